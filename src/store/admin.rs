//! Operator statements: what subscriptions owe, and dead-letter
//! maintenance. None of
//! them is on a hot path; they favour one readable statement each.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Integer, Jsonb, Nullable, Text, Timestamptz};

use crate::admin::{DeadLetter, Selection};
use crate::error::{Error, Result};
use crate::event::EventId;

/// One topic's counts (see `admin::QueueCounts`).
#[derive(QueryableByName)]
pub(crate) struct StatusRow {
    #[diesel(sql_type = Text)]
    pub(crate) topic: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) pending: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) due_now: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) scheduled: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) in_flight: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) retrying: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) dead_letters: i64,
    #[diesel(sql_type = Nullable<Double>)]
    pub(crate) oldest_age_seconds: Option<f64>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Double>)]
    pub(crate) next_scheduled_in_seconds: Option<f64>,
}

/// Per-topic counts of what subscriptions still owe (`outbox.pending`, one
/// row per subscription and event) and of the dead letters. Reads the
/// unsettled part of the log once: an operator's query, not a hot path.
pub(crate) fn status_by_topic(
    conn: &mut PgConnection,
    subscription: Option<&str>,
) -> QueryResult<Vec<StatusRow>> {
    diesel::sql_query(
        "WITH queue AS (
             SELECT topic,
                    count(*) AS pending,
                    count(*) FILTER (WHERE available_at <= now() AND NOT in_flight) AS due_now,
                    count(*) FILTER (WHERE available_at > now() AND NOT in_flight) AS scheduled,
                    count(*) FILTER (WHERE in_flight) AS in_flight,
                    count(*) FILTER (WHERE attempts > 0 AND NOT in_flight) AS retrying,
                    extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds,
                    extract(epoch FROM min(available_at) FILTER (
                        WHERE available_at > now() AND available_at < 'infinity'
                          AND NOT in_flight) - now())::float8
                        AS next_scheduled_in_seconds
               FROM outbox.pending
              WHERE $1::text IS NULL OR subscription = $1
              GROUP BY topic
         ), dead AS (
             SELECT topic, count(*) AS dead_letters FROM outbox.dead_letters
              WHERE $1::text IS NULL OR subscription = $1
              GROUP BY topic
         )
         SELECT coalesce(q.topic, d.topic) AS topic,
                coalesce(q.pending, 0) AS pending,
                coalesce(q.due_now, 0) AS due_now,
                coalesce(q.scheduled, 0) AS scheduled,
                coalesce(q.in_flight, 0) AS in_flight,
                coalesce(q.retrying, 0) AS retrying,
                coalesce(d.dead_letters, 0) AS dead_letters,
                q.oldest_age_seconds,
                q.next_scheduled_in_seconds
           FROM queue q
           FULL JOIN dead d ON d.topic = q.topic
          ORDER BY 1",
    )
    .bind::<Nullable<Text>, _>(subscription)
    .load(conn)
}

/// A row of `outbox.dead_letters`.
#[derive(QueryableByName)]
pub(crate) struct DeadLetterRow {
    #[diesel(sql_type = Text)]
    subscription: String,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Nullable<Text>)]
    key: Option<String>,
    #[diesel(sql_type = Jsonb)]
    payload: serde_json::Value,
    #[diesel(sql_type = Jsonb)]
    headers: serde_json::Value,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Text)]
    last_error: String,
    #[diesel(sql_type = Timestamptz)]
    failed_at: DateTime<Utc>,
}

impl DeadLetterRow {
    pub(crate) fn into_dead_letter(self) -> Result<DeadLetter> {
        let id = EventId(self.id);
        Ok(DeadLetter {
            subscription: self.subscription,
            id,
            topic: self.topic,
            key: self.key,
            payload: self.payload,
            headers: serde_json::from_value(self.headers)
                .map_err(|source| Error::Decode { id, source })?,
            created_at: self.created_at,
            attempts: self.attempts,
            last_error: self.last_error,
            failed_at: self.failed_at,
        })
    }
}

const DEAD_LETTER_COLUMNS: &str =
    "subscription, id, topic, key, payload, headers, created_at, attempts, last_error, failed_at";

/// Newest failures first; `dead_letters_failed_at_idx` or, with a topic,
/// `dead_letters_topic_idx`.
pub(crate) fn list_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    topic: Option<&str>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> QueryResult<Vec<DeadLetterRow>> {
    diesel::sql_query(format!(
        "SELECT {DEAD_LETTER_COLUMNS}
           FROM outbox.dead_letters
          WHERE ($1::text IS NULL OR topic = $1)
            AND ($2::timestamptz IS NULL OR failed_at >= $2)
            AND ($4::text IS NULL OR subscription = $4)
          ORDER BY failed_at DESC, id DESC, subscription
          LIMIT $3"
    ))
    .bind::<Nullable<Text>, _>(topic)
    .bind::<Nullable<Timestamptz>, _>(since)
    .bind::<BigInt, _>(limit)
    .bind::<Nullable<Text>, _>(subscription)
    .load(conn)
}

