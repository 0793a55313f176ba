//! Operating the outbox: queue status, and the dead letters an operator
//! lists, inspects, replays or purges. The `outbox` command is built on
//! these; programs can call them directly.

use chrono::{DateTime, Utc};
use diesel::PgConnection;
use serde::Serialize;

use crate::error::Result;
use crate::event::{EventId, Headers};
use crate::store;

/// Counts of the queue, overall and per topic. From [`status`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// The whole queue (every topic).
    #[serde(flatten)]
    pub total: QueueCounts,
    /// One entry per topic with queued events or dead letters, by name.
    pub topics: Vec<TopicStatus>,
}

/// The counts of one topic.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TopicStatus {
    /// The topic.
    pub topic: String,
    /// Its counts.
    #[serde(flatten)]
    pub counts: QueueCounts,
}

/// What the queue holds. Every undelivered event is `pending`, and is
/// exactly one of `due_now`, `scheduled` or `in_flight`; `retrying` counts
/// the pending events that failed at least once and wait for their next
/// attempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct QueueCounts {
    /// Events not yet delivered nor dead.
    pub pending: i64,
    /// Pending and due: a relay may claim them now (includes expired leases).
    pub due_now: i64,
    /// Pending and not due before a later time (delayed, or backing off).
    pub scheduled: i64,
    /// Held by a relay under a live lease.
    pub in_flight: i64,
    /// Failed at least once and not held: waiting for (or due for) a retry.
    pub retrying: i64,
    /// Events in `outbox.dead_letters`.
    pub dead_letters: i64,
    /// Age in seconds of the oldest pending event; `None` when none is.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Seconds until the next scheduled event (delayed, or backing off)
    /// comes due; `None` when none is scheduled.
    pub next_scheduled_in_seconds: Option<f64>,
}

/// The state of the queue now. Reads the whole `outbox.events` table once
/// (and the dead letters once): cheap for a healthy queue, proportional to
/// the backlog otherwise.
///
/// ```no_run
/// # let mut conn = <diesel::PgConnection as diesel::Connection>::establish("postgres://localhost/app")?;
/// let status = outbox::status(&mut conn)?;
/// if status.total.oldest_pending_age_seconds.unwrap_or(0.0) > 300.0 {
///     eprintln!("events have waited over 5 minutes; {} dead letters", status.total.dead_letters);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn status(conn: &mut PgConnection) -> Result<Status> {
    let rows = store::status_by_topic(conn)?;
    let mut status = Status::default();
    for row in rows {
        let counts = QueueCounts {
            pending: row.pending,
            due_now: row.due_now,
            scheduled: row.scheduled,
            in_flight: row.in_flight,
            retrying: row.retrying,
            dead_letters: row.dead_letters,
            oldest_pending_age_seconds: row.oldest_age_seconds,
            next_scheduled_in_seconds: row.next_scheduled_in_seconds,
        };
        let total = &mut status.total;
        total.pending += counts.pending;
        total.due_now += counts.due_now;
        total.scheduled += counts.scheduled;
        total.in_flight += counts.in_flight;
        total.retrying += counts.retrying;
        total.dead_letters += counts.dead_letters;
        total.oldest_pending_age_seconds = match (
            total.oldest_pending_age_seconds,
            counts.oldest_pending_age_seconds,
        ) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        total.next_scheduled_in_seconds = match (
            total.next_scheduled_in_seconds,
            counts.next_scheduled_in_seconds,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        status.topics.push(TopicStatus {
            topic: row.topic,
            counts,
        });
    }
    Ok(status)
}

/// An event in `outbox.dead_letters`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event id (kept on replay).
    pub id: EventId,
    /// The topic.
    pub topic: String,
    /// The ordering key.
    pub key: Option<String>,
    /// The payload as published.
    pub payload: serde_json::Value,
    /// The headers as published.
    pub headers: Headers,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// How many delivery attempts were made.
    pub attempts: i32,
    /// Why it died.
    pub last_error: String,
    /// When it was moved to the dead letters.
    pub failed_at: DateTime<Utc>,
}

/// Which dead letters an operation takes.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// These ids (unknown ids are ignored; the count says how many matched).
    Ids(Vec<EventId>),
    /// Every dead letter of this topic.
    Topic(String),
    /// Dead letters that failed before this time.
    FailedBefore(DateTime<Utc>),
    /// Every dead letter.
    All,
}

/// Lists dead letters, most recent failure first: optionally of one topic,
/// optionally only those that failed at or after `since`, at most `limit`.
pub fn dead_letters(
    conn: &mut PgConnection,
    topic: Option<&str>,
    since: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<Vec<DeadLetter>> {
    store::list_dead_letters(conn, topic, since, i64::from(limit))?
        .into_iter()
        .map(store::DeadLetterRow::into_dead_letter)
        .collect()
}

/// One dead letter, payload and headers included; `None` if there is no
/// dead letter with that id.
pub fn dead_letter(conn: &mut PgConnection, id: EventId) -> Result<Option<DeadLetter>> {
    store::get_dead_letter(conn, id)?
        .map(store::DeadLetterRow::into_dead_letter)
        .transpose()
}

/// How many dead letters `selection` takes, without changing anything (a
/// dry run of replay or purge).
pub fn count_dead_letters(conn: &mut PgConnection, selection: &Selection) -> Result<u64> {
    Ok(store::count_dead_letters(conn, selection)?)
}

/// Moves the selected dead letters back into the queue, due now, with their
/// **same id** (receivers deduplicate on it), attempts reset to 0 and the
/// last error kept for reference. Works in transactions of `batch_size`
/// events (at least 1), calling `progress` with the running total after
/// each; returns how many were replayed.
///
/// A replayed event is an earlier id of its key than the events published
/// since: later events of its key wait until it is delivered (or dies
/// again), which keeps the key's order from here on.
pub fn replay_dead_letters(
    conn: &mut PgConnection,
    selection: &Selection,
    batch_size: u32,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let mut total = 0;
    loop {
        let moved = store::replay_dead_letters(conn, selection, i64::from(batch_size.max(1)))?;
        if moved == 0 {
            return Ok(total);
        }
        total += moved;
        progress(total);
    }
}

/// Deletes the selected dead letters for good; returns how many.
pub fn purge_dead_letters(conn: &mut PgConnection, selection: &Selection) -> Result<u64> {
    Ok(store::purge_dead_letters(conn, selection)?)
}
