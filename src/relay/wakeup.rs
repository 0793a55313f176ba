//! When a relay wants NOTIFYs: while events come slowly, and otherwise only
//! while all its workers are asleep.
//!
//! A NOTIFY serializes publishers' commits (docs/design.md), which costs
//! something only when many commit at once. So the relay watches the rate
//! of events: what it claims, and the notifications it hears (one per
//! publishing statement while they are on, which tells a burst at once,
//! before the claims catch up):
//!
//! - Below [`NOTIFY_BELOW`] events/s (most applications, most of the time)
//!   it keeps `outbox.relay_wakeup` *armed*, so every commit notifies, and
//!   its workers sleep between events until a notification wakes one: an
//!   event is picked up about a millisecond after its commit.
//! - Above [`POLL_ABOVE`] the listener *disarms* the flag on the next
//!   notification, and a worker that found work polls again after short,
//!   growing pauses ([`LINGER`]): publishers commit without notifying. One
//!   that found nothing for a while becomes drowsy and then sleeps until a
//!   wake-up or the poll interval; when the last worker of the relay dozes
//!   off it arms the flag again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The pauses of a worker between claims that came back empty, after a
/// claim that found work: it keeps looking for about 127 ms (the total)
/// before it sleeps. The last pause is the drowsy one: the relay arms the
/// wake-up flag at its start when every worker has reached it, and the
/// claim at its end catches events whose publishers read the flag just
/// before it was armed.
pub(crate) const LINGER: [Duration; 7] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
];

/// Bounds of how long an armed wake-up flag stays armed without renewal.
const ARMED_AT_LEAST: Duration = Duration::from_secs(1);
const ARMED_AT_MOST: Duration = Duration::from_secs(24 * 60 * 60);

/// Below this rate of claimed events per second the relay keeps
/// notifications on and its workers wait for them.
pub(crate) const NOTIFY_BELOW: f64 = 250.0;
/// Above this rate it turns them off and polls (the gap between the two
/// keeps it from flapping). It must stay well below what publishers reach
/// while they notify: notifying commits run one at a time through their
/// WAL flush, about 700/s on the standard machine, so a threshold above
/// that (it was 1,000/s) is never crossed once notifications are on, and
/// they stay on under any load.
pub(crate) const POLL_ABOVE: f64 = 500.0;
/// The window over which the rate is measured: short, so that a burst of
/// publishers turns notifications off after about
/// `POLL_ABOVE × RATE_WINDOW` (50) of them.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// The relay-wide side: how many workers sleep, whether (and when) this
/// relay armed the flag, and how fast events come.
#[derive(Debug)]
pub(crate) struct Wakeup {
    /// False without a listener: then nobody would hear a NOTIFY, so the
    /// relay never asks for one.
    enabled: bool,
    workers: usize,
    asleep: AtomicUsize,
    armed_at: Mutex<Option<Instant>>,
    /// How long an arming lasts (a few poll intervals).
    armed_for: Duration,
    /// How often a sleeping relay renews it (the poll interval).
    renew_every: Duration,
    rate: Mutex<Rate>,
}

/// Events counted per [`RATE_WINDOW`], and the mode they decided.
#[derive(Debug)]
struct Rate {
    window_start: Instant,
    claimed: u64,
    /// Notifications heard: while the flag is armed, one per publishing
    /// statement. They tell the publishers' rate at once, where claims
    /// trail it while notified workers wake one claim at a time.
    notified: u64,
    notify: bool,
}

impl Wakeup {
    /// `workers` in all; the flag is renewed every `poll_interval` and
    /// lasts three of them (at least 1 s, at most a day).
    pub(crate) fn new(enabled: bool, workers: usize, poll_interval: Duration) -> Self {
        Wakeup {
            enabled,
            workers,
            asleep: AtomicUsize::new(0),
            armed_at: Mutex::new(None),
            armed_for: (poll_interval * 3).clamp(ARMED_AT_LEAST, ARMED_AT_MOST),
            renew_every: poll_interval,
            rate: Mutex::new(Rate {
                window_start: Instant::now(),
                claimed: 0,
                notified: 0,
                notify: true,
            }),
        }
    }

