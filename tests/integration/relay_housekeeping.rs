//! The relay vacuums `outbox.events` itself after enough settled events,
//! unless told not to.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::relay_support::{setup, RelayBed, PATIENCE};

/// Manual VACUUMs of `outbox.events` so far (autovacuum counts apart).
fn vacuums(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT vacuum_count AS n FROM pg_stat_user_tables
          WHERE relid = 'outbox.events'::regclass",
    )
    .get_result::<Count>(conn)
    .unwrap()
    .n
}

/// Publishes `n` keyless events in one statement and lets `relay` (built
/// on `bed`) deliver them all.
fn deliver(bed: &RelayBed, relay: outbox::RelayBuilder, n: usize) -> outbox::Relay {
    let relay = relay
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let events: Vec<_> = (0..n)
        .map(|i| outbox::NewEvent::dynamic("t", serde_json::json!({ "i": i })))
        .collect();
    outbox::transaction(&mut bed.conn(), |tx| tx.publish_events(events)).unwrap();
    assert_eq!(bed.signals.delivered(n).len(), n);
    relay
}

#[test]
fn a_busy_relay_vacuums_its_table() {
    let bed = setup();
    let mut conn = bed.conn();
    assert_eq!(vacuums(&mut conn), 0);
    let relay = deliver(&bed, bed.relay(), 2_500);
    // Statistics reach other sessions within a second or so.
    let deadline = Instant::now() + PATIENCE;
    while vacuums(&mut conn) == 0 {
        assert!(Instant::now() < deadline, "the relay never vacuumed");
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_relay_told_not_to_never_vacuums() {
    let bed = setup();
    let relay = deliver(&bed, bed.relay().vacuum(false), 2_500);
    std::thread::sleep(Duration::from_millis(1_500));
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(vacuums(&mut bed.conn()), 0);
}
