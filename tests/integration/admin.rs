//! The operator API: what is owed, and listing, showing, replaying and
//! purging dead letters, per subscription.

use diesel::connection::SimpleConnection;

use crate::common::count;
use crate::relay_support::{setup, Signal, PATIENCE};

/// Rows in every state, written as publishers and relays would have left
/// them: unread events in the log, rows of the default subscription's
/// `outbox.deliveries`, and dead letters of two subscriptions (event 1002
/// died in both).
const QUEUE: &str = "
    SELECT outbox.subscribe('email', '{c}', false, '{c}', '{}');
    INSERT INTO outbox.events (topic, payload, created_at, available_at) VALUES
      ('a', '{}', now() - interval '10 minutes', now() - interval '1 minute'), -- due
      ('a', '{}', now(), now()),                                              -- due
      ('a', '{}', now(), now() + interval '1 hour'),                          -- delayed
      ('b', '{}', now() - interval '2 minutes', now());                       -- due
    INSERT INTO outbox.deliveries (subscription, id, topic, payload, headers, created_at, available_at, attempts, reason, token) VALUES
      ('default', 2001, 'a', '{}', '{}', now(), now() + interval '30 seconds', 1, 'queued', 42), -- in flight
      ('default', 2002, 'a', '{}', '{}', now(), now() + interval '5 minutes', 2, 'retry', NULL), -- backing off
      ('default', 2003, 'a', '{}', '{}', now(), now() - interval '1 second', 3, 'retry', NULL);  -- due for a retry
    INSERT INTO outbox.dead_letters (subscription, id, topic, payload, headers, created_at, attempts, last_error, failed_at) VALUES
      ('default', 1001, 'c', '{\"n\": 1}', '{}', now() - interval '3 days', 25, 'gave up after 25 attempts: 503', now() - interval '2 days'),
      ('default', 1002, 'c', '{\"n\": 2}', '{\"traceparent\": \"00-abc-01\"}', now() - interval '1 hour', 1, 'permanent failure: 422', now() - interval '30 minutes'),
      ('default', 1003, 'a', '{\"n\": 3}', '{}', now() - interval '1 hour', 1, 'permanent failure: 404', now() - interval '10 minutes'),
      ('email', 1002, 'c', '{\"n\": 2}', '{}', now() - interval '1 hour', 2, 'permanent failure: 550', now() - interval '5 minutes');";

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
    assert_eq!(counts(&status.total), (7, 4, 2, 1, 2, 4));
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
            ("c", (0, 0, 0, 0, 0, 3))
        ]
    );
    let oldest = status.total.oldest_pending_age_seconds.unwrap();
    assert!((600.0..660.0).contains(&oldest), "{oldest}");
    assert_eq!(status.topics[2].counts.oldest_pending_age_seconds, None);

    // One subscription's share: `email` owes nothing and has one dead letter.
    let email = outbox::subscription_status(&mut conn, "email").unwrap();
    assert_eq!(counts(&email.total), (0, 0, 0, 0, 0, 1));
    let subscriptions: Vec<_> = outbox::subscriptions(&mut conn)
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.patterns, s.pending, s.dead_letters))
        .collect();
    assert_eq!(
        subscriptions,
        [
            ("default".to_owned(), vec!["*".to_owned()], 7, 3),
            ("email".to_owned(), vec!["c".to_owned()], 0, 1)
        ]
    );
}

