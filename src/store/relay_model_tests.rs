//! A randomized model test of the subscription log (migration 000005).
//!
//! Three subscriptions (`default`, read by one worker that routes every
//! topic and one that routes only `order.*`; `orders`, read by two
//! workers; `audit`, by one) and two publishers run random steps against a
//! real database, one statement at a time: publish (keyed or not, some
//! delayed, some inside a transaction committed or rolled back steps
//! later), claim, settle with random verdicts (held computed as the relay
//! does), run a lease out, let time pass (retries and delayed events come
//! due), reclaim, burn transaction ids across a segment. After every step
//! each subscription is checked against the model ([`Model::check`]); at
//! the end everything is drained and every event accounted for.
//!
//! Key order is the order the log promises (docs/design.md §4): an event
//! must follow every event of its key whose transaction committed before
//! its own took its transaction id, and the earlier events of its own
//! transaction. Two transactions that overlapped are delivered in xid
//! order when one window holds both: not commit order, a documented limit.
//!
//! Transactions may stay open across steps and commit late ([`FULL`]):
//! the case that once stranded keys (`a_late_commit_behind_a_retry_of_its_key_is_not_stranded`).
//!
//! Reproduce a failure, or explore more seeds, with
//! `OUTBOX_MODEL_SEED=<u64> cargo test --all-features --lib relay_model_tests`
//! (`OUTBOX_MODEL_LOG=<n>` shows the last n steps).
//! Interleavings *inside* statements are in `relay_race_tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

use super::claim::{Place, TopicFilter};
use super::pg;
use super::relay_race_tests::{claim_as, expire, publish, settle_ids, Batch, Id};
use super::settle::{extend_lease, Verdict};
use super::subscriptions::{reclaim, subscribe};
use crate::event::EventId;

const SEEDS: [u64; 3] = [1, 2, 3];
const STEPS: usize = 300;
/// Leases never run out by the clock during a run: only a "lease runs
/// out" step ends one, so a seed replays the same run.
const LEASE: Duration = Duration::from_secs(3600);
const KEYS: [Option<&str>; 5] = [Some("a"), Some("b"), Some("c"), Some("d"), None];
const TOPICS: [&str; 3] = ["order.created", "order.paid", "user.signup"];
const BURNS: usize = 2;

/// Makes every settle forget to wake the next row of a key (used only to
/// show that the model notices).
const SETTLE_FORGETS_TO_WAKE: &str = "
    CREATE OR REPLACE FUNCTION outbox.wake_next_of_keys(p_subscription text, done_keys text[])
    RETURNS void LANGUAGE sql AS $$ SELECT $$";

/// What a run may do besides the steps every run takes.
#[derive(Clone, Copy)]
struct Config {
    /// A publisher holds transactions open across steps, so events commit
    /// late (after later transactions' events were read).
    late_commits: bool,
}

/// Every kind of step.
const FULL: Config = Config { late_commits: true };

/// Every transaction commits in the step that opens it (for the sabotage
/// check, which needs a run that is otherwise clean and quick).
const NO_LATE_COMMITS: Config = Config {
    late_commits: false,
};

#[test]
fn random_steps_lose_nothing_keep_key_order_and_strand_nothing() {
    run_seeds(FULL);
}

fn run_seeds(config: Config) {
    let seeds = match std::env::var("OUTBOX_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("OUTBOX_MODEL_SEED is a u64")],
        Err(_) => SEEDS.to_vec(),
    };
    for seed in seeds {
        println!("model seed {seed} (OUTBOX_MODEL_SEED={seed} replays it)");
        match run(seed, config, None) {
            Ok(stats) => println!("seed {seed}: {stats:?}"),
            Err(failure) => panic!("{failure}"),
        }
    }
}

/// The model is only worth its runs if a broken protocol fails them.
#[test]
fn the_model_notices_a_settle_that_forgets_to_wake_the_next_row() {
    let failure = run(SEEDS[0], NO_LATE_COMMITS, Some(SETTLE_FORGETS_TO_WAKE))
        .expect_err("a run without wakes");
    assert!(failure.contains("stranded"), "{failure}");
}

