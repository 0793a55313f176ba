//! When a sink fails: retried on the backoff schedule, honouring
//! retry-after within the cap, dead-lettered on a permanent error or after
//! the last attempt, and a panic is just a transient failure.

use std::time::Duration;

use outbox::{DeliveryError, StoredEvent};

use crate::common::{count, pending};
use crate::relay_support::{dead_letters, retries, setup, Recording, Signal, PATIENCE};

#[test]
fn a_transient_failure_is_retried_after_the_backoff_and_then_delivered() {
    let bed = setup();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .route(
            "*",
            recording.sink(|e| match e.attempts {
                1 | 2 => Err(DeliveryError::transient(format!(
                    "smtp timeout {}",
                    e.attempts
                ))),
                _ => Ok(()),
            }),
        )
        .start()
        .unwrap();
    let ids = bed.publish(&[("email.send", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();

    // Backoff 50 ms doubling, no jitter (see RelayBed::relay).
    assert_eq!(
        retries(&seen),
        [
            (1, Duration::from_millis(50), "smtp timeout 1".to_owned()),
            (2, Duration::from_millis(100), "smtp timeout 2".to_owned()),
        ]
    );
    assert_eq!(recording.calls(), [(ids[0], 1), (ids[0], 2), (ids[0], 3)]);
    assert!(seen.contains(&Signal::Delivered {
        id: ids[0],
        attempt: 3
    }));
    let mut conn = bed.conn();
    assert_eq!(pending(&mut conn), 0);
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 0);
}

#[test]
fn the_retry_schedule_is_kept_in_the_database_between_attempts() {
    let bed = setup();
    let relay = bed
        .relay()
        .backoff(outbox::Backoff::new(
            Duration::from_secs(3600),
            Duration::from_secs(7200),
            2.0,
            0.0,
        ))
        .route("*", |_: &StoredEvent| {
            Err(DeliveryError::transient("provider down"))
        })
        .start()
        .unwrap();
    let before = chrono::Utc::now();
    let ids = bed.publish(&[("email.send", None)]);
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Retry { .. })));
    relay.shutdown(PATIENCE).unwrap();

    let queued = outbox::queued_events(&mut bed.conn(), 10).unwrap();
    assert_eq!(queued.len(), 1);
    let event = &queued[0];
    assert_eq!((event.id, event.attempts), (ids[0], 1));
    assert_eq!(event.last_error.as_deref(), Some("provider down"));
    let wait = event.available_at - before;
    assert!(
        wait >= chrono::Duration::seconds(3599) && wait <= chrono::Duration::seconds(3660),
        "next attempt in {wait}"
    );
}

