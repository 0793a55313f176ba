//! A randomized model test of the claim / defer / settle protocol.
//!
//! Three simulated relays, each on its own connection, claim, defer what
//! came back blocked, hand events to a sink one at a time, renew lost
//! leases, settle, and die, in a random order (one statement at a time)
//! against a real database, while events of a few keys (and none) keep
//! being published. After every step the table is checked against the
//! model and against the protocol's invariants (see [`Model::check`]); at
//! the end everything is drained and every event accounted for.
//!
//! Time is the model's own: "time passes" moves every `available_at` back
//! by the same amount, so leases, retries and deferral margins run out as
//! they would, and nothing sleeps. Every model duration is a multiple of
//! 20 s except the lease (130 s), so the run's own real time (about a
//! second) never decides whether something is due: a seed replays the
//! same run.
//! Reproduce a failure, or explore more seeds, with
//! `OUTBOX_MODEL_SEED=<u64> cargo test --lib relay_model_tests`.
//!
//! What it does not cover: interleavings *inside* statements (a settle
//! waiting for a deferral's lock, a defer skipping a locked event); those
//! are replayed exactly in `relay_race_tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

use super::claim::{claim, defer, TopicFilter};
use super::pg;
use super::settle::{extend_lease, settle, Verdict};
use crate::event::EventId;

/// The seeds every test run checks; `OUTBOX_MODEL_SEED` replaces them.
const SEEDS: [u64; 3] = [1, 2, 3];
const STEPS: usize = 400;
const RELAYS: usize = 3;
const KEYS: [&str; 4] = ["a", "b", "c", "d"];
/// 10 s away from every sum of [`TICKS`], so the model and the database
/// agree on when a lease ran out unless a batch stays in hand for 10 s of
/// real time (a whole run takes about one).
const LEASE: Duration = Duration::from_secs(130);
/// How far time moves in one "time passes" step, in seconds: mostly less
/// than a lease, sometimes past it (and past a deferral's 60 s margin).
const TICKS: [u64; 6] = [20, 20, 40, 60, 100, 200];
/// A retry's delay, in seconds: due at once, soon, or after a deferral
/// behind it would have run out (so a deferred event comes due while its
/// predecessor is still queued, and must be blocked again).
const RETRY_DELAYS: [u64; 3] = [0, 40, 600];

/// Makes every settle forget to wake deferred successors (used only to
/// show that the model notices).
const SETTLE_FORGETS_TO_WAKE: &str = "
    CREATE OR REPLACE FUNCTION outbox.wake_deferred_successors(done_ids bigint[], done_keys text[])
    RETURNS void LANGUAGE sql AS $$ SELECT $$";

#[test]
fn random_relay_steps_keep_key_order_and_never_leave_a_first_event_deferred() {
    let seeds = match std::env::var("OUTBOX_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("OUTBOX_MODEL_SEED is a u64")],
        Err(_) => SEEDS.to_vec(),
    };
    for seed in seeds {
        match run(seed, None) {
            Ok(stats) => println!("seed {seed}: {stats:?}"),
            Err(failure) => panic!("{failure}"),
        }
    }
}

/// The model is only worth its runs if a broken protocol fails them: with
/// the wake gone (in this test's database only), a settle leaves the next
/// event of its key deferred behind nothing.
#[test]
fn the_model_notices_a_settle_that_forgets_to_wake_the_next_event() {
    let failure = run(SEEDS[0], Some(SETTLE_FORGETS_TO_WAKE)).expect_err("a run without wakes");
    assert!(failure.contains("invariant 2"), "{failure}");
}

