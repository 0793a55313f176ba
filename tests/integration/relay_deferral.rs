//! Events waiting for an earlier event of their key are moved out of the
//! claim's way (deferred) and made due again the moment that event is
//! settled; a publisher's own delay is never shortened.

use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Double};

use crate::relay_support::{setup, Recording, RelayBed, Signal, PATIENCE};

/// (deferred, seconds until available_at) of event `id`.
fn deferral(conn: &mut PgConnection, id: i64) -> (bool, f64) {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Bool)]
        deferred: bool,
        #[diesel(sql_type = Double)]
        due_in: f64,
    }
    let row: Row = diesel::sql_query(
        "SELECT deferred, extract(epoch FROM available_at - now())::float8 AS due_in
           FROM outbox.events WHERE id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result(conn)
    .unwrap_or_else(|e| panic!("event {id}: {e}"));
    (row.deferred, row.due_in)
}

fn wait_until_deferred(bed: &RelayBed, id: i64) -> f64 {
    let mut conn = bed.conn();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (deferred, due_in) = deferral(&mut conn, id);
        if deferred {
            return due_in;
        }
        assert!(Instant::now() < deadline, "event {id} was never deferred");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A two-worker relay on `bed` whose sink records every call, and whose
/// calls for the first event published (id 1) each wait for the returned
/// sender and fail when it sends `false`; other calls succeed at once.
fn gated_relay(bed: &RelayBed) -> (outbox::Relay, Recording, Sender<bool>) {
    let recording = Recording::new();
    let (release, gate): (Sender<bool>, Receiver<bool>) = bounded(1);
    let relay = bed
        .relay()
        .workers(2)
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
fn successors_wait_out_of_the_way_and_follow_as_soon_as_the_head_is_delivered() {
    let bed = setup();
    let (relay, recording, release) = gated_relay(&bed);
    let ids = bed.publish(&[("t", Some("k")), ("t", Some("k")), ("t", Some("k"))]);
    // The head is held by the gate; the other worker meets the two others,
    // blocked, and moves them past the head's lease end (30 s) plus the
    // 60 s margin.
    for id in &ids[1..] {
        let due_in = wait_until_deferred(&bed, id.get());
        assert!((80.0..=91.0).contains(&due_in), "deferred by {due_in} s");
    }
    // The head fails once: still blocked, they stay deferred while its
    // retry waits at the gate.
    release.send(false).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while recording.calls().len() < 2 {
        assert!(Instant::now() < deadline, "the head was never retried");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(deferral(&mut bed.conn(), ids[1].get()).0);
    assert!(deferral(&mut bed.conn(), ids[2].get()).0);
    // Delivered on its retry: the next is due at once, and then the last.
    let started = Instant::now();
    release.send(true).unwrap();
    assert_eq!(bed.signals.delivered(3), ids);
    assert!(started.elapsed() < Duration::from_secs(10));
    relay.shutdown(PATIENCE).unwrap();
    let calls: Vec<_> = recording.calls().into_iter().map(|(id, _)| id).collect();
    assert_eq!(calls, [ids[0], ids[0], ids[1], ids[2]]);
}

#[test]
fn a_publishers_delay_is_never_shortened_by_its_keys_progress() {
    let bed = setup();
    let (relay, recording, release) = gated_relay(&bed);
    let mut conn = bed.conn();
    let head = bed.publish(&[("t", Some("k"))])[0];
    let delayed = outbox::transaction(&mut conn, |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic("t", serde_json::json!({}))
                .key("k")
                .delay(Duration::from_secs(3600)),
        )
    })
    .unwrap();
    let after = bed.publish(&[("t", Some("k"))])[0];
    // The last one is due but waits for the head, then for the delayed one.
    wait_until_deferred(&bed, after.get());
    release.send(true).unwrap();
    assert_eq!(bed.signals.delivered(1), [head]);
    std::thread::sleep(Duration::from_millis(500));
    relay.shutdown(PATIENCE).unwrap();

    let (deferred, due_in) = deferral(&mut conn, delayed.get());
    assert!(!deferred);
    assert!(
        (3590.0..=3600.0).contains(&due_in),
        "delay became {due_in} s"
    );
    // Still deferred (past the head's lease); when that runs out, a claim
    // meets it again, blocked by the delayed event, and defers it again.
    let (deferred, due_in) = deferral(&mut conn, after.get());
    assert!(
        deferred && due_in > 60.0,
        "deferred {deferred}, due in {due_in} s"
    );
    assert_eq!(recording.calls(), [(head, 1)]);
}

#[test]
fn a_deferred_event_whose_predecessor_was_deleted_by_hand_comes_due_by_its_margin_and_is_counted() {
    let bed = setup();
    let (relay, recording, release) = gated_relay(&bed);
    let ids = bed.publish(&[("t", Some("k")), ("t", Some("k"))]);
    let due_in = wait_until_deferred(&bed, ids[1].get());
    assert!(due_in > 30.0, "deferred for {due_in} s");
    // An operator deletes the held head by hand: no settle will ever wake
    // its successor. There is no sweep: it comes due by its margin, here
    // brought forward instead of waited for.
    let mut conn = bed.conn();
    diesel::sql_query("DELETE FROM outbox.events WHERE id = $1")
        .bind::<BigInt, _>(ids[0].get())
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query("UPDATE outbox.events SET available_at = now() WHERE id = $1")
        .bind::<BigInt, _>(ids[1].get())
        .execute(&mut conn)
        .unwrap();
    release.send(true).unwrap();
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
    let calls: Vec<_> = recording.calls().into_iter().map(|(id, _)| id).collect();
    assert_eq!(calls, ids);
}
