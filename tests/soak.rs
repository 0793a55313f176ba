//! Soak: 16 publishers at a fixed total rate and three subscriptions, each
//! served by one relay process (the real `outbox relay` binary, stdout
//! sink), for a while, sampling every second.
//!
//! Asserts that what is owed stays bounded (no growth trend), that the
//! outbox's tables (the log's segments, `outbox.deliveries`,
//! `outbox.cursors`: tables, indexes and TOAST) stay within a fixed size
//! (the log keeps a few segments of 2^14 transactions until every
//! subscription has passed them, then truncates them whole), and that
//! every published event was delivered to every subscription, exactly once
//! since nothing fails.
//!
//! The publishers run at a rate the relay sustains even as a debug build on
//! two busy cores: this checks that a relay which keeps up also keeps the
//! table small. How fast a relay drains at full speed is a benchmark's
//! question (`benches/relay.rs`, docs/benchmarks.md), not this test's.
//!
//! `OUTBOX_SOAK_SECS` sets the publishing time (20 s by default, 300 for
//! the five-minute run recorded in docs/benchmarks.md) and
//! `OUTBOX_SOAK_RATE` the total events per second (500 by default; each is
//! delivered three times):
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
const SUBSCRIPTIONS: [&str; 3] = ["alpha", "beta", "gamma"];
/// The tables' size bound: a fixed allowance for the empty tables, their
/// indexes and the free space vacuum leaves behind, plus room for the rows
/// the log may hold at this many bytes per event (row, index entry).
const FIXED_BYTES: f64 = 2.0 * 1024.0 * 1024.0;
const BYTES_PER_EVENT: f64 = 512.0;
/// Transactions per segment of the log (migration 000005).
const SEGMENT_XIDS: f64 = 16_384.0;
/// The log holds the segment being written, the one before (until every
/// cursor and running transaction has left it) and what the housekeeper's
/// reclaim interval (5 s) and the relays' lag add: at one event per
/// transaction, at most three segments and ten seconds of events.
const SEGMENTS_HELD: f64 = 3.0;
const SECONDS_HELD: f64 = 10.0;

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
    /// (subscription, event) pairs still owed.
    #[diesel(sql_type = BigInt)]
    backlog: i64,
    /// Rows of the log.
    #[diesel(sql_type = BigInt)]
    log_rows: i64,
    /// Every outbox table with its indexes and TOAST.
    #[diesel(sql_type = BigInt)]
    bytes: i64,
    /// The log's heap alone.
    #[diesel(sql_type = BigInt)]
    heap_bytes: i64,
}

fn sample(conn: &mut PgConnection) -> Sample {
    diesel::sql_query(
        "WITH tables AS (
             SELECT inhrelid AS t FROM pg_inherits WHERE inhparent = 'outbox.events'::regclass
             UNION ALL SELECT 'outbox.deliveries'::regclass
             UNION ALL SELECT 'outbox.cursors'::regclass
         )
         SELECT (SELECT count(*) FROM outbox.pending) AS backlog,
                (SELECT count(*) FROM outbox.events) AS log_rows,
                (SELECT sum(pg_total_relation_size(t))::bigint FROM tables) AS bytes,
                (SELECT sum(pg_relation_size(inhrelid))::bigint FROM pg_inherits
                  WHERE inhparent = 'outbox.events'::regclass) AS heap_bytes",
    )
    .get_result(conn)
    .unwrap()
}

