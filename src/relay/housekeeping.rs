//! The housekeeper thread: gives the log's storage back in bulk, wakes
//! what nothing else would, and keeps the small hot tables small.
//!
//! - **Reclaim.** Every [`RECLAIM_EVERY`] while events flow (every
//!   [`RECLAIM_IDLE_EVERY`] while none do) it calls `outbox.reclaim()`:
//!   lanes with nothing to read move to the present, and every segment of
//!   `outbox.events` that all subscriptions have passed is `TRUNCATE`d
//!   (never waiting for a lock). No row of the log is ever deleted one by
//!   one, so VACUUM never chases them.
//! - **Idempotency keys.** On the same timer it deletes the keys whose
//!   window ended (`outbox.expire_idempotency_keys`, 10,000 a call, again
//!   while calls come back full), oldest first.
//! - **Stranded rows.** A row of `outbox.deliveries` waiting behind the
//!   head of its key is woken by the settle that removes the head, in the
//!   same transaction. A head removed some other way (by hand) would leave
//!   it waiting for ever; the housekeeper wakes it and counts it
//!   (`RelayStats::stranded_rescued`): zero when relays alone settle.
//! - **Vacuum.** `outbox.cursors` is rewritten twice per batch and
//!   `outbox.deliveries` is a queue; after every [`VACUUM_AFTER_ROWS`]
//!   settled events it runs `VACUUM (SKIP_LOCKED, TRUNCATE false)` on
//!   both, at most once a second and never more than 1/20 of the time. It
//!   needs the tables' owner (or the database's); a relay role without
//!   that logs it once and leaves them to autovacuum.
//!
//! Workers only count what they settle and nudge the housekeeper thread,
//! which works on a pooled connection of its own: a delivering worker
//! never waits for it. When a VACUUM leaves many dead rows behind, some
//! session's old snapshot pins them; the relay names it in a warning,
//! since only an operator can end it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use diesel::PgConnection;

use super::Shared;
use crate::store::maintenance;

/// Settled events between two vacuums: the same threshold the migration
/// gives autovacuum.
pub(crate) const VACUUM_AFTER_ROWS: u64 = 1_000;
/// How often the log's storage is reclaimed while events are settled.
pub(crate) const RECLAIM_EVERY: Duration = Duration::from_secs(5);
/// How often while nothing is settled (idle lanes still move on, so that a
/// quiet database gives its segments back too).
pub(crate) const RECLAIM_IDLE_EVERY: Duration = Duration::from_secs(60);
/// The shortest time between two vacuums by one relay.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest share of time spent vacuuming: wait 20× the last one's time.
const SPACING: u32 = 20;
/// Dead rows a vacuum could not remove before the relay looks for the
/// snapshot that pins them, and how often it says so.
const PINNED_ROWS: i64 = 10_000;
const PINNED_WARNING_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct Housekeeping {
    enabled: bool,
    settled: AtomicU64,
    /// Events settled since the last reclaim.
    settled_since_reclaim: AtomicU64,
    /// Nudges the housekeeper thread (one pending nudge at most).
    nudge: Sender<()>,
    nudged: Receiver<()>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until checked once.
    permitted: Option<bool>,
    last_run: Option<Instant>,
    last_took: Duration,
    last_pinned_warning: Option<Instant>,
}

impl Housekeeping {
    pub(crate) fn new(enabled: bool) -> Self {
        let (nudge, nudged) = crossbeam_channel::bounded(1);
        Housekeeping {
            enabled,
            settled: AtomicU64::new(0),
            settled_since_reclaim: AtomicU64::new(0),
            nudge,
            nudged,
            state: Mutex::new(State::default()),
        }
    }

    /// Counts events settled (each left a dead row version) and nudges
    /// the housekeeper once enough have been. Never blocks.
    pub(crate) fn settled(&self, events: usize) {
        self.settled_since_reclaim
            .fetch_add(events as u64, Ordering::Relaxed);
        if !self.enabled {
            return;
        }
        let settled = self.settled.fetch_add(events as u64, Ordering::Relaxed) + events as u64;
        if settled >= VACUUM_AFTER_ROWS {
            let _ = self.nudge.try_send(());
        }
    }

