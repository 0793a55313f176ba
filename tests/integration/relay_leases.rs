//! Leases with fencing: a relay that stalls past its lease loses the event
//! to another relay and can no longer settle it; a slow batch renews its
//! lease so nobody else takes it.

use std::time::Duration;

use crossbeam_channel::bounded;
use outbox::{DeliveryError, StoredEvent};

use crate::common::{count, pending};
use crate::relay_support::{recorder, setup, Recording, Signal, PATIENCE};

#[test]
fn a_relay_that_lost_its_lease_cannot_dead_letter_what_another_delivered() {
    let bed = setup();
    let (stalled_observer, stalled_signals) = recorder();
    let (release_tx, release) = bounded::<()>(1);
    // Relay A claims, then stalls past its lease, then reports a permanent
    // failure: fencing must discard that verdict.
    let stalled = bed
        .relay()
        .name("stalled")
        .workers(1)
        .observer(stalled_observer)
        .lease_duration(Duration::from_millis(300))
        .route("*", move |_: &StoredEvent| {
            let _ = release.recv_timeout(PATIENCE);
            Err(DeliveryError::permanent(
                "verdict of a relay whose lease ran out",
            ))
        })
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", None)]);
    stalled_signals.until(|s| s.contains(&Signal::Claimed(ids.clone())));

    let recording = Recording::new();
    let rescuer = bed
        .relay()
        .name("rescuer")
        .poll_interval(Duration::from_millis(20))
        .route("*", recording.sink(|_| Ok(())))
        .start()
        .unwrap();
    // Delivered by the rescuer once the lease expired. (A row of the log
    // taken over from a lapsed lease is claimed as a first attempt: the
    // log keeps no count of claims.)
    bed.signals.until(|s| {
        s.contains(&Signal::Delivered {
            id: ids[0],
            attempt: 1,
        })
    });
    release_tx.send(()).unwrap();
    let seen = stalled_signals.until(|s| s.iter().any(|s| matches!(s, Signal::LeaseLost(_))));
    assert_eq!(seen.last(), Some(&Signal::LeaseLost(ids.clone())));
    assert!(
        !seen.iter().any(|s| matches!(s, Signal::Dead { .. })),
        "{seen:?}"
    );
    assert_eq!(stalled.stats().lease_lost, 1);
    assert_eq!(stalled.stats().dead_lettered, 0);
    stalled.shutdown(PATIENCE).unwrap();
    rescuer.shutdown(PATIENCE).unwrap();

    assert_eq!(recording.calls(), [(ids[0], 1)]);
    let mut conn = bed.conn();
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 0);
    assert_eq!(pending(&mut conn), 0);
}

#[test]
fn a_batch_slower_than_its_lease_renews_it_and_is_delivered_once() {
    let bed = setup();
    let recording = Recording::new();
    // 5 events × 150 ms = 750 ms of delivery against a 400 ms lease, while a
    // second relay polls every 20 ms for anything whose lease ran out.
    let slow = bed
        .relay()
        .name("slow")
        .workers(1)
        .batch_size(5)
        .lease_duration(Duration::from_millis(400))
        .route(
            "*",
            recording.sink(|_| {
                std::thread::sleep(Duration::from_millis(150)); // the sink's own slow work
                Ok(())
            }),
        )
        .start()
        .unwrap();
    // One key, so one lane of the log: one claim takes all five.
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events(
            (0..5).map(|n| outbox::NewEvent::dynamic("t", serde_json::json!(n)).key("k")),
        )
    })
    .unwrap();
    bed.signals.until(|s| {
        s.iter()
            .any(|s| matches!(s, Signal::Claimed(c) if c.len() == 5))
    });
    let competitor = bed
        .relay()
        .name("competitor")
        .poll_interval(Duration::from_millis(20))
        .route("*", recording.sink(|_| Ok(())))
        .start()
        .unwrap();
    bed.signals.delivered(5);
    slow.shutdown(PATIENCE).unwrap();
    competitor.shutdown(PATIENCE).unwrap();

    let expected: Vec<_> = ids.iter().map(|id| (*id, 1)).collect();
    assert_eq!(
        recording.calls(),
        expected,
        "each event delivered once, by the slow relay"
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}