    /// A claim took `events`.
    pub(crate) fn claimed(&self, events: usize) {
        let mut rate = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
        rate.claimed += events as u64;
        rate.decide();
    }

    /// The listener heard `notifications`.
    pub(crate) fn notified(&self, notifications: usize) {
        let mut rate = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
        rate.notified += notifications as u64;
        rate.decide();
    }

    /// Whether the relay keeps notifications on and waits for them (a
    /// listener is needed, and events come slowly).
    pub(crate) fn notify_mode(&self) -> bool {
        self.enabled
            && self
                .rate
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .notify
    }

    /// Whether the flag this relay armed is still armed, as far as it
    /// knows (another relay's listener may have disarmed it since).
    fn armed_still(&self) -> bool {
        self.armed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < self.armed_for)
    }

    /// Whether the relay wants notifications now: events come slowly, or
    /// every worker is asleep.
    fn wants_notifications(&self) -> bool {
        self.notify_mode() || (self.enabled && self.asleep.load(Ordering::Acquire) == self.workers)
    }

    /// Whether the flag must be armed now, by a statement of its own,
    /// before the next claim: the relay wants notifications and the flag
    /// is not armed (then publishers committing during that claim would
    /// neither notify nor be seen by it).
    pub(crate) fn should_arm(&self) -> bool {
        self.enabled && self.wants_notifications() && !self.armed_still()
    }

    /// For how long the next claim should renew the flag, if it should: it
    /// is armed and was renewed a poll interval ago or more. A sleeping
    /// relay's poll thus keeps it armed in the same statement, and a relay
    /// that died stops costing publishers a NOTIFY within
    /// [`Wakeup::armed_for`].
    pub(crate) fn renew_with_claim(&self) -> Option<Duration> {
        let due = self
            .armed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| (self.renew_every..self.armed_for).contains(&at.elapsed()));
        (due && self.wants_notifications()).then_some(self.armed_for)
    }

    /// How long an arming lasts.
    pub(crate) fn armed_for(&self) -> Duration {
        self.armed_for
    }

    /// Records that the flag was armed just now.
    pub(crate) fn armed(&self) {
        *self.armed_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Called by the listener on a notification: true if this relay had
    /// armed the flag and should now disarm it (never in notify mode:
    /// there the flag stays armed).
    pub(crate) fn take_armed(&self) -> bool {
        !self.notify_mode()
            && self
                .armed_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .is_some()
    }
}

impl Rate {
    /// Decides the mode from the larger of the two counts: once per window,
    /// and at once when this window alone already passes [`POLL_ABOVE`].
    fn decide(&mut self) {
        let events = self.claimed.max(self.notified);
        if events as f64 > POLL_ABOVE * RATE_WINDOW.as_secs_f64() {
            self.notify = false;
        }
        let elapsed = self.window_start.elapsed();
        if elapsed >= RATE_WINDOW {
            let per_second = events as f64 / elapsed.as_secs_f64();
            if per_second < NOTIFY_BELOW {
                self.notify = true;
            } else if per_second > POLL_ABOVE {
                self.notify = false;
            }
            self.window_start = Instant::now();
            self.claimed = 0;
            self.notified = 0;
        }
    }
}

/// One worker's idleness: where it is in [`LINGER`], and whether it counts
/// as asleep.
#[derive(Debug)]
pub(crate) struct Idleness {
    /// Empty claims since the last one that found work; `LINGER.len()` and
    /// above: asleep until woken or the poll interval.
    streak: usize,
    asleep: bool,
    /// After this worker armed the wake-up flag: the publishers that read
    /// it just before may commit after its next claim's snapshot, without
    /// a NOTIFY. Each has an xid below the xmax of a claim that started
    /// after the arming; until a claim's xmin has passed that, the worker
    /// keeps looking (1, 2, 4 … 64 ms apart) instead of sleeping.
    watch: Watch,
    watched: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    Off,
    /// Armed; the next claim's xmax is the mark.
    Pending,
    /// Until a claim's xmin reaches this xid.
    Below(i64),
}

