//! The operator API: queue status, and listing, showing, replaying and
//! purging dead letters.

use diesel::connection::SimpleConnection;

use crate::common::count;
use crate::relay_support::{setup, Signal, PATIENCE};

/// Rows in every state, written as relays would have left them.
const QUEUE: &str = "
    INSERT INTO outbox.events (topic, payload, created_at, available_at, attempts, claim_token) VALUES
      ('a', '{}', now() - interval '10 minutes', now() - interval '1 minute', 0, NULL), -- due
      ('a', '{}', now(), now(), 0, NULL),                                              -- due
      ('a', '{}', now(), now() + interval '1 hour', 0, NULL),                          -- delayed
      ('a', '{}', now(), now() + interval '30 seconds', 1, 42),                        -- in flight
      ('a', '{}', now(), now() + interval '5 minutes', 2, NULL),                       -- backing off
      ('a', '{}', now(), now() - interval '1 second', 3, NULL),                        -- due for a retry
      ('b', '{}', now() - interval '2 minutes', now(), 0, NULL);                       -- due
    INSERT INTO outbox.dead_letters (id, topic, payload, headers, created_at, attempts, last_error, failed_at) VALUES
      (1001, 'c', '{\"n\": 1}', '{}', now() - interval '3 days', 25, 'gave up after 25 attempts: 503', now() - interval '2 days'),
      (1002, 'c', '{\"n\": 2}', '{\"traceparent\": \"00-abc-01\"}', now() - interval '1 hour', 1, 'permanent failure: 422', now() - interval '30 minutes'),
      (1003, 'a', '{\"n\": 3}', '{}', now() - interval '1 hour', 1, 'permanent failure: 404', now() - interval '10 minutes');";

#[test]
fn status_counts_every_state_overall_and_per_topic() {
    let bed = setup();
    let mut conn = bed.conn();
    conn.batch_execute(QUEUE).unwrap();
    let status = outbox::status(&mut conn).unwrap();

    let counts = |s: &outbox::QueueCounts| {
        (
            s.pending,
            s.due_now,
            s.scheduled,
            s.in_flight,
            s.retrying,
            s.dead_letters,
        )
    };
    assert_eq!(counts(&status.total), (7, 4, 2, 1, 2, 3));
    let topics: Vec<_> = status
        .topics
        .iter()
        .map(|t| (t.topic.as_str(), counts(&t.counts)))
        .collect();
    assert_eq!(
        topics,
        [
            ("a", (6, 3, 2, 1, 2, 1)),
            ("b", (1, 1, 0, 0, 0, 0)),
            ("c", (0, 0, 0, 0, 0, 2))
        ]
    );
    let oldest = status.total.oldest_pending_age_seconds.unwrap();
    assert!((600.0..660.0).contains(&oldest), "{oldest}");
    assert_eq!(status.topics[2].counts.oldest_pending_age_seconds, None);
}

#[test]
fn dead_letters_are_listed_newest_first_filtered_and_shown_in_full() {
    let bed = setup();
    let mut conn = bed.conn();
    conn.batch_execute(QUEUE).unwrap();

    let ids = |list: &[outbox::DeadLetter]| list.iter().map(|d| d.id.get()).collect::<Vec<_>>();
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, None, None, 100).unwrap()),
        [1003, 1002, 1001]
    );
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, Some("c"), None, 100).unwrap()),
        [1002, 1001]
    );
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, None, None, 1).unwrap()),
        [1003]
    );
    let day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, None, Some(day_ago), 100).unwrap()),
        [1003, 1002]
    );

    let shown = outbox::dead_letter(&mut conn, outbox::EventId(1002))
        .unwrap()
        .unwrap();
    assert_eq!(shown.topic, "c");
    assert_eq!(shown.payload, serde_json::json!({ "n": 2 }));
    assert_eq!(shown.headers["traceparent"], "00-abc-01");
    assert_eq!(
        (shown.attempts, shown.last_error.as_str()),
        (1, "permanent failure: 422")
    );
    assert_eq!(
        outbox::dead_letter(&mut conn, outbox::EventId(9)).unwrap(),
        None
    );
}

#[test]
fn replay_returns_dead_letters_to_the_queue_with_their_ids_and_the_relay_delivers_them() {
    let bed = setup();
    let mut conn = bed.conn();
    conn.batch_execute(QUEUE).unwrap();
    conn.batch_execute("DELETE FROM outbox.events").unwrap();

    let selection = outbox::Selection::Topic("c".into());
    assert_eq!(
        outbox::count_dead_letters(&mut conn, &selection).unwrap(),
        2
    );
    let mut progress = Vec::new();
    let replayed =
        outbox::replay_dead_letters(&mut conn, &selection, 1, |done| progress.push(done)).unwrap();
    assert_eq!((replayed, progress), (2, vec![1, 2]));

    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    let state: Vec<_> = queued
        .iter()
        .map(|e| (e.id.get(), e.topic.as_str(), e.attempts))
        .collect();
    assert_eq!(state, [(1001, "c", 0), (1002, "c", 0)]);
    assert_eq!(
        queued[0].last_error.as_deref(),
        Some("gave up after 25 attempts: 503")
    );
    assert!(queued.iter().all(|e| e.available_at <= chrono::Utc::now()));
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 1);

    let relay = bed
        .relay()
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let mut delivered = bed.signals.delivered(2);
    relay.shutdown(PATIENCE).unwrap();
    delivered.sort();
    assert_eq!(delivered, [outbox::EventId(1001), outbox::EventId(1002)]);
    assert!(!bed
        .signals
        .0
        .try_iter()
        .any(|s| matches!(s, Signal::Dead { .. })));
}

#[test]
fn purge_deletes_exactly_the_selection() {
    let bed = setup();
    let mut conn = bed.conn();
    conn.batch_execute(QUEUE).unwrap();
    let remaining = |conn: &mut diesel::PgConnection| {
        outbox::dead_letters(conn, None, None, 100)
            .unwrap()
            .iter()
            .map(|d| d.id.get())
            .collect::<Vec<_>>()
    };

    let day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    assert_eq!(
        outbox::purge_dead_letters(&mut conn, &outbox::Selection::FailedBefore(day_ago)).unwrap(),
        1
    );
    assert_eq!(remaining(&mut conn), [1003, 1002]);
    let ids = outbox::Selection::Ids(vec![outbox::EventId(1002), outbox::EventId(77)]);
    assert_eq!(outbox::purge_dead_letters(&mut conn, &ids).unwrap(), 1);
    assert_eq!(remaining(&mut conn), [1003]);
    assert_eq!(
        outbox::purge_dead_letters(&mut conn, &outbox::Selection::Topic("c".into())).unwrap(),
        0
    );
    assert_eq!(
        outbox::purge_dead_letters(&mut conn, &outbox::Selection::All).unwrap(),
        1
    );
    assert_eq!(remaining(&mut conn), Vec::<i64>::new());
    assert_eq!(
        count(&mut conn, "outbox.events"),
        7,
        "the queue is untouched"
    );
}
