//! The housekeeper thread: keeps `outbox.events` small by vacuuming it.
//!
//! A queue table turns over its whole content all the time, and every
//! delivered event leaves dead row versions behind (the claim's update and
//! the delete). Autovacuum visits a database at most once per
//! `autovacuum_naptime` (a minute by default, a server-wide setting), and a
//! busy outbox piles up tens of megabytes of dead rows in that time, which
//! every claim then has to step over. So after every
//! [`VACUUM_AFTER_ROWS`] settled events the housekeeper runs
//! `VACUUM (SKIP_LOCKED, TRUNCATE false)` on the table, at most once a second and never more than 1/20 of the
//! time (a huge backlog makes each vacuum slow, so it runs rarer). It needs
//! the table's owner (or the database's); a relay role without that logs it
//! once and leaves the table to autovacuum (docs/design.md).
//!
//! Workers only count what they settle and nudge the housekeeper thread,
//! which vacuums on a pooled connection of its own: a delivering worker
//! never waits for a VACUUM (inside a one-worker relay's round it cost a
//! quarter of the drain rate).
//!
//! When a VACUUM leaves many dead rows behind, some session's old snapshot
//! pins them; the relay names it in a warning, since only an operator can
//! end it.
//!
//! There is no sweep for deferred events: a settle wakes the successors of
//! what it deletes in its own transaction, and an event whose earlier event
//! vanished some other way comes due by itself after its deferral margin
//! (counted as a rescue, `RelayStats::stranded_rescued`).

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
            nudge,
            nudged,
            state: Mutex::new(State::default()),
        }
    }

    /// Counts events settled (each left a dead row version) and nudges
    /// the housekeeper once enough have been. Never blocks.
    pub(crate) fn settled(&self, events: usize) {
        if !self.enabled {
            return;
        }
        let settled = self.settled.fetch_add(events as u64, Ordering::Relaxed) + events as u64;
        if settled >= VACUUM_AFTER_ROWS {
            let _ = self.nudge.try_send(());
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
                    tracing::info!(relay, "this role does not own outbox.events, so the relay leaves vacuuming it to autovacuum (see docs/design.md on bloat)");
                }
                Err(error) => {
                    tracing::warn!(relay, %error, "checking whether the relay may vacuum outbox.events failed");
                    return;
                }
            }
        }
        if state.permitted != Some(true) {
            return;
        }
        self.settled.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let result = maintenance::vacuum_events(conn);
        state.last_run = Some(Instant::now());
        state.last_took = started.elapsed();
        match result {
            Ok(()) => {
                tracing::debug!(relay, took = ?state.last_took, "vacuumed outbox.events");
                self.look_for_pinned_rows(&mut state, conn, relay);
            }
            Err(error) => tracing::warn!(relay, %error, "vacuuming outbox.events failed"),
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
                "VACUUM cannot remove dead rows of outbox.events while an old snapshot is open; claims slow down until it ends (pg_terminate_backend(pid) ends it)"
            ),
            _ => tracing::warn!(
                relay,
                dead_rows = dead,
                "VACUUM cannot remove dead rows of outbox.events (an old snapshot, a replication slot or a prepared transaction holds them); claims slow down until it is released"
            ),
        }
    }
}

/// The housekeeper thread: waits for a nudge (or a timer, so a nudge that
/// came too early is not forgotten), then vacuums if due, on a pooled
/// connection it gives back at once. With vacuuming off it has nothing to
/// do and exits.
pub(super) fn run(shared: Arc<Shared>, shutdown: Receiver<()>) {
    let housekeeping = &shared.housekeeping;
    if !housekeeping.enabled {
        return;
    }
    loop {
        // Idle until nudged; once a vacuum is owed, look again every
        // MIN_INTERVAL in case spacing made this one wait.
        let owed = housekeeping.settled.load(Ordering::Relaxed) >= VACUUM_AFTER_ROWS;
        let timer = if owed {
            MIN_INTERVAL
        } else {
            Duration::from_secs(3600)
        };
        select! {
            recv(housekeeping.nudged) -> _ => {}
            recv(shutdown) -> _ => return,
            default(timer) => {}
        }
        if housekeeping.settled.load(Ordering::Relaxed) < VACUUM_AFTER_ROWS {
            continue;
        }
        match shared.pool.get() {
            Ok(mut conn) => housekeeping.vacuum_if_due(&mut conn, &shared.name),
            Err(error) => {
                tracing::debug!(relay = %shared.name, %error, "no connection for housekeeping");
            }
        }
    }
}
