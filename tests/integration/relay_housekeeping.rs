//! The relay's housekeeper: it vacuums `outbox.deliveries` and
//! `outbox.cursors` itself after enough settled events (unless told not
//! to), and gives the log's storage back by truncating the segments of
//! `outbox.events` every subscription has passed.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::common::{count, pending};
use crate::relay_support::{setup, RelayBed, PATIENCE};

/// Manual VACUUMs of `outbox.deliveries` so far (autovacuum counts apart).
fn vacuums(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT vacuum_count AS n FROM pg_stat_user_tables
          WHERE relid = 'outbox.deliveries'::regclass",
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
fn a_busy_relay_vacuums_its_queue_table() {
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

/// Consumes transaction ids until the next 2^14-xid range of the log
/// (the unit its segments are truncated by) has begun after the newest
/// event's: subtransactions that each write a row take one each.
fn move_past_the_newest_events_range(conn: &mut PgConnection) {
    #[derive(QueryableByName)]
    struct Needed {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let needed = diesel::sql_query(
        "SELECT greatest(((((SELECT max(tx) FROM outbox.events)::text::bigint >> 14) + 1) << 14)
                         - pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1, 0)::bigint AS n",
    )
    .get_result::<Needed>(conn)
    .unwrap()
    .n;
    diesel::sql_query(format!(
        "DO $$
         BEGIN
             CREATE TEMP TABLE burn (x int);
             FOR i IN 1..{needed} LOOP
                 BEGIN
                     INSERT INTO burn VALUES (i);
                 EXCEPTION WHEN others THEN NULL;
                 END;
             END LOOP;
             DROP TABLE burn;
         END
         $$"
    ))
    .execute(conn)
    .unwrap();
}

#[test]
fn the_housekeeper_truncates_the_segments_every_subscription_has_passed() {
    let bed = setup();
    let mut conn = bed.conn();
    let relay = deliver(&bed, bed.relay(), 500);
    // Delivered, but still in the log: rows of the log are never deleted
    // one by one.
    assert_eq!(count(&mut conn, "outbox.events"), 500);
    assert_eq!(pending(&mut conn), 0);
    move_past_the_newest_events_range(&mut conn);
    // One more event keeps the relay busy (so it reclaims every few
    // seconds); it lives in the current segment, which is kept.
    let last = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), last);
    let deadline = Instant::now() + PATIENCE;
    while count(&mut conn, "outbox.events") > 1 {
        assert!(
            Instant::now() < deadline,
            "the old segment was never truncated"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.shutdown(PATIENCE).unwrap();
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let left = diesel::sql_query("SELECT id FROM outbox.events")
        .load::<Id>(&mut conn)
        .unwrap();
    assert_eq!(
        left.iter().map(|r| r.id).collect::<Vec<_>>(),
        [last[0].get()]
    );
    assert_eq!(pending(&mut conn), 0);
}

#[test]
fn a_segment_a_subscription_has_not_passed_is_kept() {
    let bed = setup();
    let mut conn = bed.conn();
    // "slow" is registered but nobody serves it: it still owes every event.
    outbox::register_subscription(&mut conn, "slow", &["t"]).unwrap();
    let relay = deliver(&bed, bed.relay(), 100);
    move_past_the_newest_events_range(&mut conn);
    let last = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), last);
    // The housekeeper runs, and keeps everything "slow" has not read.
    #[derive(QueryableByName)]
    struct Segment {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        s: i32,
    }
    let truncated = diesel::sql_query("SELECT s FROM outbox.reclaim() AS s")
        .load::<Segment>(&mut conn)
        .unwrap();
    assert!(
        truncated.is_empty(),
        "truncated {:?}",
        truncated.iter().map(|s| s.s).collect::<Vec<_>>()
    );
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(count(&mut conn, "outbox.events"), 101);
    let owed: Vec<_> = outbox::queued_events(&mut conn, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.subscription == "slow")
        .collect();
    assert_eq!(owed.len(), 101);
}
