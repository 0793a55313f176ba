//! Pick-up latency at fixed publishing rates: one publisher commits one
//! event every 200, 20 and 5 ms (5, 50 and 200 events/s), and for each event
//! the time from its commit returning to the relay's sink being called is
//! set beside the time to a raw `LISTEN` client's receipt of a NOTIFY the
//! same transaction sent: what any PostgreSQL-woken consumer could do.
//!
//! The relay has a listener, 4 workers and a 1 s poll interval, as an
//! application would run it. Each criterion iteration is one event at the
//! rate (the time it reports is the publishing interval, by construction);
//! the latencies are printed after each group as p50 / p99 / max.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench pickup`

#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "../src/relay/pq.rs"]
#[allow(dead_code, unused_imports)]
mod pq;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use crossbeam_channel::{bounded, Receiver};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};

/// (events per second, events measured).
const RATES: [(u32, u64); 3] = [(5, 100), (50, 500), (200, 1000)];
const RAW_CHANNEL: &str = "bench_raw_listen";

fn pickup_at_rate(c: &mut Criterion) {
    let db = pg::test_db();
    let pool = Pool::builder()
        .max_size(8)
        .build(ConnectionManager::<PgConnection>::new(db.url()))
        .unwrap();
    let (called, calls) = bounded::<Instant>(16);
    let relay = outbox::Relay::builder(pool)
        .listen(db.url())
        .route("*", move |_: &outbox::StoredEvent| {
            let _ = called.try_send(Instant::now());
            Ok(())
        })
        .start()
        .unwrap();
    let heard = raw_listener(db.url());
    let mut conn = db.conn();

    for (rate, events) in RATES {
        let interval = Duration::from_secs(1) / rate;
        let mut group = c.benchmark_group("pickup_at_rate");
        group.sampling_mode(SamplingMode::Flat);
        group.sample_size(10);
        group.warm_up_time(interval * 10);
        group.measurement_time(interval * events as u32);
        let (mut relay_latency, mut raw_latency) = (Vec::new(), Vec::new());
        let mut next = Instant::now();
        group.bench_function(format!("{rate}_per_s"), |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next = Instant::now().max(next) + interval;
                    conn.transaction(|conn| {
                        outbox::publish_event(
                            conn,
                            outbox::NewEvent::dynamic("bench.pickup", serde_json::json!({})),
                        )?;
                        diesel::sql_query(format!("NOTIFY {RAW_CHANNEL}")).execute(conn)
                    })
                    .unwrap();
                    let committed = Instant::now();
                    let sink = calls.recv_timeout(Duration::from_secs(10)).unwrap();
                    let raw = heard.recv_timeout(Duration::from_secs(10)).unwrap();
                    relay_latency.push(sink.saturating_duration_since(committed));
                    raw_latency.push(raw.saturating_duration_since(committed));
                }
                // The publishing interval: criterion plans its iterations
                // from this, and the latencies are reported below.
                started.elapsed()
            })
        });
        group.finish();
        if relay_latency.is_empty() {
            continue; // filtered out on the command line
        }
        eprintln!(
            "pickup_at_rate/{rate}_per_s: relay {} ; raw LISTEN {}",
            summary(&mut relay_latency),
            summary(&mut raw_latency)
        );
    }
    relay.shutdown(Duration::from_secs(10)).unwrap();
}

/// A thread that LISTENs on its own libpq connection and reports when each
/// notification arrived.
fn raw_listener(url: &str) -> Receiver<Instant> {
    let mut listener = pq::PqListener::connect(url).unwrap();
    listener.execute(&format!("LISTEN {RAW_CHANNEL}")).unwrap();
    let (heard_tx, heard) = bounded(16);
    std::thread::spawn(move || loop {
        match listener.wait(Duration::from_millis(250)) {
            Ok(0) => {}
            Ok(n) => {
                let at = Instant::now();
                for _ in 0..n {
                    if heard_tx.send(at).is_err() {
                        return;
                    }
                }
            }
            Err(_) => return,
        }
    });
    heard
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    format!(
        "{} samples, p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1]
    )
}

criterion_group!(benches, pickup_at_rate);
criterion_main!(benches);
