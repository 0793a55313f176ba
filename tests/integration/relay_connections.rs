//! Lost connections: terminating every backend of a relay never stops it.
//! It reconnects, catches up on what it missed, and loses nothing.

use std::time::Duration;

use diesel::prelude::*;

use crate::common::pending;
use crate::relay_support::{setup, Signal, PATIENCE};

/// Terminates every backend on this database except the caller's.
fn terminate_all_other_backends(conn: &mut PgConnection) -> usize {
    #[derive(QueryableByName)]
    struct Killed {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) AS n
           FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .get_result::<Killed>(conn)
    .unwrap()
    .n as usize
}

#[test]
fn a_relay_survives_terminated_connections_and_loses_nothing() {
    let bed = setup();
    // The poll is an hour away: after each kill, delivery depends on the
    // listener reconnecting (and catching up at once) and on the workers
    // getting fresh connections from the pool.
    let relay = bed
        .relay()
        .poll_interval(Duration::from_secs(3600))
        .workers(2)
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let mut admin = bed.conn();
    let mut published = Vec::new();
    let mut delivered = Vec::new();
    for round in 0..3 {
        // Make sure the relay has connections to lose.
        let ids = bed.publish(&[("t", None)]);
        delivered.extend(bed.signals.delivered(1));
        published.extend(ids);

        let killed = terminate_all_other_backends(&mut admin);
        assert!(killed >= 2, "round {round}: only {killed} backends to kill");
        bed.signals
            .until(|s| s.contains(&Signal::Reconnected("listener")));

        let ids = bed.publish(&vec![("t", None); 20]);
        delivered.extend(bed.signals.delivered(20));
        published.extend(ids);
    }
    assert!(relay.stats().reconnects >= 3, "{:?}", relay.stats());
    relay.shutdown(PATIENCE).unwrap();
    delivered.sort();
    assert_eq!(delivered, published);
    assert_eq!(pending(&mut admin), 0);
}

#[test]
fn events_published_while_the_listener_was_away_are_found_on_reconnect() {
    let bed = setup();
    let relay = bed
        .relay()
        .poll_interval(Duration::from_secs(3600))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), ids);

    // Kill, and publish before the listener is back: that notification is
    // lost, and only the catch-up round after reconnecting can find it.
    let mut admin = bed.conn();
    terminate_all_other_backends(&mut admin);
    let missed = bed.publish(&[("t", None), ("t", None)]);
    let mut delivered = bed.signals.delivered(2);
    delivered.sort();
    assert_eq!(delivered, missed);
    relay.shutdown(PATIENCE).unwrap();
}
