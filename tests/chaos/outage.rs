//! One subscriber's outage: three subscriptions of the same events, and the
//! receiver of one of them is unreachable (connections refused) for a
//! while. The other two keep their commit-to-sink latency (p50 within 2× of
//! the same run before the outage); the failed one retries each event on
//! the backoff schedule, no faster (no hot loop) and not much slower, and
//! delivers everything exactly once after the receiver is back.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer};

use crate::receiver::{Attempt, Receiver};
use crate::relays::{Relays, Settings};
use crate::tcp_proxy::{free_port, TcpProxy};
use crate::{count, knob, log_dir, pg};

/// Events published in each phase, one per transaction, at [`EVERY`].
const EVENTS: usize = 100;
const EVERY: Duration = Duration::from_millis(20);
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// The relay's jitter and growth (the CLI's, which are the library's).
const JITTER: f64 = outbox::Backoff::DEFAULT_JITTER;
const FACTOR: f64 = outbox::Backoff::DEFAULT_FACTOR;
/// The relays poll every 100 ms (see `Relays::spawn`).
const POLL: Duration = Duration::from_millis(100);
/// What a round may add to a retry's delay on a busy two-core machine:
/// notification or poll latency, the claim, the refused connection, the
/// settle. Only the lower bound depends on it.
const SLACK: Duration = Duration::from_secs(1);
/// The healthy subscriptions and the one whose receiver goes down.
const HEALTHY: [&str; 2] = ["alpha", "beta"];
const FAILING: &str = "gamma";

/// The delay after failed attempt `n` (1 for the first), before jitter.
fn ceiling(n: u32) -> Duration {
    BACKOFF_INITIAL
        .mul_f64(FACTOR.powi(n as i32 - 1))
        .min(BACKOFF_MAX)
}

/// The most attempts the schedule allows within `window` of the first:
/// attempt n+1 comes at the earliest the shortest jittered delay after
/// attempt n.
fn most_attempts(window: Duration) -> u32 {
    let mut at = Duration::ZERO;
    let mut attempts = 1;
    loop {
        at += ceiling(attempts).mul_f64(1.0 - JITTER);
        if at > window {
            return attempts;
        }
        attempts += 1;
    }
}

/// The fewest: the first attempt within `SLACK`, and each next one within
/// the longest delay plus a poll interval and `SLACK`.
fn fewest_attempts(window: Duration) -> u32 {
    let mut at = SLACK;
    let mut attempts = 0;
    while at <= window {
        attempts += 1;
        at += ceiling(attempts) + POLL + SLACK;
    }
    attempts
}

