//! The relay delivers: once, woken by NOTIFY or found by the poll, only the
//! topics it routes, with typed handlers, and stops cleanly.

use std::time::Duration;

use diesel::prelude::*;

use crate::common::{approved, count, pending, OrderApproved};
use crate::relay_support::{dead_letters, setup, Recording, Signal, PATIENCE};

#[test]
fn a_committed_event_is_delivered_once_and_removed() {
    let bed = setup();
    let recording = Recording::new();
    let relay = bed
        .relay()
        .route("*", recording.sink(|_| Ok(())))
        .start()
        .unwrap();

    let ids = bed.publish(&[("order.approved", None), ("order.shipped", Some("order-1"))]);
    let mut delivered = bed.signals.delivered(2);
    delivered.sort();
    assert_eq!(delivered, ids);
    relay.shutdown(PATIENCE).unwrap();

    let mut calls = recording.calls();
    calls.sort();
    assert_eq!(calls, [(ids[0], 1), (ids[1], 1)]);
    let mut conn = bed.conn();
    assert_eq!(pending(&mut conn), 0);
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 0);
}

#[test]
fn notify_wakes_an_idle_relay_long_before_its_poll() {
    let bed = setup();
    let relay = bed
        .relay()
        .poll_interval(Duration::from_secs(3600))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    // The first event may be found by the start-up round or while the
    // worker lingers after it; once the relay sleeps again (it asks for a
    // notification), the second can only be found through a notification:
    // the poll is an hour away.
    let first = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), first);
    crate::relay_wakeup::wait_for_flag(&mut bed.conn(), true);
    let second = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), second);
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn the_poll_delivers_when_the_trigger_is_disabled() {
    let bed = setup();
    diesel::sql_query("ALTER TABLE outbox.events DISABLE TRIGGER events_notify")
        .execute(&mut bed.conn())
        .unwrap();
    let relay = bed
        .relay()
        .poll_interval(Duration::from_millis(50))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", None), ("t", None), ("t", None)]);
    let mut delivered = bed.signals.delivered(3);
    delivered.sort();
    assert_eq!(delivered, ids);
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_relay_without_a_listener_delivers_by_polling() {
    let bed = setup();
    let relay = bed
        .poll_only()
        .poll_interval(Duration::from_millis(50))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), ids);
    assert_eq!(pending(&mut bed.conn()), 0);
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn unrouted_topics_stay_queued_until_a_relay_routes_them() {
    let bed = setup();
    let orders = bed
        .relay()
        .name("orders-relay")
        .route("order.*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let ids = bed.publish(&[("billing.paid", None), ("order.approved", None)]);
    // The billing event was due before the order event was claimed, so that
    // claim passed it over: it is not this relay's topic.
    assert_eq!(bed.signals.delivered(1), [ids[1]]);
    let queued = outbox::queued_events(&mut bed.conn(), 10).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].id, queued[0].attempts), (ids[0], 0));
    orders.shutdown(PATIENCE).unwrap();

    let billing = bed
        .relay()
        .route("billing.*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    assert_eq!(bed.signals.delivered(1), [ids[0]]);
    billing.shutdown(PATIENCE).unwrap();
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_typed_handler_receives_the_decoded_event_and_its_metadata() {
    let bed = setup();
    let (sent, received) = crossbeam_channel::unbounded();
    let relay = bed
        .relay()
        .handle(move |event: OrderApproved, meta: &outbox::StoredEvent| {
            sent.send((event, meta.id, meta.attempts, meta.key.clone()))?;
            Ok(())
        })
        .start()
        .unwrap();
    let id = outbox::transaction(&mut bed.conn(), |tx| tx.publish(&approved(7))).unwrap();
    let got = received.recv_timeout(PATIENCE).unwrap();
    assert_eq!(got, (approved(7), id, 1, Some("order-7".to_owned())));
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_payload_that_no_longer_decodes_is_dead_lettered_with_the_serde_error() {
    let bed = setup();
    let relay = bed
        .relay()
        .handle(|_: OrderApproved, meta: &outbox::StoredEvent| {
            panic!("the handler must not run for event {}", meta.id)
        })
        .start()
        .unwrap();
    let id = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(outbox::NewEvent::dynamic(
            "order.approved",
            serde_json::json!({ "order_id": "seven" }),
        ))
    })
    .unwrap();
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    let Some(Signal::Dead { id: dead, error }) = seen.last() else {
        unreachable!()
    };
    assert_eq!(*dead, id);
    assert!(
        error.starts_with("permanent failure: payload does not decode into")
            && error.contains("invalid type: string \"seven\", expected i64"),
        "{error}"
    );
    relay.shutdown(PATIENCE).unwrap();
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(
        letters,
        [(id.get(), "order.approved".to_owned(), 1, error.clone())]
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn impossible_settings_are_typed_errors_naming_the_field() {
    let bed = setup();
    let ok = || bed.relay().route("*", |_: &outbox::StoredEvent| Ok(()));
    let cases: Vec<(outbox::RelayBuilder, &str)> = vec![
        (bed.relay(), "route"),
        (ok().route("a*b", |_: &outbox::StoredEvent| Ok(())), "route"),
        (ok().route("*", |_: &outbox::StoredEvent| Ok(())), "route"),
        (ok().workers(0), "workers"),
        (ok().workers(100_000), "workers"),
        (ok().batch_size(0), "batch_size"),
        (ok().batch_size(1_000_000), "batch_size"),
        (ok().poll_interval(Duration::ZERO), "poll_interval"),
        (
            ok().lease_duration(Duration::from_millis(1)),
            "lease_duration",
        ),
        (ok().max_attempts(0), "max_attempts"),
        (ok().name(""), "name"),
        (ok().listen("not a url"), "listen"),
        (
            ok().backoff(outbox::Backoff::new(
                Duration::from_secs(2),
                Duration::from_secs(1),
                2.0,
                0.1,
            )),
            "backoff.cap",
        ),
        (
            ok().backoff(outbox::Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
                -1.0,
                0.1,
            )),
            "backoff.factor",
        ),
    ];
    for (builder, expected) in cases {
        match builder.start() {
            Err(outbox::Error::Config { field, .. }) => assert_eq!(field, expected),
            other => panic!("expected a config error on {expected}, got {other:?}"),
        }
    }
}

#[test]
fn shutdown_lets_the_delivery_in_progress_finish_and_releases_the_rest() {
    let bed = setup();
    // The sink begins the shutdown during its first delivery, which then
    // completes; the other four of the batch must not be attempted.
    let stopper = std::sync::Arc::new(std::sync::Mutex::new(None::<outbox::Stopper>));
    let in_sink = stopper.clone();
    let relay = bed
        .poll_only()
        .workers(1)
        .batch_size(10)
        .route("*", move |_: &outbox::StoredEvent| {
            if let Some(stopper) = in_sink.lock().unwrap().as_ref() {
                stopper.stop();
            }
            Ok(())
        })
        .start()
        .unwrap();
    *stopper.lock().unwrap() = Some(relay.stopper());
    // All five in one statement and of one key (so in one lane of the
    // log), so one claim takes them together.
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events(
            (0..5).map(|n| outbox::NewEvent::dynamic("t", serde_json::json!(n)).key("k")),
        )
    })
    .unwrap();
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Released(_))));
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(seen.last(), Some(&Signal::Released(ids[1..].to_vec())));
    assert!(
        seen.contains(&Signal::Delivered {
            id: ids[0],
            attempt: 1
        }),
        "{seen:?}"
    );
    let queued = outbox::queued_events(&mut bed.conn(), 10).unwrap();
    let after: Vec<(outbox::EventId, i32, Option<String>)> = queued
        .iter()
        .map(|e| (e.id, e.attempts, e.last_error.clone()))
        .collect();
    let expected: Vec<_> = ids[1..].iter().map(|id| (*id, 0, None)).collect();
    assert_eq!(
        after, expected,
        "the unattempted events are back, their attempt undone"
    );
    // They were the tail of the batch: they stay unread in the log, all
    // due (the next claim reads them in order), and nothing went to
    // outbox.deliveries, where they would have blocked their key.
    assert!(queued.iter().all(|e| e.available_at <= chrono::Utc::now()));
    assert_eq!(count(&mut bed.conn(), "outbox.deliveries"), 0);
}

