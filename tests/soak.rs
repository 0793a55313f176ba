//! Soak: 16 publishers at a fixed total rate and one relay process (the
//! real `outbox relay` binary, stdout sink) for a while, sampling the queue
//! every second.
//!
//! Asserts that the backlog stays bounded (no growth trend), that
//! `outbox.events` (table, indexes and TOAST) stays within a size scaled to
//! the rate (a few seconds' worth of rows), and that every published event
//! was delivered, exactly once since nothing fails.
//!
//! The publishers run at a rate the relay sustains even as a debug build on
//! two busy cores: this checks that a relay which keeps up also keeps the
//! table small. How fast a relay drains at full speed is a benchmark's
//! question (`benches/relay.rs`, docs/benchmarks.md), not this test's.
//!
//! `OUTBOX_SOAK_SECS` sets the publishing time (20 s by default, 300 for
//! the five-minute run recorded in docs/benchmarks.md) and
//! `OUTBOX_SOAK_RATE` the total events per second (1,000 by default):
//!
//! ```text
//! OUTBOX_SOAK_SECS=300 OUTBOX_SOAK_RATE=4000 DATABASE_URL=postgres://postgres@127.0.0.1/test \
//!     cargo test --release --all-features --test soak -- --nocapture
//! ```

#[path = "support/pg.rs"]
mod pg;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;

const PUBLISHERS: usize = 16;
/// The table's size bound: a fixed allowance for an empty table, its
/// indexes and the free space vacuum leaves behind, plus room for this many
/// seconds of publishing at this many bytes per event (row, index entries,
/// dead tuples awaiting vacuum).
const FIXED_BYTES: f64 = 1024.0 * 1024.0;
const SECONDS_OF_ROWS: f64 = 2.0;
const BYTES_PER_EVENT: f64 = 512.0;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

/// Kills the relay if the test fails before stopping it.
struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(QueryableByName)]
struct Sample {
    #[diesel(sql_type = BigInt)]
    backlog: i64,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
    #[diesel(sql_type = BigInt)]
    heap_bytes: i64,
}

fn sample(conn: &mut PgConnection) -> Sample {
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM outbox.events) AS backlog,
                pg_total_relation_size('outbox.events') AS bytes,
                pg_relation_size('outbox.events') AS heap_bytes",
    )
    .get_result(conn)
    .unwrap()
}

#[test]
fn sixteen_publishers_and_one_relay_keep_the_queue_small_and_lose_nothing() {
    let seconds = env_number("OUTBOX_SOAK_SECS", 20);
    let target_rate = env_number("OUTBOX_SOAK_RATE", 1_000) as f64;
    // Each publisher commits one event per tick, on a fixed schedule (a late
    // tick is made up at once, so the total rate holds on average).
    let tick = Duration::from_secs_f64(PUBLISHERS as f64 / target_rate);
    let db = pg::test_db();
    let mut conn = db.conn();
    diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        .execute(&mut conn)
        .unwrap();

    let mut relay = RelayProcess(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--sink", "stdout"])
            .env("DATABASE_URL", db.url())
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_SOAK_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Every delivered id, as the relay prints it (one JSON object a line).
    let stdout = relay.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            ids.push(event["id"].as_i64().unwrap());
        }
        ids
    });

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (url, stop, published) = (db.url().to_owned(), stop.clone(), published.clone());
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                let mut ids = Vec::new();
                // Publishers start spread over one tick, not all at once.
                let mut next = Instant::now() + tick.mul_f64(p as f64 / PUBLISHERS as f64);
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next += tick;
                    let order = (p as i64) << 40 | n;
                    let id = outbox::transaction(&mut conn, |tx| {
                        diesel::sql_query("INSERT INTO orders (id, status) VALUES ($1, 'approved')")
                            .bind::<BigInt, _>(order)
                            .execute(tx.conn())?;
                        tx.publish_event(
                            outbox::NewEvent::dynamic(
                                "order.approved",
                                serde_json::json!({ "order_id": order, "email": format!("customer{order}@example.com") }),
                            )
                            .key(format!("order-{order}")),
                        )
                    })
                    .unwrap();
                    ids.push(id.get());
                    published.fetch_add(1, Ordering::Relaxed);
                }
                ids
            })
        })
        .collect();

    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(sample(&mut conn));
    }
    stop.store(true, Ordering::Relaxed);
    let mut all_published = HashSet::new();
    for publisher in publishers {
        all_published.extend(publisher.join().unwrap());
    }
    let publishing = started.elapsed();

    // The relay drains what is left, then is stopped (SIGTERM: graceful).
    let deadline = Instant::now() + Duration::from_secs(60);
    while sample(&mut conn).backlog > 0 {
        assert!(
            Instant::now() < deadline,
            "the relay did not drain the rest"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe_free_sigterm(relay.0.id());
    let status = relay.0.wait().unwrap();
    assert!(status.success(), "relay exited with {status}");
    let delivered = reader.join().unwrap();

    let rate = all_published.len() as f64 / publishing.as_secs_f64();
    let max_table_bytes = (FIXED_BYTES + SECONDS_OF_ROWS * target_rate * BYTES_PER_EVENT) as i64;
    let backlogs: Vec<i64> = samples.iter().map(|s| s.backlog).collect();
    let largest = samples.iter().map(|s| s.bytes).max().unwrap();
    let half = backlogs.len() / 2;
    let first_half = *backlogs[..half].iter().max().unwrap();
    let second_half = *backlogs[half..].iter().max().unwrap();
    println!(
        "soak: {} s, {} events published ({rate:.0}/s) by {PUBLISHERS} publishers, {} delivered; \
         backlog max {first_half} (first half) / {second_half} (second half); \
         outbox.events at most {:.1} MB; backlog per second: {backlogs:?}; \
         MB per second (heap/total): {:?}",
        publishing.as_secs(),
        all_published.len(),
        delivered.len(),
        largest as f64 / 1e6,
        samples
            .iter()
            .map(|s| format!(
                "{:.1}/{:.1}",
                s.heap_bytes as f64 / 1e6,
                s.bytes as f64 / 1e6
            ))
            .collect::<Vec<_>>(),
    );

    // Nothing lost, nothing twice: no delivery failed and nothing crashed.
    assert_eq!(delivered.len(), all_published.len());
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), all_published);
    // The load was the one asked for (else the bounds below prove little).
    assert!(
        rate >= 0.9 * target_rate,
        "publishers reached {rate:.0} of {target_rate} events/s"
    );
    assert!(
        largest <= max_table_bytes,
        "outbox.events grew to {largest} bytes, above {max_table_bytes} for {target_rate} events/s"
    );
    // Bounded: the second half never needs much more room than the first
    // (a relay falling behind grows the backlog without bound), and the
    // backlog never exceeds two seconds of publishing.
    assert!(
        second_half <= first_half * 3 / 2 + 500,
        "backlog grew: {backlogs:?}"
    );
    assert!(
        (*backlogs.iter().max().unwrap() as f64) < 2.0 * rate,
        "backlog above two seconds of publishing: {backlogs:?}"
    );
}

/// Asks the relay to stop gracefully.
fn unsafe_free_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