#[test]
fn one_subscribers_outage_neither_slows_the_others_nor_loses_anything() {
    let _alone = crate::one_at_a_time();
    let outage = Duration::from_secs(knob("OUTBOX_OUTAGE_SECS", 60));
    let db = pg::test_db();
    let mut conn = db.conn();
    for name in HEALTHY.iter().chain([&FAILING]) {
        outbox::register_subscription(&mut conn, name, &["outage"]).unwrap();
    }
    outbox::remove_subscription(&mut conn, outbox::DEFAULT_SUBSCRIPTION).unwrap();

    let receivers: HashMap<&str, Receiver> = HEALTHY
        .iter()
        .chain([&FAILING])
        .map(|name| (*name, Receiver::start(2, 0.0)))
        .collect();
    // The failing subscription's relay talks to a port that forwards to its
    // receiver through a gate: open, closed (refused connections), open.
    let failing_addr = receivers[FAILING].url()["http://".len()..]
        .trim_end_matches("/hook")
        .to_owned();
    let port = free_port();
    let mut gate = Some(TcpProxy::start(port, &failing_addr));
    let logs = log_dir("outage");
    let relays: Vec<Relays> = receivers
        .iter()
        .map(|(name, receiver)| {
            let webhook_url = if *name == FAILING {
                format!("http://127.0.0.1:{port}/hook")
            } else {
                receiver.url()
            };
            Relays::start(
                1,
                Settings {
                    database_url: db.url().to_owned(),
                    subscription: (*name).to_owned(),
                    webhook_url,
                    workers: 2,
                    batch_size: EVENTS as u32,
                    lease: Duration::from_secs(10),
                    backoff_initial: BACKOFF_INITIAL,
                    backoff_max: BACKOFF_MAX,
                },
                logs.clone(),
            )
        })
        .collect();
    // Latencies count from the commit: publish once every relay listens.
    wait_until_listening(&mut conn, db.name(), relays.len());

    // Before: everyone up.
    let before = publish_phase(&mut conn, "before");
    let everyone: HashMap<&str, &Receiver> = receivers.iter().map(|(n, r)| (*n, r)).collect();
    wait_delivered(&everyone, &before, Duration::from_secs(30));

    // The outage: the gate closes, and the same load is published.
    drop(gate.take());
    let closed = Instant::now();
    let during = publish_phase(&mut conn, "during");
    let healthy: HashMap<&str, &Receiver> = everyone
        .iter()
        .filter(|(name, _)| **name != FAILING)
        .map(|(name, r)| (*name, *r))
        .collect();
    wait_delivered(&healthy, &during, Duration::from_secs(30));
    // The rest of the outage is a fixed stretch of time, not a wait.
    std::thread::sleep(outage.saturating_sub(closed.elapsed()));
    let mut relays = relays;
    for group in &mut relays {
        group.assert_alive();
    }
    let tried = attempts_so_far(&mut conn, FAILING);
    let ended = Instant::now();
    gate = Some(reopen(port, &failing_addr));
    let reopened = Instant::now();

    // The healthy subscriptions did not notice.
    for name in HEALTHY {
        let receiver = &receivers[name];
        let (p50_before, p50_during) = (
            p50(&latencies(receiver, &before)),
            p50(&latencies(receiver, &during)),
        );
        eprintln!("outage: {name} commit-to-sink p50 {p50_before:?} before, {p50_during:?} during");
        assert!(
            p50_during <= p50_before * 2,
            "{name}: p50 {p50_during:?} during {FAILING}'s outage, {p50_before:?} before"
        );
    }

    // The failing one kept every event of the outage and tried each on the
    // schedule: its first attempt came within SLACK of the publish, then
    // no faster and not much slower than the backoff.
    assert_eq!(
        tried.keys().copied().collect::<HashSet<_>>(),
        during.iter().map(|(id, _)| *id).collect(),
        "the outage's events are not all waiting for their retry"
    );
    for (id, published) in &during {
        let window = ended - *published;
        let (most, fewest) = (most_attempts(window), fewest_attempts(window));
        let attempts = tried[id];
        assert!(
            (fewest..=most).contains(&attempts),
            "event {id}: {attempts} attempts in {window:?}, the schedule allows {fewest}..={most}"
        );
    }

    // Back up: each of its events delivered once, within the longest delay.
    let all: Vec<(i64, Instant)> = before.iter().chain(&during).copied().collect();
    wait_delivered(
        &[(FAILING, &receivers[FAILING])].into_iter().collect(),
        &all,
        BACKOFF_MAX + POLL + Duration::from_secs(30),
    );
    let recovered = reopened.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&mut conn, "outbox.pending") > 0 {
        assert!(Instant::now() < deadline, "delivered events never settled");
        let _ = receivers[FAILING]
            .delivered()
            .recv_timeout(Duration::from_millis(50));
    }
    drop(relays);
    drop(gate);
    for (name, receiver) in &receivers {
        let delivered: Vec<i64> = receiver
            .attempts()
            .iter()
            .filter(|a| a.delivered())
            .map(|a| a.id)
            .collect();
        assert_eq!(
            delivered.len(),
            all.len(),
            "{name}: {} deliveries of {} events",
            delivered.len(),
            all.len()
        );
        assert_eq!(
            delivered.iter().copied().collect::<HashSet<_>>(),
            all.iter().map(|(id, _)| *id).collect(),
            "{name} did not get every event exactly once"
        );
    }
    eprintln!(
        "outage: {FAILING} down {:.1}s; {}..={} attempts per event meanwhile; \
         all delivered {:.1}s after it came back",
        (ended - closed).as_secs_f64(),
        tried.values().min().unwrap(),
        tried.values().max().unwrap(),
        recovered.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&logs);
}

