//! Claim cost against the size of the backlog: the time to claim, deliver
//! (no-op sink) and settle batches of 100 from the head of a backlog of 10k
//! and 1M unread events (10M with `OUTBOX_BACKLOGS`), beside a hand-written
//! claim-and-delete loop on a plain queue table holding as many due events
//! (`raw_claim_delete` on `bench.queue`, the queue the relay used to be).
//!
//! The relay serves one named subscription (the default one is removed),
//! with one worker and no listener; its own vacuuming is off, so both sides
//! are timed on the same table state. Each iteration takes 10,000 events
//! (100 batches) off the head; between iterations (untimed) as many new
//! events are appended to the log and to the queue, the queue is vacuumed
//! and `outbox.reclaim()` runs, so both backlogs keep their size. The
//! backlog has 1,000 keys (`customer-N`), so the per-key order is part of
//! every claim; `OUTBOX_BACKLOG_KEYS=0` makes it keyless.
//!
//! Afterwards (printed, not a criterion group): the 1M backlog drained in
//! rounds of 10,000 while another session holds a snapshot open. On the old
//! queue that kept VACUUM from removing the deleted rows the claim stepped
//! over; the log deletes nothing, so this shows whether anything else grows.
//!
//! `OUTBOX_BACKLOGS` (comma-separated, default `10000,1000000`) picks the
//! sizes; `10000,1000000,10000000` adds 10M, which takes several minutes
//! and several GB (log and queue) to fill.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench backlog`

#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "support/raw.rs"]
mod raw;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use crossbeam_channel::{bounded, Sender};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};

/// Events taken off the head per iteration (100 batches of 100).
const PER_ITERATION: usize = 10_000;
const BATCH: u32 = 100;
const TOPIC: &str = "bench.backlog";
const SUBSCRIPTION: &str = "backlog";

/// How many ordering keys the backlog has (`OUTBOX_BACKLOG_KEYS`, 1,000 by
/// default; 0: keyless events).
fn keys() -> i64 {
    std::env::var("OUTBOX_BACKLOG_KEYS")
        .map_or(1_000, |k| k.parse().expect("OUTBOX_BACKLOG_KEYS: a number"))
}

/// Appends `n` due events to the log and to the queue.
fn append(conn: &mut PgConnection, n: usize) {
    raw::fill(conn, "outbox.events", TOPIC, n, keys());
    raw::fill(conn, "bench.queue", TOPIC, n, keys());
}

/// Refreshes the planner's view, removes the queue's dead rows, and gives
/// back the log's segments every cursor has passed (none, mostly: a bench
/// burns too few transaction ids to rotate one).
fn vacuum(conn: &mut PgConnection) {
    conn.batch_execute(
        "VACUUM ANALYZE bench.queue, outbox.events, outbox.cursors, outbox.deliveries",
    )
    .unwrap();
    conn.batch_execute("SELECT outbox.reclaim()").unwrap();
}

/// Signals once `target` events were delivered.
struct Watch {
    delivered: AtomicUsize,
    target: usize,
    done: Sender<()>,
}

impl outbox::Observer for Watch {
    fn on_delivered(&self, _: &outbox::StoredEvent) {
        if self.delivered.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            let _ = self.done.try_send(());
        }
    }
}

type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Starts a one-worker relay and times it until it has delivered
/// `PER_ITERATION` events; stops it (what it holds goes back).
fn relay_takes_an_iteration(pool: &PgPool) -> Duration {
    let (done, finished) = bounded(1);
    let start = Instant::now();
    let relay = outbox::Relay::builder(pool.clone())
        .workers(1)
        .batch_size(BATCH)
        .vacuum(false)
        .observer(Watch {
            delivered: AtomicUsize::new(0),
            target: PER_ITERATION,
            done,
        })
        .subscribe(SUBSCRIPTION, &[TOPIC], |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    finished.recv_timeout(Duration::from_secs(600)).unwrap();
    let took = start.elapsed();
    relay.shutdown(Duration::from_secs(30)).unwrap();
    took
}

fn backlogs() -> Vec<usize> {
    std::env::var("OUTBOX_BACKLOGS")
        .unwrap_or_else(|_| "10000,1000000".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("OUTBOX_BACKLOGS: sizes separated by commas")
        })
        .collect()
}

fn claim_cost(c: &mut Criterion) {
    let db = pg::test_db();
    let pool = Pool::builder()
        .max_size(2)
        .build(ConnectionManager::new(db.url()))
        .unwrap();
    let mut conn = db.conn();
    raw::create_tables(&mut conn);
    raw::subscriptions_only(&mut conn, &[SUBSCRIPTION], &[TOPIC]);
    let mut group = c.benchmark_group("claim_cost");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.throughput(Throughput::Elements(PER_ITERATION as u64));
    let mut size = 0;
    for backlog in backlogs() {
        let started = Instant::now();
        append(&mut conn, backlog - size);
        vacuum(&mut conn);
        size = backlog;
        eprintln!("backlog of {backlog} filled in {:?}", started.elapsed());
        let mut iteration = |timed: &mut dyn FnMut(&mut PgConnection) -> Duration| {
            let took = timed(&mut conn);
            append(&mut conn, PER_ITERATION);
            vacuum(&mut conn);
            took
        };
        group.bench_function(BenchmarkId::new("relay", backlog), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| iteration(&mut |_| relay_takes_an_iteration(&pool)))
                    .sum()
            })
        });
        group.bench_function(BenchmarkId::new("raw_claim_delete", backlog), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        iteration(&mut |conn| {
                            let start = Instant::now();
                            let taken =
                                raw::raw_claim_delete(conn, i64::from(BATCH), PER_ITERATION);
                            assert_eq!(taken, PER_ITERATION);
                            start.elapsed()
                        })
                    })
                    .sum()
            })
        });
        if backlog == 1_000_000 {
            pinned_snapshot(&db, &pool, &mut conn);
        }
    }
    group.finish();
}

/// Ten rounds of 10,000 events off a 1M backlog while another session
/// keeps a snapshot open; prints the time per batch of each round. Then
/// the same once the snapshot is released and the table vacuumed.
fn pinned_snapshot(db: &pg::TestDb, pool: &PgPool, conn: &mut PgConnection) {
    let mut holder = db.conn();
    holder
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox.relay_wakeup;",
        )
        .unwrap();
    let per_batch = |took: Duration| took / (PER_ITERATION as u32 / BATCH);
    let mut rounds = Vec::new();
    for _ in 0..10 {
        rounds.push(per_batch(relay_takes_an_iteration(pool)));
        append(conn, PER_ITERATION);
        vacuum(conn); // removes nothing the snapshot can still see
    }
    holder.batch_execute("COMMIT").unwrap();
    vacuum(conn);
    let after = per_batch(relay_takes_an_iteration(pool));
    append(conn, PER_ITERATION);
    vacuum(conn);
    eprintln!(
        "claim_cost/pinned_snapshot/1000000: time per batch of {BATCH} in rounds of \
         {PER_ITERATION} while a snapshot is held: {rounds:?}; after it ends and a vacuum: {after:?}"
    );
}

criterion_group!(benches, claim_cost);
criterion_main!(benches);
