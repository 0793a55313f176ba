//! Per-key order: events sharing a key are delivered one at a time, in the
//! order written, even across retries; keyless events go in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use outbox::{DeliveryError, EventId, StoredEvent};

use crate::relay_support::{setup, Signal, PATIENCE};

#[test]
fn events_of_one_key_are_attempted_only_after_every_earlier_one_is_delivered() {
    let bed = setup();
    // Every call, in the order the sink saw them: (id, key, attempt, ok).
    type Call = (EventId, String, i32, bool);
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let log = calls.clone();
    let relay = bed
        .relay()
        .workers(4)
        .batch_size(10)
        .route("*", move |e: &StoredEvent| {
            // Fail the first attempt of about a third of the events.
            let fail = e.attempts == 1 && e.id.get() % 3 == 0;
            log.lock()
                .unwrap()
                .push((e.id, e.key.clone().unwrap(), e.attempts, !fail));
            if fail {
                Err(DeliveryError::transient("first attempt fails"))
            } else {
                Ok(())
            }
        })
        .start()
        .unwrap();
    let keys = ["a", "b", "c", "d"];
    let published: Vec<(&str, Option<&str>)> = (0..80)
        .map(|n| ("order.changed", Some(keys[n % keys.len()])))
        .collect();
    let ids = bed.publish(&published);
    bed.signals.delivered(ids.len());
    relay.shutdown(PATIENCE).unwrap();

    let calls = calls.lock().unwrap().clone();
    let mut delivered_per_key: HashMap<String, Vec<EventId>> = HashMap::new();
    for (id, key, attempt, ok) in &calls {
        let expected: Vec<EventId> = ids
            .iter()
            .zip(&published)
            .filter(|(_, (_, k))| *k == Some(key.as_str()))
            .map(|(id, _)| *id)
            .take_while(|earlier| earlier < id)
            .collect();
        let delivered = delivered_per_key.entry(key.clone()).or_default();
        assert_eq!(
            *delivered, expected,
            "event {id} (key {key}, attempt {attempt}) was attempted before every earlier event of its key was delivered"
        );
        if *ok {
            delivered.push(*id);
        }
    }
    let retried = calls.iter().filter(|c| !c.3).count();
    assert!(
        retried >= 20,
        "only {retried} failures: the test lost its teeth"
    );
    for key in keys {
        let expected: Vec<EventId> = ids
            .iter()
            .zip(&published)
            .filter(|(_, (_, k))| *k == Some(key))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(delivered_per_key[key], expected, "key {key}");
    }
}

#[test]
fn a_later_event_of_a_key_waits_for_the_retry_while_keyless_events_pass() {
    let bed = setup();
    let calls: Arc<Mutex<Vec<(EventId, i32)>>> = Arc::default();
    let log = calls.clone();
    let relay = bed
        .relay()
        .route("*", move |e: &StoredEvent| {
            log.lock().unwrap().push((e.id, e.attempts));
            if e.key.is_some() && e.payload["n"] == 0 && e.attempts == 1 {
                // Long enough that an event waiting for the retry would be
                // seen to wait: another worker reads the keyless event's
                // lane meanwhile.
                return Err(DeliveryError::retry_after(
                    Duration::from_millis(500),
                    "first try fails",
                ));
            }
            Ok(())
        })
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", Some("k")), ("t", Some("k")), ("t", None)]);
    let (first, second, keyless) = (ids[0], ids[1], ids[2]);
    let seen = bed.signals.delivered(3);
    relay.shutdown(PATIENCE).unwrap();

    let calls = calls.lock().unwrap().clone();
    let position = |call: (EventId, i32)| calls.iter().position(|c| *c == call).unwrap();
    assert!(position((second, 1)) > position((first, 2)), "{calls:?}");
    assert!(!calls.contains(&(second, 2)));
    assert!(calls.contains(&(keyless, 1)));
    // The keyless event did not wait for the retry.
    assert!(position((keyless, 1)) < position((first, 2)), "{calls:?}");
    assert_eq!(seen.iter().filter(|id| **id == second).count(), 1);
}

#[test]
fn keyless_events_are_delivered_in_parallel() {
    let bed = setup();
    // Each delivery waits until two deliveries are in flight at once: that
    // only completes if two workers deliver concurrently.
    let in_flight = Arc::new((Mutex::new(0usize), Condvar::new()));
    let gate = in_flight.clone();
    let relay = bed
        .relay()
        .workers(2)
        .batch_size(1)
        .route("*", move |_: &StoredEvent| {
            let (count, changed) = &*gate;
            let mut count = count.lock().unwrap();
            *count += 1;
            changed.notify_all();
            let (count, timeout) = changed
                .wait_timeout_while(count, PATIENCE, |n| *n < 2)
                .unwrap();
            drop(count);
            if timeout.timed_out() {
                Err(DeliveryError::permanent("never had company"))
            } else {
                Ok(())
            }
        })
        .start()
        .unwrap();
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events((0..2).map(|n| outbox::NewEvent::dynamic("t", serde_json::json!(n))))
    })
    .unwrap();
    let seen = bed.signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Delivered { .. } | Signal::Dead { .. }))
            .count()
            == 2
    });
    relay.shutdown(PATIENCE).unwrap();
    let mut delivered: Vec<_> = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Delivered { id, attempt: 1 } => Some(*id),
            _ => None,
        })
        .collect();
    delivered.sort();
    assert_eq!(delivered, ids);
}

#[test]
fn a_backlog_of_one_key_drains_without_waiting_for_the_poll() {
    let bed = setup();
    let recording = crate::relay_support::Recording::new();
    // The poll is an hour away: only going again after settling a keyed
    // event can deliver the next one of its key.
    let relay = bed
        .relay()
        .poll_interval(std::time::Duration::from_secs(3600))
        .route("*", recording.sink(|_| Ok(())))
        .start()
        .unwrap();
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events(
            (0..50).map(|n| outbox::NewEvent::dynamic("t", serde_json::json!(n)).key("hot")),
        )
    })
    .unwrap();
    bed.signals.delivered(50);
    relay.shutdown(PATIENCE).unwrap();
    // The order of the sink's calls, not of the hooks: a worker's
    // on_delivered runs after its settle commits, by which time another
    // worker may already have claimed, delivered and reported the next
    // event of the key.
    let called: Vec<EventId> = recording.calls().into_iter().map(|(id, _)| id).collect();
    assert_eq!(called, ids, "one key: delivered one at a time, in order");
}