fn run(seed: u64, config: Config, sabotage: Option<&str>) -> Result<Stats, String> {
    let db = pg::test_db();
    let mut model = Model::new(&db, seed, config);
    if let Some(sql) = sabotage {
        model.observer.batch_execute(sql).expect("sabotage");
    }
    let outcome = (0..STEPS)
        .try_for_each(|_| {
            model.step += 1;
            model.random_step().and_then(|()| model.check())
        })
        .and_then(|()| model.drain());
    outcome.map(|()| model.stats).map_err(|violation| {
        // OUTBOX_MODEL_LOG=<n>: how many of the last steps a failure shows.
        let shown = std::env::var("OUTBOX_MODEL_LOG").map_or(40, |n| n.parse().unwrap_or(40));
        let recent = model.log.len().saturating_sub(shown);
        format!(
            "seed {seed}: {violation}\nreproduce with OUTBOX_MODEL_SEED={seed}; last steps:\n  {}",
            model.log[recent..].join("\n  ")
        )
    })
}

type Checked = Result<(), String>;

macro_rules! ensure {
    ($holds:expr, $($message:tt)+) => {
        if !$holds {
            return Err(format!($($message)+));
        }
    };
}

#[derive(Debug, Default)]
struct Stats {
    published: usize,
    rolled_back: usize,
    claimed: usize,
    sunk: usize,
    retried: usize,
    held: usize,
    dead: usize,
    released: usize,
    leases_run_out: usize,
    renewals: usize,
    fenced: usize,
    duplicates: usize,
    segments_truncated: usize,
}

struct Sub {
    name: &'static str,
    topics: TopicFilter,
}

impl Sub {
    fn wants(&self, topic: &str) -> bool {
        routes(&self.topics, topic)
    }
}

fn routes(filter: &TopicFilter, topic: &str) -> bool {
    filter.all
        || filter.exact.iter().any(|t| t == topic)
        || filter
            .like
            .iter()
            .any(|l| topic.starts_with(l.trim_end_matches('%')))
}

fn filter(all: bool, exact: &[&str], like: &[&str]) -> TopicFilter {
    TopicFilter {
        all,
        exact: exact.iter().map(|s| s.to_string()).collect(),
        like: like.iter().map(|s| s.to_string()).collect(),
    }
}

struct Event {
    topic: &'static str,
    key: Option<&'static str>,
    /// The model transaction that published it.
    tx: usize,
}

/// A publishing transaction: the step its first insert took an xid, and
/// the step it committed (`None` while open or rolled back).
struct Tx {
    xid_step: usize,
    commit_step: Option<usize>,
}

struct InHand {
    batch: Batch,
    /// Not run out (as far as the model knows the database).
    live: bool,
    /// The worker noticed the lease ran out and renewed: which rows it
    /// still holds.
    held: Option<BTreeSet<i64>>,
}

impl InHand {
    fn holds(&self, id: i64) -> bool {
        self.held.as_ref().is_none_or(|h| h.contains(&id))
    }
}

struct Worker {
    name: String,
    sub: usize,
    routed: TopicFilter,
    conn: PgConnection,
    hand: Option<InHand>,
}

struct Publisher {
    conn: PgConnection,
    open: Option<usize>,
}

/// What one subscription's sinks got, and what its settles recorded.
#[derive(Default)]
struct Ledger {
    /// Sink calls that succeeded, by event.
    sunk: BTreeMap<i64, usize>,
    /// Settles the database accepted with `delivered` or `dead`.
    settled: BTreeMap<i64, usize>,
    dead: BTreeSet<i64>,
    /// Events a sink refused for good (dead verdicts, settled or not): for
    /// key order, as good as delivered.
    refused: BTreeSet<i64>,
    /// Events a sink got or a verdict was given for under a lease lost
    /// before the settle: the documented duplicates.
    lost: BTreeSet<i64>,
}

struct Model {
    rng: StdRng,
    config: Config,
    observer: PgConnection,
    subs: Vec<Sub>,
    workers: Vec<Worker>,
    publishers: Vec<Publisher>,
    events: BTreeMap<i64, Event>,
    txs: Vec<Tx>,
    ledgers: Vec<Ledger>,
    step: usize,
    burns: usize,
    log: Vec<String>,
    stats: Stats,
}