#[test]
fn several_relays_on_one_database_deliver_each_event_exactly_once() {
    let bed = setup();
    let recording = Recording::new();
    let relays: Vec<_> = (0..3)
        .map(|n| {
            bed.relay()
                .name(format!("relay-{n}"))
                .workers(2)
                .batch_size(25)
                .route("*", recording.sink(|_| Ok(())))
                .start()
                .unwrap()
        })
        .collect();
    let mut conn = bed.conn();
    let mut ids = Vec::new();
    for chunk in 0..30 {
        ids.extend(
            outbox::transaction(&mut conn, |tx| {
                tx.publish_events((0..100).map(|n| {
                    outbox::NewEvent::dynamic("bulk", serde_json::json!({ "chunk": chunk, "n": n }))
                }))
            })
            .unwrap(),
        );
    }
    let mut delivered = bed.signals.delivered(ids.len());
    for relay in relays {
        relay.shutdown(PATIENCE).unwrap();
    }
    delivered.sort();
    assert_eq!(delivered, ids);
    let mut calls: Vec<_> = recording.calls().into_iter().map(|(id, _)| id).collect();
    calls.sort();
    assert_eq!(calls, ids, "each event reached the sink exactly once");
    assert_eq!(pending(&mut conn), 0);
}

#[test]
fn dropping_the_relay_stops_and_joins_every_thread() {
    let bed = setup();
    let (observer, signals) = crate::relay_support::recorder();
    let relay = bed
        .relay()
        .observer(observer)
        .workers(3)
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let ids = bed.publish(&[("t", None)]);
    assert_eq!(signals.delivered(1), ids);
    drop(relay);
    // Every thread held the observer; all are gone once the channel closes.
    let rest: Vec<Signal> = signals.0.try_iter().collect();
    assert!(
        matches!(
            signals.0.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ),
        "{rest:?}"
    );
}
