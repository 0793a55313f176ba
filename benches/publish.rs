//! Publish cost.
//!
//! - `publish`: one publisher; a business transaction alone, and with one
//!   and ten events: written by a hand-written INSERT into a plain table of
//!   the log's columns (`plain_insert`, the baseline: what an application
//!   pays for any table of events), by a hand-written INSERT into
//!   `outbox.events` (`raw_sql`), and through `outbox::transaction` with 0,
//!   1 and 5 named subscriptions registered (`outbox_transaction/subsS`;
//!   the default subscription is removed, so S is every subscription).
//!   Each candidate starts from empty tables.
//! - `concurrent_publishers`: 1, 4 and 16 publishers committing a business
//!   row and an event each, while a relay (listening, 4 workers) delivers
//!   them, with three wake-up designs: the shipped one (`wake_on_demand`:
//!   NOTIFY only while the relay sleeps), no notifications at all
//!   (`no_notify`, the trigger disabled: the baseline) and a trigger that
//!   always notifies (`always_notify`, the first release's design).
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench publish`
//! (without `DATABASE_URL`, a throwaway cluster with fsync off is used).

#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "support/raw.rs"]
mod raw;

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diesel::connection::SimpleConnection;
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

/// The event rows as a user would write them by hand into `table`
/// (`bench.events`, the baseline, or `outbox.events`).
fn raw_insert_events(
    conn: &mut PgConnection,
    table: &str,
    order_id: i64,
    n: usize,
) -> QueryResult<usize> {
    let mut sql = format!("INSERT INTO {table} (topic, key, payload) VALUES ");
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

/// Exactly `n` subscriptions, all named (`sub-0` …), for `order.*`.
fn set_subscriptions(conn: &mut PgConnection, n: usize) {
    conn.batch_execute("DELETE FROM outbox.subscriptions")
        .unwrap();
    for i in 0..n {
        outbox::register_subscription(conn, &format!("sub-{i}"), &["order.*"]).unwrap();
    }
}

/// Every candidate starts from empty tables (nothing delivers here, so
/// the log would otherwise grow from one candidate to the next).
fn empty_tables(conn: &mut PgConnection) {
    conn.batch_execute("TRUNCATE orders, bench.events, outbox.events, outbox.idempotency_keys")
        .unwrap();
    conn.batch_execute(
        "VACUUM ANALYZE orders, bench.events, outbox.events, outbox.idempotency_keys",
    )
    .unwrap();
}

fn publish(c: &mut Criterion) {
    let db = pg::test_db();
    let mut conn = db.conn();
    diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        .execute(&mut conn)
        .unwrap();
    raw::create_tables(&mut conn);
    set_subscriptions(&mut conn, 0);

    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);

    empty_tables(&mut conn);
    group.bench_function(BenchmarkId::new("business_row_only", 0), |b| {
        b.iter(|| {
            conn.transaction(|tx| insert_order(tx, next_order()))
                .unwrap()
        })
    });
    for events in [1usize, 10] {
        for (name, table) in [
            ("plain_insert", "bench.events"),
            ("raw_sql", "outbox.events"),
        ] {
            empty_tables(&mut conn);
            group.bench_function(BenchmarkId::new(name, events), |b| {
                b.iter(|| {
                    conn.transaction(|tx| {
                        let id = next_order();
                        insert_order(tx, id)?;
                        raw_insert_events(tx, table, id, events)
                    })
                    .unwrap()
                })
            });
        }
        for subscriptions in [0usize, 1, 5] {
            set_subscriptions(&mut conn, subscriptions);
            empty_tables(&mut conn);
            group.bench_function(
                BenchmarkId::new(format!("outbox_transaction/subs{subscriptions}"), events),
                |b| {
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
                },
            );
        }
        set_subscriptions(&mut conn, 0);
    }
    // Without diesel's statement cache, as behind PgBouncer
    // (outbox::NoStatementCache), beside outbox_transaction/subs0/1.
    empty_tables(&mut conn);
    conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
    group.bench_function(
        BenchmarkId::new("outbox_transaction/no_statement_cache", 1),
        |b| {
            b.iter(|| {
                outbox::transaction(&mut conn, |tx| {
                    let id = next_order();
                    insert_order(tx.conn(), id)?;
                    tx.publish(&event(id)).map(|_| ())
                })
                .unwrap()
            })
        },
    );
    conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Unbounded);
    // An idempotency key on every event (each new): the key's row and
    // index entry, and the one-statement claim-and-insert, beside
    // raw_sql/1 and outbox_transaction/subs0/1 above.
    empty_tables(&mut conn);
    group.bench_function(BenchmarkId::new("outbox_transaction/idempotent", 1), |b| {
        b.iter(|| {
            outbox::transaction(&mut conn, |tx| {
                let id = next_order();
                insert_order(tx.conn(), id)?;
                tx.publish_event(
                    outbox::NewEvent::typed(&event(id)).idempotency_key(format!("order-{id}")),
                )
                .map(|_| ())
            })
            .unwrap()
        })
    });
    group.finish();
    // Keep the log from growing across benchmark runs on a shared server.
    empty_tables(&mut conn);
}

/// The trigger function of the first release: NOTIFY on every insert.
const ALWAYS_NOTIFY: &str = "CREATE OR REPLACE FUNCTION outbox.notify_events_inserted()
     RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN PERFORM pg_notify('outbox_events', ''); RETURN NULL; END; $$";

/// A database with one wake-up design, and a relay delivering from it.
struct Design {
    db: pg::TestDb,
    relay: outbox::Relay,
}

impl Design {
    fn start(design: &str) -> Self {
        let db = pg::test_db();
        let mut setup = db.conn();
        diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
            .execute(&mut setup)
            .unwrap();
        match design {
            "no_notify" => {
                diesel::sql_query("ALTER TABLE outbox.events DISABLE TRIGGER events_notify")
                    .execute(&mut setup)
                    .unwrap();
            }
            "always_notify" => {
                diesel::sql_query(ALWAYS_NOTIFY)
                    .execute(&mut setup)
                    .unwrap();
            }
            _ => {}
        }
        let pool = diesel::r2d2::Pool::builder()
            .max_size(5)
            .build(diesel::r2d2::ConnectionManager::new(db.url()))
            .unwrap();
        let relay = outbox::Relay::builder(pool)
            .listen(db.url())
            .route("*", |_: &outbox::StoredEvent| Ok(()))
            .start()
            .unwrap();
        Design { db, relay }
    }
}

fn concurrent_publishers(c: &mut Criterion) {
    /// Transactions per publisher per iteration.
    const EACH: usize = 64;
    let mut group = c.benchmark_group("concurrent_publishers");
    group.sampling_mode(criterion::SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    // Every design's database and relay first, then the designs side by
    // side for each publisher count: drift in the machine's load then
    // shows in all three alike. An idle relay sleeps, costing nothing.
    let designs: Vec<_> = ["wake_on_demand", "no_notify", "always_notify"]
        .into_iter()
        .map(|design| (design, Design::start(design)))
        .collect();
    for publishers in [1usize, 4, 16] {
        group.throughput(Throughput::Elements((publishers * EACH) as u64));
        for (name, design) in &designs {
            let mut conns: Vec<PgConnection> = (0..publishers).map(|_| design.db.conn()).collect();
            group.bench_function(BenchmarkId::new(*name, publishers), |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for _ in 0..iters {
                        std::thread::scope(|scope| {
                            for conn in conns.iter_mut() {
                                scope.spawn(move || {
                                    for _ in 0..EACH {
                                        outbox::transaction(conn, |tx| {
                                            let id = next_order();
                                            insert_order(tx.conn(), id)?;
                                            tx.publish(&event(id)).map(|_| ())
                                        })
                                        .unwrap();
                                    }
                                });
                            }
                        });
                    }
                    started.elapsed()
                })
            });
        }
    }
    for (_, design) in designs {
        design.relay.shutdown(Duration::from_secs(30)).unwrap();
    }
    group.finish();
}

criterion_group!(benches, publish, concurrent_publishers);
criterion_main!(benches);
