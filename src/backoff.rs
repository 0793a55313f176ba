//! Retry timing: jittered exponential backoff, as a pure function of the
//! attempt number and a random source.

use std::time::Duration;

use rand::{Rng, RngExt};

/// Jittered exponential backoff: the delay before retrying after failed
/// attempt `n` is `base × factor^(n-1)`, capped at `cap`, then shortened by
/// a random fraction of up to `jitter`.
///
/// ```
/// use std::time::Duration;
/// use rand::SeedableRng;
///
/// let backoff = outbox::Backoff::default();
/// let mut rng = rand::rngs::StdRng::seed_from_u64(7);
/// let first = backoff.delay(1, &mut rng);
/// assert!(first <= Duration::from_secs(1) && first >= Duration::from_millis(800));
/// assert!(backoff.delay(100, &mut rng) <= backoff.cap());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    factor: f64,
    jitter: f64,
}

impl Backoff {
    /// Default delay after the first failure: 1 s.
    pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
    /// Default longest delay: 1 hour. Reached at the 13th delay (2^12 s
    /// would be 68 min). An hour keeps the attempts against a target that
    /// is down for a day to about one an hour, and once it is back, every
    /// waiting event is delivered within the hour.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(3600);
    /// Default growth per attempt: doubling.
    pub const DEFAULT_FACTOR: f64 = 2.0;
    /// Default jitter: delays are shortened by up to 20%.
    pub const DEFAULT_JITTER: f64 = 0.2;

    /// A backoff schedule. Checked when the relay starts: `base` > 0,
    /// `cap` ≥ `base`, `factor` ≥ 1 and finite, `jitter` in `0.0..=1.0`.
    pub fn new(base: Duration, cap: Duration, factor: f64, jitter: f64) -> Self {
        Backoff {
            base,
            cap,
            factor,
            jitter,
        }
    }

