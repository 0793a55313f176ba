//! A sink outage: the receiver is unreachable (connections refused) for a
//! while. Each event is retried on the backoff schedule, no faster (no hot
//! loop) and not much slower, and everything is delivered once the
//! receiver is back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer};

use crate::receiver::Receiver;
use crate::relays::{Relays, Settings};
use crate::tcp_proxy::{free_port, TcpProxy};
use crate::{count, knob, log_dir, pg};

const EVENTS: usize = 100;
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

/// The delay after failed attempt `n` (1 for the first), before jitter.
fn ceiling(n: u32) -> Duration {
    BACKOFF_INITIAL
        .mul_f64(FACTOR.powi(n as i32 - 1))
        .min(BACKOFF_MAX)
}

/// The most attempts the schedule allows within `window` of the publish:
/// the first may come at once, and attempt n+1 at the earliest the
/// shortest jittered delay after attempt n.
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
fn sink_outage_retries_on_the_schedule() {
    let outage = Duration::from_secs(knob("OUTBOX_OUTAGE_SECS", 15));
    let db = pg::test_db();
    let receiver = Receiver::start(2, 0.0);
    let receiver_addr = receiver.url()["http://".len()..]
        .trim_end_matches("/hook")
        .to_owned();
    // The relay talks to a port where nothing listens until the gate opens:
    // every attempt meanwhile is a refused connection (a transient failure).
    let port = free_port();
    let logs = log_dir("outage");
    let mut relays = Relays::start(
        1,
        Settings {
            database_url: db.url().to_owned(),
            webhook_url: format!("http://127.0.0.1:{port}/hook"),
            workers: 2,
            batch_size: EVENTS as u32,
            lease: Duration::from_secs(10),
            backoff_initial: BACKOFF_INITIAL,
            backoff_max: BACKOFF_MAX,
        },
        logs.clone(),
    );

    // The lower bound counts from the publish: publish once the relay
    // listens, so a slow start-up is not mistaken for a slow schedule.
    let mut conn = db.conn();
    wait_until_listening(&mut conn, db.name());

    // Without keys, so every event is retried on its own schedule.
    let published_at = Instant::now();
    let ids: Vec<i64> = outbox::transaction(&mut conn, |tx| {
        tx.publish_events(
            (0..EVENTS).map(|i| outbox::NewEvent::dynamic("outage", serde_json::json!(i))),
        )
    })
    .unwrap()
    .into_iter()
    .map(|id| id.0)
    .collect();

    // The outage itself: a fixed stretch of time, not a wait for the relay.
    std::thread::sleep(outage);
    relays.assert_alive();
    let during = attempts_so_far(&mut conn);
    let window = published_at.elapsed();
    let gate = TcpProxy::start(port, &receiver_addr);
    let reopened = Instant::now();

    let (most, fewest) = (most_attempts(window), fewest_attempts(outage));
    assert_eq!(
        during.len(),
        EVENTS,
        "an event left the queue during the outage"
    );
    for (id, attempts) in &during {
        assert!(
            (fewest..=most).contains(attempts),
            "event {id}: {attempts} attempts in {window:?}, the schedule allows {fewest}..={most}"
        );
    }

    // Back up: each event is delivered once, within the longest delay.
    let deadline = reopened + BACKOFF_MAX + POLL + Duration::from_secs(30);
    let mut missing: std::collections::HashSet<i64> = ids.iter().copied().collect();
    while !missing.is_empty() {
        let id = receiver
            .delivered()
            .recv_deadline(deadline)
            .unwrap_or_else(|_| panic!("{} events not delivered after the outage", missing.len()));
        missing.remove(&id);
    }
    let recovered = reopened.elapsed();
    // Settled (deleted) right after delivery; look again after each
    // further delivery (there should be none) or every 50 ms.
    while count(&mut conn, "outbox.events") > 0 {
        assert!(Instant::now() < deadline, "delivered events never settled");
        let _ = receiver.delivered().recv_timeout(Duration::from_millis(50));
    }
    drop(relays);
    drop(gate);
    let attempts = receiver.attempts();
    assert_eq!(attempts.len(), EVENTS, "an event was delivered twice");
    let total: u32 = during.values().sum();
    eprintln!(
        "outage: {EVENTS} events, receiver down {:.1}s; {}..={} attempts each during it \
         (schedule allows {fewest}..={most}; {total} in all); all delivered {:.1}s after it came back",
        window.as_secs_f64(),
        during.values().min().unwrap(),
        during.values().max().unwrap(),
        recovered.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&logs);
}

/// Returns once a relay's listener is connected to `database`: the LISTEN
/// is the last statement its connection ran. There is no signal to wait
/// on, so it looks every 20 ms, for up to a minute.
fn wait_until_listening(conn: &mut PgConnection, database: &str) {
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
        .expect("looking for the relay's listener")
        .n;
        if listening > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never started listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each queued event's attempts (claims) so far.
fn attempts_so_far(conn: &mut PgConnection) -> HashMap<i64, u32> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Integer)]
        attempts: i32,
    }
    diesel::sql_query("SELECT id, attempts FROM outbox.events")
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
