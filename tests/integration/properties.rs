//! Property: the claim statement's topic filter (exact names and escaped
//! `LIKE` prefixes, evaluated by PostgreSQL) takes exactly the topics the
//! relay's Rust matcher routes, for topics full of `%`, `_` and `\`. The
//! pure properties (pattern semantics, most specific route wins, escaping
//! against a model of `LIKE`) are unit tests in `src/relay/routing.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::pg;
use crate::relay_support::{pool, recorder, Signal};

/// Topics over an alphabet rich in `LIKE` metacharacters.
const TOPIC: &str = r"[ab.%_\\]{1,5}";

/// A route pattern: `*`, an exact topic, or a prefix followed by `*`.
fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("*".to_owned()),
        3 => TOPIC,
        4 => TOPIC.prop_map(|t| format!("{t}*")),
    ]
}

/// Published last in each case and routed on its own, so that every case
/// delivers something.
const SENTINEL: &str = "~sentinel";

#[test]
fn the_sql_claim_filter_takes_exactly_the_topics_the_rust_matcher_routes() {
    let db = pg::test_db();
    let pool = pool(&db);
    // proptest calls the case closure through `Fn`.
    let conn = std::cell::RefCell::new(db.conn());
    // Every case starts a relay and a database round trip or two: a few
    // dozen cases keep this under a few seconds.
    let mut runner = TestRunner::new(Config::with_cases(24));
    let cases = (
        proptest::collection::btree_set(pattern(), 1..5),
        proptest::collection::vec(TOPIC, 1..12),
    );
    runner
        .run(&cases, |(patterns, topics)| {
            let mut conn = conn.borrow_mut();
            // The log and what the default subscription parked (events of
            // topics no earlier relay routed) start empty in every case.
            conn.batch_execute("TRUNCATE outbox.events; DELETE FROM outbox.deliveries")
                .unwrap();
            let ids = outbox::transaction(&mut conn, |tx| {
                tx.publish_events(
                    topics
                        .iter()
                        .map(String::as_str)
                        .chain([SENTINEL])
                        .map(|t| outbox::NewEvent::dynamic(t, serde_json::json!({}))),
                )
            })
            .unwrap();
            let parsed: Vec<outbox::TopicPattern> = patterns
                .iter()
                .map(|p| outbox::TopicPattern::parse(p).unwrap())
                .collect();
            let mut expected: BTreeSet<outbox::EventId> = topics
                .iter()
                .zip(&ids)
                .filter(|(topic, _)| parsed.iter().any(|p| p.matches(topic)))
                .map(|(_, id)| *id)
                .collect();
            let sentinel = *ids.last().unwrap();
            expected.insert(sentinel);

            let (observer, signals) = recorder();
            let mut builder = outbox::Relay::builder(pool.clone())
                .observer(observer)
                .workers(1)
                .poll_interval(Duration::from_millis(50))
                .route(SENTINEL, |_: &outbox::StoredEvent| Ok(()));
            for pattern in &patterns {
                builder = builder.route(pattern, |_: &outbox::StoredEvent| Ok(()));
            }
            let relay = builder.start().unwrap();
            // Every routed event delivered, then every other one read (and
            // parked for a relay that routes it): a claim that took one of
            // those would have been seen by then.
            let mut seen = signals.until(|s| {
                let delivered: BTreeSet<outbox::EventId> = s
                    .iter()
                    .filter_map(|s| match s {
                        Signal::Delivered { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                delivered.is_superset(&expected)
            });
            let deadline = std::time::Instant::now() + crate::relay_support::PATIENCE;
            while crate::common::count(&mut conn, "outbox.pending WHERE state = 'unread'") > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never read the whole log"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            relay.shutdown(crate::relay_support::PATIENCE).unwrap();
            seen.extend(signals.0.try_iter());
            let claimed: BTreeSet<outbox::EventId> = seen
                .iter()
                .filter_map(|s| match s {
                    Signal::Claimed(ids) => Some(ids.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            prop_assert_eq!(
                claimed,
                expected,
                "patterns {:?}, topics {:?}",
                patterns,
                topics
            );
            prop_assert!(
                !seen.iter().any(|s| matches!(s, Signal::Released(_))),
                "claimed an event it could not route: {:?}",
                seen
            );
            Ok(())
        })
        .unwrap();
}
