//! The audit of a chaos run: per-key order of first deliveries, and a
//! cause for every duplicate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::publisher::Published;
use crate::receiver::Attempt;
use crate::survival::{BATCH, LEASE, RELAYS, WORKERS};

#[derive(Debug)]
pub enum Disruption {
    /// `kill -9` of the relay process with this label.
    Kill(String),
    /// `pg_terminate_backend` of every relay connection (how many there were).
    Terminate(i64),
    /// `pg_ctl restart -m immediate`.
    Restart,
}

/// Every attempt carries its event's key, and for every key the first
/// successful delivery of each of its events came in publish (= id) order.
/// Poison events have none and are skipped.
pub fn assert_first_deliveries_in_publish_order(published: &[Published], attempts: &[Attempt]) {
    let key_of: HashMap<i64, &str> = published.iter().map(|p| (p.id, p.key.as_str())).collect();
    let mut first: HashMap<i64, usize> = HashMap::new();
    for (index, attempt) in attempts.iter().enumerate() {
        assert_eq!(
            attempt.key.as_deref(),
            key_of.get(&attempt.id).copied(),
            "event {} arrived with the wrong outbox-key",
            attempt.id
        );
        if attempt.delivered() {
            first.entry(attempt.id).or_insert(index);
        }
    }
    let mut by_key: HashMap<&str, Vec<&Published>> = HashMap::new();
    for p in published.iter().filter(|p| !p.poison) {
        by_key.entry(&p.key).or_default().push(p);
    }
    for (key, mut events) in by_key {
        events.sort_by_key(|p| p.seq);
        for pair in events.windows(2) {
            assert!(
                pair[0].id < pair[1].id,
                "key {key}: seq {} got a later id than seq {}",
                pair[0].seq,
                pair[1].seq
            );
            assert!(
                first[&pair[0].id] < first[&pair[1].id],
                "key {key}: event {} (seq {}) was first delivered after event {} (seq {})",
                pair[0].id,
                pair[0].seq,
                pair[1].id,
                pair[1].seq
            );
        }
    }
}

pub struct Duplicates {
    /// Events delivered more than once.
    pub events: usize,
    /// Deliveries beyond the first, over all events.
    pub extra: usize,
    /// Of `events`, those first delivered by a process killed soon after.
    pub at_a_kill: usize,
}

/// Counts duplicates and checks each has a cause.
///
/// A relay settles a batch (deletes the delivered events) after delivering
/// it; an event delivered but not yet settled comes due again when the
/// lease runs out, and is delivered again. That happens only when:
/// - the relay was killed (SIGKILL) after the delivery and before the
///   settle: the first delivery was made by the process that was killed,
///   at most `LEASE` + 2 s before the kill (the rest of its batch, then
///   the settle, retried for up to a lease if the database was away);
/// - its connection was terminated or the server crashed around then and
///   the settle could not be retried within the lease, or the lease could
///   not be renewed and another relay took the batch over: the first
///   delivery came within `LEASE` + 2 s of such an event, either side.
///
/// Each batch holds at most `BATCH` events per worker, so the extra
/// deliveries are at most `kills × WORKERS × BATCH` plus
/// `(terminations + restarts) × RELAYS × WORKERS × BATCH`.
pub fn account_for_duplicates(
    attempts: &[Attempt],
    disruptions: &[(Instant, Disruption)],
    kills: u32,
    outages: u32,
) -> Duplicates {
    let mut deliveries: HashMap<i64, Vec<&Attempt>> = HashMap::new();
    for attempt in attempts.iter().filter(|a| a.delivered()) {
        deliveries.entry(attempt.id).or_default().push(attempt);
    }
    let killed_at: HashMap<&str, Instant> = disruptions
        .iter()
        .filter_map(|(at, d)| match d {
            Disruption::Kill(label) => Some((label.as_str(), *at)),
            _ => None,
        })
        .collect();
    let window = LEASE + Duration::from_secs(2);
    // The kill's instant is taken just before the signal, and a request
    // already on its way may still be answered: a second of leeway.
    let leeway = Duration::from_secs(1);
    let at_a_kill = |first: &Attempt| {
        killed_at
            .get(first.relay.as_str())
            .is_some_and(|&kill| first.at <= kill + leeway && first.at + window >= kill)
    };
    let near_outage = |at: Instant| {
        disruptions.iter().any(|(when, d)| {
            !matches!(d, Disruption::Kill(_)) && at + window >= *when && at <= *when + window
        })
    };
    let mut duplicates = Duplicates {
        events: 0,
        extra: 0,
        at_a_kill: 0,
    };
    for (id, times) in &deliveries {
        if times.len() < 2 {
            continue;
        }
        duplicates.events += 1;
        duplicates.extra += times.len() - 1;
        let first = times[0];
        if at_a_kill(first) {
            duplicates.at_a_kill += 1;
            continue;
        }
        assert!(
            near_outage(first.at),
            "event {id} was delivered {} times, first by relay {} which was not killed \
             soon after, and not near a termination or a restart; its attempts \
             (relay, attempt header, status, ms after the first): {:?}; the \
             disruptions (ms after the first attempt): {:?}",
            times.len(),
            first.relay,
            attempts
                .iter()
                .filter(|a| a.id == *id)
                .map(|a| (
                    a.relay.as_str(),
                    a.attempt,
                    a.status,
                    a.at.saturating_duration_since(first.at).as_millis()
                ))
                .collect::<Vec<_>>(),
            disruptions
                .iter()
                .map(|(at, d)| (
                    at.saturating_duration_since(first.at).as_millis() as i128
                        - first.at.saturating_duration_since(*at).as_millis() as i128,
                    d
                ))
                .collect::<Vec<_>>()
        );
    }
    let bound = (kills as usize + outages as usize * RELAYS) * WORKERS * BATCH as usize;
    assert!(
        duplicates.extra <= bound,
        "{} extra deliveries, more than the {bound} that the kills and outages allow",
        duplicates.extra
    );
    duplicates
}