#[test]
fn dead_letters_are_listed_newest_first_filtered_and_shown_in_full() {
    let bed = setup();
    let mut conn = bed.conn();
    conn.batch_execute(QUEUE).unwrap();

    let ids = |list: &[outbox::DeadLetter]| list.iter().map(|d| d.id.get()).collect::<Vec<_>>();
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, None, None, None, 100).unwrap()),
        [1002, 1003, 1002, 1001]
    );
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, Some("default"), None, None, 100).unwrap()),
        [1003, 1002, 1001]
    );
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, Some("default"), Some("c"), None, 100).unwrap()),
        [1002, 1001]
    );
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, None, None, None, 1).unwrap()),
        [1002]
    );
    let day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    assert_eq!(
        ids(&outbox::dead_letters(&mut conn, Some("default"), None, Some(day_ago), 100).unwrap()),
        [1003, 1002]
    );

    // Event 1002 died in both subscriptions: one dead letter each.
    let both = outbox::dead_letter(&mut conn, None, outbox::EventId(1002)).unwrap();
    let who: Vec<_> = both
        .iter()
        .map(|d| (d.subscription.as_str(), d.last_error.as_str()))
        .collect();
    assert_eq!(
        who,
        [
            ("default", "permanent failure: 422"),
            ("email", "permanent failure: 550")
        ]
    );
    let shown = outbox::dead_letter(&mut conn, Some("default"), outbox::EventId(1002))
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(shown.topic, "c");
    assert_eq!(shown.payload, serde_json::json!({ "n": 2 }));
    assert_eq!(shown.headers["traceparent"], "00-abc-01");
    assert_eq!(
        (shown.attempts, shown.last_error.as_str()),
        (1, "permanent failure: 422")
    );
    assert_eq!(
        outbox::dead_letter(&mut conn, None, outbox::EventId(9)).unwrap(),
        []
    );
}

#[test]
fn replay_returns_dead_letters_to_their_subscription_with_their_ids_and_the_relay_delivers_them() {
    let bed = setup();
    let mut conn = bed.conn();
    conn.batch_execute(QUEUE).unwrap();
    conn.batch_execute("TRUNCATE outbox.events; DELETE FROM outbox.deliveries")
        .unwrap();

    let selection = outbox::Selection::Topic("c".into());
    assert_eq!(
        outbox::count_dead_letters(&mut conn, None, &selection).unwrap(),
        3
    );
    assert_eq!(
        outbox::count_dead_letters(&mut conn, Some("default"), &selection).unwrap(),
        2
    );
    let mut progress = Vec::new();
    let replayed = outbox::replay_dead_letters(&mut conn, Some("default"), &selection, 1, |done| {
        progress.push(done)
    })
    .unwrap();
    assert_eq!((replayed, progress), (2, vec![1, 2]));

    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    let state: Vec<_> = queued
        .iter()
        .map(|e| {
            (
                e.id.get(),
                e.topic.as_str(),
                e.attempts,
                e.subscription.as_str(),
            )
        })
        .collect();
    assert_eq!(
        state,
        [(1001, "c", 0, "default"), (1002, "c", 0, "default")]
    );
    assert_eq!(
        queued[0].last_error.as_deref(),
        Some("gave up after 25 attempts: 503")
    );
    assert!(queued.iter().all(|e| e.available_at <= chrono::Utc::now()));
    // The other subscription's dead letter of 1002 stays where it is.
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 2);

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
        outbox::dead_letters(conn, Some("default"), None, None, 100)
            .unwrap()
            .iter()
            .map(|d| d.id.get())
            .collect::<Vec<_>>()
    };

    let day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    assert_eq!(
        outbox::purge_dead_letters(
            &mut conn,
            Some("default"),
            &outbox::Selection::FailedBefore(day_ago)
        )
        .unwrap(),
        1
    );
    assert_eq!(remaining(&mut conn), [1003, 1002]);
    let ids = outbox::Selection::Ids(vec![outbox::EventId(1002), outbox::EventId(77)]);
    assert_eq!(
        outbox::purge_dead_letters(&mut conn, Some("default"), &ids).unwrap(),
        1
    );
    assert_eq!(remaining(&mut conn), [1003]);
    assert_eq!(
        outbox::purge_dead_letters(
            &mut conn,
            Some("default"),
            &outbox::Selection::Topic("c".into())
        )
        .unwrap(),
        0
    );
    assert_eq!(
        outbox::purge_dead_letters(&mut conn, Some("default"), &outbox::Selection::All).unwrap(),
        1
    );
    assert_eq!(remaining(&mut conn), Vec::<i64>::new());
    // Without a subscription: every subscription's.
    assert_eq!(
        outbox::purge_dead_letters(&mut conn, None, &outbox::Selection::All).unwrap(),
        1
    );
    assert_eq!(
        count(&mut conn, "outbox.pending"),
        7,
        "what is owed is untouched"
    );
}
