//! Relay throughput and latency.
//!
//! - `drain`: time to deliver a backlog of 100k events to a no-op sink, at
//!   batch sizes 100 / 500 / 1000 and 1 / 2 / 4 workers, beside a raw SQL
//!   claim-and-delete loop (one drainer) in the same group.
//! - `commit_to_sink`: from the publisher's commit returning to the sink
//!   being called, woken by NOTIFY versus found by a 50 ms poll.
//! - an idle relay's CPU use over 10 s, printed before the groups.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench relay`

#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "support/raw.rs"]
mod raw;

use raw::{raw_claim_delete, Row};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use crossbeam_channel::{bounded, Sender};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};

const BACKLOG: usize = 100_000;

type PgPool = Pool<ConnectionManager<PgConnection>>;

fn pool(db: &pg::TestDb) -> PgPool {
    Pool::builder()
        .max_size(6)
        .build(ConnectionManager::new(db.url()))
        .unwrap()
}

fn fill_backlog(conn: &mut PgConnection, n: usize) {
    // `OUTBOX_DRAIN_KEYS=1000`: the events spread round-robin over that
    // many ordering keys (0, the default: keyless).
    let keys: i32 = std::env::var("OUTBOX_DRAIN_KEYS")
        .ok()
        .map(|k| k.parse().expect("OUTBOX_DRAIN_KEYS must be a number"))
        .unwrap_or(0);
    diesel::sql_query(
        "INSERT INTO outbox.events (topic, key, payload)
         SELECT 'bench.drain', CASE WHEN $2 > 0 THEN 'k' || (g % $2) END,
                jsonb_build_object('n', g, 'email', 'customer' || g || '@example.com')
           FROM generate_series(1, $1) g",
    )
    .bind::<diesel::sql_types::Integer, _>(n as i32)
    .bind::<diesel::sql_types::Integer, _>(keys)
    .execute(conn)
    .unwrap();
    diesel::sql_query("VACUUM ANALYZE outbox.events")
        .execute(conn)
        .unwrap();
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

/// The raw limit: delete while reading, one statement per batch. Not a
/// valid relay (a crash after the delete loses the batch), shown for scale.
fn raw_delete(conn: &mut PgConnection, batch: i64) -> usize {
    let mut total = 0;
    loop {
        let rows: Vec<Row> = diesel::sql_query(
            "WITH batch AS (
                 SELECT id FROM outbox.events
                  WHERE available_at <= now()
                  ORDER BY available_at, id
                  LIMIT $1
                    FOR UPDATE SKIP LOCKED)
             DELETE FROM outbox.events e USING batch
              WHERE e.id = batch.id
             RETURNING e.id, e.payload",
        )
        .bind::<diesel::sql_types::BigInt, _>(batch)
        .load(conn)
        .unwrap();
        if rows.is_empty() {
            return total;
        }
        total += rows.len();
    }
}

fn drain(c: &mut Criterion) {
    let db = pg::test_db();
    let pool = pool(&db);
    let mut conn = db.conn();
    let mut group = c.benchmark_group("drain");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.throughput(Throughput::Elements(BACKLOG as u64));
    for batch in [100u32, 500, 1000] {
        for (name, raw) in [
            (
                "raw_delete",
                raw_delete as fn(&mut PgConnection, i64) -> usize,
            ),
            ("raw_claim_delete", |conn, batch| {
                raw_claim_delete(conn, batch, usize::MAX)
            }),
        ] {
            group.bench_function(BenchmarkId::new(format!("{name}/batch{batch}"), 1), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        fill_backlog(&mut conn, BACKLOG);
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
                            fill_backlog(&mut conn, BACKLOG);
                            let (done, drained) = bounded(1);
                            let watch = Arc::new(DrainWatch {
                                delivered: AtomicUsize::new(0),
                                target: BACKLOG,
                                done,
                            });
                            let start = Instant::now();
                            let relay = outbox::Relay::builder(pool.clone())
                                .workers(workers)
                                .batch_size(batch)
                                .route("*", |_: &outbox::StoredEvent| Ok(()))
                                .observer(watch.clone())
                                .start()
                                .unwrap();
                            drained.recv_timeout(Duration::from_secs(600)).unwrap();
                            total += start.elapsed();
                            relay.shutdown(Duration::from_secs(30)).unwrap();
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

/// CPU time of this process while a relay (4 workers, listener, 1 s poll)
/// sits idle for 10 s.
fn idle_cpu(_: &mut Criterion) {
    let db = pg::test_db();
    let relay = outbox::Relay::builder(pool(&db))
        .listen(db.url())
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1)); // settle start-up
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_time() - before;
    relay.shutdown(Duration::from_secs(10)).unwrap();
    eprintln!(
        "idle relay: {:?} of CPU in 10 s ({:.3}% of one core)",
        used,
        used.as_secs_f64() * 10.0
    );
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
