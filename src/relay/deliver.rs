//! Handing a claimed batch to its sinks: consecutive events routed to the
//! same sink go in one [`Sink::deliver_batch`] call (at most the sink's
//! [`Sink::max_batch`]), and every event comes back with its own result.
//!
//! The worker decides what happens between calls (renewing the lease,
//! stopping) and turns each result into a verdict.

use std::collections::HashSet;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};

use super::rate::RateLimit;
use super::routing::{Route, Routes};
use crate::event::{EventId, StoredEvent};
use crate::sink::{DeliveryError, Sink};

/// One sink call's worth of a batch: consecutive events with the same
/// route.
pub(super) struct Call<'a> {
    /// Where they go; `None` when no route takes their topic (claims only
    /// take routed topics, so this is a safeguard).
    route: Option<&'a Route>,
    /// Their positions in the batch.
    pub(super) events: Range<usize>,
}

/// Splits `events` (a claimed batch, in delivery order) into calls: runs of
/// consecutive events routed to the same sink, none longer than the sink's
/// [`Sink::max_batch`], and none holding two events of one key (a batch of
/// the log may hold several: the later ones must wait for the verdict on
/// the earlier). Keeping runs consecutive keeps the batch's order across
/// sinks.
pub(super) fn calls<'a>(routes: &'a Routes, events: &[StoredEvent]) -> Vec<Call<'a>> {
    let mut calls: Vec<Call<'a>> = Vec::new();
    let mut keys: HashSet<&str> = HashSet::new();
    for (index, event) in events.iter().enumerate() {
        let route = routes.route_for(&event.topic);
        let key = event.key.as_deref();
        if let Some(last) = calls.last_mut() {
            let same = match (last.route, route) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            };
            let room = last.route.map_or(usize::MAX, |r| r.sink.max_batch().max(1));
            let repeats = key.is_some_and(|k| keys.contains(k));
            if same && last.events.len() < room && !repeats {
                last.events.end = index + 1;
                keys.extend(key);
                continue;
            }
        }
        keys.clear();
        keys.extend(key);
        calls.push(Call {
            route,
            events: index..index + 1,
        });
    }
    calls
}

impl<'a> Call<'a> {
    /// The limit its sink is held to, if any.
    pub(super) fn limit(&self) -> Option<&'a RateLimit> {
        self.route.and_then(|route| route.limit.as_ref())
    }

    /// Splits off the call's first `n` events (at least one) as a call of
    /// their own; `self` keeps the rest, which may be none.
    pub(super) fn split_first(&mut self, n: usize) -> Call<'a> {
        let end = (self.events.start + n.max(1)).min(self.events.end);
        let first = Call {
            route: self.route,
            events: self.events.start..end,
        };
        self.events.start = end;
        first
    }

    /// Delivers the call's events that `holds` still says are this relay's,
    /// in one [`Sink::deliver_batch`] call. Returns, for every event of the
    /// call in order, its position in the batch and its result: `None` for
    /// an event not handed to the sink (no longer held: another relay took
    /// it over, and delivering would only duplicate; or not routed), which
    /// the relay releases.
    ///
    /// A panic fails every event handed to the sink (transient), and so
    /// does a missing result; extra results are ignored.
    pub(super) fn deliver(
        &self,
        batch: &[StoredEvent],
        holds: impl Fn(EventId) -> bool,
    ) -> Vec<(usize, Option<Result<(), DeliveryError>>)> {
        let sent: Vec<usize> = match self.route {
            Some(_) => self
                .events
                .clone()
                .filter(|&i| holds(batch[i].id))
                .collect(),
            None => Vec::new(),
        };
        let mut results = match self.route {
            Some(route) if !sent.is_empty() => {
                let events: Vec<&StoredEvent> = sent.iter().map(|&i| &batch[i]).collect();
                deliver_batch(&*route.sink, &events).into_iter()
            }
            _ => Vec::new().into_iter(),
        };
        let mut sent = sent.into_iter().peekable();
        self.events
            .clone()
            .map(|index| {
                if sent.next_if_eq(&index).is_none() {
                    return (index, None);
                }
                let result = results.next().unwrap_or_else(|| {
                    Err(DeliveryError::transient(
                        "the sink returned no result for this event",
                    ))
                });
                (index, Some(result))
            })
            .collect()
    }
}

/// `sink.deliver_batch(events)`, with a panic caught and turned into a
/// transient failure of every event; with the `opentelemetry` feature,
/// inside the delivery spans of `relay/spans.rs`.
fn deliver_batch(sink: &dyn Sink, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
    #[cfg(feature = "opentelemetry")]
    return super::spans::Deliveries::open(events).around(|| call_sink(sink, events));
    #[cfg(not(feature = "opentelemetry"))]
    call_sink(sink, events)
}

