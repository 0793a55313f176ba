//! [`RateLimit`]: at most so many deliveries started in any window of a
//! given length, across every worker of a relay.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A limit on how fast a relay hands events to a sink: at most `limit`
/// deliveries started in **any** window of `per` (a sliding window, not a
/// token bucket that refills: 10 per second never means 19 within one
/// second). A delivery counts from the moment it is granted until the
/// sink call returns, and for `per` after: so the limit holds for the
/// moments the sink really starts its requests, however late a busy
/// machine schedules them after the grant (the cost: slow calls lower the
/// rate a little). Put it on a route or a subscription with
/// [`RelayBuilder::rate_limit`](crate::RelayBuilder::rate_limit).
///
/// - **Per relay process.** Every worker of the relay shares it; clones
///   share one budget too, so give clones to several routes to limit them
///   together. Relays in other processes have their own: run one relay for
///   a limited subscription, or divide the limit by the number of relays
///   (docs/relay.md says why it is not shared through the database).
/// - **Waiting is not failing.** Events waiting for the limit are not
///   handed to the sink, not counted as attempts or failures, and keep
///   their place in their key's order; their claim's lease is renewed
///   while they wait, and a shutdown releases them unattempted.
/// - A sink's own back-pressure still applies:
///   [`DeliveryError::retry_after`](crate::DeliveryError::retry_after)
///   (an HTTP 429 with `Retry-After`) backs the event off as usual.
///
/// ```
/// use std::time::Duration;
/// let email = outbox::RateLimit::per_second(10);
/// let bulk = outbox::RateLimit::new(1_000, Duration::from_secs(60));
/// # let _ = (email, bulk);
/// ```
#[derive(Clone)]
pub struct RateLimit {
    limit: u32,
    per: Duration,
    /// The deliveries that count against the window: one entry per grant
    /// (how many, and when their call returned; `None` while it runs).
    grants: Arc<Mutex<Grants>>,
}

#[derive(Default)]
struct Grants {
    next: u64,
    /// (grant number, how many, when the call returned).
    entries: VecDeque<(u64, u32, Option<Instant>)>,
}

/// Deliveries [`RateLimit::take`] allowed: they count against the window
/// until the call that makes them returns, then for one more window.
/// Dropping it marks the call returned (also when the sink panicked).
pub(crate) struct Permit<'a> {
    limit: &'a RateLimit,
    grant: u64,
    /// How many deliveries it allows.
    pub(crate) count: usize,
}

impl Permit<'_> {
    /// Marks the call returned at `at` (rather than when dropped).
    #[cfg(test)]
    fn returned(self, at: Instant) {
        self.mark(at);
        std::mem::forget(self);
    }

    fn mark(&self, at: Instant) {
        let mut grants = self.limit.lock();
        if let Some(entry) = grants.entries.iter_mut().find(|e| e.0 == self.grant) {
            entry.2 = Some(at);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.mark(Instant::now());
    }
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RateLimit({} per {:?})", self.limit, self.per)
    }
}

/// How soon to look again while every counted delivery is still running
/// (its end, which frees the window, is not known yet).
const WHILE_RUNNING: Duration = Duration::from_millis(5);

impl RateLimit {
    /// At most `limit` deliveries in any window of `per`. A zero `limit`
    /// or `per` is refused by the relay's `start` (as
    /// [`Error::Config`](crate::Error::Config)).
    pub fn new(limit: u32, per: Duration) -> Self {
        RateLimit {
            limit,
            per,
            grants: Arc::default(),
        }
    }

    /// At most `limit` deliveries in any one second.
    pub fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// The most deliveries in any window.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window's length.
    pub fn per(&self) -> Duration {
        self.per
    }

