//! Named subscriptions: every subscription receives every event of its
//! topics exactly once, with its own retries, order and dead letters, from
//! the moment it was registered on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use diesel::prelude::*;
use outbox::{DeliveryError, EventId, StoredEvent};

use crate::common::count;
use crate::relay_support::{count_delivered, setup, Signal, PATIENCE};

/// One sink call: (subscription, id, key, attempt).
type Call = (String, EventId, Option<String>, i32);

/// Every sink call of every subscription, in call order.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    /// A sink for subscription `name` that records each call, then answers
    /// with `behave`.
    fn sink(
        &self,
        name: &'static str,
        behave: impl Fn(&StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
    ) -> impl outbox::Sink {
        let calls = self.0.clone();
        move |event: &StoredEvent| {
            assert_eq!(event.subscription, name, "delivered to the wrong sink");
            calls.lock().unwrap().push((
                name.to_owned(),
                event.id,
                event.key.clone(),
                event.attempts,
            ));
            behave(event)
        }
    }

    /// The ids each subscription's sink was called with, in call order.
    fn per_subscription(&self) -> BTreeMap<String, Vec<EventId>> {
        let mut per: BTreeMap<String, Vec<EventId>> = BTreeMap::new();
        for (name, id, _, _) in self.0.lock().unwrap().iter() {
            per.entry(name.clone()).or_default().push(*id);
        }
        per
    }

    fn all(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }
}

/// What named subscriptions still owe (`outbox.pending` without the
/// default subscription, which nobody serves here and which keeps every
/// event for a relay that routes it).
fn owed_by_named(conn: &mut PgConnection) -> i64 {
    count(conn, "outbox.pending WHERE subscription <> 'default'")
}

/// What the default subscription still owes.
fn owed_by_default(conn: &mut PgConnection) -> i64 {
    count(conn, "outbox.pending WHERE subscription = 'default'")
}

fn sorted(mut ids: Vec<EventId>) -> Vec<EventId> {
    ids.sort();
    ids
}

/// Publishes `n` events of topic `order.approved` in `n / 10` transactions,
/// keys `k0`..`k2` and every fourth keyless; returns (id, key) in commit
/// order.
fn publish_orders(conn: &mut PgConnection, n: usize) -> Vec<(EventId, Option<String>)> {
    let mut published = Vec::new();
    for chunk in 0..n / 10 {
        let events: Vec<_> = (0..10)
            .map(|i| {
                let n = chunk * 10 + i;
                let event = outbox::NewEvent::dynamic("order.approved", serde_json::json!(n));
                if n % 4 == 3 {
                    (event, None)
                } else {
                    let key = format!("k{}", n % 3);
                    (event.key(key.clone()), Some(key))
                }
            })
            .collect();
        let keys: Vec<_> = events.iter().map(|(_, k)| k.clone()).collect();
        let ids = outbox::transaction(conn, |tx| {
            tx.publish_events(events.into_iter().map(|(e, _)| e))
        })
        .unwrap();
        published.extend(ids.into_iter().zip(keys));
    }
    published
}

/// Asserts that, for each subscription, the first successful call of each
/// key's events came in commit order.
fn assert_key_order(calls: &[Call], published: &[(EventId, Option<String>)]) {
    let mut seen: BTreeMap<(String, String), Vec<EventId>> = BTreeMap::new();
    for (name, id, key, _) in calls {
        if let Some(key) = key {
            let ids = seen.entry((name.clone(), key.clone())).or_default();
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
    }
    for ((name, key), ids) in seen {
        let expected: Vec<EventId> = published
            .iter()
            .filter(|(_, k)| k.as_deref() == Some(key.as_str()))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids, expected, "subscription {name}, key {key}");
    }
}

/// The dead letters: (subscription, id, attempts, last_error), by
/// subscription and id.
fn dead_letters(conn: &mut PgConnection) -> Vec<(String, i64, i32, String)> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        subscription: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempts: i32,
        #[diesel(sql_type = diesel::sql_types::Text)]
        last_error: String,
    }
    diesel::sql_query(
        "SELECT subscription, id, attempts, last_error FROM outbox.dead_letters
          ORDER BY subscription, id",
    )
    .load::<Row>(conn)
    .unwrap()
    .into_iter()
    .map(|r| (r.subscription, r.id, r.attempts, r.last_error))
    .collect()
}

#[test]
fn three_subscriptions_of_one_topic_each_receive_every_event_exactly_once() {
    let bed = setup();
    let mut conn = bed.conn();
    for name in ["email", "search", "audit"] {
        assert!(outbox::register_subscription(&mut conn, name, &["order.*"]).unwrap());
    }
    let published = publish_orders(&mut conn, 200);
    let ids: Vec<EventId> = published.iter().map(|(id, _)| *id).collect();
    // Two relays serve all three: each event still reaches each
    // subscription's sink once.
    let calls = Calls::default();
    let relays: Vec<_> = (0..2)
        .map(|n| {
            bed.relay()
                .name(format!("relay-{n}"))
                .workers(2)
                .batch_size(25)
                .subscribe("email", &["order.*"], calls.sink("email", |_| Ok(())))
                .subscribe(
                    "search",
                    &["order.approved"],
                    calls.sink("search", |_| Ok(())),
                )
                .subscribe("audit", &["*"], calls.sink("audit", |_| Ok(())))
                .start()
                .unwrap()
        })
        .collect();
    bed.signals.delivered(3 * ids.len());
    for relay in relays {
        relay.shutdown(PATIENCE).unwrap();
    }
    let per = calls.per_subscription();
    assert_eq!(per.keys().collect::<Vec<_>>(), ["audit", "email", "search"]);
    for (name, delivered) in per {
        assert_eq!(sorted(delivered), ids, "subscription {name}");
    }
    assert!(calls.all().iter().all(|(_, _, _, attempt)| *attempt == 1));
    assert_key_order(&calls.all(), &published);
    assert_eq!(owed_by_named(&mut conn), 0);
    assert_eq!(owed_by_default(&mut conn), ids.len() as i64);
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 0);
}

