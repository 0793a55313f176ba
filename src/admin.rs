//! Operating the outbox: what the subscriptions still owe, the
//! subscriptions themselves, and the dead letters an operator lists,
//! inspects, replays or purges. The `outbox` command is built on these;
//! programs can call them directly.

use chrono::{DateTime, Utc};
use diesel::PgConnection;
use serde::Serialize;

use crate::error::Result;
use crate::event::{EventId, Headers};
use crate::store;

/// Counts of what is owed, overall and per topic. From [`status`]. An
/// event counts once per subscription that still owes it.
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

/// What is owed. Every (subscription, event) not yet delivered nor dead is
/// `pending`, and is exactly one of `due_now`, `scheduled` (delayed,
/// backing off, or waiting behind an earlier event of its key) or
/// `in_flight`; `retrying` counts the pending ones that failed at least
/// once and wait for their next attempt.
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

/// What the subscriptions owe now (`outbox.pending`). Reads the unsettled
/// part of the log once (and the dead letters once): cheap for relays that
/// keep up, proportional to the backlog otherwise.
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
    status_of(conn, None)
}

/// What one subscription owes, as [`status`] counts it for all of them.
pub fn subscription_status(conn: &mut PgConnection, subscription: &str) -> Result<Status> {
    status_of(conn, Some(subscription))
}

fn status_of(conn: &mut PgConnection, subscription: Option<&str>) -> Result<Status> {
    let rows = store::status_by_topic(conn, subscription)?;
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

/// An event in `outbox.dead_letters`: one subscription gave up on it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The subscription that gave up on it (replay sends it back there).
    pub subscription: String,
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

/// Lists dead letters, most recent failure first: optionally of one
/// subscription, optionally of one topic, optionally only those that
/// failed at or after `since`, at most `limit`.
pub fn dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    topic: Option<&str>,
    since: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<Vec<DeadLetter>> {
    store::list_dead_letters(conn, subscription, topic, since, i64::from(limit))?
        .into_iter()
        .map(store::DeadLetterRow::into_dead_letter)
        .collect()
}

/// The dead letters of event `id`, payload and headers included: one per
/// subscription that gave up on it (only `subscription`'s, if given), by
/// subscription name; empty if there is none.
pub fn dead_letter(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    id: EventId,
) -> Result<Vec<DeadLetter>> {
    store::get_dead_letter(conn, subscription, id)?
        .into_iter()
        .map(store::DeadLetterRow::into_dead_letter)
        .collect()
}

/// How many dead letters `selection` takes (of `subscription` only, if
/// given), without changing anything (a dry run of replay or purge).
pub fn count_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    selection: &Selection,
) -> Result<u64> {
    Ok(store::count_dead_letters(conn, subscription, selection)?)
}

/// Sends the selected dead letters (of `subscription` only, if given)
/// back to the subscription that gave up on them, and to no other: due
/// now, with their **same id** (receivers deduplicate on it), attempts
/// reset to 0 and the last error kept for reference. Works in transactions
/// of `batch_size` events (at least 1), calling `progress` with the
/// running total after each; returns how many were replayed.
///
/// A replayed event goes behind what its key has waiting in that
/// subscription (a retry, events held behind it); a key with nothing
/// waiting delivers it next to the events it is reading from the log.
pub fn replay_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    selection: &Selection,
    batch_size: u32,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let mut total = 0;
    loop {
        let moved = store::replay_dead_letters(
            conn,
            subscription,
            selection,
            i64::from(batch_size.max(1)),
        )?;
        if moved == 0 {
            return Ok(total);
        }
        total += moved;
        progress(total);
    }
}

/// Deletes the selected dead letters (of `subscription` only, if given)
/// for good; returns how many.
pub fn purge_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    selection: &Selection,
) -> Result<u64> {
    Ok(store::purge_dead_letters(conn, subscription, selection)?)
}

/// A registered subscription and what it owes. From [`subscriptions`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct SubscriptionStatus {
    /// Its name.
    pub name: String,
    /// Its topic patterns, as declared (`order.*`).
    pub patterns: Vec<String>,
    /// When it was registered: it receives the events committed after.
    pub created_at: DateTime<Utc>,
    /// Events it has not yet delivered nor dead-lettered.
    pub pending: i64,
    /// Age in seconds of its oldest pending event: its lag.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Its dead letters.
    pub dead_letters: i64,
}

/// Every registered subscription, by name, with what it owes. Reads the
/// unsettled part of the log: an operator's query.
///
/// ```no_run
/// # let mut conn = <diesel::PgConnection as diesel::Connection>::establish("postgres://localhost/app")?;
/// for sub in outbox::subscriptions(&mut conn)? {
///     if sub.oldest_pending_age_seconds.unwrap_or(0.0) > 3600.0 {
///         eprintln!("{} is an hour behind ({} pending)", sub.name, sub.pending);
///     }
/// }
/// # Ok::<(), outbox::Error>(())
/// ```
pub fn subscriptions(conn: &mut PgConnection) -> Result<Vec<SubscriptionStatus>> {
    Ok(store::list_subscriptions(conn)?
        .into_iter()
        .map(|row| SubscriptionStatus {
            name: row.name,
            patterns: row.patterns,
            created_at: row.created_at,
            pending: row.pending,
            oldest_pending_age_seconds: row.oldest_age_seconds,
            dead_letters: row.dead_letters,
        })
        .collect())
}

/// Registers the subscription `name` for `patterns` now, as a relay
/// serving it does when it first connects: from this transaction's
/// snapshot on, every event of those topics is kept for it, whether or not
/// a relay serves it yet. Returns whether it was created (an existing one
/// gets the new patterns). Call it beside [`crate::migrate`] when events
/// published before the first relay starts must reach the subscription.
///
/// ```no_run
/// # let mut conn = <diesel::PgConnection as diesel::Connection>::establish("postgres://localhost/app")?;
/// outbox::migrate(&mut conn)?;
/// outbox::register_subscription(&mut conn, "email", &["order.approved"])?;
/// # Ok::<(), outbox::Error>(())
/// ```
pub fn register_subscription(
    conn: &mut PgConnection,
    name: &str,
    patterns: &[&str],
) -> Result<bool> {
    let (_, written, topics) = crate::relay::compile_subscription(name, patterns)?;
    Ok(store::subscribe(conn, name, &written, &topics)?)
}

/// Removes a subscription: what it still owes and its dead letters are
/// dropped, and the log's storage it held back is reclaimed by the next
/// relay housekeeping. Returns whether it existed. A relay still serving
/// it registers it again (from that moment on): stop those relays first.
pub fn remove_subscription(conn: &mut PgConnection, name: &str) -> Result<bool> {
    Ok(store::remove_subscription(conn, name)?)
}
