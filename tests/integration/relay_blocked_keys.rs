//! Events waiting for an earlier event of their key (a retry, a delayed
//! event) wait in `outbox.deliveries`, out of every claim's way, and come
//! due the moment that event is settled; a publisher's own delay is never
//! shortened, a key's order survives a failure beside a delayed event, a
//! huge backlog behind a retrying head costs a claim nothing, and a row
//! whose head was deleted by hand is woken by the housekeeper and counted.

use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::relay_support::{setup, Recording, RelayBed, Signal, PATIENCE};

/// The rows of `outbox.deliveries`, in queue order: (id, reason, due:
/// `infinity`, `held` while a relay holds the row, or `now`/`later`).
fn deliveries(conn: &mut PgConnection) -> Vec<(i64, String, String)> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        reason: String,
        #[diesel(sql_type = Text)]
        due: String,
    }
    diesel::sql_query(
        "SELECT id, reason,
                CASE WHEN available_at = 'infinity' THEN 'infinity'
                     WHEN token IS NOT NULL AND available_at > now() THEN 'held'
                     WHEN available_at <= now() THEN 'now'
                     ELSE 'later' END AS due
           FROM outbox.deliveries ORDER BY seq",
    )
    .load::<Row>(conn)
    .unwrap()
    .into_iter()
    .map(|r| (r.id, r.reason, r.due))
    .collect()
}

/// Seconds until event `id` is due in `outbox.deliveries`.
fn due_in(conn: &mut PgConnection, id: i64) -> f64 {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Double)]
        due_in: f64,
    }
    diesel::sql_query(
        "SELECT extract(epoch FROM available_at - now())::float8 AS due_in
           FROM outbox.deliveries WHERE id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result::<Row>(conn)
    .unwrap_or_else(|e| panic!("event {id}: {e}"))
    .due_in
}

/// Waits until the sink has been called `n` times.
fn wait_for_calls(recording: &Recording, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while recording.calls().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {:?} calls",
            recording.calls()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A two-worker relay on `bed` whose sink records every call, and whose
/// calls for the first event published (id 1) each wait for the returned
/// sender and fail when it sends `false`; other calls succeed at once. Its
/// poll is an hour away: whatever it delivers promptly, it was woken for.
fn gated_relay(bed: &RelayBed) -> (outbox::Relay, Recording, Sender<bool>) {
    let recording = Recording::new();
    let (release, gate): (Sender<bool>, Receiver<bool>) = bounded(1);
    let relay = bed
        .relay()
        .workers(2)
        .poll_interval(Duration::from_secs(3600))
        .route(
            "*",
            recording.sink(move |event| {
                if event.id.get() == 1 && !gate.recv().unwrap() {
                    return Err(outbox::DeliveryError::transient("head fails"));
                }
                Ok(())
            }),
        )
        .start()
        .unwrap();
    (relay, recording, release)
}

#[test]
fn successors_wait_in_deliveries_behind_a_retrying_head_and_follow_as_soon_as_it_is_delivered() {
    let bed = setup();
    let (relay, recording, release) = gated_relay(&bed);
    let ids = bed.publish(&[("t", Some("k")), ("t", Some("k")), ("t", Some("k"))]);
    // The head is held by the gate; it fails once, and its retry waits at
    // the gate too.
    wait_for_calls(&recording, 1);
    release.send(false).unwrap();
    wait_for_calls(&recording, 2);
    // Meanwhile the two others wait behind it in outbox.deliveries, due
    // when it settles: no claim takes them, none reads them again.
    assert_eq!(
        deliveries(&mut bed.conn()),
        [
            (ids[0].get(), "retry".to_owned(), "held".to_owned()),
            (ids[1].get(), "blocked".to_owned(), "infinity".to_owned()),
            (ids[2].get(), "blocked".to_owned(), "infinity".to_owned()),
        ]
    );
    // Delivered on its retry: the next is due at once, and then the last
    // (the poll is an hour away).
    release.send(true).unwrap();
    assert_eq!(bed.signals.delivered(3), ids);
    relay.shutdown(PATIENCE).unwrap();
    let calls: Vec<_> = recording.calls().into_iter().map(|(id, _)| id).collect();
    assert_eq!(calls, [ids[0], ids[0], ids[1], ids[2]]);
    assert!(deliveries(&mut bed.conn()).is_empty());
}

#[test]
fn a_publishers_delay_is_never_shortened_by_its_keys_progress() {
    let bed = setup();
    let (relay, recording, release) = gated_relay(&bed);
    let mut conn = bed.conn();
    let head = bed.publish(&[("t", Some("k"))])[0];
    wait_for_calls(&recording, 1);
    let delayed = outbox::transaction(&mut conn, |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic("t", serde_json::json!({}))
                .key("k")
                .delay(Duration::from_secs(3600)),
        )
    })
    .unwrap();
    let after = bed.publish(&[("t", Some("k"))])[0];
    release.send(true).unwrap();
    assert_eq!(bed.signals.delivered(1), [head]);
    // The head's delivery moved the lane on: the delayed event and the one
    // behind it are read and parked, the first till its time, the second
    // till the first is settled.
    let deadline = Instant::now() + PATIENCE;
    while deliveries(&mut conn).len() < 2 {
        assert!(Instant::now() < deadline, "never parked");
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        deliveries(&mut conn),
        [
            (delayed.get(), "delayed".to_owned(), "later".to_owned()),
            (after.get(), "blocked".to_owned(), "infinity".to_owned()),
        ]
    );
    let delay = due_in(&mut conn, delayed.get());
    assert!((3590.0..=3600.0).contains(&delay), "delay became {delay} s");
    assert_eq!(recording.calls(), [(head, 1)]);
}

