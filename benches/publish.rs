//! Publish cost: a business transaction alone, with one and ten outbox
//! events, and the same rows written by hand-written SQL (the baseline).
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench publish`
//! (without `DATABASE_URL`, a throwaway cluster with fsync off is used).

#[path = "../tests/support/pg.rs"]
mod pg;

use std::sync::atomic::{AtomicI64, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::Serialize;

#[derive(Serialize)]
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

static NEXT_ORDER: AtomicI64 = AtomicI64::new(1);

fn next_order() -> i64 {
    NEXT_ORDER.fetch_add(1, Ordering::Relaxed)
}

fn insert_order(conn: &mut PgConnection, id: i64) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO orders (id, status) VALUES ($1, 'approved')")
        .bind::<BigInt, _>(id)
        .execute(conn)
}

fn event(order_id: i64) -> OrderApproved {
    OrderApproved {
        order_id,
        email: format!("customer{order_id}@example.com"),
    }
}

/// The baseline: the event rows as a user would write them by hand.
fn raw_insert_events(conn: &mut PgConnection, order_id: i64, n: usize) -> QueryResult<usize> {
    let mut sql = String::from("INSERT INTO outbox.events (topic, key, payload) VALUES ");
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("('order.approved', $1, ${}::jsonb)", i + 2));
    }
    let mut query = diesel::sql_query(sql)
        .bind::<Text, _>(format!("order-{order_id}"))
        .into_boxed();
    for _ in 0..n {
        let payload = serde_json::to_string(&event(order_id)).unwrap();
        query = query.bind::<Text, _>(payload);
    }
    query.execute(conn)
}

fn publish(c: &mut Criterion) {
    let db = pg::test_db();
    let mut conn = db.conn();
    diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        .execute(&mut conn)
        .unwrap();

    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);

    group.bench_function(BenchmarkId::new("business_row_only", 0), |b| {
        b.iter(|| {
            conn.transaction(|tx| insert_order(tx, next_order()))
                .unwrap()
        })
    });
    for events in [1usize, 10] {
        group.bench_function(BenchmarkId::new("raw_sql", events), |b| {
            b.iter(|| {
                conn.transaction(|tx| {
                    let id = next_order();
                    insert_order(tx, id)?;
                    raw_insert_events(tx, id, events)
                })
                .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("outbox_transaction", events), |b| {
            b.iter(|| {
                outbox::transaction(&mut conn, |tx| {
                    let id = next_order();
                    insert_order(tx.conn(), id)?;
                    if events == 1 {
                        tx.publish(&event(id)).map(|_| ())
                    } else {
                        let batch: Vec<_> = (0..events).map(|_| event(id)).collect();
                        tx.publish_all(&batch).map(|_| ())
                    }
                })
                .unwrap()
            })
        });
    }
    group.finish();
    // Keep the queue from growing across benchmark runs on a shared server.
    diesel::sql_query("TRUNCATE outbox.events")
        .execute(&mut conn)
        .unwrap();
}

criterion_group!(benches, publish);
criterion_main!(benches);
