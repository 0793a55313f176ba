//! Soak: 16 publishers and one relay process (the real `outbox relay`
//! binary, stdout sink) for a while, sampling the queue every second.
//!
//! Asserts that the backlog stays bounded (no growth trend), that
//! `outbox.events` (table, indexes and TOAST) stays under 10 MB, and that
//! every published event was delivered, exactly once since nothing fails.
//!
//! `OUTBOX_SOAK_SECS` sets the publishing time: 20 s by default (CI), 300
//! for the five-minute run recorded in docs/benchmarks.md:
//!
//! ```text
//! OUTBOX_SOAK_SECS=300 DATABASE_URL=postgres://postgres@127.0.0.1/test \
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
const MAX_TABLE_BYTES: i64 = 10 * 1024 * 1024;

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
    let seconds: u64 = std::env::var("OUTBOX_SOAK_SECS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("OUTBOX_SOAK_SECS must be a number of seconds")
        })
        .unwrap_or(20);
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
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
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
    assert!(
        largest < MAX_TABLE_BYTES,
        "outbox.events grew to {largest} bytes"
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