/// Publishes [`EVENTS`] events one transaction each, one every [`EVERY`];
/// returns each id with the moment its commit returned.
fn publish_phase(conn: &mut PgConnection, phase: &str) -> Vec<(i64, Instant)> {
    let start = Instant::now();
    (0..EVENTS)
        .map(|n| {
            // A fixed rate, not a wait for anything.
            std::thread::sleep(
                (start + EVERY * n as u32).saturating_duration_since(Instant::now()),
            );
            let id = outbox::transaction(conn, |tx| {
                tx.publish_event(outbox::NewEvent::dynamic(
                    "outage",
                    serde_json::json!({ "phase": phase, "n": n }),
                ))
            })
            .unwrap();
            (id.0, Instant::now())
        })
        .collect()
}

/// Waits until each receiver has delivered every one of `events`.
fn wait_delivered(
    receivers: &HashMap<&str, &Receiver>,
    events: &[(i64, Instant)],
    patience: Duration,
) {
    let deadline = Instant::now() + patience;
    for (name, receiver) in receivers {
        let mut missing: HashSet<i64> = events.iter().map(|(id, _)| *id).collect();
        for attempt in receiver.attempts().iter().filter(|a| a.delivered()) {
            missing.remove(&attempt.id);
        }
        while !missing.is_empty() {
            let id = receiver
                .delivered()
                .recv_deadline(deadline)
                .unwrap_or_else(|_| {
                    panic!(
                        "{name}: {} events not delivered in {patience:?}",
                        missing.len()
                    )
                });
            missing.remove(&id);
        }
    }
}

/// Commit-to-sink time of each of `events` at `receiver` (its first
/// successful delivery).
fn latencies(receiver: &Receiver, events: &[(i64, Instant)]) -> Vec<Duration> {
    let attempts = receiver.attempts();
    let first: HashMap<i64, &Attempt> = attempts
        .iter()
        .rev()
        .filter(|a| a.delivered())
        .map(|a| (a.id, a))
        .collect();
    events
        .iter()
        .map(|(id, committed)| first[id].at.saturating_duration_since(*committed))
        .collect()
}

fn p50(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

/// Opens the gate again. The closed gate's listener goes away as soon as
/// its accept loop sees the flag; until then the port may still be taken.
fn reopen(port: u16, upstream: &str) -> TcpProxy {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never came free");
        std::thread::yield_now();
    }
    TcpProxy::start(port, upstream)
}

/// Returns once `relays` relay listeners are connected to `database`: the
/// LISTEN is the last statement such a connection ran. There is no signal
/// to wait on, so it looks every 20 ms, for up to a minute.
fn wait_until_listening(conn: &mut PgConnection, database: &str, relays: usize) {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listening = diesel::sql_query(
            "SELECT count(*) AS n
               FROM pg_stat_activity
              WHERE datname = $1
                AND query LIKE 'LISTEN%'",
        )
        .bind::<diesel::sql_types::Text, _>(database)
        .get_result::<N>(conn)
        .expect("looking for the relays' listeners")
        .n;
        if listening >= relays as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the relays never started listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The attempts so far of each event `subscription` is retrying.
fn attempts_so_far(conn: &mut PgConnection, subscription: &str) -> HashMap<i64, u32> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Integer)]
        attempts: i32,
    }
    diesel::sql_query("SELECT id, attempts FROM outbox.deliveries WHERE subscription = $1")
        .bind::<diesel::sql_types::Text, _>(subscription)
        .load::<Row>(conn)
        .expect("reading attempts")
        .into_iter()
        .map(|r| (r.id, r.attempts as u32))
        .collect()
}

#[test]
fn the_bounds_follow_the_schedule() {
    // 0, then at least 0.4, 0.8, 1.6, 3.2, 3.2 … s apart: 7 attempts by 15 s.
    assert_eq!(most_attempts(Duration::from_secs(15)), 7);
    // At most 1, then 1.6, 2.1, 3.1, 5.1, 5.1 … s apart: 5 by 15 s.
    assert_eq!(fewest_attempts(Duration::from_secs(15)), 5);
    assert_eq!(most_attempts(Duration::ZERO), 1);
}