#[test]
fn a_head_that_fails_beside_a_delayed_event_of_its_key_still_goes_first() {
    let bed = setup();
    let recording = Recording::new();
    // Head, a delayed event, and one more, of one key, in one transaction:
    // one claim reads all three. The head fails once.
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events([
            outbox::NewEvent::dynamic("t", serde_json::json!(0)).key("k"),
            outbox::NewEvent::dynamic("t", serde_json::json!(1))
                .key("k")
                .delay(Duration::from_millis(300)),
            outbox::NewEvent::dynamic("t", serde_json::json!(2)).key("k"),
        ])
    })
    .unwrap();
    let relay = bed
        .relay()
        .route(
            "*",
            recording.sink(|e| match (e.payload.as_i64(), e.attempts) {
                (Some(0), 1) => Err(outbox::DeliveryError::transient("head fails")),
                _ => Ok(()),
            }),
        )
        .start()
        .unwrap();
    assert_eq!(bed.signals.delivered(3), ids);
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        recording.calls(),
        [(ids[0], 1), (ids[0], 2), (ids[1], 1), (ids[2], 1)]
    );
}

/// Blocks of the outbox tables (`outbox.deliveries`, the segments of
/// `outbox.events`, the cursors, and their indexes) this session has read
/// and not yet reported to the statistics.
fn outbox_blocks_read(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Blocks {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint AS n
           FROM pg_class c
          WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'i')",
    )
    .get_result::<Blocks>(conn)
    .unwrap()
    .n
}

/// Publishes one more event of key `hot` and claims once (the claim parks
/// it behind the backlog and returns nothing); returns the blocks of the
/// outbox tables that claim read. A first claim, rolled back, plans
/// the statements, as a relay's connection keeps them planned.
fn claim_behind_the_backlog(bed: &RelayBed, conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let more = bed.publish(&[("t", Some("hot"))]);
    // What autovacuum does within a minute of a burst (its threshold on
    // outbox.deliveries is 1,000 rows); until then a relay's cached plans
    // may be those of a small table.
    diesel::sql_query("ANALYZE outbox.deliveries")
        .execute(conn)
        .unwrap();
    let claim =
        "SELECT id FROM outbox.claim('default', 0, 'probe', 100, 30000000, true, '{}', '{}')
                  WHERE id <> 0";
    let warm_up = conn.transaction(|conn| {
        diesel::sql_query(claim).execute(conn)?;
        Err::<(), _>(diesel::result::Error::RollbackTransaction)
    });
    assert!(warm_up.is_err());
    let blocks = conn
        .transaction(|conn| {
            // Statistics of the session not yet reported count too: the
            // difference is this claim's.
            let before = outbox_blocks_read(conn);
            let claimed: Vec<i64> = diesel::sql_query(claim)
                .load::<Claimed>(conn)?
                .into_iter()
                .map(|c| c.id)
                .collect();
            assert_eq!(claimed, Vec::<i64>::new());
            diesel::result::QueryResult::Ok(outbox_blocks_read(conn) - before)
        })
        .unwrap();
    assert_eq!(
        deliveries(conn).last(),
        Some(&(more[0].get(), "blocked".to_owned(), "infinity".to_owned()))
    );
    blocks
}

/// Publishes `n` events of key `hot` in one transaction and has probe
/// claims park them all.
fn grow_the_backlog(conn: &mut PgConnection, n: usize) {
    let target = crate::common::count(conn, "outbox.deliveries") + n as i64;
    outbox::transaction(conn, |tx| {
        tx.publish_events(
            (0..n).map(|i| outbox::NewEvent::dynamic("t", serde_json::json!(i)).key("hot")),
        )
    })
    .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while crate::common::count(conn, "outbox.deliveries") < target {
        assert!(Instant::now() < deadline, "the backlog was never parked");
        diesel::sql_query(
            "SELECT count(*) FROM outbox.claim('default', 0, 'probe', 1000, 30000000, true, '{}', '{}')",
        )
        .execute(conn)
        .unwrap();
    }
}

