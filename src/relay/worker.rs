//! A worker thread of one subscription: wait for a wake-up or the poll
//! timer, then claim a batch, deliver it through the sinks, and settle it
//! in one round trip. Repeat while there is more.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, TryRecvError};
use diesel::PgConnection;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::deliver;
use super::rate::Permit;
use super::subscription::Served;
use super::wakeup::{Idleness, Pause, LINGER};
use super::Shared;
use crate::backoff::Backoff;
use crate::error::Error;
use crate::event::{EventId, StoredEvent};
use crate::observe::Counters;
use crate::sink::{DeliveryError, DeliveryErrorKind};
use crate::store::{self, Place, Settlement, Verdict};

type PooledConn = diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<PgConnection>>;

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    /// Which of the relay's subscriptions this worker serves.
    pub(super) subscription: usize,
    /// The lane its first claim tries first; each claim tries the next.
    pub(super) first_lane: usize,
    pub(super) shutdown: Receiver<()>,
}

/// A worker waiting longer than this for a rate limit gives its pooled
/// connection back meanwhile.
const GIVE_BACK_AFTER: Duration = Duration::from_millis(20);

/// What a round found, to decide how soon to look again.
enum Round {
    /// More may be waiting (rows of the log, which other lanes may have
    /// too, a full batch, or a settled keyed event that unblocks the next
    /// of its key): go again at once.
    More,
    /// Less than a batch: look again after a short pause.
    Partial,
    /// Nothing due: pause longer each time, then sleep.
    Empty,
}

impl Worker {
    fn served(&self) -> &Served {
        &self.shared.subscriptions[self.subscription]
    }