#[test]
fn a_sinks_retry_after_is_honoured_within_the_backoff_cap() {
    let bed = setup();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .route(
            "*",
            recording.sink(|e| match e.attempts {
                1 => Err(DeliveryError::retry_after(
                    Duration::from_millis(150),
                    "429 slow down",
                )),
                2 => Err(DeliveryError::retry_after(
                    Duration::from_secs(86_400),
                    "429 come back tomorrow",
                )),
                _ => Ok(()),
            }),
        )
        .start()
        .unwrap();
    let ids = bed.publish(&[("webhook", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        retries(&seen),
        [
            (1, Duration::from_millis(150), "429 slow down".to_owned()),
            // Capped at the backoff cap (400 ms in RelayBed::relay).
            (
                2,
                Duration::from_millis(400),
                "429 come back tomorrow".to_owned()
            ),
        ]
    );
    assert_eq!(recording.calls().len(), 3);
    assert!(seen.contains(&Signal::Delivered {
        id: ids[0],
        attempt: 3
    }));
}

#[test]
fn a_permanent_failure_is_dead_lettered_at_once_with_its_reason() {
    let bed = setup();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .route(
            "*",
            recording.sink(|_| Err(DeliveryError::permanent("422 invalid address"))),
        )
        .start()
        .unwrap();
    let ids = bed.publish(&[("email.send", Some("customer-1"))]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();

    assert_eq!(recording.calls(), [(ids[0], 1)]);
    assert_eq!(
        seen.last(),
        Some(&Signal::Dead {
            id: ids[0],
            error: "permanent failure: 422 invalid address".into()
        })
    );
    let mut conn = bed.conn();
    assert_eq!(
        dead_letters(&mut conn),
        [(
            ids[0].get(),
            "email.send".to_owned(),
            1,
            "permanent failure: 422 invalid address".to_owned()
        )]
    );
    assert_eq!(pending(&mut conn), 0);
}

#[test]
fn the_last_failed_attempt_moves_the_event_to_the_dead_letters() {
    let bed = setup();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .max_attempts(3)
        .route(
            "*",
            recording.sink(|e| Err(DeliveryError::transient(format!("boom {}", e.attempts)))),
        )
        .start()
        .unwrap();
    let ids = bed.publish(&[("email.send", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();

    assert_eq!(recording.calls(), [(ids[0], 1), (ids[0], 2), (ids[0], 3)]);
    assert_eq!(
        retries(&seen).iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2]
    );
    let mut conn = bed.conn();
    assert_eq!(
        dead_letters(&mut conn),
        [(
            ids[0].get(),
            "email.send".to_owned(),
            3,
            "gave up after 3 attempts: boom 3".to_owned()
        )]
    );
    assert_eq!(pending(&mut conn), 0);
}

#[test]
fn a_single_attempt_is_reported_in_the_singular() {
    let bed = setup();
    let relay = bed
        .relay()
        .max_attempts(1)
        .route("*", |_: &StoredEvent| Err(DeliveryError::transient("boom")))
        .start()
        .unwrap();
    let ids = bed.publish(&[("email.send", None)]);
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        dead_letters(&mut bed.conn()),
        [(
            ids[0].get(),
            "email.send".to_owned(),
            1,
            "gave up after 1 attempt: boom".to_owned()
        )]
    );
}

#[test]
fn a_dead_letter_keeps_the_event_exactly_as_published() {
    let bed = setup();
    let relay = bed
        .relay()
        .route("*", |_: &StoredEvent| Err(DeliveryError::permanent("no")))
        .start()
        .unwrap();
    let id = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic(
                "audit.login",
                serde_json::json!({ "user": 42, "ip": "10.0.0.1" }),
            )
            .key("user-42")
            .header("traceparent", "00-abc-01"),
        )
    })
    .unwrap();
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();

    use diesel::prelude::*;
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Letter {
        #[diesel(sql_type = diesel::sql_types::Text)]
        row: String,
    }
    let row = diesel::sql_query(
        "SELECT concat_ws('|', d.id, d.topic, d.key, d.payload, d.headers,
                          d.created_at <= d.failed_at, d.attempts, d.last_error) AS row
           FROM outbox.dead_letters d",
    )
    .get_result::<Letter>(&mut bed.conn())
    .unwrap()
    .row;
    assert_eq!(
        row,
        format!(
            "{id}|audit.login|user-42|{{\"ip\": \"10.0.0.1\", \"user\": 42}}|{{\"traceparent\": \"00-abc-01\"}}|t|1|permanent failure: no"
        )
    );
}

#[test]
fn a_panicking_sink_is_a_transient_failure() {
    let bed = setup();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .route(
            "*",
            recording.sink(|e| {
                if e.attempts == 1 {
                    panic!("sink bug on event {}", e.id);
                }
                Ok(())
            }),
        )
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        retries(&seen),
        [(
            1,
            Duration::from_millis(50),
            format!("sink panicked: sink bug on event {}", ids[0])
        )]
    );
    assert_eq!(recording.calls(), [(ids[0], 1), (ids[0], 2)]);
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_row_the_relay_cannot_read_dies_alone_and_its_batch_is_delivered() {
    let bed = setup();
    let relay = bed
        .relay()
        .batch_size(10)
        .route("*", |_: &StoredEvent| Ok(()))
        .start()
        .unwrap();
    use diesel::prelude::*;
    // Valid jsonb that serde_json refuses: a number beyond f64.
    diesel::sql_query(
        "INSERT INTO outbox.events (topic, payload) VALUES ('t', '{\"n\": 1}'), ('t', '1e400'), ('t', '{\"n\": 3}')",
    )
    .execute(&mut bed.conn())
    .unwrap();
    let seen = bed.signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Delivered { .. }))
            .count()
            == 2
            && relay.stats().dead_lettered == 1
    });
    relay.shutdown(PATIENCE).unwrap();
    let mut delivered: Vec<i64> = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Delivered { id, .. } => Some(id.get()),
            _ => None,
        })
        .collect();
    delivered.sort();
    assert_eq!(delivered, [1, 3]);
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].0, letters[0].2), (2, 1));
    assert!(
        letters[0]
            .3
            .starts_with("unreadable event: payload is valid jsonb but not readable here:"),
        "{letters:?}"
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}