/// Runs `STEPS` random steps and the drain on a fresh database (after
/// `sabotage`, if any); the error names the seed, the broken invariant and
/// the last steps.
fn run(seed: u64, sabotage: Option<&str>) -> Result<Stats, String> {
    let db = pg::test_db();
    let mut model = Model::new(&db, seed);
    if let Some(sql) = sabotage {
        model.observer.batch_execute(sql).expect("sabotage");
    }
    let outcome = (0..STEPS)
        .try_for_each(|_| model.step().and_then(|()| model.check()))
        .and_then(|()| model.drain());
    outcome.map(|()| model.stats).map_err(|violation| {
        let recent = model.steps.len().saturating_sub(30);
        format!(
            "seed {seed}: {violation}\nreproduce with OUTBOX_MODEL_SEED={seed}; last steps:\n  {}",
            model.steps[recent..].join("\n  ")
        )
    })
}

/// An invariant's check: `Err` says what broke.
type Checked = Result<(), String>;

macro_rules! ensure {
    ($holds:expr, $($message:tt)+) => {
        if !$holds {
            return Err(format!($($message)+));
        }
    };
}

/// What a run did, to see that it reached the interesting paths.
#[derive(Debug, Default)]
struct Stats {
    published: usize,
    claimed: usize,
    blocked: usize,
    deferred: usize,
    woken: usize,
    delivered: usize,
    redelivered: usize,
    retried: usize,
    dead: usize,
    leases_run_out: usize,
    takeovers: usize,
    fenced: usize,
    kills: usize,
}

struct Relay {
    name: String,
    conn: PgConnection,
    /// What its last claim found blocked, not deferred yet (the worker
    /// defers right after claiming; other relays may act in between).
    blocked: Vec<i64>,
    batch: Option<Batch>,
}

struct Batch {
    token: i64,
    events: Vec<InHand>,
    /// Model time at which the lease runs out.
    lease_ends: Duration,
}

struct InHand {
    id: i64,
    /// Still ours by the last claim or renewal; a relay delivers nothing
    /// else (the worker's `LeaseKeeper`).
    held: bool,
    /// Decided by a sink call (or `Release` for an event taken over).
    verdict: Option<Verdict>,
}

struct Model {
    rng: StdRng,
    observer: PgConnection,
    relays: Vec<Relay>,
    /// Model time since the run began.
    now: Duration,
    /// Every event published, with its key.
    keys: BTreeMap<i64, Option<String>>,
    /// Events that should be in `outbox.events`.
    queued: BTreeSet<i64>,
    /// Events that should be in `outbox.dead_letters`.
    dead: BTreeSet<i64>,
    /// Every event a sink accepted, in the order it did (at least once: a
    /// relay that dies or loses its lease after a delivery means another).
    deliveries: Vec<i64>,
    steps: Vec<String>,
    stats: Stats,
}

