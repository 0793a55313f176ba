//! Watching a relay: the [`Observer`] hooks (metrics, logs, tests) and the
//! [`RelayStats`] counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::Error;
use crate::event::{EventId, StoredEvent};
use crate::sink::DeliveryError;

/// Hooks called by a relay as events move. Every method has a no-op
/// default, so an observer implements only what it needs. Hooks run on
/// relay threads: keep them quick and never block.
///
/// Settlement hooks (`on_delivered`, `on_retry`, `on_dead_lettered`) run
/// after the outcome is committed, so the database already shows it.
pub trait Observer: Send + Sync + 'static {
    /// A worker claimed a batch (before delivering it).
    fn on_claimed(&self, events: &[StoredEvent]) {
        let _ = events;
    }

    /// An event was delivered and removed from the queue.
    fn on_delivered(&self, event: &StoredEvent) {
        let _ = event;
    }

    /// A delivery failed and the event will be retried after `delay`.
    fn on_retry(&self, event: &StoredEvent, error: &DeliveryError, delay: Duration) {
        let _ = (event, error, delay);
    }

    /// An event was moved to the dead letters with `error`.
    fn on_dead_lettered(&self, event: &StoredEvent, error: &str) {
        let _ = (event, error);
    }

    /// Events that were claimed but not attempted went back to be claimed
    /// again: at shutdown, or held behind an earlier event of their key
    /// that failed in the same batch.
    fn on_released(&self, events: &[EventId]) {
        let _ = events;
    }

    /// The relay's lease on these events ran out and another claim took
    /// them over: this relay's outcome for them was discarded (fencing). A
    /// delivery that did happen may be repeated by the new holder.
    fn on_lease_lost(&self, events: &[EventId]) {
        let _ = events;
    }

    /// Keyed events waiting in `outbox.deliveries` behind an earlier event
    /// of their key were made due by the housekeeper, because that event
    /// went away without a settle waking them (deleted by hand). Relays
    /// alone never cause this; a rescue while nobody deletes rows by hand
    /// points at a bug.
    fn on_stranded_rescued(&self, events: &[EventId]) {
        let _ = events;
    }

    /// A database operation failed; the relay backs off and retries.
    fn on_error(&self, error: &Error) {
        let _ = error;
    }

    /// A database connection works again after failures (`what` is
    /// `"listener"` or `"worker"`).
    fn on_reconnect(&self, what: &'static str) {
        let _ = what;
    }
}

/// A shared observer: keep an `Arc` to read what it collected while the
/// relay runs, or give one observer to several relays.
impl<O: Observer + ?Sized> Observer for std::sync::Arc<O> {
    fn on_claimed(&self, events: &[StoredEvent]) {
        (**self).on_claimed(events)
    }
    fn on_delivered(&self, event: &StoredEvent) {
        (**self).on_delivered(event)
    }
    fn on_retry(&self, event: &StoredEvent, error: &DeliveryError, delay: Duration) {
        (**self).on_retry(event, error, delay)
    }
    fn on_dead_lettered(&self, event: &StoredEvent, error: &str) {
        (**self).on_dead_lettered(event, error)
    }
    fn on_released(&self, events: &[EventId]) {
        (**self).on_released(events)
    }
    fn on_lease_lost(&self, events: &[EventId]) {
        (**self).on_lease_lost(events)
    }
    fn on_stranded_rescued(&self, events: &[EventId]) {
        (**self).on_stranded_rescued(events)
    }
    fn on_error(&self, error: &Error) {
        (**self).on_error(error)
    }
    fn on_reconnect(&self, what: &'static str) {
        (**self).on_reconnect(what)
    }
}

/// The observer that does nothing: the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// Counters since the relay started. A snapshot from [`Relay::stats`](crate::Relay::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Events claimed (each claim of an event counts once).
    pub claimed: u64,
    /// Events delivered and removed.
    pub delivered: u64,
    /// Failed deliveries scheduled for a retry.
    pub retried: u64,
    /// Events moved to the dead letters.
    pub dead_lettered: u64,
    /// Claimed events returned unattempted: at shutdown, or held behind an
    /// earlier event of their key that failed in the same batch.
    pub released: u64,
    /// Events whose lease was lost before settling.
    pub lease_lost: u64,
    /// Keyed events woken by the housekeeper instead of by the settle of
    /// their earlier event ([`Observer::on_stranded_rescued`]).
    pub stranded_rescued: u64,
    /// Database errors (claim, settle, listen) the relay recovered from.
    pub errors: u64,
    /// Reconnections after failures.
    pub reconnects: u64,
}

/// Live counters behind [`RelayStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claimed: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) stranded_rescued: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RelayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            claimed: get(&self.claimed),
            delivered: get(&self.delivered),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            released: get(&self.released),
            lease_lost: get(&self.lease_lost),
            stranded_rescued: get(&self.stranded_rescued),
            errors: get(&self.errors),
            reconnects: get(&self.reconnects),
        }
    }
}
