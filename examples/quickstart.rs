//! The outbox in one story: an approved order and its email event commit
//! together, and a failed order leaves neither behind.
//!
//! Runs against `DATABASE_URL` when it is set, otherwise against a throwaway
//! PostgreSQL cluster started from the local installation.

#[path = "../tests/support/pg.rs"]
mod pg;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::{Deserialize, Serialize};

/// The event the email service must hear about.
#[derive(Debug, Serialize, Deserialize)]
struct OrderApproved {
    order_id: i64,
    email: String,
}

impl outbox::Event for OrderApproved {
    const TOPIC: &'static str = "order.approved";

    fn key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id))
    }
}

/// The application's own error type: `outbox::transaction` only asks that it
/// converts from `diesel::result::Error`.
#[derive(Debug)]
enum ApproveError {
    Database(outbox::Error),
    NoEmailAddress,
}

impl From<diesel::result::Error> for ApproveError {
    fn from(error: diesel::result::Error) -> Self {
        ApproveError::Database(error.into())
    }
}

impl std::fmt::Display for ApproveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApproveError::Database(e) => write!(f, "{e}"),
            ApproveError::NoEmailAddress => f.write_str("the order has no email address"),
        }
    }
}

impl std::error::Error for ApproveError {}

/// Approves an order: the order row and the event, in one transaction.
fn approve(
    conn: &mut PgConnection,
    order_id: i64,
    email: &str,
) -> Result<outbox::EventId, ApproveError> {
    outbox::transaction(conn, |tx| {
        diesel::sql_query("INSERT INTO orders (id, email, status) VALUES ($1, $2, 'approved')")
            .bind::<BigInt, _>(order_id)
            .bind::<Text, _>(email)
            .execute(tx.conn())?;
        let id = tx.publish(&OrderApproved {
            order_id,
            email: email.to_owned(),
        })?;
        if email.is_empty() {
            // Business rule checked after the writes: the whole transaction,
            // event included, rolls back.
            return Err(ApproveError::NoEmailAddress);
        }
        Ok(id)
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = pg::test_db();
    let mut conn = db.conn();
    outbox::migrate(&mut conn)?;
    diesel::sql_query(
        "CREATE TABLE orders (id bigint PRIMARY KEY, email text NOT NULL, status text NOT NULL)",
    )
    .execute(&mut conn)?;

    let id = approve(&mut conn, 7, "ada@example.com")?;
    println!("order 7 approved; event {id} queued for the email service");

    match approve(&mut conn, 8, "") {
        Ok(_) => unreachable!("order 8 has no email address"),
        Err(e) => println!("order 8 failed ({e}); its transaction rolled back"),
    }

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let orders = diesel::sql_query("SELECT count(*) AS n FROM orders")
        .get_result::<Count>(&mut conn)?
        .n;
    let queued = outbox::queued_events(&mut conn, 100)?;
    println!(
        "orders in the table: {orders}; events in the outbox: {}",
        queued.len()
    );
    for event in &queued {
        println!(
            "  event {} topic={} key={:?} payload={}",
            event.id,
            event.topic,
            event.key.as_deref().unwrap_or("-"),
            event.payload
        );
    }
    assert_eq!(
        (orders, queued.len()),
        (1, 1),
        "exactly the committed order and its event"
    );
    Ok(())
}
