//! What a relay serves: named subscriptions, each with its sink, its own
//! workers and its own schedule, and the default subscription that
//! `.route` and `.handle` fill.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::routing::{Routes, TopicPattern};
use super::wakeup::Schedule;
use crate::error::Error;
use crate::sink::Sink;
use crate::store::TopicFilter;

/// The subscription that relays without a named one serve: every topic,
/// and each relay takes the topics it routes (others wait for a relay
/// that routes them, as before subscriptions existed).
pub const DEFAULT_SUBSCRIPTION: &str = "default";

/// One subscription as this relay serves it.
pub(crate) struct Served {
    pub(crate) name: String,
    /// The patterns registered in `outbox.subscriptions`.
    pub(crate) patterns: Vec<String>,
    /// The same, for SQL.
    pub(crate) topics: TopicFilter,
    /// The sinks, by topic.
    pub(crate) routes: Routes,
    /// What this relay's claims take: its routes (for a named subscription,
    /// its patterns); the subscription's other topics wait for a relay
    /// that routes them.
    pub(crate) routed: TopicFilter,
    pub(crate) schedule: Schedule,
    /// One pending wake-up at most: a burst of notifications becomes one
    /// claim round.
    pub(crate) wake_tx: Sender<()>,
    pub(crate) wake_rx: Receiver<()>,
    /// Whether a sleeping worker keeps the poll timer: one at a time, so
    /// an idle relay claims once per poll interval, not once per worker.
    pub(crate) poller: AtomicBool,
    registered: AtomicBool,
}

impl Served {
    /// The default subscription with this relay's routes.
    pub(crate) fn default_with(routes: Routes) -> Self {
        let routed = routes.claim_filter();
        Self::new(
            DEFAULT_SUBSCRIPTION.to_owned(),
            vec!["*".to_owned()],
            TopicFilter {
                all: true,
                ..TopicFilter::default()
            },
            routes,
            routed,
        )
    }

    /// A named subscription delivering every topic of `patterns` to `sink`.
    pub(crate) fn named(name: &str, patterns: &[&str], sink: Arc<dyn Sink>) -> Result<Self, Error> {
        let (routes, written, topics) = compile(name, patterns, Some(sink))?;
        // Its claims take its own patterns: should another relay have
        // registered wider ones, the topics this relay has no sink for wait
        // for a relay that has (they are parked, not put back at once).
        let routed = topics.clone();
        Ok(Self::new(name.to_owned(), written, topics, routes, routed))
    }

    fn new(
        name: String,
        patterns: Vec<String>,
        topics: TopicFilter,
        routes: Routes,
        routed: TopicFilter,
    ) -> Self {
        let (wake_tx, wake_rx) = bounded(1);
        Served {
            name,
            patterns,
            topics,
            routes,
            routed,
            schedule: Schedule::default(),
            wake_tx,
            wake_rx,
            poller: AtomicBool::new(false),
            registered: AtomicBool::new(false),
        }
    }

    /// Whether this relay has registered the subscription since it started.
    pub(crate) fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    pub(crate) fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Release);
    }
}

/// Checks a subscription's name and patterns; returns its routes (to
/// `sink`, if given), its patterns as written back, and its topics for SQL.
pub(crate) fn compile(
    name: &str,
    patterns: &[&str],
    sink: Option<Arc<dyn Sink>>,
) -> Result<(Routes, Vec<String>, TopicFilter), Error> {
    check_name(name)?;
    if patterns.is_empty() {
        return Err(Error::Config {
            field: "subscribe",
            reason: format!("subscription {name:?} has no topic pattern"),
        });
    }
    // Without a sink the routes only compile the filter: a sink that
    // refuses everything stands in.
    let sink = sink.unwrap_or_else(|| {
        Arc::new(|_: &crate::StoredEvent| Err::<(), _>(crate::DeliveryError::transient("no sink")))
    });
    let mut routes = Routes::default();
    let mut written = Vec::with_capacity(patterns.len());
    for pattern in patterns {
        let invalid = |e: Error| Error::Config {
            field: "subscribe",
            reason: format!("subscription {name:?}: {}", reason_of(e)),
        };
        let parsed = TopicPattern::parse(pattern).map_err(invalid)?;
        written.push(parsed.to_string());
        routes.add(parsed, sink.clone()).map_err(invalid)?;
    }
    let topics = routes.claim_filter();
    Ok((routes, written, topics))
}

fn reason_of(error: Error) -> String {
    match error {
        Error::Config { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Subscription names: 1 to 63 characters, letters, digits, `_`, `.` and
/// `-`, not starting with `.` or `-` (the table's check says the same).
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && !name.starts_with(['.', '-']);
    if valid {
        Ok(())
    } else {
        Err(Error::Config {
            field: "subscribe",
            reason: format!(
                "subscription name {:?} must be 1 to 63 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`",
                crate::error::excerpt(name)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_table_check() {
        for good in ["email", "search-indexer", "a.b_c", "default", "0"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(64);
        for bad in ["", "-x", ".x", "a b", "é", long.as_str()] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