impl Idleness {
    /// A new worker starts drowsy: its first empty claim puts it to sleep
    /// (through the drowsy pause, so an event published while the relay
    /// starts is still found).
    pub(crate) fn new() -> Self {
        Idleness {
            streak: LINGER.len() - 2,
            asleep: false,
            watch: Watch::Off,
            watched: 0,
        }
    }

    /// This worker armed the wake-up flag (or its claim armed it anew).
    pub(crate) fn armed(&mut self) {
        self.watch = Watch::Pending;
        self.watched = 0;
    }

    /// A claim returned with this snapshot (xmin, xmax).
    pub(crate) fn claimed(&mut self, (xmin, xmax): (i64, i64)) {
        if self.watch == Watch::Pending {
            self.watch = Watch::Below(xmax);
        }
        if let Watch::Below(mark) = self.watch {
            if xmin >= mark {
                self.watch = Watch::Off;
            }
        }
    }

    /// While watching after an arming: how long to pause before looking
    /// again.
    pub(crate) fn watching(&mut self) -> Option<Duration> {
        if self.watch == Watch::Off {
            return None;
        }
        let pause = LINGER[self.watched.min(LINGER.len() - 1)];
        self.watched += 1;
        Some(pause)
    }

    /// The last claim found work (or the worker was woken).
    pub(crate) fn busy(&mut self, wakeup: &Wakeup) {
        self.streak = 0;
        self.awake(wakeup);
    }

    /// The worker cannot claim (the database is unreachable): it is not
    /// waiting for a notification.
    pub(crate) fn awake(&mut self, wakeup: &Wakeup) {
        if std::mem::take(&mut self.asleep) {
            wakeup.asleep.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The last claim found nothing: how long to pause before the next,
    /// given the poll interval. Counts the worker as asleep from the
    /// drowsy pause on.
    pub(crate) fn empty(&mut self, wakeup: &Wakeup, poll_interval: Duration) -> Pause {
        self.streak = self.streak.saturating_add(1);
        if self.streak >= LINGER.len() - 1 && !self.asleep {
            self.asleep = true;
            wakeup.asleep.fetch_add(1, Ordering::AcqRel);
        }
        LINGER
            .get(self.streak)
            .map_or(Pause::Sleep(poll_interval), |&pause| {
                Pause::Linger(pause.min(poll_interval))
            })
    }
}

/// How a worker waits before its next claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    /// A short pause while events may still come: always timed.
    Linger(Duration),
    /// Until a wake-up, or the poll (or the next known due time). Only one
    /// sleeping worker per subscription keeps the time (see
    /// [`Served::poller`](super::subscription::Served)); the others wait for
    /// a wake-up, so an idle relay polls once per interval, not once per
    /// worker.
    Sleep(Duration),
}

/// When events this relay knows of come due: the retries it scheduled and
/// the next due time its claims saw. A worker never sleeps past the
/// earliest, so a retry or a delayed event is taken when it comes due
/// rather than at the next poll (which may be an hour away).
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    /// The earliest few times; later ones are found again by the claims
    /// that the earlier ones cause.
    times: Mutex<std::collections::BTreeSet<Instant>>,
}

impl Schedule {
    /// How many times are kept at most.
    const CAPACITY: usize = 64;

    /// Something comes due at `at` (a retry this relay just settled).
    pub(crate) fn add(&self, at: Instant) {
        let mut times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        times.insert(at);
        if times.len() > Self::CAPACITY {
            times.pop_last();
        }
    }