impl Model {
    fn new(db: &pg::TestDb, seed: u64, config: Config) -> Self {
        let mut observer = db.conn();
        let subs = vec![
            Sub {
                name: "default",
                topics: filter(true, &[], &[]),
            },
            Sub {
                name: "orders",
                topics: filter(false, &[], &["order.%"]),
            },
            Sub {
                name: "audit",
                topics: filter(false, &["user.signup", "order.paid"], &[]),
            },
        ];
        for sub in &subs[1..] {
            let patterns: Vec<String> = match sub.name {
                "orders" => vec!["order.*".into()],
                _ => vec!["user.signup".into(), "order.paid".into()],
            };
            assert!(subscribe(&mut observer, sub.name, &patterns, &sub.topics).unwrap());
        }
        let workers = [
            (0, filter(true, &[], &[])),
            (0, filter(false, &["order.created", "order.paid"], &[])),
            (1, subs[1].topics.clone()),
            (1, subs[1].topics.clone()),
            (2, subs[2].topics.clone()),
        ]
        .into_iter()
        .enumerate()
        .map(|(n, (sub, routed))| Worker {
            name: format!("w{n}"),
            sub,
            routed,
            conn: db.conn(),
            hand: None,
        })
        .collect();
        Model {
            rng: StdRng::seed_from_u64(seed),
            config,
            observer,
            ledgers: subs.iter().map(|_| Ledger::default()).collect(),
            subs,
            workers,
            publishers: (0..2)
                .map(|_| Publisher {
                    conn: db.conn(),
                    open: None,
                })
                .collect(),
            events: BTreeMap::new(),
            txs: Vec::new(),
            step: 0,
            burns: 0,
            log: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn random_step(&mut self) -> Checked {
        let w = self.rng.random_range(0..self.workers.len());
        match self.rng.random_range(0..100) {
            0..15 => self.publish_committed(),
            15..22 if self.config.late_commits => self.publish_open(),
            22..27 if self.config.late_commits => self.end_open(),
            15..27 => self.publish_committed(),
            27..80 if self.workers[w].hand.is_none() => return self.claim(w),
            27..80 => return self.settle(w),
            80..87 => self.run_lease_out(w),
            87..94 => self.pass_time(),
            94..98 => self.reclaim(),
            _ => self.burn(),
        }
        Ok(())
    }

    fn new_events(&mut self, conn: usize, tx: usize) {
        let mut ids = Vec::new();
        for _ in 0..self.rng.random_range(1..=3) {
            let topic = *TOPICS.choose(&mut self.rng).unwrap();
            let key = *KEYS.choose(&mut self.rng).unwrap();
            let delay = if self.rng.random_bool(0.15) { 3600 } else { 0 };
            let id = publish(&mut self.publishers[conn].conn, topic, key, delay);
            self.events.insert(id, Event { topic, key, tx });
            ids.push(format!(
                "{id} {topic} {key:?}{}",
                if delay > 0 { " delayed" } else { "" }
            ));
        }
        self.stats.published += ids.len();
        self.log
            .push(format!("{}: publish (tx {tx}) {ids:?}", self.step));
    }

    fn publish_committed(&mut self) {
        let tx = self.txs.len();
        self.txs.push(Tx {
            xid_step: self.step,
            commit_step: None,
        });
        execute(&mut self.publishers[0].conn, "BEGIN");
        self.new_events(0, tx);
        execute(&mut self.publishers[0].conn, "COMMIT");
        self.txs[tx].commit_step = Some(self.step);
    }

    fn publish_open(&mut self) {
        let tx = match self.publishers[1].open {
            Some(tx) => tx,
            None => {
                execute(&mut self.publishers[1].conn, "BEGIN");
                self.txs.push(Tx {
                    xid_step: self.step,
                    commit_step: None,
                });
                self.publishers[1].open = Some(self.txs.len() - 1);
                self.txs.len() - 1
            }
        };
        self.new_events(1, tx);
    }

    fn end_open(&mut self) {
        let Some(tx) = self.publishers[1].open.take() else {
            return;
        };
        if self.rng.random_bool(0.2) {
            execute(&mut self.publishers[1].conn, "ROLLBACK");
            self.events.retain(|_, e| e.tx != tx);
            self.stats.rolled_back += 1;
            self.log.push(format!("{}: tx {tx} rolls back", self.step));
        } else {
            execute(&mut self.publishers[1].conn, "COMMIT");
            self.txs[tx].commit_step = Some(self.step);
            self.log.push(format!("{}: tx {tx} commits", self.step));
        }
    }

    fn committed(&self, id: i64) -> bool {
        self.txs[self.events[&id].tx].commit_step.is_some()
    }

    /// Whether `a` must be delivered before `b` (both of one key).
    fn precedes(&self, a: i64, b: i64) -> bool {
        let (ea, eb) = (&self.events[&a], &self.events[&b]);
        if ea.tx == eb.tx {
            return a < b;
        }
        self.txs[ea.tx]
            .commit_step
            .is_some_and(|c| c < self.txs[eb.tx].xid_step)
    }

    fn claim(&mut self, w: usize) -> Checked {
        let lane = self.rng.random_range(0..8);
        let limit = self.rng.random_range(1..=6);
        let batch = self.claim_for(w, lane, limit)?;
        if !batch.rows.is_empty() {
            self.workers[w].hand = Some(InHand {
                batch,
                live: true,
                held: None,
            });
        }
        Ok(())
    }

    /// Worker `w` claims; every row must be a committed event of its
    /// subscription's and its own topics that no settle has recorded yet.
    fn claim_for(&mut self, w: usize, lane: usize, limit: i64) -> Result<Batch, String> {
        let worker = &mut self.workers[w];
        let (s, name) = (worker.sub, self.subs[worker.sub].name);
        let batch = claim_as(
            &mut worker.conn,
            name,
            lane,
            &worker.name,
            limit,
            LEASE,
            &worker.routed,
        );
        let rows: Vec<_> = batch.rows.iter().map(|r| (r.id, r.place)).collect();
        self.log.push(format!(
            "{}: {} claims {name} (lane {lane}, limit {limit}): {rows:?} token {} lane {:?}",
            self.step, worker.name, batch.token, batch.lane
        ));
        let worker = &self.workers[w];
        for row in &batch.rows {
            let id = row.id;
            ensure!(
                self.events.contains_key(&id) && self.committed(id),
                "claim: {id} is not a committed event"
            );
            let topic = self.events[&id].topic;
            ensure!(
                self.subs[s].wants(topic),
                "claim: {name} got {id} of topic {topic}"
            );
            ensure!(
                routes(&worker.routed, topic),
                "claim: {} got {id} of unrouted topic {topic}",
                worker.name
            );
            ensure!(
                !self.ledgers[s].settled.contains_key(&id),
                "claim: {name} got {id} again, though a settle already recorded it"
            );
        }
        self.stats.claimed += batch.rows.len();
        Ok(batch)
    }

    fn random_verdict(&mut self) -> Verdict {
        match self.rng.random_range(0..100) {
            0..70 => Verdict::Delivered,
            70..85 => Verdict::Retry {
                delay: Duration::from_secs(*[0, 3600].choose(&mut self.rng).unwrap()),
                error: "model: try again".into(),
            },
            85..92 => Verdict::Dead {
                error: "model: refused".into(),
            },
            _ => Verdict::Release,
        }
    }

    /// The worker hands its batch to the sink and settles it. A worker
    /// whose lease ran out may notice and renew first (then it releases
    /// what it lost), or not (then its settle is fenced).
    fn settle(&mut self, w: usize) -> Checked {
        let s = self.workers[w].sub;
        let name = self.subs[s].name;
        let mut hand = self.workers[w].hand.take().expect("a batch in hand");
        if !hand.live && self.rng.random_bool(0.5) {
            let places: Vec<_> = hand
                .batch
                .rows
                .iter()
                .map(|r| (EventId(r.id), r.place))
                .collect();
            let held = extend_lease(
                &mut self.workers[w].conn,
                name,
                hand.batch.token,
                hand.batch.lane,
                &places,
                LEASE,
            )
            .expect("renewal");
            self.log.push(format!(
                "{}: {} renews: holds {held:?}",
                self.step, self.workers[w].name
            ));
            hand.held = Some(held.into_iter().map(|id| id.0).collect());
            hand.live = true;
            self.stats.renewals += 1;
        }
        let mut waiting = BTreeSet::new();
        let mut verdicts = Vec::new();
        // Now and then the relay stops during the batch: it puts back the
        // rest unattempted.
        let stops_at = if self.rng.random_bool(0.1) {
            self.rng.random_range(0..=hand.batch.rows.len())
        } else {
            usize::MAX
        };
        for (n, row) in hand.batch.rows.iter().enumerate() {
            let id = row.id;
            let key = self.events[&id].key;
            let verdict = if n >= stops_at {
                self.stats.released += 1;
                Verdict::Release
            } else if key.is_some_and(|k| waiting.contains(k)) {
                self.stats.held += 1;
                Verdict::Held
            } else if !hand.holds(id) {
                self.stats.released += 1;
                Verdict::Release
            } else {
                let verdict = self.random_verdict();
                match verdict {
                    Verdict::Delivered => self.sink(s, id)?,
                    Verdict::Dead { .. } => {
                        self.ledgers[s].refused.insert(id);
                    }
                    _ => {}
                }
                if matches!(verdict, Verdict::Retry { .. } | Verdict::Release) {
                    if let Some(k) = key {
                        waiting.insert(k);
                    }
                }
                verdict
            };
            verdicts.push((id, verdict));
        }
        let expected = self.still_ours(name, &hand.batch);
        let settled = settle_ids(&mut self.workers[w].conn, name, &hand.batch, &verdicts);
        self.log.push(format!(
            "{}: {} settles {name} token {}: {:?} -> {settled:?}",
            self.step,
            self.workers[w].name,
            hand.batch.token,
            verdicts
                .iter()
                .map(|(id, v)| (*id, short(v)))
                .collect::<Vec<_>>()
        ));
        ensure!(
            settled == expected,
            "fencing: {} settled {settled:?}, but its token held {expected:?}",
            self.workers[w].name
        );
        let ledger = &mut self.ledgers[s];
        for (id, verdict) in verdicts {
            let accepted = settled.contains(&id);
            if !accepted {
                self.stats.fenced += 1;
                if matches!(verdict, Verdict::Delivered | Verdict::Dead { .. }) {
                    ledger.lost.insert(id);
                }
                continue;
            }
            match verdict {
                Verdict::Delivered => *ledger.settled.entry(id).or_default() += 1,
                Verdict::Dead { .. } => {
                    *ledger.settled.entry(id).or_default() += 1;
                    ledger.dead.insert(id);
                    self.stats.dead += 1;
                }
                Verdict::Retry { .. } => self.stats.retried += 1,
                Verdict::Release | Verdict::Held => {}
            }
        }
        Ok(())
    }

    /// The ids a settle of `batch` must settle: all its log rows if its
    /// token still holds the lane, and its deliveries rows still under
    /// its token.
    fn still_ours(&mut self, sub: &str, batch: &Batch) -> Vec<i64> {
        let batch_ids: Vec<i64> = batch.ids();
        let mut ours = ids(diesel::sql_query(
            "SELECT id FROM outbox.deliveries
                  WHERE subscription = $1 AND token = $2 AND id = ANY($3)",
        )
        .bind::<Text, _>(sub)
        .bind::<BigInt, _>(batch.token)
        .bind::<diesel::sql_types::Array<BigInt>, _>(&batch_ids)
        .load::<Id>(&mut self.observer));
        if let Some(lane) = batch.lane {
            #[derive(QueryableByName)]
            struct Held {
                #[diesel(sql_type = Bool)]
                held: bool,
            }
            let held = diesel::sql_query(
                "SELECT coalesce(token = $3, false) AS held FROM outbox.cursors
                  WHERE subscription = $1 AND lane = $2",
            )
            .bind::<Text, _>(sub)
            .bind::<Integer, _>(i32::from(lane))
            .bind::<BigInt, _>(batch.token)
            .get_result::<Held>(&mut self.observer)
            .expect("reading a cursor")
            .held;
            if held {
                ours.extend(
                    batch
                        .rows
                        .iter()
                        .filter(|r| matches!(r.place, Place::Log { .. }))
                        .map(|r| r.id),
                );
            }
        }
        ours.sort_unstable();
        ours
    }

    /// A sink of subscription `s` accepts `id`: every event of its key
    /// that precedes it has been delivered or dead-lettered.
    fn sink(&mut self, s: usize, id: i64) -> Checked {
        let key = self.events[&id].key;
        let sub = &self.subs[s];
        let ledger = &self.ledgers[s];
        if key.is_some() {
            for (&other, event) in &self.events {
                if other == id
                    || event.key != key
                    || !sub.wants(event.topic)
                    || !self.precedes(other, id)
                {
                    continue;
                }
                if !(ledger.sunk.contains_key(&other) || ledger.refused.contains(&other)) {
                    let (ta, tb) = (&self.txs[event.tx], &self.txs[self.events[&id].tx]);
                    let state = describe_key(&mut self.observer, sub.name, key);
                    return Err(format!(
                        "order: {} delivered {id} (key {key:?}, tx {} xid at step {} commit {:?}) \
                         before {other} (tx {} xid at step {} commit {:?}); {state}",
                        sub.name,
                        self.events[&id].tx,
                        tb.xid_step,
                        tb.commit_step,
                        event.tx,
                        ta.xid_step,
                        ta.commit_step
                    ));
                }
            }
        }
        self.log
            .push(format!("{}: {} sink gets {id}", self.step, sub.name));
        *self.ledgers[s].sunk.entry(id).or_default() += 1;
        self.stats.sunk += 1;
        Ok(())
    }

    /// Worker `w`'s lease runs out (its lane's and its rows'), unknown to it.
    fn run_lease_out(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        let Some(hand) = worker.hand.as_mut().filter(|h| h.live) else {
            return;
        };
        hand.live = false;
        hand.held = None;
        expire(&mut self.observer, hand.batch.token);
        self.stats.leases_run_out += 1;
        self.log.push(format!(
            "{}: {}'s lease (token {}) runs out",
            self.step, worker.name, hand.batch.token
        ));
    }

    /// Retries and delayed events come due.
    fn pass_time(&mut self) {
        execute(
            &mut self.observer,
            "UPDATE outbox.deliveries SET available_at = now()
              WHERE token IS NULL AND available_at > now() AND available_at < 'infinity'",
        );
        self.log.push(format!("{}: time passes", self.step));
    }

    fn reclaim(&mut self) {
        let truncated = reclaim(&mut self.observer).expect("reclaim");
        self.stats.segments_truncated += truncated.len();
        self.log
            .push(format!("{}: reclaim truncates {truncated:?}", self.step));
    }

    /// A whole segment's worth of transaction ids goes by.
    fn burn(&mut self) {
        if self.burns == BURNS {
            return;
        }
        self.burns += 1;
        execute(
            &mut self.observer,
            "CREATE TEMP TABLE IF NOT EXISTS burn (i int);
             DO $$ BEGIN FOR i IN 1..16400 LOOP
                 BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN OTHERS THEN RAISE; END;
             END LOOP; END $$",
        );
        self.log.push(format!("{}: 16400 xids burn", self.step));
    }

    /// After every step, for every subscription:
    ///
    /// 1. Nothing lost, nothing twice: `outbox.pending` holds, once each,
    ///    exactly the committed events of its topics no settle recorded as
    ///    delivered or dead.
    /// 2. In flight there are exactly the rows the live batches hold, and
    ///    no key is held by two batches.
    /// 3. The dead letters are exactly those settled dead.
    /// 4. Nothing stranded: every 'infinity' row has an earlier row of its
    ///    key.
    fn check(&mut self) -> Checked {
        for s in 0..self.subs.len() {
            let name = self.subs[s].name;
            let ledger = &self.ledgers[s];
            let pending: Vec<Pending> = diesel::sql_query(
                "SELECT id, in_flight FROM outbox.pending WHERE subscription = $1 ORDER BY id",
            )
            .bind::<Text, _>(name)
            .load(&mut self.observer)
            .expect("reading outbox.pending");
            let owed: Vec<i64> = pending.iter().map(|p| p.id).collect();
            let expected: Vec<i64> = self
                .events
                .iter()
                .filter(|(id, e)| {
                    self.committed(**id)
                        && self.subs[s].wants(e.topic)
                        && !ledger.settled.contains_key(id)
                })
                .map(|(id, _)| *id)
                .collect();
            ensure!(
                owed == expected,
                "pending: {name} owes {owed:?}, the model expects {expected:?}"
            );

            let in_flight: Vec<i64> = pending
                .iter()
                .filter(|p| p.in_flight)
                .map(|p| p.id)
                .collect();
            let mut held: Vec<i64> = Vec::new();
            let mut keys: BTreeMap<&str, String> = BTreeMap::new();
            for worker in self.workers.iter().filter(|w| w.sub == s) {
                let Some(hand) = worker.hand.as_ref().filter(|h| h.live) else {
                    continue;
                };
                for row in hand.batch.rows.iter().filter(|r| hand.holds(r.id)) {
                    held.push(row.id);
                    if let Some(key) = self.events[&row.id].key {
                        let holder = keys.entry(key).or_insert_with(|| worker.name.clone());
                        ensure!(
                            *holder == worker.name,
                            "in flight: {name}'s key {key} is held by {holder} and {}",
                            worker.name
                        );
                    }
                }
            }
            held.sort_unstable();
            // The view also counts as in flight the rows of a leased window
            // that its batch did not return: they wait for its settle to
            // park them, and nobody else may read them. Nothing else.
            let reserved: Vec<i64> = in_flight
                .iter()
                .copied()
                .filter(|id| !held.contains(id))
                .collect();
            let tokens: Vec<i64> = self
                .workers
                .iter()
                .filter(|w| w.sub == s)
                .filter_map(|w| w.hand.as_ref().filter(|h| h.live && h.batch.lane.is_some()))
                .map(|h| h.batch.token)
                .collect();
            let unexplained = ids(diesel::sql_query(
                "SELECT e.id FROM outbox.events e
                   JOIN outbox.cursors c ON c.subscription = $1 AND c.lane = e.lane
                  WHERE e.id = ANY($2) AND (c.token IS NULL OR c.token <> ALL($3))
                 UNION ALL
                 SELECT d.id FROM outbox.deliveries d
                  WHERE d.subscription = $1 AND d.id = ANY($2)",
            )
            .bind::<Text, _>(name)
            .bind::<diesel::sql_types::Array<BigInt>, _>(&reserved)
            .bind::<diesel::sql_types::Array<BigInt>, _>(&tokens)
            .load::<Id>(&mut self.observer));
            ensure!(
                held.iter().all(|id| in_flight.contains(id)) && unexplained.is_empty(),
                "in flight: {name} has {in_flight:?}, the live batches hold {held:?} \
                 (and {unexplained:?} are in no live batch's window)"
            );

            let dead = ids(diesel::sql_query(
                "SELECT id FROM outbox.dead_letters WHERE subscription = $1 ORDER BY id",
            )
            .bind::<Text, _>(name)
            .load::<Id>(&mut self.observer));
            let expected: Vec<i64> = ledger.dead.iter().copied().collect();
            ensure!(
                dead == expected,
                "dead letters: {name} has {dead:?}, the model expects {expected:?}"
            );
        }
        let stranded = ids(diesel::sql_query(
            "SELECT d.id FROM outbox.deliveries d
                  WHERE d.available_at = 'infinity'
                    AND (d.key IS NULL OR NOT EXISTS (
                         SELECT FROM outbox.deliveries x
                          WHERE x.subscription = d.subscription AND x.key = d.key
                            AND x.seq < d.seq))",
        )
        .load::<Id>(&mut self.observer));
        ensure!(
            stranded.is_empty(),
            "stranded: {stranded:?} wait at 'infinity' behind nothing"
        );
        Ok(())
    }

    /// Open transactions commit, every worker dies, every retry and
    /// delayed event comes due; then one worker per subscription drains
    /// it. Every event is then delivered or dead-lettered exactly once per
    /// subscription, except the documented duplicates after a lease loss.
    fn drain(&mut self) -> Checked {
        self.step += 1;
        if self.publishers[1].open.is_some() {
            let tx = self.publishers[1].open.take().unwrap();
            execute(&mut self.publishers[1].conn, "COMMIT");
            self.txs[tx].commit_step = Some(self.step);
        }
        for w in 0..self.workers.len() {
            self.run_lease_out(w);
            self.workers[w].hand = None;
        }
        self.log.push(format!("{}: drain", self.step));
        self.check()?;
        let drainers = [0, 2, 4];
        for round in 0..200 {
            self.step += 1;
            self.pass_time();
            let mut got = 0;
            for &w in &drainers {
                let (s, name) = (self.workers[w].sub, self.subs[self.workers[w].sub].name);
                let batch = self.claim_for(w, round % 8, 100)?;
                got += batch.rows.len();
                for id in batch.ids() {
                    self.sink(s, id)?;
                }
                let verdicts: Vec<_> = batch
                    .ids()
                    .into_iter()
                    .map(|id| (id, Verdict::Delivered))
                    .collect();
                let settled = settle_ids(&mut self.workers[w].conn, name, &batch, &verdicts);
                ensure!(
                    settled.len() == verdicts.len(),
                    "drain: {name} settled {settled:?} of {verdicts:?}"
                );
                for id in settled {
                    *self.ledgers[s].settled.entry(id).or_default() += 1;
                }
                self.check()?;
            }
            if got == 0 && round >= 8 {
                break;
            }
        }
        for (s, sub) in self.subs.iter().enumerate() {
            let ledger = &self.ledgers[s];
            for (&id, event) in self.events.iter().filter(|(_, e)| sub.wants(e.topic)) {
                let settled = ledger.settled.get(&id).copied().unwrap_or(0);
                ensure!(
                    settled == 1,
                    "drain: {} settled {id} {settled} times",
                    sub.name
                );
                let sunk = ledger.sunk.get(&id).copied().unwrap_or(0);
                let dead = usize::from(ledger.dead.contains(&id));
                if ledger.lost.contains(&id) {
                    self.stats.duplicates += sunk + dead - 1;
                } else {
                    ensure!(
                        sunk + dead == 1,
                        "drain: {} delivered {id} {sunk} times, dead {dead} (key {:?})",
                        sub.name,
                        event.key
                    );
                }
            }
        }
        Ok(())
    }
}

fn short(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Delivered => "delivered",
        Verdict::Retry { .. } => "retry",
        Verdict::Release => "release",
        Verdict::Held => "held",
        Verdict::Dead { .. } => "dead",
    }
}

#[derive(QueryableByName)]
struct Pending {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    in_flight: bool,
}

fn execute(conn: &mut PgConnection, sql: &str) {
    conn.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn ids(rows: QueryResult<Vec<Id>>) -> Vec<i64> {
    rows.expect("reading ids")
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// What the database holds of `key` for `subscription`, for a failure.
fn describe_key(conn: &mut PgConnection, subscription: &str, key: Option<&str>) -> String {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        state: String,
        #[diesel(sql_type = Bool)]
        in_flight: bool,
    }
    let pending: Vec<Row> = diesel::sql_query(
        "SELECT id, state, in_flight FROM outbox.pending
          WHERE subscription = $1 AND key IS NOT DISTINCT FROM $2 ORDER BY id",
    )
    .bind::<Text, _>(subscription)
    .bind::<diesel::sql_types::Nullable<Text>, _>(key)
    .load(conn)
    .expect("reading outbox.pending");
    let pending: Vec<_> = pending
        .into_iter()
        .map(|r| (r.id, r.state, r.in_flight))
        .collect();
    format!("pending of the key (id, state, in flight): {pending:?}")
}
