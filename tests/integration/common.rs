//! Helpers shared by the integration tests.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use serde::{Deserialize, Serialize};

/// The seed's event: an order was approved, an email must go out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderApproved {
    pub order_id: i64,
    pub email: String,
}

impl outbox::Event for OrderApproved {
    const TOPIC: &'static str = "order.approved";

    fn key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id))
    }
}

pub fn approved(order_id: i64) -> OrderApproved {
    OrderApproved {
        order_id,
        email: format!("customer{order_id}@example.com"),
    }
}

/// Creates the business table the tests write next to their events.
pub fn create_orders(conn: &mut PgConnection) {
    diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        .execute(conn)
        .expect("creating orders");
}

/// Inserts an order row: the business write of a test transaction.
pub fn insert_order(conn: &mut PgConnection, id: i64) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO orders (id, status) VALUES ($1, 'approved')")
        .bind::<BigInt, _>(id)
        .execute(conn)
}

/// `SELECT count(*)` of a table.
pub fn count(conn: &mut PgConnection, table: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
        .get_result::<Count>(conn)
        .unwrap_or_else(|e| panic!("counting {table}: {e}"))
        .n
}

/// What is still owed to some subscription (`outbox.pending`): 0 means
/// nothing is left to deliver. (`outbox.events` is a log now: delivered
/// events stay in it until a whole segment is reclaimed.)
pub fn pending(conn: &mut PgConnection) -> i64 {
    count(conn, "outbox.pending")
}