#[test]
fn a_failing_subscription_retries_on_its_own_while_the_others_deliver_everything() {
    let bed = setup();
    let mut conn = bed.conn();
    for name in ["email", "search", "audit"] {
        outbox::register_subscription(&mut conn, name, &["order.approved"]).unwrap();
    }
    let published = publish_orders(&mut conn, 30);
    let ids: Vec<EventId> = published.iter().map(|(id, _)| *id).collect();
    let calls = Calls::default();
    let relay = bed
        .relay()
        .max_attempts(3)
        .subscribe(
            "email",
            &["order.approved"],
            calls.sink("email", |e| {
                Err(DeliveryError::transient(format!(
                    "smtp down {}",
                    e.attempts
                )))
            }),
        )
        .subscribe(
            "search",
            &["order.approved"],
            calls.sink("search", |_| Ok(())),
        )
        .subscribe(
            "audit",
            &["order.approved"],
            calls.sink("audit", |_| Ok(())),
        )
        .start()
        .unwrap();
    let seen = bed.signals.until(|s| {
        count_delivered(s) == 2 * ids.len()
            && s.iter()
                .filter(|s| matches!(s, Signal::Dead { .. }))
                .count()
                == ids.len()
    });
    relay.shutdown(PATIENCE).unwrap();

    // The two others delivered everything at the first attempt, in key
    // order, whatever email went through.
    let per = calls.per_subscription();
    for name in ["search", "audit"] {
        assert_eq!(sorted(per[name].clone()), ids, "subscription {name}");
    }
    let all = calls.all();
    assert!(all
        .iter()
        .filter(|(name, ..)| name != "email")
        .all(|(_, _, _, attempt)| *attempt == 1));
    assert_key_order(&all, &published);
    // Email tried each event three times, one key at a time, and gave up.
    let mut email: Vec<(EventId, i32)> = all
        .iter()
        .filter(|(name, ..)| name == "email")
        .map(|(_, id, _, attempt)| (*id, *attempt))
        .collect();
    email.sort();
    let expected: Vec<(EventId, i32)> = ids
        .iter()
        .flat_map(|id| (1..=3).map(move |attempt| (*id, attempt)))
        .collect();
    assert_eq!(email, expected);
    assert_eq!(relay_retries(&seen), 2 * ids.len());
    // Its dead letters carry its name; the others have none.
    let expected: Vec<(String, i64, i32, String)> = ids
        .iter()
        .map(|id| {
            (
                "email".to_owned(),
                id.get(),
                3,
                "gave up after 3 attempts: smtp down 3".to_owned(),
            )
        })
        .collect();
    assert_eq!(dead_letters(&mut conn), expected);
    let listed = outbox::dead_letters(&mut conn, Some("email"), None, None, 1000).unwrap();
    assert_eq!(listed.len(), ids.len());
    for other in ["search", "audit"] {
        assert!(
            outbox::dead_letters(&mut conn, Some(other), None, None, 1000)
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(owed_by_named(&mut conn), 0);
}

fn relay_retries(signals: &[Signal]) -> usize {
    signals
        .iter()
        .filter(|s| matches!(s, Signal::Retry { .. }))
        .count()
}

#[test]
fn a_subscription_registered_later_receives_only_events_committed_after_it() {
    let bed = setup();
    let mut conn = bed.conn();
    let mut other = bed.conn();
    outbox::register_subscription(&mut conn, "early", &["t"]).unwrap();
    let before = bed.publish(&[("t", Some("k")), ("t", None)]);
    // A transaction open across the registration commits after it: the
    // late subscription receives its event.
    let across = outbox::transaction(&mut conn, |tx| {
        let id = tx.publish_event(outbox::NewEvent::dynamic("t", serde_json::json!("across")))?;
        assert!(outbox::register_subscription(&mut other, "late", &["t"]).unwrap());
        Ok::<_, outbox::Error>(id)
    })
    .unwrap();
    let after = bed.publish(&[("t", Some("k")), ("t", None)]);
    let calls = Calls::default();
    let relay = bed
        .relay()
        .subscribe("early", &["t"], calls.sink("early", |_| Ok(())))
        .subscribe("late", &["t"], calls.sink("late", |_| Ok(())))
        .start()
        .unwrap();
    bed.signals
        .delivered(before.len() + 1 + after.len() + 1 + after.len());
    relay.shutdown(PATIENCE).unwrap();
    let per = calls.per_subscription();
    let everything: Vec<EventId> = before
        .iter()
        .copied()
        .chain([across])
        .chain(after.iter().copied())
        .collect();
    assert_eq!(sorted(per["early"].clone()), sorted(everything));
    let mut expected_late = vec![across];
    expected_late.extend(&after);
    assert_eq!(sorted(per["late"].clone()), sorted(expected_late));
    assert_eq!(owed_by_named(&mut conn), 0);
}
