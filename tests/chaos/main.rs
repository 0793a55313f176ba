//! Survival tests: break things on purpose and count what comes out.
//!
//! A separate test binary (`cargo test --all-features --test chaos`) so it
//! runs after the main integration binary instead of competing with it for
//! the machine. Two tests:
//!
//! - `chaos_loses_nothing` ([`survival`]): events published concurrently
//!   while three real `outbox relay` processes deliver into a receiver that
//!   fails at random and refuses poison events, and the test kills relays
//!   with SIGKILL, terminates their backends and crashes PostgreSQL (a
//!   private cluster the test owns, never a shared server).
//! - `one_subscribers_outage_neither_slows_the_others_nor_loses_anything`
//!   ([`outage`]): three subscriptions, and one's receiver is unreachable
//!   for a while; the other two keep their latency (p50 within 2×), the
//!   failed one's attempts follow the backoff schedule, and it delivers
//!   everything once its receiver is back.
//!
//! Sizes and durations (environment variables; the defaults are what CI
//! runs, about two minutes on two cores):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `OUTBOX_CHAOS_KEYS` | 200 | ordering keys |
//! | `OUTBOX_CHAOS_EVENTS` | 6000 | events (rounded down to a multiple of the keys), each delivered to three subscriptions |
//! | `OUTBOX_CHAOS_POISON` | 50 | poison events, refused with 422 on every attempt |
//! | `OUTBOX_CHAOS_FAIL_PERCENT` | 20 | share of other attempts answered 503 |
//! | `OUTBOX_CHAOS_SPREAD_SECS` | 25 | publishing is spread over about this long |
//! | `OUTBOX_CHAOS_KILLS` | 10 | at least this many `kill -9` of a relay |
//! | `OUTBOX_CHAOS_KILL_EVERY_MS` | 2000 | time between two kills |
//! | `OUTBOX_CHAOS_PATIENCE_SECS` | 180 | how long the end of the run may take to drain |
//! | `OUTBOX_CHAOS_DRAIN_SECS` | 8 | the drain after the faults stop must take at most this long (lease + 5 s; raise it for large runs) |
//! | `OUTBOX_OUTAGE_SECS` | 60 | how long the failing subscriber's receiver is down |
//!
//! `OUTBOX_CHAOS_KEEP_LOGS=1` keeps the relay logs (their directory is
//! printed) even when the run passes.

use diesel::prelude::*;

mod audit;
#[path = "../support/cluster.rs"]
mod cluster;
mod outage;
#[path = "../support/pg.rs"]
mod pg;
mod publisher;
mod receiver;
mod relays;
mod survival;
#[path = "../integration/tcp_proxy.rs"]
mod tcp_proxy;

/// Held by each test of this binary while it runs: the outage test compares
/// latencies before and during an outage, which another test loading the
/// machine in only one of the two phases would skew, and two chaos runs at
/// once would only measure the machine.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An environment knob, or its CI default.
fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a valid value")),
        _ => default,
    }
}

/// A directory for relay logs, named on stderr so that a failed run can
/// be read (a passing test removes it).
fn log_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-{test}-{}", std::process::id()));
    eprintln!("{test}: relay logs in {}", dir.display());
    dir
}

/// `SELECT count(*)` of a table.
fn count(conn: &mut PgConnection, table: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
        .get_result::<N>(conn)
        .unwrap_or_else(|e| panic!("counting {table}: {e}"))
        .n
}