    /// Reclaims the log's storage and wakes stranded rows. Failures are
    /// logged, never returned: the next run tries again.
    fn reclaim(&self, shared: &Shared, conn: &mut PgConnection) {
        let relay = &shared.name;
        self.settled_since_reclaim.store(0, Ordering::Relaxed);
        match crate::store::reclaim(conn) {
            Ok(segments) if !segments.is_empty() => {
                tracing::debug!(relay = %relay, ?segments, "truncated segments of outbox.events");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(relay = %relay, %error, "reclaiming outbox.events failed"),
        }
        // A full call means more may have expired: call again.
        let mut expired = 0;
        loop {
            match maintenance::expire_idempotency_keys(conn) {
                Ok(n) => {
                    expired += n;
                    if n < maintenance::EXPIRE_KEYS_PER_CALL {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(relay = %relay, %error, "expiring idempotency keys failed");
                    break;
                }
            }
        }
        if expired > 0 {
            tracing::debug!(relay = %relay, expired, "deleted expired idempotency keys");
        }
        match crate::store::wake_stranded(conn) {
            Ok(ids) if !ids.is_empty() => {
                let ids: Vec<crate::EventId> = ids.into_iter().map(crate::EventId).collect();
                crate::observe::Counters::add(&shared.counters.stranded_rescued, ids.len());
                tracing::warn!(relay = %relay, events = ?ids, "events waited behind an event of their key that was removed without a settle (by hand?); they are due now");
                shared.observer.on_stranded_rescued(&ids);
                // Due now, but the workers may be asleep until their poll.
                for served in &shared.subscriptions {
                    let _ = served.wake_tx.try_send(());
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(relay = %relay, %error, "looking for stranded deliveries failed");
            }
        }
    }

    /// Vacuums on `conn` if that is due now. Failures are logged, never
    /// returned: nothing depends on them.
    fn vacuum_if_due(&self, conn: &mut PgConnection, relay: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.settled.load(Ordering::Relaxed) < VACUUM_AFTER_ROWS
            || state
                .last_run
                .is_some_and(|at| at.elapsed() < MIN_INTERVAL.max(state.last_took * SPACING))
        {
            return;
        }
        if state.permitted.is_none() {
            match maintenance::may_vacuum_events(conn) {
                Ok(true) => state.permitted = Some(true),
                Ok(false) => {
                    state.permitted = Some(false);
                    tracing::info!(relay, "this role does not own outbox.deliveries, so the relay leaves vacuuming it to autovacuum (see docs/design.md on bloat)");
                }
                Err(error) => {
                    tracing::warn!(relay, %error, "checking whether the relay may vacuum outbox.deliveries failed");
                    return;
                }
            }
        }
        if state.permitted != Some(true) {
            return;
        }
        self.settled.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let result = maintenance::vacuum_queues(conn);
        state.last_run = Some(Instant::now());
        state.last_took = started.elapsed();
        match result {
            Ok(()) => {
                tracing::debug!(relay, took = ?state.last_took, "vacuumed outbox.deliveries and outbox.cursors");
                self.look_for_pinned_rows(&mut state, conn, relay);
            }
            Err(error) => tracing::warn!(relay, %error, "vacuuming outbox.deliveries failed"),
        }
    }

    fn look_for_pinned_rows(&self, state: &mut State, conn: &mut PgConnection, relay: &str) {
        if state
            .last_pinned_warning
            .is_some_and(|at| at.elapsed() < PINNED_WARNING_EVERY)
        {
            return;
        }
        let Ok(dead) = maintenance::dead_rows_left(conn) else {
            return;
        };
        if dead < PINNED_ROWS {
            return;
        }
        state.last_pinned_warning = Some(Instant::now());
        match maintenance::oldest_snapshot(conn) {
            Ok(Some(oldest)) => tracing::warn!(
                relay,
                dead_rows = dead,
                pid = oldest.pid,
                xmin_age = oldest.xmin_age,
                transaction_age = oldest.transaction_age.as_deref().unwrap_or("unknown"),
                state = oldest.state.as_deref().unwrap_or("unknown"),
                application = oldest.application_name.as_deref().unwrap_or("unknown"),
                "VACUUM cannot remove dead rows of outbox.deliveries and outbox.cursors while an old snapshot is open; claims slow down until it ends (pg_terminate_backend(pid) ends it)"
            ),
            _ => tracing::warn!(
                relay,
                dead_rows = dead,
                "VACUUM cannot remove dead rows of outbox.deliveries and outbox.cursors (an old snapshot, a replication slot or a prepared transaction holds them); claims slow down until it is released"
            ),
        }
    }
}

/// The housekeeper thread: reclaims on a timer, and waits for a nudge to
/// vacuum if due, on a pooled connection it gives back at once.
pub(super) fn run(shared: Arc<Shared>, shutdown: Receiver<()>) {
    let housekeeping = &shared.housekeeping;
    let mut last_reclaim: Option<Instant> = None;
    loop {
        let busy = housekeeping.settled_since_reclaim.load(Ordering::Relaxed) > 0;
        let reclaim_in = last_reclaim.map_or(Duration::ZERO, |at| {
            (if busy {
                RECLAIM_EVERY
            } else {
                RECLAIM_IDLE_EVERY
            })
            .saturating_sub(at.elapsed())
        });
        // Once a vacuum is owed, look again every MIN_INTERVAL in case
        // spacing made this one wait.
        let owed = housekeeping.enabled
            && housekeeping.settled.load(Ordering::Relaxed) >= VACUUM_AFTER_ROWS;
        let timer = if owed {
            reclaim_in.min(MIN_INTERVAL)
        } else {
            reclaim_in.min(RECLAIM_EVERY)
        };
        select! {
            recv(housekeeping.nudged) -> _ => {}
            recv(shutdown) -> _ => return,
            default(timer) => {}
        }
        let busy = housekeeping.settled_since_reclaim.load(Ordering::Relaxed) > 0;
        let reclaim_due = last_reclaim.is_none_or(|at| {
            at.elapsed()
                >= if busy {
                    RECLAIM_EVERY
                } else {
                    RECLAIM_IDLE_EVERY
                }
        });
        let vacuum_due = housekeeping.enabled
            && housekeeping.settled.load(Ordering::Relaxed) >= VACUUM_AFTER_ROWS;
        if !reclaim_due && !vacuum_due {
            continue;
        }
        match shared.pool.get() {
            Ok(mut conn) => {
                if reclaim_due {
                    housekeeping.reclaim(&shared, &mut conn);
                    last_reclaim = Some(Instant::now());
                }
                if vacuum_due {
                    housekeeping.vacuum_if_due(&mut conn, &shared.name);
                }
            }
            Err(error) => {
                tracing::debug!(relay = %shared.name, %error, "no connection for housekeeping");
                last_reclaim = Some(Instant::now());
            }
        }
    }
}