#[test]
fn sixteen_publishers_and_three_subscriptions_keep_the_tables_small_and_lose_nothing() {
    let seconds = env_number("OUTBOX_SOAK_SECS", 20);
    let target_rate = env_number("OUTBOX_SOAK_RATE", 500) as f64;
    // Each publisher commits one event per tick, on a fixed schedule (a late
    // tick is made up at once, so the total rate holds on average).
    let tick = Duration::from_secs_f64(PUBLISHERS as f64 / target_rate);
    let db = pg::test_db();
    let mut conn = db.conn();
    diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        .execute(&mut conn)
        .unwrap();

    for name in SUBSCRIPTIONS {
        outbox::register_subscription(&mut conn, name, &["*"]).unwrap();
    }
    outbox::remove_subscription(&mut conn, outbox::DEFAULT_SUBSCRIPTION).unwrap();
    let mut relays: Vec<RelayProcess> = SUBSCRIPTIONS
        .iter()
        .map(|name| {
            RelayProcess(
                Command::new(env!("CARGO_BIN_EXE_outbox"))
                    .args(["relay", "--sink", "stdout", "--subscription", name])
                    .env("DATABASE_URL", db.url())
                    .env(
                        "RUST_LOG",
                        std::env::var("OUTBOX_SOAK_LOG").unwrap_or("warn".into()),
                    )
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // Every delivered id, as each relay prints it (one JSON object a line).
    let readers: Vec<_> = relays
        .iter_mut()
        .map(|relay| {
            let stdout = relay.0.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for line in BufReader::new(stdout).lines() {
                    let line = line.unwrap();
                    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                    ids.push(event["id"].as_i64().unwrap());
                }
                ids
            })
        })
        .collect();

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

    // The relays drain what is left, then are stopped (SIGTERM: graceful).
    let deadline = Instant::now() + Duration::from_secs(60);
    while sample(&mut conn).backlog > 0 {
        assert!(
            Instant::now() < deadline,
            "the relays did not drain the rest"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut delivered = Vec::new();
    for (relay, reader) in relays.iter_mut().zip(readers) {
        unsafe_free_sigterm(relay.0.id());
        let status = relay.0.wait().unwrap();
        assert!(status.success(), "relay exited with {status}");
        delivered.push(reader.join().unwrap());
    }

    let rate = all_published.len() as f64 / publishing.as_secs_f64();
    let max_log_rows = SEGMENTS_HELD * SEGMENT_XIDS + SECONDS_HELD * target_rate;
    let max_table_bytes = (FIXED_BYTES + max_log_rows * BYTES_PER_EVENT) as i64;
    let backlogs: Vec<i64> = samples.iter().map(|s| s.backlog).collect();
    let largest = samples.iter().map(|s| s.bytes).max().unwrap();
    let half = backlogs.len() / 2;
    let first_half = *backlogs[..half].iter().max().unwrap();
    let second_half = *backlogs[half..].iter().max().unwrap();
    println!(
        "soak: {} s, {} events published ({rate:.0}/s) by {PUBLISHERS} publishers, delivered \
         {:?} to {SUBSCRIPTIONS:?}; owed max {first_half} (first half) / {second_half} (second \
         half); tables at most {:.1} MB; owed per second: {backlogs:?}; log rows per second: \
         {:?}; MB per second (log heap/all tables): {:?}",
        publishing.as_secs(),
        all_published.len(),
        delivered.iter().map(Vec::len).collect::<Vec<_>>(),
        largest as f64 / 1e6,
        samples.iter().map(|s| s.log_rows).collect::<Vec<_>>(),
        samples
            .iter()
            .map(|s| format!(
                "{:.1}/{:.1}",
                s.heap_bytes as f64 / 1e6,
                s.bytes as f64 / 1e6
            ))
            .collect::<Vec<_>>(),
    );

    // Nothing lost, nothing twice, for every subscription: no delivery
    // failed and nothing crashed.
    for (name, delivered) in SUBSCRIPTIONS.iter().zip(delivered) {
        assert_eq!(delivered.len(), all_published.len(), "{name}");
        assert_eq!(
            delivered.into_iter().collect::<HashSet<_>>(),
            all_published,
            "{name}"
        );
    }
    // The load was the one asked for (else the bounds below prove little).
    assert!(
        rate >= 0.9 * target_rate,
        "publishers reached {rate:.0} of {target_rate} events/s"
    );
    assert!(
        largest <= max_table_bytes,
        "the outbox tables grew to {largest} bytes, above {max_table_bytes} for {target_rate} events/s"
    );
    // Bounded: the second half never owes much more than the first (a
    // relay falling behind grows the backlog without bound), and what is
    // owed never exceeds two seconds of publishing per subscription.
    assert!(
        second_half <= first_half * 3 / 2 + 500,
        "backlog grew: {backlogs:?}"
    );
    assert!(
        (*backlogs.iter().max().unwrap() as f64) < 2.0 * rate * SUBSCRIPTIONS.len() as f64,
        "owed above two seconds of publishing: {backlogs:?}"
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