fn call_sink(sink: &dyn Sink, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
    panic::catch_unwind(AssertUnwindSafe(|| sink.deliver_batch(events))).unwrap_or_else(|panic| {
        let error = DeliveryError::transient(format!("sink panicked: {}", panic_message(&*panic)));
        vec![Err(error); events.len()]
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::relay::routing::TopicPattern;

    fn event(id: i64, topic: &str) -> StoredEvent {
        StoredEvent {
            id: EventId(id),
            topic: topic.to_owned(),
            key: None,
            payload: serde_json::Value::Null,
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            available_at: chrono::Utc::now(),
            attempts: 1,
            last_error: None,
            subscription: String::new(),
        }
    }

    /// A sink that takes up to `max` events a call and fails the event
    /// with id `fail`, or misbehaves as `mode` says.
    struct Batching {
        max: usize,
        fail: i64,
        mode: &'static str,
    }

    impl Sink for Batching {
        fn deliver(&self, _: &StoredEvent) -> Result<(), DeliveryError> {
            unreachable!("the relay calls deliver_batch")
        }
        fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
            match self.mode {
                "panic" => panic!("boom"),
                "short" => vec![Ok(())],
                _ => events
                    .iter()
                    .map(|e| match e.id.0 == self.fail {
                        true => Err(DeliveryError::permanent("no")),
                        false => Ok(()),
                    })
                    .collect(),
            }
        }
        fn max_batch(&self) -> usize {
            self.max
        }
    }

    fn routes(pairs: Vec<(&str, Arc<dyn Sink>)>) -> Routes {
        let mut routes = Routes::default();
        for (pattern, sink) in pairs {
            routes
                .add(TopicPattern::parse(pattern).unwrap(), sink)
                .unwrap();
        }
        routes
    }

    fn kinds(results: Vec<(usize, Option<Result<(), DeliveryError>>)>) -> Vec<String> {
        results
            .into_iter()
            .map(|(i, r)| match r {
                None => format!("{i}:released"),
                Some(Ok(())) => format!("{i}:ok"),
                Some(Err(e)) => format!("{i}:{:?} {}", e.kind(), e.message()),
            })
            .collect()
    }

    #[test]
    fn consecutive_events_of_one_sink_share_a_call_up_to_its_max_batch() {
        let a: Arc<dyn Sink> = Arc::new(Batching {
            max: 2,
            fail: 0,
            mode: "",
        });
        let b: Arc<dyn Sink> = Arc::new(|_: &StoredEvent| Ok(()));
        let routes = routes(vec![("a.*", a), ("b.*", b)]);
        let batch: Vec<StoredEvent> = ["a.x", "a.y", "a.z", "b.x", "b.y", "a.x"]
            .iter()
            .enumerate()
            .map(|(i, t)| event(i as i64 + 1, t))
            .collect();
        let calls: Vec<Range<usize>> = calls(&routes, &batch)
            .into_iter()
            .map(|c| c.events)
            .collect();
        // b keeps the default max_batch of 1.
        assert_eq!(calls, [0..2, 2..3, 3..4, 4..5, 5..6]);
    }

    #[test]
    fn a_call_never_holds_two_events_of_one_key() {
        let sink: Arc<dyn Sink> = Arc::new(Batching {
            max: 10,
            fail: 0,
            mode: "",
        });
        let routes = routes(vec![("*", sink)]);
        let keyed = |id: i64, key: Option<&str>| StoredEvent {
            key: key.map(str::to_owned),
            ..event(id, "t")
        };
        let batch = [
            keyed(1, Some("a")),
            keyed(2, Some("b")),
            keyed(3, None),
            keyed(4, Some("a")),
            keyed(5, None),
            keyed(6, Some("b")),
            keyed(7, Some("c")),
        ];
        let calls: Vec<Range<usize>> = calls(&routes, &batch)
            .into_iter()
            .map(|c| c.events)
            .collect();
        // The second `a` starts a call; the second `b` does not repeat
        // within that one.
        assert_eq!(calls, [0..3, 3..7]);
    }

    #[test]
    fn each_event_gets_its_own_result_and_unheld_ones_are_not_sent() {
        let sink: Arc<dyn Sink> = Arc::new(Batching {
            max: 10,
            fail: 3,
            mode: "",
        });
        let routes = routes(vec![("*", sink)]);
        let batch: Vec<StoredEvent> = (1..=4).map(|id| event(id, "t")).collect();
        let calls = calls(&routes, &batch);
        assert_eq!(calls.len(), 1);
        let results = calls[0].deliver(&batch, |id| id != EventId(2));
        assert_eq!(
            kinds(results),
            ["0:ok", "1:released", "2:Permanent no", "3:ok"]
        );
    }

    #[test]
    fn a_panic_or_a_missing_result_fails_events_as_transient() {
        let batch: Vec<StoredEvent> = (1..=2).map(|id| event(id, "t")).collect();
        for (mode, expected) in [
            (
                "panic",
                [
                    "0:Transient sink panicked: boom",
                    "1:Transient sink panicked: boom",
                ],
            ),
            (
                "short",
                [
                    "0:ok",
                    "1:Transient the sink returned no result for this event",
                ],
            ),
        ] {
            let sink: Arc<dyn Sink> = Arc::new(Batching {
                max: 10,
                fail: 0,
                mode,
            });
            let routes = routes(vec![("*", sink)]);
            let results = calls(&routes, &batch)[0].deliver(&batch, |_| true);
            assert_eq!(kinds(results), expected, "{mode}");
        }
    }
}