    /// A claim sent at `sent` has taken (or found blocked) everything due
    /// by then, and reported the next due time, if any. Times up to `sent`
    /// are forgotten: anything added for them had committed before the
    /// claim's snapshot, so the claim saw it.
    pub(crate) fn claimed(&self, sent: Instant, next: Option<Instant>) {
        let mut times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        times.retain(|at| *at > sent);
        if let Some(next) = next {
            times.insert(next);
            if times.len() > Self::CAPACITY {
                times.pop_last();
            }
        }
    }

    /// How long until the earliest known due time (zero if it has passed);
    /// `None` if nothing is known to come due.
    pub(crate) fn until_next(&self) -> Option<Duration> {
        let times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        times
            .first()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_forgets_what_it_saw_and_keeps_what_came_after() {
        let schedule = Schedule::default();
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(schedule.until_next(), None);
        schedule.add(now + hour);
        schedule.add(now + 2 * hour);
        // A claim sent after the first time forgets it, not the second,
        // and adds what it reports.
        schedule.claimed(now + hour + Duration::from_secs(1), Some(now + 3 * hour));
        let next = schedule.until_next().unwrap();
        assert!(next > hour && next <= 2 * hour, "{next:?}");
        schedule.claimed(now + 2 * hour, None);
        let next = schedule.until_next().unwrap();
        assert!(next > 2 * hour && next <= 3 * hour, "{next:?}");
        schedule.claimed(now + 4 * hour, None);
        assert_eq!(schedule.until_next(), None);
    }

    #[test]
    fn only_the_earliest_times_are_kept() {
        let schedule = Schedule::default();
        let now = Instant::now() + Duration::from_secs(3600);
        for n in (0..1000u64).rev() {
            schedule.add(now + Duration::from_secs(n));
        }
        let times = schedule.times.lock().unwrap();
        assert_eq!(times.len(), Schedule::CAPACITY);
        assert_eq!(*times.last().unwrap(), now + Duration::from_secs(63));
    }

    #[test]
    fn a_burst_of_notifications_turns_them_off_before_the_claims_catch_up() {
        let wakeup = Wakeup::new(true, 2, Duration::from_secs(1));
        assert!(wakeup.notify_mode());
        // Within one window: 30 claimed, but 51 publishing statements heard.
        wakeup.claimed(30);
        wakeup.notified(50);
        assert!(
            wakeup.notify_mode(),
            "50 in a window is the mark, not above it"
        );
        wakeup.notified(1);
        assert!(!wakeup.notify_mode());
        // The first look after the window closes it (still above the mark);
        // a window with nothing heard or claimed turns them on again.
        std::thread::sleep(RATE_WINDOW);
        wakeup.claimed(0);
        assert!(!wakeup.notify_mode());
        std::thread::sleep(RATE_WINDOW);
        wakeup.claimed(0);
        assert!(wakeup.notify_mode());
    }

    #[test]
    fn after_arming_a_worker_looks_until_every_earlier_transaction_ended() {
        let mut idleness = Idleness::new();
        assert_eq!(idleness.watching(), None);
        idleness.armed();
        // The claim right after the arming.
        assert_eq!(idleness.watching(), Some(LINGER[0]));
        // It saw transactions 90 and up running below its xmax 100.
        idleness.claimed((90, 100));
        assert_eq!(idleness.watching(), Some(LINGER[1]));
        idleness.claimed((95, 120));
        assert_eq!(idleness.watching(), Some(LINGER[2]));
        // Everything below 100 has ended: sleep.
        idleness.claimed((100, 130));
        assert_eq!(idleness.watching(), None);
        // Nothing running at the claim after an arming: sleep at once.
        idleness.armed();
        assert_eq!(idleness.watching(), Some(LINGER[0]));
        idleness.claimed((140, 140));
        assert_eq!(idleness.watching(), None);
    }

    #[test]
    fn a_passed_time_means_now() {
        let schedule = Schedule::default();
        schedule.add(Instant::now());
        assert_eq!(schedule.until_next(), Some(Duration::ZERO));
    }
}