    /// Why the relay cannot use it, if it cannot.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if self.limit == 0 {
            Some("must allow at least one delivery")
        } else if self.per.is_zero() {
            Some("must have a window longer than zero")
        } else {
            None
        }
    }

    /// Whether `self` and `other` share one budget.
    pub(crate) fn same(&self, other: &RateLimit) -> bool {
        Arc::ptr_eq(&self.grants, &other.grants)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Allows up to `wanted` deliveries to start at `now` (at least one),
    /// or says when to ask again. A delivery counts from its grant until
    /// its call returns (the [`Permit`] is dropped) and for `per` after:
    /// so however late a granted call really starts, no `per` holds more
    /// than `limit` starts, whenever they are measured from.
    pub(crate) fn take(&self, wanted: usize, now: Instant) -> Result<Permit<'_>, Instant> {
        let per = self.per;
        let mut grants = self.lock();
        grants.entries.retain(|(_, _, returned)| {
            returned.is_none_or(|at| now.saturating_duration_since(at) < per)
        });
        let counted: u32 = grants.entries.iter().map(|(_, n, _)| n).sum();
        let free = self.limit.saturating_sub(counted);
        if free == 0 || wanted == 0 {
            // The first to leave the window frees one; while all still
            // run, their end is not known yet.
            let first_out = grants
                .entries
                .iter()
                .filter_map(|(_, _, returned)| returned.map(|at| at + per))
                .min();
            return Err(first_out.unwrap_or(now + WHILE_RUNNING.min(per)));
        }
        let count = u32::try_from(wanted).unwrap_or(u32::MAX).min(free);
        let grant = grants.next;
        grants.next += 1;
        grants.entries.push_back((grant, count, None));
        Ok(Permit {
            limit: self,
            grant,
            count: count as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_delivery_counts_until_its_call_returns_and_a_window_after() {
        let limit = RateLimit::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        let first = limit.take(4, t0).unwrap();
        assert_eq!(first.count, 4);
        let second = limit.take(100, t0 + ms(100)).unwrap();
        assert_eq!(second.count, 6);
        // Full, and nothing has returned: look again soon.
        assert_eq!(
            limit.take(1, t0 + ms(500)).err(),
            Some(t0 + ms(500) + WHILE_RUNNING)
        );
        first.returned(t0 + ms(200));
        // Free again one window after the first call returned.
        assert_eq!(limit.take(1, t0 + ms(500)).err(), Some(t0 + ms(1200)));
        assert_eq!(limit.take(100, t0 + ms(1200)).unwrap().count, 4);
        second.returned(t0 + ms(300));
    }

    #[test]
    fn clones_share_one_budget() {
        let a = RateLimit::per_second(3);
        let b = a.clone();
        let now = Instant::now();
        let _two = a.take(2, now).unwrap();
        assert_eq!(b.take(2, now).unwrap().count, 1);
        assert!(a.same(&b));
        assert!(!a.same(&RateLimit::per_second(3)));
    }

    #[test]
    fn impossible_limits_are_named() {
        assert!(RateLimit::per_second(0).problem().is_some());
        assert!(RateLimit::new(1, Duration::ZERO).problem().is_some());
        assert_eq!(RateLimit::per_second(1).problem(), None);
    }

    #[test]
    fn a_call_that_panics_still_returns_its_permit() {
        let limit = RateLimit::per_second(1);
        let now = Instant::now();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _permit = limit.take(1, now).unwrap();
            panic!("sink");
        }));
        assert!(caught.is_err());
        let free_at = limit.take(1, now).err().unwrap();
        assert!(free_at <= Instant::now() + Duration::from_secs(1));
        assert!(
            free_at > now + WHILE_RUNNING,
            "returned, so a window, not a poll"
        );
    }

    proptest::proptest! {
        /// Workers take permits and return them after calls of any length;
        /// each delivery starts at any moment between its grant and its
        /// return. No window of `per` ever holds more than `limit` starts.
        #[test]
        fn no_window_holds_more_than_the_limit_however_late_calls_start(
            limit in 1u32..12,
            steps in proptest::collection::vec((0u64..300, 1usize..20, 0u64..400, 0u64..100), 1..150),
        ) {
            let per = ms(1000);
            let rate = RateLimit::new(limit, per);
            let t0 = Instant::now();
            let mut now = t0;
            // Running calls: when they return, and their permits.
            let mut running: Vec<(Instant, Permit<'_>)> = Vec::new();
            let mut starts: Vec<Instant> = Vec::new();
            for (advance, wanted, lasts, start_after) in steps {
                now += ms(advance);
                // Calls that returned by now, in order of return.
                running.sort_by_key(|(at, _)| *at);
                while running.first().is_some_and(|(at, _)| *at <= now) {
                    let (at, permit) = running.remove(0);
                    permit.returned(at);
                }
                match rate.take(wanted, now) {
                    Ok(permit) => {
                        proptest::prop_assert!(permit.count >= 1 && permit.count <= wanted);
                        let returns = now + ms(lasts);
                        // Each delivery starts between grant and return.
                        let start = now + ms(start_after.min(lasts));
                        starts.extend(std::iter::repeat_n(start, permit.count));
                        running.push((returns, permit));
                    }
                    Err(again) => proptest::prop_assert!(again > now),
                }
            }
            starts.sort();
            for (i, first) in starts.iter().enumerate() {
                let in_window = starts[i..]
                    .iter()
                    .take_while(|at| at.duration_since(*first) < per)
                    .count();
                proptest::prop_assert!(in_window <= limit as usize, "{in_window} > {limit}");
            }
        }
    }
}
