//! [`RateLimit`]: at most so many deliveries started in any window of a
//! given length, across every worker of a relay.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A limit on how fast a relay hands events to a sink: at most `limit`
/// deliveries started in **any** window of `per` (a sliding window, not a
/// token bucket that refills: 10 per second never means 19 within one
/// second). Put it on a route or a subscription with
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
    /// When deliveries started within the last `per`, oldest first, as
    /// (when, how many): one entry per grant, not per event.
    starts: Arc<Mutex<VecDeque<(Instant, u32)>>>,
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RateLimit({} per {:?})", self.limit, self.per)
    }
}

impl RateLimit {
    /// At most `limit` deliveries started in any window of `per`. A zero
    /// `limit` or `per` is refused by the relay's `start` (as
    /// [`Error::Config`](crate::Error::Config)).
    pub fn new(limit: u32, per: Duration) -> Self {
        RateLimit {
            limit,
            per,
            starts: Arc::default(),
        }
    }

    /// At most `limit` deliveries started in any one second.
    pub fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// The most deliveries started in any window.
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
        Arc::ptr_eq(&self.starts, &other.starts)
    }

    /// Starts up to `wanted` deliveries at `now`: how many it may start
    /// (at least one), or when the next one may.
    pub(crate) fn take(&self, wanted: usize, now: Instant) -> Result<usize, Instant> {
        let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
        while starts
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.per)
        {
            starts.pop_front();
        }
        let started: u32 = starts.iter().map(|(_, n)| n).sum();
        let free = self.limit.saturating_sub(started);
        if free == 0 || wanted == 0 {
            // Free again when enough of the oldest leave the window; with
            // nothing free, the oldest grant leaving frees at least one.
            let oldest = starts.front().map_or(now, |(at, _)| *at);
            return Err(oldest + self.per);
        }
        let granted = u32::try_from(wanted).unwrap_or(u32::MAX).min(free);
        starts.push_back((now, granted));
        Ok(granted as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_more_than_the_limit_in_any_window() {
        let limit = RateLimit::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limit.take(4, t0), Ok(4));
        assert_eq!(limit.take(100, t0 + Duration::from_millis(100)), Ok(6));
        assert_eq!(
            limit.take(1, t0 + Duration::from_millis(500)),
            Err(t0 + Duration::from_secs(1)),
            "full until the first grant leaves the window"
        );
        // The first 4 left; the 6 of t0+100ms have not.
        assert_eq!(limit.take(100, t0 + Duration::from_secs(1)), Ok(4));
        assert_eq!(
            limit.take(1, t0 + Duration::from_millis(1050)),
            Err(t0 + Duration::from_millis(1100))
        );
        assert_eq!(limit.take(100, t0 + Duration::from_millis(1100)), Ok(6));
    }

    #[test]
    fn clones_share_one_budget() {
        let a = RateLimit::per_second(3);
        let b = a.clone();
        let now = Instant::now();
        assert_eq!(a.take(2, now), Ok(2));
        assert_eq!(b.take(2, now), Ok(1));
        assert!(a.same(&b));
        assert!(!a.same(&RateLimit::per_second(3)));
    }

    #[test]
    fn impossible_limits_are_named() {
        assert!(RateLimit::per_second(0).problem().is_some());
        assert!(RateLimit::new(1, Duration::ZERO).problem().is_some());
        assert_eq!(RateLimit::per_second(1).problem(), None);
    }

    proptest::proptest! {
        /// Whatever the requests, no window of `per` ever holds more than
        /// `limit` starts, and a refusal names a time when one is free.
        #[test]
        fn the_window_holds(
            limit in 1u32..20,
            steps in proptest::collection::vec((0u64..400, 1usize..30), 1..200),
        ) {
            let per = Duration::from_millis(1000);
            let rate = RateLimit::new(limit, per);
            let t0 = Instant::now();
            let mut now = t0;
            let mut started: Vec<Instant> = Vec::new();
            for (advance, wanted) in steps {
                now += Duration::from_millis(advance);
                match rate.take(wanted, now) {
                    Ok(granted) => {
                        proptest::prop_assert!(granted >= 1 && granted <= wanted);
                        started.extend(std::iter::repeat_n(now, granted));
                    }
                    Err(free_at) => {
                        proptest::prop_assert!(free_at > now);
                        proptest::prop_assert!(rate.take(1, free_at).is_ok());
                        started.push(free_at);
                        now = free_at;
                    }
                }
                let in_window = started
                    .iter()
                    .filter(|at| now.saturating_duration_since(**at) < per)
                    .count();
                proptest::prop_assert!(in_window <= limit as usize, "{in_window} > {limit}");
            }
        }
    }
}
