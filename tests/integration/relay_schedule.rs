//! Retries and delayed events are taken when they come due, not at the
//! next poll: every relay here polls once an hour, so an event found only
//! by a poll would time the test out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{DeliveryError, StoredEvent};

use crate::relay_support::{setup, RelayBed, Signal};

const HOUR: Duration = Duration::from_secs(3600);
const RETRY_AFTER: Duration = Duration::from_millis(300);

/// Each attempt's number and when it started.
type Attempts = Arc<Mutex<Vec<(i32, Instant)>>>;

/// A sink that fails each event's first attempt and records when every
/// attempt started.
fn failing_once() -> (impl outbox::Sink, Attempts) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let sink = move |event: &StoredEvent| {
        recorded
            .lock()
            .unwrap()
            .push((event.attempts, Instant::now()));
        match event.attempts {
            1 => Err(DeliveryError::transient("first attempt fails")),
            _ => Ok(()),
        }
    };
    (sink, calls)
}

fn retry_on_time(bed: &RelayBed, builder: outbox::RelayBuilder) {
    let (sink, calls) = failing_once();
    let relay = builder
        .poll_interval(HOUR)
        .backoff(outbox::Backoff::new(RETRY_AFTER, HOUR, 2.0, 0.0))
        .route("*", sink)
        .start()
        .unwrap();
    let ids = bed.publish(&[("email.send", None)]);
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(Duration::from_secs(10)).unwrap();

    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls
            .iter()
            .map(|(attempt, _)| *attempt)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    let gap = calls[1].1 - calls[0].1;
    // Never early; how late is printed (it is a few ms on an idle machine).
    assert!(gap >= RETRY_AFTER, "retried after {gap:?}");
    println!(
        "retry of {} after {gap:?} for a {RETRY_AFTER:?} backoff",
        ids[0]
    );
}

#[test]
fn a_retry_is_taken_when_its_backoff_ends_with_a_listener() {
    let bed = setup();
    retry_on_time(&bed, bed.relay());
}

#[test]
fn a_retry_is_taken_when_its_backoff_ends_without_a_listener() {
    let bed = setup();
    retry_on_time(&bed, bed.poll_only());
}

/// Publishes one event due in `delay`; returns when it was published and
/// when it became due in the database's clock.
fn publish_delayed(bed: &RelayBed, delay: Duration) -> chrono::DateTime<chrono::Utc> {
    let mut conn = bed.conn();
    outbox::transaction(&mut conn, |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic("email.send", serde_json::json!({})).delay(delay),
        )
    })
    .unwrap();
    outbox::queued_events(&mut conn, 1).unwrap()[0].available_at
}

fn delivered_at(bed: &RelayBed, builder: outbox::RelayBuilder, publish_first: bool) {
    let delivered = Arc::new(Mutex::new(None));
    let at = delivered.clone();
    let sink = move |_: &StoredEvent| -> Result<(), DeliveryError> {
        *at.lock().unwrap() = Some(chrono::Utc::now());
        Ok(())
    };
    let due = publish_first.then(|| publish_delayed(bed, Duration::from_millis(500)));
    let relay = builder
        .poll_interval(HOUR)
        .route("*", sink)
        .start()
        .unwrap();
    let due = due.unwrap_or_else(|| publish_delayed(bed, Duration::from_millis(500)));
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(Duration::from_secs(10)).unwrap();
    let delivered = delivered.lock().unwrap().unwrap();
    // Both clocks are this machine's (the test server is local).
    assert!(delivered >= due, "delivered at {delivered}, due at {due}");
    println!(
        "delayed event delivered {} after it came due",
        delivered - due
    );
}

#[test]
fn a_delayed_event_published_while_the_relay_sleeps_is_taken_when_due() {
    // The insert's notification wakes the relay; its claim learns the time.
    let bed = setup();
    delivered_at(&bed, bed.relay(), false);
}

#[test]
fn a_delayed_event_already_queued_is_taken_when_due_without_a_listener() {
    // The relay's first claim learns the time.
    let bed = setup();
    delivered_at(&bed, bed.poll_only(), true);
}