    /// The delay after the first failure.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay, jitter included.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// How much each further failure multiplies the delay.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The largest fraction by which jitter shortens a delay.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The delay before the next attempt, after failed attempt `attempt`
    /// (1 for the first). Always within `[d × (1 − jitter), d]` where
    /// `d = min(cap, base × factor^(attempt−1))`, so never above `cap`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        // Cap before jitter: the exponential overflows to infinity quickly,
        // and a capped value keeps jitter meaningful at the ceiling (all
        // late retries would otherwise land at exactly `cap`, in lockstep).
        let ceiling =
            (self.base.as_secs_f64() * self.factor.powi(exponent)).min(self.cap.as_secs_f64());
        // Jitter only shortens, so the cap also holds after it.
        let shortened = ceiling * (1.0 - self.jitter * rng.random::<f64>());
        Duration::try_from_secs_f64(shortened)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// Checks the settings; the relay builder reports the first problem.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if self.base.is_zero() {
            return Err(("backoff.base", "must be greater than zero".into()));
        }
        if self.cap < self.base {
            return Err((
                "backoff.cap",
                format!(
                    "{:?} is shorter than backoff.base {:?}",
                    self.cap, self.base
                ),
            ));
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return Err((
                "backoff.factor",
                format!("{} must be finite and at least 1", self.factor),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err((
                "backoff.jitter",
                format!("{} must be between 0 and 1", self.jitter),
            ));
        }
        Ok(())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(
            Self::DEFAULT_BASE,
            Self::DEFAULT_CAP,
            Self::DEFAULT_FACTOR,
            Self::DEFAULT_JITTER,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(42)
    }

    #[test]
    fn without_jitter_the_delay_doubles_until_the_cap() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10), 2.0, 0.0);
        let delays: Vec<u64> = (1..=6)
            .map(|n| backoff.delay(n, &mut rng()).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn jitter_shortens_within_its_fraction_and_varies() {
        let backoff = Backoff::new(Duration::from_secs(8), Duration::from_secs(60), 2.0, 0.5);
        let mut rng = rng();
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(1, &mut rng)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_secs(4) && *d <= Duration::from_secs(8)));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 150,
            "jitter barely varies: {}",
            distinct.len()
        );
    }

    #[test]
    fn a_seeded_rng_gives_a_reproducible_schedule() {
        let backoff = Backoff::default();
        let a: Vec<Duration> = (1..=10).map(|n| backoff.delay(n, &mut rng())).collect();
        let b: Vec<Duration> = (1..=10).map(|n| backoff.delay(n, &mut rng())).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_secs(3), 10.0, 0.0);
        assert_eq!(backoff.delay(u32::MAX, &mut rng()), Duration::from_secs(3));
        assert_eq!(backoff.delay(0, &mut rng()), Duration::from_millis(1));
    }

    /// Valid schedules: base from 1 µs to about 11 days, cap at or above
    /// it (possibly far above), factor from 1 to 1000, any jitter.
    fn schedules() -> impl proptest::strategy::Strategy<Value = Backoff> {
        use proptest::prelude::*;
        (
            1u64..1_000_000_000_000,
            0u64..1_000_000_000_000_000,
            1.0f64..1_000.0,
            0.0f64..=1.0,
        )
            .prop_map(|(base_us, extra_us, factor, jitter)| {
                let base = Duration::from_micros(base_us);
                Backoff::new(base, base + Duration::from_micros(extra_us), factor, jitter)
            })
    }

    /// The delay before jitter, computed the obvious way for comparison.
    fn ceiling(backoff: &Backoff, attempt: u32) -> f64 {
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        (backoff.base.as_secs_f64() * backoff.factor.powi(exponent)).min(backoff.cap.as_secs_f64())
    }

    proptest::proptest! {
        #[test]
        fn every_delay_lies_within_its_jitter_band_and_never_above_the_cap(
            backoff in schedules(),
            attempt: u32,
            seed: u64,
        ) {
            proptest::prop_assume!(backoff.check().is_ok());
            let delay = backoff.delay(attempt, &mut rand::rngs::StdRng::seed_from_u64(seed));
            let ceiling = ceiling(&backoff, attempt);
            proptest::prop_assert!(delay <= backoff.cap);
            // Slack for the f64 → Duration → f64 round trip: a nanosecond,
            // or the f64 precision of large delays.
            let slack = 1e-9 + ceiling * 1e-12;
            proptest::prop_assert!(delay.as_secs_f64() <= ceiling + slack, "{delay:?} > {ceiling}");
            proptest::prop_assert!(
                delay.as_secs_f64() >= ceiling * (1.0 - backoff.jitter) - slack,
                "{delay:?} < {ceiling} × (1 − {})", backoff.jitter
            );
        }

        #[test]
        fn with_the_same_random_draw_a_later_attempt_never_waits_less(
            backoff in schedules(),
            attempt in 0u32..2_000,
            seed: u64,
        ) {
            // The same seed gives the same jitter fraction, so this compares
            // the pre-jitter schedule: non-decreasing up to the cap.
            let rng = || rand::rngs::StdRng::seed_from_u64(seed);
            let now = backoff.delay(attempt, &mut rng());
            let next = backoff.delay(attempt + 1, &mut rng());
            proptest::prop_assert!(now <= next, "attempt {attempt}: {now:?} then {next:?}");
        }

        #[test]
        fn without_jitter_the_schedule_reaches_the_cap_and_stays_there(
            base_ms in 1u64..10_000,
            cap_factor in 1u64..1_000,
            factor in 1.5f64..10.0,
            attempt in 1u32..=u32::MAX,
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = base * cap_factor as u32;
            let backoff = Backoff::new(base, cap, factor, 0.0);
            let delay = backoff.delay(attempt, &mut rng());
            // factor ≥ 1.5 grows past any cap ≤ 1000 × base within 18 steps.
            if attempt > 18 {
                proptest::prop_assert_eq!(delay, cap);
            } else {
                proptest::prop_assert!(delay >= base && delay <= cap);
            }
        }
    }

    /// The total wait of `attempts` attempts (one delay fewer than
    /// attempts), from every delay at its most shortened to none shortened.
    fn span(backoff: &Backoff, attempts: u32) -> (f64, f64) {
        let longest: f64 = (1..attempts).map(|n| ceiling(backoff, n)).sum();
        (longest * (1.0 - backoff.jitter), longest)
    }

    #[test]
    fn the_default_schedule_retries_for_a_day_and_gives_up_within_a_day_and_a_half() {
        let attempts = crate::RelayBuilder::DEFAULT_MAX_ATTEMPTS;
        let (shortest, longest) = span(&Backoff::default(), attempts);
        // 41 delays: 1 + 2 + … + 2048 s = 4,095 s, then 29 × 3,600 s.
        assert_eq!(
            (shortest.round() as u64, longest.round() as u64),
            (86_796, 108_495),
            "{attempts} attempts: {shortest} s to {longest} s"
        );
        // Even if every delay is shortened as much as jitter allows, an
        // outage of a day dead-letters nothing; one attempt fewer would not.
        assert!(shortest >= 86_400.0);
        assert!(span(&Backoff::default(), attempts - 1).0 < 86_400.0);
        // And an event that cannot be delivered still reaches the dead
        // letters (and a human) within a day and a half.
        assert!(longest <= 1.5 * 86_400.0);
    }

    #[test]
    fn impossible_settings_name_their_field() {
        let s = Duration::from_secs(1);
        assert_eq!(
            Backoff::new(Duration::ZERO, s, 2.0, 0.1)
                .check()
                .unwrap_err()
                .0,
            "backoff.base"
        );
        assert_eq!(
            Backoff::new(s * 2, s, 2.0, 0.1).check().unwrap_err().0,
            "backoff.cap"
        );
        assert_eq!(
            Backoff::new(s, s, 0.5, 0.1).check().unwrap_err().0,
            "backoff.factor"
        );
        assert_eq!(
            Backoff::new(s, s, f64::NAN, 0.1).check().unwrap_err().0,
            "backoff.factor"
        );
        assert_eq!(
            Backoff::new(s, s, 2.0, 1.5).check().unwrap_err().0,
            "backoff.jitter"
        );
        assert!(Backoff::default().check().is_ok());
    }
}
