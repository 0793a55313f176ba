//! Relay throughput and latency.
//!
//! - `drain`: time to deliver a backlog of 100k events to no-op sinks, at
//!   batch 500 (`OUTBOX_DRAIN_BATCHES`, comma-separated) and 1 / 2 / 4
//!   workers, beside two hand-written drains of a plain queue table of the
//!   same size (`bench.queue`, one client) in the same group:
//!   - `raw_delete`: the at-most-once loop (`DELETE … RETURNING` of 500
//!     rows `FOR UPDATE SKIP LOCKED`), issue 13's baseline;
//!   - `raw_claim_delete`: claim under a lease, then delete (what an
//!     at-least-once queue drain costs by hand).
//!
//!   `relay/batchB/W`: one named subscription, W workers.
//!   `three_subscriptions/batchB/W`: three named subscriptions of the same
//!   topic in one relay (W workers each), timed to the 300,000th delivery;
//!   its throughput is deliveries/s. The default subscription is removed
//!   in both databases, so nothing else keeps the log.
//!   `OUTBOX_DRAIN_KEYS=1000` spreads the events over that many ordering
//!   keys (0, the default: keyless); the queue table gets the same keys.
//! - `commit_to_sink`: from the publisher's commit returning to the sink
//!   being called, woken by NOTIFY versus found by a 50 ms poll.
//! - an idle relay's CPU use and statements per poll interval, counted by
//!   the server, printed before the groups (`OUTBOX_IDLE_SECS`, 30).
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench relay`

#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "support/raw.rs"]
mod raw;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use crossbeam_channel::{bounded, Sender};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};

const BACKLOG: usize = 100_000;
const TOPIC: &str = "bench.drain";
const THREE: [&str; 3] = ["drain-a", "drain-b", "drain-c"];

type PgPool = Pool<ConnectionManager<PgConnection>>;

fn pool(db: &pg::TestDb) -> PgPool {
    Pool::builder()
        .max_size(16)
        .build(ConnectionManager::new(db.url()))
        .unwrap()
}

/// `OUTBOX_DRAIN_KEYS=1000`: the events spread round-robin over that many
/// ordering keys (0, the default: keyless).
fn keys() -> i64 {
    std::env::var("OUTBOX_DRAIN_KEYS")
        .ok()
        .map(|k| k.parse().expect("OUTBOX_DRAIN_KEYS must be a number"))
        .unwrap_or(0)
}

fn batches() -> Vec<u32> {
    std::env::var("OUTBOX_DRAIN_BATCHES")
        .unwrap_or_else(|_| "500".into())
        .split(',')
        .map(|n| n.trim().parse().expect("OUTBOX_DRAIN_BATCHES: numbers"))
        .collect()
}

/// Publishes the backlog into the log (one transaction) and refreshes the
/// planner's view; untimed.
fn fill_log(conn: &mut PgConnection) {
    raw::fill(conn, "outbox.events", TOPIC, BACKLOG, keys());
    conn.batch_execute("VACUUM ANALYZE outbox.events, outbox.cursors, outbox.deliveries")
        .unwrap();
}

/// After a drain, untimed: checks that nothing is owed, and empties the
/// log (what `outbox.reclaim` does once a segment's transactions are all
/// older than every cursor; a bench burns too few transaction ids to
/// rotate a segment), so every iteration starts from the same log size.
fn empty_log(conn: &mut PgConnection) {
    assert_eq!(
        raw::pending(conn),
        0,
        "a drained subscription still owes events"
    );
    conn.batch_execute("TRUNCATE outbox.events").unwrap();
}

fn fill_queue(conn: &mut PgConnection) {
    raw::fill(conn, "bench.queue", TOPIC, BACKLOG, keys());
    conn.batch_execute("VACUUM ANALYZE bench.queue").unwrap();
}

/// Signals once `target` events were delivered.
struct DrainWatch {
    delivered: AtomicUsize,
    target: usize,
    done: Sender<()>,
}

impl outbox::Observer for DrainWatch {
    fn on_delivered(&self, _: &outbox::StoredEvent) {
        if self.delivered.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            let _ = self.done.try_send(());
        }
    }
}

/// Starts a relay serving `subscriptions` (no-op sinks), times it from
/// `start()` to the last of `BACKLOG` deliveries per subscription, stops it.
fn relay_drains(pool: &PgPool, subscriptions: &[&str], workers: usize, batch: u32) -> Duration {
    let (done, drained) = bounded(1);
    let watch = Arc::new(DrainWatch {
        delivered: AtomicUsize::new(0),
        target: BACKLOG * subscriptions.len(),
        done,
    });
    let start = Instant::now();
    let mut builder = outbox::Relay::builder(pool.clone())
        .workers(workers)
        .batch_size(batch)
        .observer(watch.clone());
    for name in subscriptions {
        builder = builder.subscribe(name, &[TOPIC], |_: &outbox::StoredEvent| Ok(()));
    }
    let relay = builder.start().unwrap();
    drained.recv_timeout(Duration::from_secs(600)).unwrap();
    let took = start.elapsed();
    relay.shutdown(Duration::from_secs(30)).unwrap();
    took
}

fn drain(c: &mut Criterion) {
    // One database per subscription layout: a subscription keeps every
    // event of its topic, so the one-subscription runs must not publish
    // into a database where three more wait.
    let one = pg::test_db();
    let three = pg::test_db();
    let (one_pool, three_pool) = (pool(&one), pool(&three));
    let mut conn = one.conn();
    let mut three_conn = three.conn();
    raw::create_tables(&mut conn);
    raw::subscriptions_only(&mut conn, &["drain"], &[TOPIC]);
    raw::subscriptions_only(&mut three_conn, &THREE, &[TOPIC]);
    let mut group = c.benchmark_group("drain");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    for batch in batches() {
        group.throughput(Throughput::Elements(BACKLOG as u64));
        for (name, raw) in [
            (
                "raw_delete",
                raw::raw_delete as fn(&mut PgConnection, i64) -> usize,
            ),
            ("raw_claim_delete", |conn, batch| {
                raw::raw_claim_delete(conn, batch, usize::MAX)
            }),
        ] {
            group.bench_function(BenchmarkId::new(format!("{name}/batch{batch}"), 1), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        fill_queue(&mut conn);
                        let start = Instant::now();
                        assert_eq!(raw(&mut conn, i64::from(batch)), BACKLOG);
                        total += start.elapsed();
                    }
                    total
                })
            });
        }
        for workers in [1usize, 2, 4] {
            group.bench_function(
                BenchmarkId::new(format!("relay/batch{batch}"), workers),
                |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            fill_log(&mut conn);
                            total += relay_drains(&one_pool, &["drain"], workers, batch);
                            empty_log(&mut conn);
                        }
                        total
                    })
                },
            );
        }
        group.throughput(Throughput::Elements((BACKLOG * THREE.len()) as u64));
        for workers in [1usize, 2] {
            group.bench_function(
                BenchmarkId::new(format!("three_subscriptions/batch{batch}"), workers),
                |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            fill_log(&mut three_conn);
                            total += relay_drains(&three_pool, &THREE, workers, batch);
                            empty_log(&mut three_conn);
                        }
                        total
                    })
                },
            );
        }
    }
    group.finish();
}

/// Whether a relay of this database sleeps, asking for a NOTIFY.
fn relay_asleep(conn: &mut PgConnection) -> bool {
    #[derive(QueryableByName)]
    struct Armed {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        armed: bool,
    }
    diesel::sql_query(
        "SELECT EXISTS (SELECT FROM outbox.relay_wakeup WHERE armed_until > now()) AS armed",
    )
    .get_result::<Armed>(conn)
    .unwrap()
    .armed
}

/// From the publisher's commit returning to the sink being called:
///
/// - `asleep`: the relay has been idle long enough to sleep and ask for a
///   NOTIFY (the wait for that is not timed): the idle pick-up.
/// - `awake`: events back to back; the relay is still polling after the
///   previous one, so it finds the next without a notification.
/// - `poll_50ms`: no listener, a 50 ms poll.
///
/// p50/p99 are printed after each. `asleep` waits ~130 ms before every
/// sample, so its group takes one iteration per sample.
fn commit_to_sink(c: &mut Criterion) {
    let db = pg::test_db();
    let pool = pool(&db);
    let mut conn = db.conn();
    let mut probe = db.conn();
    for (name, listen, poll) in [
        ("asleep", true, Duration::from_secs(1)),
        ("awake", true, Duration::from_secs(1)),
        ("poll_50ms", false, Duration::from_millis(50)),
    ] {
        let mut group = c.benchmark_group("commit_to_sink");
        if name == "asleep" {
            group.sampling_mode(SamplingMode::Flat);
            group.sample_size(200);
            group.warm_up_time(Duration::from_millis(1));
            group.measurement_time(Duration::from_millis(1));
        } else {
            group.sample_size(20);
        }
        let (called, calls) = bounded::<Instant>(1);
        let mut builder = outbox::Relay::builder(pool.clone())
            .poll_interval(poll)
            .route("*", move |_: &outbox::StoredEvent| {
                let _ = called.try_send(Instant::now());
                Ok(())
            });
        if listen {
            builder = builder.listen(db.url());
        }
        let relay = builder.start().unwrap();
        let mut samples: Vec<Duration> = Vec::new();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if name == "asleep" {
                        while !relay_asleep(&mut probe) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    outbox::transaction(&mut conn, |tx| {
                        tx.publish_event(outbox::NewEvent::dynamic(
                            "bench.latency",
                            serde_json::json!({}),
                        ))
                    })
                    .unwrap();
                    let committed = Instant::now();
                    let delivered = calls.recv_timeout(Duration::from_secs(10)).unwrap();
                    let latency = delivered.saturating_duration_since(committed);
                    samples.push(latency);
                    total += latency;
                }
                total
            })
        });
        group.finish();
        relay.shutdown(Duration::from_secs(10)).unwrap();
        if samples.is_empty() {
            continue; // filtered out on the command line
        }
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
        eprintln!(
            "commit_to_sink/{name}: {} samples, p50 {:?}, p99 {:?}, max {:?}",
            samples.len(),
            pct(0.50),
            pct(0.99),
            samples.last().unwrap()
        );
    }
}

/// An idle relay (4 workers, listener, the default 1 s poll): the CPU time
/// of this process and the statements its database ran, over
/// `OUTBOX_IDLE_SECS` (30 by default). Statements are counted from the
/// server (`pg_stat_database.xact_commit + xact_rollback` of the relay's
/// database: every statement outside a transaction is one), read from
/// another database so the reads do not count; a backend reports its
/// counts within 10 s of going idle, so each reading waits 11 s first.
/// Issue 14's goal: at most 0.2 % of a core, at most one statement per
/// poll interval.
fn idle_cpu(_: &mut Criterion) {
    let seconds: u64 = std::env::var("OUTBOX_IDLE_SECS")
        .map_or(30, |s| s.parse().expect("OUTBOX_IDLE_SECS: whole seconds"));
    let db = pg::test_db();
    let mut observer = pg::admin();
    let relay = outbox::Relay::builder(pool(&db))
        .listen(db.url())
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    // Start-up done, and its statements reported.
    std::thread::sleep(Duration::from_secs(11));
    let statements_before = statements(&mut observer, db.name());
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(seconds));
    let used = cpu_time() - before;
    std::thread::sleep(Duration::from_secs(11));
    let statements = statements(&mut observer, db.name()) - statements_before;
    relay.shutdown(Duration::from_secs(10)).unwrap();
    eprintln!(
        "idle relay (4 workers, 1 s poll) over {seconds} s: {used:?} of CPU ({:.3}% of one core), \
         {statements} statements ({:.2} per poll interval; an upper bound: other sessions \
         of that database, such as autovacuum's, count too)",
        used.as_secs_f64() * 100.0 / seconds as f64,
        statements as f64 / seconds as f64
    );
}

/// Statements run in database `name` so far, as the server counts them.
fn statements(observer: &mut PgConnection, name: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT (xact_commit + xact_rollback)::bigint AS n FROM pg_stat_database WHERE datname = $1",
    )
    .bind::<diesel::sql_types::Text, _>(name)
    .get_result::<Count>(observer)
    .unwrap()
    .n
}

fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the buffer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

criterion_group!(benches, idle_cpu, commit_to_sink, drain);
criterion_main!(benches);