    pub(super) fn run(self) {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut lane = self.first_lane;
        let reconnect = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 2.0, 0.5);
        let mut failures: u32 = 0;
        let mut idleness = Idleness::new();
        // A pooled connection for the claim, any lease renewal and the
        // settle (checking one out per statement would cost the pool's
        // validation query each time). Kept while the worker goes on or
        // lingers, and while it sleeps keeping the poll timer (so that an
        // idle relay sends one statement per poll); given back before any
        // other sleep, so the pool is shared fairly with the application.
        let mut conn: Option<PooledConn> = None;
        loop {
            if self.stopping() {
                idleness.awake(&self.shared.wakeup);
                return;
            }
            lane = lane.wrapping_add(1);
            let pause = self
                .round(&mut conn, lane, &mut rng, &mut idleness)
                .and_then(|round| self.pause_after(round, &mut idleness, &mut conn));
            if pause.is_err() {
                conn = None;
            }
            match pause {
                Ok(pause) => {
                    if failures > 0 {
                        failures = 0;
                        Counters::add(&self.shared.counters.reconnects, 1);
                        self.shared.observer.on_reconnect("worker");
                        tracing::info!(relay = %self.shared.name, "database reachable again");
                    }
                    let Some(pause) = pause else { continue };
                    if !self.wait(pause, &mut idleness, &mut conn) {
                        return;
                    }
                }
                Err(error) => {
                    idleness.awake(&self.shared.wakeup);
                    failures = failures.saturating_add(1);
                    Counters::add(&self.shared.counters.errors, 1);
                    let chain = error_chain(&error);
                    let hint = if chain.contains("does not exist") {
                        " (is the outbox schema migrated? run outbox::migrate)"
                    } else {
                        ""
                    };
                    tracing::warn!(relay = %self.shared.name, subscription = %self.served().name, error = %chain, "claiming or settling failed{hint}; retrying");
                    self.shared.observer.on_error(&error);
                    select! {
                        recv(self.shutdown) -> _ => return,
                        default(reconnect.delay(failures, &mut rng)) => {}
                    }
                }
            }
        }
    }

    /// Waits for `pause`, a wake-up or the shutdown; false on shutdown.
    /// Of the workers of a subscription that sleep, one keeps the time
    /// (the poller) and the others wait only for a wake-up: the poller's
    /// claim wakes one of them when it finds work.
    fn wait(&self, pause: Pause, idleness: &mut Idleness, conn: &mut Option<PooledConn>) -> bool {
        let served = self.served();
        let poller = matches!(pause, Pause::Sleep(_))
            && served
                .poller
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        let timed = match pause {
            Pause::Linger(pause) => Some(pause),
            Pause::Sleep(pause) => poller.then_some(pause),
        };
        if timed.is_none() {
            *conn = None;
        }
        // A sleeper that does not keep the poll timer still wakes for the
        // next known due time (a retry it settled, say): the poller's timer
        // was set before that was known.
        let timed = timed.or_else(|| served.schedule.until_next());
        let woken = match timed {
            Some(pause) => select! {
                recv(served.wake_rx) -> _ => Some(true),
                recv(self.shutdown) -> _ => None,
                default(pause) => Some(false),
            },
            None => select! {
                recv(served.wake_rx) -> _ => Some(true),
                recv(self.shutdown) -> _ => None,
            },
        };
        if poller {
            served.poller.store(false, Ordering::Release);
        }
        match woken {
            Some(true) => idleness.busy(&self.shared.wakeup),
            Some(false) => {}
            None => {
                idleness.awake(&self.shared.wakeup);
                return false;
            }
        }
        true
    }

    /// How long to wait after `round` before claiming again (`None`: go
    /// again at once). When this worker is the last of the relay to fall
    /// asleep, arms the wake-up flag first, so that publishers notify.
    fn pause_after(
        &self,
        round: Round,
        idleness: &mut Idleness,
        slot: &mut Option<PooledConn>,
    ) -> Result<Option<Pause>, Error> {
        let shared = &*self.shared;
        // Never past the next known due time (a retry, a delayed event).
        let poll_interval = self
            .served()
            .schedule
            .until_next()
            .map_or(shared.config.poll_interval, |due| {
                due.min(shared.config.poll_interval)
            });
        let pause = match round {
            Round::More => {
                idleness.busy(&shared.wakeup);
                return Ok(None);
            }
            // Events come slowly: keep the flag armed and sleep until a
            // notification (or the poll, or the next due time).
            Round::Partial | Round::Empty if shared.wakeup.notify_mode() => {
                match round {
                    Round::Partial => idleness.busy(&shared.wakeup),
                    _ => drop(idleness.empty(&shared.wakeup, poll_interval)),
                }
                Pause::Sleep(poll_interval)
            }
            Round::Partial => {
                idleness.busy(&shared.wakeup);
                return Ok(Some(Pause::Linger(LINGER[0].min(poll_interval))));
            }
            Round::Empty => idleness.empty(&shared.wakeup, poll_interval),
        };
        if shared.wakeup.should_arm() {
            self.arm(slot)?;
            idleness.armed();
        }
        // Right after an arming, look again (and again, while transactions
        // older than it run) instead of sleeping: publishers that read the
        // flag while it was off may still commit.
        Ok(Some(idleness.watching().map_or(pause, |watch| {
            Pause::Linger(watch.min(poll_interval))
        })))
    }

    /// Arms the wake-up flag for a few poll intervals, in a statement of
    /// its own; while the relay sleeps, its polls renew it
    /// ([`Wakeup::renew_with_claim`]), and a relay that died stops costing
    /// publishers a NOTIFY soon after.
    fn arm(&self, slot: &mut Option<PooledConn>) -> Result<(), Error> {
        let shared = &*self.shared;
        let conn = match slot {
            Some(conn) => conn,
            None => slot.insert(shared.pool.get()?),
        };
        store::wakeup::arm(conn, shared.wakeup.armed_for())?;
        shared.wakeup.armed();
        Ok(())
    }

    fn stopping(&self) -> bool {
        matches!(self.shutdown.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Registers the subscription once per relay (and again after an
    /// operator removed it): from then on the database keeps its events.
    fn register(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let served = self.served();
        if served.is_registered() {
            return Ok(());
        }
        let created = store::subscribe(conn, &served.name, &served.patterns, &served.topics)?;
        served.set_registered(true);
        if created {
            tracing::info!(relay = %self.shared.name, subscription = %served.name, patterns = ?served.patterns, "subscription registered: it receives every event committed from now on");
        }
        Ok(())
    }

    /// Claims, delivers and settles one batch.
    fn round(
        &self,
        slot: &mut Option<PooledConn>,
        lane: usize,
        rng: &mut StdRng,
        idleness: &mut Idleness,
    ) -> Result<Round, Error> {
        let shared = &*self.shared;
        let served = self.served();
        let config = &shared.config;
        let conn = match slot {
            Some(conn) => conn,
            None => slot.insert(shared.pool.get()?),
        };
        self.register(conn)?;
        let sent = Instant::now();
        let renew = shared.wakeup.renew_with_claim();
        let claimed = store::claim(
            conn,
            &served.name,
            lane,
            &shared.name,
            i64::from(config.batch_size),
            config.lease,
            &served.routed,
            renew,
        )
        .inspect_err(|error| {
            if error.to_string().contains("is not registered") {
                // Removed by an operator while this relay runs: declared
                // here, so registered again.
                served.set_registered(false);
            }
        })?;
        if renew.is_some() {
            shared.wakeup.armed();
        }
        if claimed.rearmed {
            idleness.armed();
        } else {
            idleness.claimed(claimed.snapshot);
        }
        // Measured from the reply, so the wake-up is never early.
        let next_due = claimed.next_due_in.map(|due_in| Instant::now() + due_in);
        served.schedule.claimed(sent, next_due);
        shared.wakeup.claimed(claimed.rows.len());
        if claimed.rows.is_empty() {
            return Ok(Round::Empty);
        }
        let full = claimed.rows.len() == config.batch_size as usize;
        let from_log = claimed.lane.is_some();
        if full || from_log {
            // More may be waiting (other lanes too): pass the wake-up on to
            // an idle worker of this subscription.
            let _ = served.wake_tx.try_send(());
        }
        Counters::add(&shared.counters.claimed, claimed.rows.len());
        {
            let mut seen = std::collections::HashMap::new();
            for row in &claimed.rows {
                if let Some(first) = seen.insert(row.event_id(), row.place()) {
                    tracing::error!(relay = %shared.name, subscription = %served.name, id = %row.event_id(), first = ?first, again = ?row.place(), lane = ?claimed.lane, "a claimed batch holds an event twice");
                }
            }
        }
        let mut events = Vec::with_capacity(claimed.rows.len());
        let mut places = Vec::with_capacity(claimed.rows.len());
        let mut unreadable = Vec::new();
        for row in claimed.rows {
            let place = row.place();
            match row.into_event(&served.name) {
                (event, None) => {
                    events.push(event);
                    places.push(place);
                }
                // Valid jsonb that serde_json refuses (1e400, very deep
                // nesting): no sink can be given it, so it dies at once
                // instead of failing the batch on every claim.
                (event, Some(reason)) => unreadable.push((reason, event, place)),
            }
        }
        shared.observer.on_claimed(&events);
        // Unreadable events go after the deliverable ones, already judged.
        let deliverable = events.len();
        let mut outcomes = Vec::with_capacity(deliverable + unreadable.len());
        for (reason, event, place) in unreadable {
            outcomes.push(Outcome {
                id: event.id,
                event: events.len(),
                verdict: Verdict::Dead {
                    error: format!("unreadable event: {reason}"),
                },
                error: None,
            });
            events.push(event);
            places.push(place);
        }

        // The database's lease began at the claim's now(): count from when
        // the claim was sent, never later.
        let mut lease = LeaseKeeper::new(config.lease, sent);
        let batch = Batch {
            token: claimed.token,
            lane: claimed.lane,
            events: &events,
            places: &places,
        };
        // Keys with an event that failed (or was put back) in this batch:
        // their later events wait behind it, unattempted.
        let mut waiting_keys: std::collections::HashSet<String> = std::collections::HashSet::new();
        // One sink call per run of events routed to the same sink (one
        // event per call unless the sink takes batches). A call never holds
        // two events of one key, so that a failure holds back the later
        // ones of its key.
        let mut calls: std::collections::VecDeque<_> =
            deliver::calls(&served.routes, &events[..deliverable]).into();
        while let Some(call) = calls.pop_front() {
            let call = self.when_allowed(call, &mut calls, slot, &mut lease, &batch);
            // The permit (if limited) counts these deliveries until the
            // call returns.
            let (call, _permit) = match call {
                Ok(call) => call,
                Err(unattempted) => {
                    let rest = unattempted..deliverable;
                    outcomes.extend(rest.map(|i| Outcome::release(&events[i], i)));
                    break;
                }
            };
            let held: std::collections::HashSet<EventId> = call
                .events
                .clone()
                .map(|i| &events[i])
                .filter(|e| e.key.as_ref().is_some_and(|k| waiting_keys.contains(k)))
                .map(|e| e.id)
                .collect();
            let started = Instant::now();
            // Events no longer held (another relay took them over:
            // delivering would only duplicate) come back as `None`, and so
            // do those waiting behind a failure of their key.
            let results = call.deliver(&events, |id| lease.holds(id) && !held.contains(&id));
            lease.observe_call(started.elapsed());
            for (index, result) in results {
                let event = &events[index];
                let outcome = match result {
                    _ if held.contains(&event.id) => Outcome::held(event, index),
                    Some(result) => self.judge(event, index, result, rng),
                    None => Outcome::release(event, index),
                };
                if matches!(outcome.verdict, Verdict::Retry { .. } | Verdict::Release) {
                    if let Some(key) = &event.key {
                        waiting_keys.insert(key.clone());
                    }
                }
                outcomes.push(outcome);
            }
        }
        // A delivered or dead keyed event may unblock the next of its key:
        // look again at once instead of waiting for the poll.
        let unblocked = outcomes.iter().any(|o| {
            matches!(o.verdict, Verdict::Delivered | Verdict::Dead { .. })
                && events[o.event].key.is_some()
        });
        let settled = outcomes.len();
        self.settle(slot, &batch, outcomes)?;
        shared.housekeeping.settled(settled);
        Ok(if full || unblocked || from_log {
            Round::More
        } else {
            Round::Partial
        })
    }

    /// Waits until `call` may go: renews the lease when due, and for a
    /// rate-limited call takes a permit, splitting off (back to the front
    /// of `calls`) what the limit does not allow yet. Returns the call to
    /// make and its permit, or, when the relay stops first, the batch
    /// index of the first event left unattempted.
    fn when_allowed<'c>(
        &self,
        mut call: deliver::Call<'c>,
        calls: &mut std::collections::VecDeque<deliver::Call<'c>>,
        slot: &mut Option<PooledConn>,
        lease: &mut LeaseKeeper,
        batch: &Batch<'_>,
    ) -> Result<(deliver::Call<'c>, Option<Permit<'c>>), usize> {
        loop {
            if self.stopping() {
                return Err(call.events.start);
            }
            if lease.due() {
                self.renew(slot, lease, batch);
            }
            let Some(limit) = call.limit() else {
                return Ok((call, None));
            };
            match limit.take(call.events.len(), Instant::now()) {
                Ok(permit) => {
                    let first = call.split_first(permit.count);
                    if !call.events.is_empty() {
                        calls.push_front(call);
                    }
                    return Ok((first, Some(permit)));
                }
                Err(free_at) => {
                    // A long wait gives the connection back to the pool:
                    // other subscriptions' workers need it more.
                    if free_at.saturating_duration_since(Instant::now()) > GIVE_BACK_AFTER {
                        *slot = None;
                    }
                    // Never past the lease's renewal (and never a spin,
                    // however slow the sink's calls have been).
                    let renewal = lease
                        .due_at()
                        .max(Instant::now() + Duration::from_millis(10));
                    let until = free_at.min(renewal);
                    select! {
                        recv(self.shutdown) -> _ => {}
                        default(until.saturating_duration_since(Instant::now())) => {}
                    }
                }
            }
        }
    }

    /// Renews the whole batch's lease (delivered events stay held until
    /// the settle), on the worker's connection or, when it was given back
    /// while waiting for a rate limit, a pooled one.
    fn renew(&self, slot: &mut Option<PooledConn>, lease: &mut LeaseKeeper, batch: &Batch<'_>) {
        let renewed = match slot {
            Some(conn) => self.extend_lease(conn, batch),
            None => match self.shared.pool.get() {
                Ok(conn) => self.extend_lease(slot.insert(conn), batch),
                Err(error) => {
                    tracing::warn!(relay = %self.shared.name, %error, "no connection to renew a lease");
                    None
                }
            },
        };
        match renewed {
            Some(held) => lease.renewed(held),
            None => lease.renewal_failed(),
        }
    }

    /// Decides the verdict on `event` (the batch's `index`th) from its
    /// delivery's `result`.
    fn judge(
        &self,
        event: &StoredEvent,
        index: usize,
        result: Result<(), DeliveryError>,
        rng: &mut StdRng,
    ) -> Outcome {
        let shared = &*self.shared;
        let error = match result {
            Ok(()) => {
                return Outcome {
                    id: event.id,
                    event: index,
                    verdict: Verdict::Delivered,
                    error: None,
                }
            }
            Err(error) => error,
        };
        let attempts = u32::try_from(event.attempts).unwrap_or(0);
        let config = &shared.config;
        let verdict = match error.kind() {
            DeliveryErrorKind::Permanent => Verdict::Dead {
                error: format!("permanent failure: {}", error.message()),
            },
            _ if attempts >= config.max_attempts => Verdict::Dead {
                error: format!(
                    "gave up after {attempts} attempt{}: {}",
                    if attempts == 1 { "" } else { "s" },
                    error.message()
                ),
            },
            DeliveryErrorKind::RetryAfter(delay) => Verdict::Retry {
                delay: delay.min(config.backoff.cap()),
                error: error.message().to_owned(),
            },
            DeliveryErrorKind::Transient => Verdict::Retry {
                delay: config.backoff.delay(attempts, rng),
                error: error.message().to_owned(),
            },
        };
        Outcome {
            id: event.id,
            event: index,
            verdict,
            error: Some(error),
        }
    }

    /// Renews the lease of a batch. Best effort: if it fails the lease may
    /// run out, and the settle's fencing keeps that safe.
    fn extend_lease(&self, conn: &mut PgConnection, batch: &Batch<'_>) -> Option<Vec<EventId>> {
        let items: Vec<(EventId, Place)> = batch
            .events
            .iter()
            .zip(batch.places)
            .map(|(e, p)| (e.id, *p))
            .collect();
        match store::extend_lease(
            conn,
            &self.served().name,
            batch.token,
            batch.lane,
            &items,
            self.shared.config.lease,
        ) {
            Ok(held) => Some(held),
            Err(error) => {
                tracing::warn!(relay = %self.shared.name, error = %error, "extending a lease failed");
                None
            }
        }
    }

    /// Records the outcomes in one round trip, retrying a failed settle
    /// while the lease lasts: deliveries already happened, and giving up
    /// would only make them come due again (duplicates).
    fn settle(
        &self,
        slot: &mut Option<PooledConn>,
        batch: &Batch<'_>,
        outcomes: Vec<Outcome>,
    ) -> Result<(), Error> {
        let shared = &*self.shared;
        let name = &self.served().name;
        let (token, lane, events) = (batch.token, batch.lane, batch.events);
        let verdicts: Vec<Settlement> = outcomes
            .iter()
            .map(|o| Settlement {
                id: o.id,
                place: batch.places[o.event],
                verdict: o.verdict.clone(),
            })
            .collect();
        let deadline = Instant::now() + shared.config.lease;
        let mut tries: u32 = 0;
        let settled = loop {
            let attempt = match slot {
                Some(conn) => {
                    store::settle(conn, name, token, lane, &verdicts).map_err(Error::from)
                }
                None => shared.pool.get().map_err(Error::from).and_then(|conn| {
                    Ok(store::settle(
                        slot.insert(conn),
                        name,
                        token,
                        lane,
                        &verdicts,
                    )?)
                }),
            };
            match attempt {
                Ok(settled) => break settled,
                Err(error) if Instant::now() < deadline && !self.stopping() => {
                    *slot = None;
                    tries += 1;
                    Counters::add(&shared.counters.errors, 1);
                    tracing::warn!(relay = %shared.name, error = %error_chain(&error), "settling failed; retrying");
                    shared.observer.on_error(&error);
                    select! {
                        recv(self.shutdown) -> _ => {}
                        default(Duration::from_millis(50 * u64::from(tries.min(20)))) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        };
        self.report(events, outcomes, &settled);
        Ok(())
    }

    /// Counts and tells the observer what was committed.
    fn report(&self, events: &[StoredEvent], outcomes: Vec<Outcome>, settled: &[EventId]) {
        let shared = &*self.shared;
        let counters = &shared.counters;
        let settled: std::collections::HashSet<EventId> = settled.iter().copied().collect();
        let mut lost = Vec::new();
        let mut released = Vec::new();
        for outcome in outcomes {
            if !settled.contains(&outcome.id) {
                lost.push(outcome.id);
                continue;
            }
            let event = &events[outcome.event];
            match &outcome.verdict {
                Verdict::Delivered => {
                    Counters::add(&counters.delivered, 1);
                    shared.observer.on_delivered(event);
                }
                Verdict::Retry { delay, .. } => {
                    Counters::add(&counters.retried, 1);
                    self.served().schedule.add(Instant::now() + *delay);
                    let error = outcome
                        .error
                        .unwrap_or_else(|| DeliveryError::transient("unknown"));
                    tracing::info!(relay = %shared.name, subscription = %event.subscription, id = %event.id, topic = %event.topic, attempt = event.attempts, ?delay, error = %error, "delivery failed; will retry");
                    shared.observer.on_retry(event, &error, *delay);
                }
                Verdict::Release | Verdict::Held => released.push(event.id),
                Verdict::Dead { error } => {
                    Counters::add(&counters.dead_lettered, 1);
                    tracing::warn!(relay = %shared.name, subscription = %event.subscription, id = %event.id, topic = %event.topic, attempts = event.attempts, error = %error, "event dead-lettered");
                    shared.observer.on_dead_lettered(event, error);
                }
            }
        }
        if !released.is_empty() {
            Counters::add(&counters.released, released.len());
            shared.observer.on_released(&released);
        }
        if !lost.is_empty() {
            Counters::add(&counters.lease_lost, lost.len());
            tracing::warn!(relay = %shared.name, subscription = %self.served().name, events = ?lost, "lease lost before settling; another relay holds these events");
            shared.observer.on_lease_lost(&lost);
        }
    }
}

/// When to renew a batch's lease, and which events it still holds.
///
/// A sink call cannot be interrupted, so the lease is renewed *before* a
/// call whenever the call might outlast what is left of it: when half the
/// lease has passed, or when what is left is less than twice the longest
/// call seen so far in this batch.
struct LeaseKeeper {
    lease: Duration,
    renewed_at: Instant,
    longest_call: Duration,
    /// `None` while the whole batch is held (nothing renewed yet).
    held: Option<std::collections::HashSet<EventId>>,
}

impl LeaseKeeper {
    /// `began`: no later than the database's start of the lease (the
    /// moment the claim was sent).
    fn new(lease: Duration, began: Instant) -> Self {
        LeaseKeeper {
            lease,
            renewed_at: began,
            longest_call: Duration::ZERO,
            held: None,
        }
    }

    fn due(&self) -> bool {
        let elapsed = self.renewed_at.elapsed();
        elapsed > self.lease / 2 || elapsed + self.longest_call * 2 > self.lease
    }

    /// When [`due`](Self::due) turns true, for a wait that must not
    /// outlast the lease.
    fn due_at(&self) -> Instant {
        let half = self.lease / 2;
        let before_calls = self.lease.saturating_sub(self.longest_call * 2);
        self.renewed_at + half.min(before_calls)
    }

    fn renewed(&mut self, held: Vec<EventId>) {
        self.renewed_at = Instant::now();
        self.held = Some(held.into_iter().collect());
    }

    /// Best effort: carry on; the settle's fencing keeps a lost lease safe.
    fn renewal_failed(&mut self) {
        self.renewed_at = Instant::now();
    }

    fn holds(&self, id: EventId) -> bool {
        self.held.as_ref().is_none_or(|held| held.contains(&id))
    }

    fn observe_call(&mut self, took: Duration) {
        self.longest_call = self.longest_call.max(took);
    }
}

/// One event's verdict, with the sink's error for the observer.
struct Outcome {
    id: EventId,
    /// Its index in the batch's events (unreadable ones come last).
    event: usize,
    verdict: Verdict,
    error: Option<DeliveryError>,
}

impl Outcome {
    fn release(event: &StoredEvent, index: usize) -> Self {
        Outcome {
            id: event.id,
            event: index,
            verdict: Verdict::Release,
            error: None,
        }
    }

    fn held(event: &StoredEvent, index: usize) -> Self {
        Outcome {
            id: event.id,
            event: index,
            verdict: Verdict::Held,
            error: None,
        }
    }
}

/// A claimed batch as the worker settles it.
struct Batch<'a> {
    token: i64,
    /// The lane whose cursor the batch holds, if it has rows of the log.
    lane: Option<i16>,
    events: &'a [StoredEvent],
    /// Where each event lives, by index in `events`.
    places: &'a [Place],
}

/// An error with its causes, on one line, for logs.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_that_began_before_a_slow_claim_is_renewed_before_the_first_call() {
        // Scenario 2 of issue 12: 2.4 s of a 3 s lease went by between
        // sending the claim and the first sink call.
        let lease = Duration::from_secs(3);
        let sent = Instant::now() - Duration::from_millis(2400);
        assert!(LeaseKeeper::new(lease, sent).due());
        assert!(!LeaseKeeper::new(lease, Instant::now()).due());
    }
}