#[test]
fn a_huge_backlog_behind_a_retrying_head_costs_a_claim_nothing_more() {
    let bed = setup();
    let mut conn = bed.conn();
    // The head fails and retries in an hour; the events of its key are
    // parked behind it as they are read from the log.
    let relay = bed
        .relay()
        .batch_size(1_000)
        .backoff(outbox::Backoff::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            2.0,
            0.0,
        ))
        .route("*", |e: &outbox::StoredEvent| {
            if e.key.is_some() {
                Err(outbox::DeliveryError::transient("head fails"))
            } else {
                Ok(())
            }
        })
        .start()
        .unwrap();
    let head = bed.publish(&[("t", Some("hot"))])[0];
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Retry { .. })));
    grow_the_backlog(&mut conn, 1_000);
    // Keyless events still pass, promptly.
    let keyless = bed.publish(&[("t", None), ("t", None)]);
    let mut delivered = bed.signals.delivered(2);
    delivered.sort();
    assert_eq!(delivered, keyless);
    relay.shutdown(PATIENCE).unwrap();
    // Only the head was ever attempted: the rest was read from the log
    // once and parked.
    let parked = deliveries(&mut conn);
    assert_eq!(
        parked[0],
        (head.get(), "retry".to_owned(), "later".to_owned())
    );
    assert!(parked[1..]
        .iter()
        .all(|(_, reason, due)| reason == "blocked" && due == "infinity"));

    // A claim behind 20,000 parked events reads about what it reads behind
    // 1,000 (a few more index levels): never as much as one pass over the
    // parked rows.
    let small = claim_behind_the_backlog(&bed, &mut conn);
    grow_the_backlog(&mut conn, 19_000);
    let large = claim_behind_the_backlog(&bed, &mut conn);
    #[derive(QueryableByName)]
    struct Pages {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let one_pass =
        diesel::sql_query("SELECT (pg_relation_size('outbox.deliveries') / 8192)::bigint AS n")
            .get_result::<Pages>(&mut conn)
            .unwrap()
            .n;
    println!(
        "blocks of the outbox tables per claim: {small} behind 1,000, {large} behind 20,000 \
         (the parked rows fill {one_pass} pages)"
    );
    assert!(
        large - small < one_pass,
        "one claim read {small} blocks of the outbox tables behind 1,000 parked events, \
         {large} behind 20,000 (whose rows fill {one_pass} pages)"
    );
}

#[test]
fn a_row_stranded_behind_a_head_deleted_by_hand_is_woken_by_the_housekeeper_and_counted() {
    let bed = setup();
    let mut conn = bed.conn();
    // The head fails and retries in an hour; its successor waits behind.
    let failing = bed
        .relay()
        .backoff(outbox::Backoff::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            2.0,
            0.0,
        ))
        .route("*", |_: &outbox::StoredEvent| {
            Err(outbox::DeliveryError::transient("head fails"))
        })
        .start()
        .unwrap();
    let ids = outbox::transaction(&mut conn, |tx| {
        tx.publish_events(
            (0..2).map(|n| outbox::NewEvent::dynamic("t", serde_json::json!(n)).key("k")),
        )
    })
    .unwrap();
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Retry { .. })));
    failing.shutdown(PATIENCE).unwrap();
    assert_eq!(
        deliveries(&mut conn),
        [
            (ids[0].get(), "retry".to_owned(), "later".to_owned()),
            (ids[1].get(), "blocked".to_owned(), "infinity".to_owned()),
        ]
    );
    // An operator deletes the head by hand: no settle will ever wake its
    // successor. The next relay's housekeeper does, at its start, and says
    // so.
    diesel::sql_query("DELETE FROM outbox.deliveries WHERE id = $1")
        .bind::<BigInt, _>(ids[0].get())
        .execute(&mut conn)
        .unwrap();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .poll_interval(Duration::from_secs(3600))
        .route("*", recording.sink(|_| Ok(())))
        .start()
        .unwrap();
    let seen = bed.signals.until(|s| {
        s.iter()
            .any(|s| matches!(s, Signal::Delivered { id, .. } if *id == ids[1]))
    });
    assert!(
        seen.contains(&Signal::StrandedRescued(vec![ids[1]])),
        "{seen:#?}"
    );
    assert_eq!(relay.stats().stranded_rescued, 1);
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(recording.calls(), [(ids[1], 1)]);
    assert!(deliveries(&mut conn).is_empty());
}