impl Model {
    fn new(db: &pg::TestDb, seed: u64) -> Self {
        Model {
            rng: StdRng::seed_from_u64(seed),
            observer: db.conn(),
            relays: (0..RELAYS)
                .map(|n| Relay {
                    name: format!("r{n}"),
                    conn: db.conn(),
                    blocked: Vec::new(),
                    batch: None,
                })
                .collect(),
            now: Duration::ZERO,
            keys: BTreeMap::new(),
            queued: BTreeSet::new(),
            dead: BTreeSet::new(),
            deliveries: Vec::new(),
            steps: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn step(&mut self) -> Checked {
        let relay = self.rng.random_range(0..RELAYS);
        match self.rng.random_range(0..100) {
            0..12 => self.publish(),
            12..75 => return self.work(relay),
            75..82 => self.kill(relay),
            _ => self.pass_time(),
        }
        Ok(())
    }

    /// A relay's next statement: defer what its claim found blocked, else
    /// claim, else one sink call, else settle the batch.
    fn work(&mut self, r: usize) -> Checked {
        if !self.relays[r].blocked.is_empty() {
            self.defer(r);
            Ok(())
        } else if self.relays[r].batch.is_none() {
            let limit = self.rng.random_range(1..=6);
            self.claim(r, limit)
        } else if self.undelivered(r) {
            let verdict = self.random_verdict();
            self.deliver_next(r, verdict)
        } else {
            self.settle(r)
        }
    }

    /// Whether relay `r` has an event in hand it has not decided yet.
    fn undelivered(&self, r: usize) -> bool {
        let batch = self.relays[r].batch.as_ref();
        batch.is_some_and(|b| b.events.iter().any(|e| e.verdict.is_none()))
    }

    fn publish(&mut self) {
        for _ in 0..self.rng.random_range(1..=3) {
            let key = match self.rng.random_bool(0.25) {
                true => None,
                false => KEYS.choose(&mut self.rng).map(|k| k.to_string()),
            };
            let id = diesel::sql_query(
                "INSERT INTO outbox.events (topic, key, payload)
                 VALUES ('model', $1, '{}') RETURNING id",
            )
            .bind::<Nullable<Text>, _>(&key)
            .get_result::<Id>(&mut self.observer)
            .expect("publishing")
            .id;
            self.steps.push(format!("publish {id} (key {key:?})"));
            self.keys.insert(id, key);
            self.queued.insert(id);
            self.stats.published += 1;
        }
    }

    fn claim(&mut self, r: usize, limit: i64) -> Checked {
        let relay = &mut self.relays[r];
        let name = relay.name.clone();
        let all = TopicFilter {
            all: true,
            ..TopicFilter::default()
        };
        let claimed = claim(&mut relay.conn, &name, limit, LEASE, &all).expect("claim");
        let ids: Vec<i64> = claimed.rows.iter().map(|row| row.id().0).collect();
        self.steps.push(format!(
            "{name} claims (limit {limit}): {ids:?} under token {}, blocked {:?}",
            claimed.token, claimed.blocked
        ));
        // `rescued`: claimed while still flagged deferred, i.e. due by its
        // margin, not by a wake. Events leave the table here only by a
        // settle (never by hand or purge, where rescues come from), and a
        // settle wakes the next deferred event of its key; so a deferred
        // event always has an earlier one queued (invariant 2), is blocked
        // when its margin runs out, and is never claimed deferred.
        ensure!(
            claimed.rescued.is_empty(),
            "rescue: {:?} claimed by their margin, though every removal was a settle",
            claimed.rescued
        );
        for &id in &ids {
            ensure!(
                self.first_of_key(id),
                "order: {name} claimed {id} while an earlier event of its key is queued"
            );
        }
        for &id in &claimed.blocked {
            ensure!(
                !self.first_of_key(id),
                "claim: {id} came back blocked, yet no earlier event of its key is queued"
            );
        }
        self.stats.claimed += ids.len();
        self.stats.blocked += claimed.blocked.len();
        let relay = &mut self.relays[r];
        relay.blocked = claimed.blocked;
        if !ids.is_empty() {
            relay.batch = Some(Batch {
                token: claimed.token,
                events: ids
                    .into_iter()
                    .map(|id| InHand {
                        id,
                        held: true,
                        verdict: None,
                    })
                    .collect(),
                lease_ends: self.now + LEASE,
            });
        }
        Ok(())
    }

    fn defer(&mut self, r: usize) {
        let relay = &mut self.relays[r];
        let blocked = std::mem::take(&mut relay.blocked);
        let moved = defer(&mut relay.conn, &blocked).expect("defer");
        self.steps
            .push(format!("{} defers {blocked:?}: {moved} moved", relay.name));
        self.stats.deferred += moved;
    }

    /// One sink call for the batch's next event, after renewing the lease
    /// if it ran out (as the worker does; events taken over meanwhile are
    /// released, never delivered).
    fn deliver_next(&mut self, r: usize, verdict: Verdict) -> Checked {
        let now = self.now;
        let relay = &mut self.relays[r];
        let batch = relay.batch.as_mut().expect("a batch in hand");
        if batch.lease_ends <= now {
            let ids: Vec<EventId> = batch.events.iter().map(|e| EventId(e.id)).collect();
            let held = extend_lease(&mut relay.conn, batch.token, &ids, LEASE).expect("renewal");
            self.steps
                .push(format!("{} renews its lease: holds {held:?}", relay.name));
            for event in &mut batch.events {
                event.held = held.contains(&EventId(event.id));
            }
            batch.lease_ends = now + LEASE;
        }
        let event = batch.events.iter_mut().find(|e| e.verdict.is_none());
        let event = event.expect("an undecided event");
        let (id, name) = (event.id, relay.name.clone());
        if !event.held {
            event.verdict = Some(Verdict::Release);
            self.steps.push(format!("{name} releases {id}: taken over"));
            self.stats.takeovers += 1;
            return Ok(());
        }
        event.verdict = Some(verdict.clone());
        self.steps
            .push(format!("{name} hands {id} to the sink: {verdict:?}"));
        ensure!(
            self.queued.contains(&id),
            "delivery: {name} handed {id} to the sink after a settle removed it"
        );
        ensure!(
            self.first_of_key(id),
            "order: {name} handed {id} to the sink while an earlier event of its key is queued"
        );
        if let Verdict::Delivered = verdict {
            if self.deliveries.contains(&id) {
                self.stats.redelivered += 1;
            }
            self.deliveries.push(id);
            self.stats.delivered += 1;
        }
        Ok(())
    }

    fn random_verdict(&mut self) -> Verdict {
        match self.rng.random_range(0..100) {
            0..75 => Verdict::Delivered,
            75..92 => Verdict::Retry {
                delay: Duration::from_secs(*RETRY_DELAYS.choose(&mut self.rng).unwrap()),
                error: "model: try again".into(),
            },
            _ => Verdict::Dead {
                error: "model: refused".into(),
            },
        }
    }

    /// Settles the batch. Fencing: exactly the events still under the
    /// batch's token are settled, and while the lease holds, that is every
    /// event the relay holds.
    fn settle(&mut self, r: usize) -> Checked {
        let now = self.now;
        let relay = &mut self.relays[r];
        let batch = relay.batch.take().expect("a batch in hand");
        let ours = ids_with_token(&mut self.observer, batch.token);
        if now < batch.lease_ends {
            let held: Vec<i64> = batch
                .events
                .iter()
                .filter(|e| e.held)
                .map(|e| e.id)
                .collect();
            ensure!(
                ours == held,
                "in flight: {}'s lease holds {held:?}, the table has {ours:?} under its token",
                relay.name
            );
        }
        let deferred_before = ids(
            &mut self.observer,
            "SELECT id FROM outbox.events WHERE deferred",
        );
        let verdicts: Vec<(EventId, Verdict)> = batch
            .events
            .into_iter()
            .map(|e| (EventId(e.id), e.verdict.expect("decided")))
            .collect();
        let mut settled: Vec<i64> = settle(&mut relay.conn, batch.token, &verdicts)
            .expect("settle")
            .into_iter()
            .map(|id| id.0)
            .collect();
        settled.sort_unstable();
        self.steps.push(format!(
            "{} settles token {}: {verdicts:?}, settled {settled:?}",
            relay.name, batch.token
        ));
        ensure!(
            settled == ours,
            "fencing: {} settled {settled:?}, but its token held {ours:?}",
            relay.name
        );
        for (id, verdict) in &verdicts {
            if !settled.contains(&id.0) {
                self.stats.fenced += 1;
                continue;
            }
            match verdict {
                Verdict::Delivered => {
                    self.queued.remove(&id.0);
                }
                Verdict::Dead { .. } => {
                    self.queued.remove(&id.0);
                    self.dead.insert(id.0);
                    self.stats.dead += 1;
                }
                Verdict::Retry { .. } => self.stats.retried += 1,
                Verdict::Release => {}
            }
        }
        let deferred_after = ids(
            &mut self.observer,
            "SELECT id FROM outbox.events WHERE deferred",
        );
        self.stats.woken += deferred_before
            .iter()
            .filter(|id| !deferred_after.contains(id))
            .count();
        Ok(())
    }

    /// The relay dies: what it claimed but did not settle comes due again
    /// when its lease runs out (made to run out now); what it delivered
    /// stays delivered.
    fn kill(&mut self, r: usize) {
        let relay = &mut self.relays[r];
        relay.blocked.clear();
        let Some(batch) = relay.batch.take() else {
            return;
        };
        diesel::sql_query(
            "UPDATE outbox.events SET available_at = now()
              WHERE claim_token = $1 AND available_at > now()",
        )
        .bind::<BigInt, _>(batch.token)
        .execute(&mut self.observer)
        .expect("running a lease out");
        self.steps
            .push(format!("{} dies holding token {}", relay.name, batch.token));
        self.stats.kills += 1;
    }

    /// The clock moves: every `available_at` moves back by the same amount.
    fn pass_time(&mut self) {
        let secs = *TICKS.choose(&mut self.rng).unwrap();
        diesel::sql_query(
            "UPDATE outbox.events SET available_at = available_at - $1 * interval '1 second'",
        )
        .bind::<BigInt, _>(secs as i64)
        .execute(&mut self.observer)
        .expect("moving the clock");
        let before = self.now;
        self.now += Duration::from_secs(secs);
        self.stats.leases_run_out += self
            .relays
            .iter()
            .filter_map(|relay| relay.batch.as_ref())
            .filter(|b| before < b.lease_ends && b.lease_ends <= self.now)
            .count();
        self.steps.push(format!("{secs} s pass"));
    }

    /// Whether no earlier event of `id`'s key is queued.
    fn first_of_key(&self, id: i64) -> bool {
        let key = &self.keys[&id];
        key.is_none() || !self.queued.range(..id).any(|e| &self.keys[e] == key)
    }

    /// The invariants, after every step:
    ///
    /// 1. No key has two events in flight (claimed, lease not run out): in
    ///    the table, and the table's in-flight events are exactly those the
    ///    relays hold by their own clocks, under their tokens.
    /// 2. No key's first queued event is deferred: a settle that removes an
    ///    event wakes the next deferred one of its key in the same
    ///    transaction, and only a later event is ever deferred. (So a claim
    ///    never takes an event still flagged deferred: nothing to rescue.)
    /// 3. Key order: an event is claimed and handed to a sink only while no
    ///    earlier event of its key is queued, and never after a settle
    ///    removed it (checked at each claim and sink call; [`Self::drain`]
    ///    checks the resulting delivery order).
    ///
    /// And the table holds exactly the events the model expects queued,
    /// the dead letters exactly those settled dead.
    fn check(&mut self) -> Checked {
        let table = ids(
            &mut self.observer,
            "SELECT id FROM outbox.events ORDER BY id",
        );
        let queued: Vec<i64> = self.queued.iter().copied().collect();
        ensure!(
            table == queued,
            "table: holds {table:?}, model expects {queued:?}"
        );
        let dead = ids(
            &mut self.observer,
            "SELECT id FROM outbox.dead_letters ORDER BY id",
        );
        let expected: Vec<i64> = self.dead.iter().copied().collect();
        ensure!(
            dead == expected,
            "dead letters: {dead:?}, model expects {expected:?}"
        );

        let in_flight: Vec<InFlight> = diesel::sql_query(
            "SELECT id, key, claim_token AS token FROM outbox.events
              WHERE claim_token IS NOT NULL AND available_at > now()",
        )
        .load(&mut self.observer)
        .expect("reading events in flight");
        let mut by_key: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for event in &in_flight {
            if let Some(key) = &event.key {
                by_key.entry(key).or_default().push(event.id);
            }
        }
        for (key, ids) in by_key {
            ensure!(
                ids.len() == 1,
                "invariant 1 (one event in flight per key): key {key} has {ids:?} in flight"
            );
        }
        let table: BTreeMap<i64, i64> = in_flight.iter().map(|e| (e.id, e.token)).collect();
        let held: BTreeMap<i64, i64> = self
            .relays
            .iter()
            .filter_map(|relay| relay.batch.as_ref())
            .filter(|batch| self.now < batch.lease_ends)
            .flat_map(|batch| {
                let held = batch.events.iter().filter(|e| e.held);
                held.map(|e| (e.id, batch.token))
            })
            .collect();
        ensure!(
            table == held,
            "invariant 1: in flight (id: token) in the table {table:?}, held by relays {held:?}"
        );

        let stranded = ids(
            &mut self.observer,
            "SELECT e.id FROM outbox.events e
              WHERE e.deferred
                AND (e.key IS NULL OR NOT EXISTS (
                     SELECT FROM outbox.events earlier
                      WHERE earlier.key = e.key AND earlier.id < e.id))",
        );
        ensure!(
            stranded.is_empty(),
            "invariant 2 (a key's first event is never left deferred): {stranded:?}"
        );
        Ok(())
    }

    /// Every relay dies and every retry comes due; then one relay claims
    /// and delivers everything, with no more time passing, so each key's
    /// next event must be woken by the settle of the one before (a round
    /// per event at most). Then every event is accounted for: delivered at
    /// least once or dead, and each key's deliveries in id order (a
    /// redelivery repeats the latest event, never an earlier one).
    fn drain(&mut self) -> Checked {
        for r in 0..RELAYS {
            self.kill(r);
        }
        diesel::sql_query(
            "UPDATE outbox.events SET available_at = available_at - interval '1 hour'",
        )
        .execute(&mut self.observer)
        .expect("moving the clock");
        self.now += Duration::from_secs(3600);
        self.steps
            .push("drain: every relay dies, an hour passes".into());
        self.check()?;
        let rounds = self.queued.len() + 1;
        for _ in 0..rounds {
            if self.queued.is_empty() {
                break;
            }
            self.claim(0, 1000)?;
            self.check()?;
            if !self.relays[0].blocked.is_empty() {
                self.defer(0);
                self.check()?;
            }
            while self.undelivered(0) {
                self.deliver_next(0, Verdict::Delivered)?;
            }
            if self.relays[0].batch.is_some() {
                self.settle(0)?;
                self.check()?;
            }
        }
        ensure!(
            self.queued.is_empty(),
            "drain: {rounds} rounds left {:?} queued, though every settle wakes the next",
            self.queued
        );

        let published: BTreeSet<i64> = self.keys.keys().copied().collect();
        let delivered: BTreeSet<i64> = self.deliveries.iter().copied().collect();
        let missing: Vec<&i64> = published
            .iter()
            .filter(|id| !delivered.contains(id) && !self.dead.contains(id))
            .collect();
        ensure!(
            missing.is_empty(),
            "lost: {missing:?} neither delivered nor dead"
        );
        for key in KEYS {
            let of_key: Vec<i64> = self
                .deliveries
                .iter()
                .copied()
                .filter(|id| self.keys[id].as_deref() == Some(key))
                .collect();
            ensure!(
                of_key.is_sorted(),
                "invariant 3 (key order): key {key} delivered in the order {of_key:?}"
            );
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct InFlight {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    key: Option<String>,
    #[diesel(sql_type = BigInt)]
    token: i64,
}

fn ids(conn: &mut PgConnection, query: &str) -> Vec<i64> {
    let rows: Vec<Id> = diesel::sql_query(query).load(conn).expect(query);
    rows.into_iter().map(|row| row.id).collect()
}

fn ids_with_token(conn: &mut PgConnection, token: i64) -> Vec<i64> {
    let rows: Vec<Id> =
        diesel::sql_query("SELECT id FROM outbox.events WHERE claim_token = $1 ORDER BY id")
            .bind::<BigInt, _>(token)
            .load(conn)
            .expect("reading a batch's events");
    rows.into_iter().map(|row| row.id).collect()
}