/// The dead letters of event `id`, one per subscription that gave up on
/// it (of `subscription` only, if given); `dead_letters_id_idx`.
pub(crate) fn get_dead_letter(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    id: EventId,
) -> QueryResult<Vec<DeadLetterRow>> {
    diesel::sql_query(format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM outbox.dead_letters
          WHERE id = $1 AND ($2::text IS NULL OR subscription = $2)
          ORDER BY subscription"
    ))
    .bind::<BigInt, _>(id.0)
    .bind::<Nullable<Text>, _>(subscription)
    .load(conn)
}

/// The `WHERE` clause of a selection, on binds $1 (ids), $2 (topic), $3
/// (failed before) and $5 (subscription); unused binds are NULL.
const SELECTION: &str = "(($1::bigint[] IS NOT NULL AND id = ANY($1))
         OR ($2::text IS NOT NULL AND topic = $2)
         OR ($3::timestamptz IS NOT NULL AND failed_at < $3)
         OR ($1::bigint[] IS NULL AND $2::text IS NULL AND $3::timestamptz IS NULL))
         AND ($5::text IS NULL OR subscription = $5)";

type SelectionBinds = (Option<Vec<i64>>, Option<String>, Option<DateTime<Utc>>);

fn selection_binds(selection: &Selection) -> SelectionBinds {
    match selection {
        Selection::Ids(ids) => (Some(ids.iter().map(|id| id.0).collect()), None, None),
        Selection::Topic(topic) => (None, Some(topic.clone()), None),
        Selection::FailedBefore(at) => (None, None, Some(*at)),
        Selection::All => (None, None, None),
    }
}

/// `$4` is unused by counting and purging: bound as NULL so that `$5` is
/// the fifth parameter everywhere.
const NO_LIMIT: Option<i64> = None;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub(crate) fn count_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    selection: &Selection,
) -> QueryResult<u64> {
    let (ids, topic, before) = selection_binds(selection);
    let count: Count = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM outbox.dead_letters
          WHERE $4::bigint IS NULL AND {SELECTION}"
    ))
    .bind::<Nullable<Array<BigInt>>, _>(ids)
    .bind::<Nullable<Text>, _>(topic)
    .bind::<Nullable<Timestamptz>, _>(before)
    .bind::<Nullable<BigInt>, _>(NO_LIMIT)
    .bind::<Nullable<Text>, _>(subscription)
    .get_result(conn)?;
    Ok(count.n as u64)
}

/// Moves up to `limit` selected dead letters back to their subscription
/// in one statement (so in one transaction): rows of `outbox.deliveries`
/// with the same id, due now, attempts 0. Oldest ids first, and behind
/// what their key already has queued there, so a key's events return in
/// their order.
pub(crate) fn replay_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    selection: &Selection,
    limit: i64,
) -> QueryResult<u64> {
    let (ids, topic, before) = selection_binds(selection);
    let moved: Count = diesel::sql_query(format!(
        "WITH chosen AS (
             SELECT subscription, id FROM outbox.dead_letters
              WHERE {SELECTION}
              ORDER BY id, subscription
              LIMIT $4
                FOR UPDATE SKIP LOCKED
         ), moved AS (
             DELETE FROM outbox.dead_letters d
              USING chosen
              WHERE d.subscription = chosen.subscription AND d.id = chosen.id
          RETURNING d.subscription, d.id, d.topic, d.key, d.payload, d.headers, d.created_at,
                    d.last_error
         ), queued AS (
             INSERT INTO outbox.deliveries
                    (subscription, id, tx, topic, key, payload, headers, created_at,
                     available_at, attempts, last_error, reason)
             SELECT m.subscription, m.id,
                    -- a row of this (subscription, id) may still be queued
                    -- (replayed twice): tell them apart
                    coalesce((SELECT max(d.tx::text::bigint) + 1 FROM outbox.deliveries d
                               WHERE d.subscription = m.subscription AND d.id = m.id), 0)
                        ::text::xid8,
                    m.topic, m.key, m.payload, m.headers, m.created_at, now(), 0, m.last_error,
                    'replayed'
               FROM moved m
              ORDER BY m.id
          RETURNING id
         )
         SELECT count(*) AS n FROM queued"
    ))
    .bind::<Nullable<Array<BigInt>>, _>(ids)
    .bind::<Nullable<Text>, _>(topic)
    .bind::<Nullable<Timestamptz>, _>(before)
    .bind::<BigInt, _>(limit)
    .bind::<Nullable<Text>, _>(subscription)
    .get_result(conn)?;
    Ok(moved.n as u64)
}

pub(crate) fn purge_dead_letters(
    conn: &mut PgConnection,
    subscription: Option<&str>,
    selection: &Selection,
) -> QueryResult<u64> {
    let (ids, topic, before) = selection_binds(selection);
    let deleted = diesel::sql_query(format!(
        "DELETE FROM outbox.dead_letters WHERE $4::bigint IS NULL AND {SELECTION}"
    ))
    .bind::<Nullable<Array<BigInt>>, _>(ids)
    .bind::<Nullable<Text>, _>(topic)
    .bind::<Nullable<Timestamptz>, _>(before)
    .bind::<Nullable<BigInt>, _>(NO_LIMIT)
    .bind::<Nullable<Text>, _>(subscription)
    .execute(conn)?;
    Ok(deleted as u64)
}
