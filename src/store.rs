//! Every SQL statement of the crate, one function per query.
//!
//! Nothing outside this module writes SQL. Each query says which index it
//! relies on and which locks it takes.

use diesel::connection::SimpleConnection;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Jsonb;
use std::io::Write;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::event::{EventId, Headers, StoredEvent};
use crate::new_event::ValidEvent;

pub(crate) mod schema {
    diesel::table! {
        outbox.events (id) {
            id -> Int8,
            topic -> Text,
            key -> Nullable<Text>,
            payload -> Jsonb,
            headers -> Jsonb,
            created_at -> Timestamptz,
            available_at -> Timestamptz,
            attempts -> Int4,
            last_error -> Nullable<Text>,
            claimed_by -> Nullable<Text>,
            claim_token -> Nullable<Int8>,
        }
    }

    diesel::table! {
        outbox.dead_letters (id) {
            id -> Int8,
            topic -> Text,
            key -> Nullable<Text>,
            payload -> Jsonb,
            headers -> Jsonb,
            created_at -> Timestamptz,
            attempts -> Int4,
            last_error -> Text,
            failed_at -> Timestamptz,
        }
    }
}

use schema::events;

/// JSON text that is already serialized, bound as `jsonb` without parsing it
/// into a `serde_json::Value` and printing it again.
#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = Jsonb)]
pub(crate) struct RawJson<'a>(pub(crate) &'a str);

impl ToSql<Jsonb, Pg> for RawJson<'_> {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        // jsonb binary format: a version byte, then the JSON text.
        out.write_all(&[1])?;
        out.write_all(self.0.as_bytes())?;
        Ok(serialize::IsNull::No)
    }
}

/// The column values of one event row. Every column is bound, none left
/// to `DEFAULT`: diesel caches the prepared statement of such an insert,
/// while a `DEFAULT` in the VALUES list makes it re-parse every time.
type EventValues<'a> = (
    diesel::dsl::Eq<events::topic, &'a str>,
    diesel::dsl::Eq<events::key, Option<&'a str>>,
    diesel::dsl::Eq<events::payload, RawJson<'a>>,
    diesel::dsl::Eq<events::headers, RawJson<'a>>,
    diesel::dsl::Eq<
        events::available_at,
        available_or_now<Option<DateTime<Utc>>, diesel::dsl::now>,
    >,
);

fn event_values(event: &ValidEvent) -> EventValues<'_> {
    (
        events::topic.eq(event.topic.as_str()),
        events::key.eq(event.key.as_deref()),
        events::payload.eq(RawJson(&event.payload)),
        events::headers.eq(RawJson(event.headers.as_deref().unwrap_or("{}"))),
        events::available_at.eq(available_or_now(event.available_at, diesel::dsl::now)),
    )
}

diesel::define_sql_function! {
    /// `coalesce(at, now())`: "now" in the database's clock unless a time is given.
    #[sql_name = "coalesce"]
    fn available_or_now(
        at: diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
        now: diesel::sql_types::Timestamptz,
    ) -> diesel::sql_types::Timestamptz;
}

/// Inserts one event. A prepared statement cached per connection; the row
/// takes no lock anyone else waits on (relays skip uncommitted rows).
pub(crate) fn insert_event(conn: &mut PgConnection, event: &ValidEvent) -> QueryResult<EventId> {
    diesel::insert_into(events::table)
        .values(event_values(event))
        .returning(events::id)
        .get_result(conn)
        .map(EventId)
}

/// Inserts many events in one statement and one round trip. Returns their
/// ids in input order: identity values are drawn row by row in input order,
/// so sorting the returned ids restores it.
pub(crate) fn insert_events(
    conn: &mut PgConnection,
    batch: &[ValidEvent],
) -> QueryResult<Vec<EventId>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<EventValues<'_>> = batch.iter().map(event_values).collect();
    let mut ids: Vec<i64> = diesel::insert_into(events::table)
        .values(rows)
        .returning(events::id)
        .get_results(conn)?;
    ids.sort_unstable();
    Ok(ids.into_iter().map(EventId).collect())
}

/// The columns of a [`StoredEvent`], in `SELECT` order.
pub(crate) type StoredColumns = (
    events::id,
    events::topic,
    events::key,
    events::payload,
    events::headers,
    events::created_at,
    events::available_at,
    events::attempts,
    events::last_error,
);

pub(crate) const STORED_COLUMNS: StoredColumns = (
    events::id,
    events::topic,
    events::key,
    events::payload,
    events::headers,
    events::created_at,
    events::available_at,
    events::attempts,
    events::last_error,
);

/// A row of [`STORED_COLUMNS`] as diesel reads it.
pub(crate) type StoredRow = (
    i64,
    String,
    Option<String>,
    serde_json::Value,
    serde_json::Value,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
    i32,
    Option<String>,
);

/// Turns a row into a [`StoredEvent`]. Headers are a JSON object of strings
/// (a table constraint), so the conversion fails only on a schema mismatch.
pub(crate) fn stored_event(row: StoredRow) -> Result<StoredEvent> {
    let (id, topic, key, payload, headers, created_at, available_at, attempts, last_error) = row;
    let id = EventId(id);
    let headers: Headers =
        serde_json::from_value(headers).map_err(|source| Error::Decode { id, source })?;
    Ok(StoredEvent {
        id,
        topic,
        key,
        payload,
        headers,
        created_at,
        available_at,
        attempts,
        last_error,
    })
}

/// The oldest queued events, delivered or not yet due alike, in id order.
/// Reads the primary key index; takes no locks.
pub(crate) fn queued_events(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<StoredRow>> {
    events::table
        .select(STORED_COLUMNS)
        .order(events::id)
        .limit(limit)
        .load(conn)
}

/// Serializes concurrent `outbox::migrate` calls: a transaction-scoped
/// advisory lock on a key no other part of the crate uses.
pub(crate) fn lock_migrations(conn: &mut PgConnection) -> QueryResult<()> {
    // "outbox" in ASCII: easy to recognise in pg_locks.
    const MIGRATION_LOCK_KEY: i64 = 0x6f75_7462_6f78;
    diesel::select(pg_advisory_xact_lock(MIGRATION_LOCK_KEY)).execute(conn)?;
    Ok(())
}

/// Creates the schema the migrations and their bookkeeping live in.
pub(crate) fn create_schema(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("CREATE SCHEMA IF NOT EXISTS outbox")
}

/// The session's `search_path`, to restore after migrating.
pub(crate) fn search_path(conn: &mut PgConnection) -> QueryResult<String> {
    diesel::select(current_setting("search_path")).get_result(conn)
}

/// Sets `search_path` until the end of the current transaction.
pub(crate) fn set_local_search_path(conn: &mut PgConnection, path: &str) -> QueryResult<()> {
    diesel::select(set_config("search_path", path, true)).execute(conn)?;
    Ok(())
}

diesel::define_sql_function! {
    /// Waits for an advisory lock held until the transaction ends.
    fn pg_advisory_xact_lock(key: diesel::sql_types::BigInt);
}

diesel::define_sql_function! {
    /// Reads a run-time setting.
    fn current_setting(name: diesel::sql_types::Text) -> diesel::sql_types::Text;
}

diesel::define_sql_function! {
    /// Sets a run-time setting; `is_local` limits it to the transaction.
    fn set_config(
        name: diesel::sql_types::Text,
        value: diesel::sql_types::Text,
        is_local: diesel::sql_types::Bool,
    ) -> diesel::sql_types::Text;
}

/// A claimed batch: its fencing token and its events.
pub(crate) struct Claimed {
    pub(crate) token: i64,
    pub(crate) rows: Vec<StoredRow>,
}

/// Which topics a claim may take: everything, or exact names and prefixes.
pub(crate) struct TopicFilter<'a> {
    pub(crate) all: bool,
    pub(crate) exact: &'a [String],
    /// `LIKE` patterns (`order.%`), with `%`, `_` and `\` in the prefix escaped.
    pub(crate) like: &'a [String],
}

#[derive(QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    token: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    topic: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    key: Option<String>,
    #[diesel(sql_type = Jsonb)]
    payload: serde_json::Value,
    #[diesel(sql_type = Jsonb)]
    headers: serde_json::Value,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    available_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    last_error: Option<String>,
}

/// Claims up to `limit` due events for `lease`, in one statement.
///
/// - Reads `events_available_at_idx` from the oldest due event: due events
///   are a prefix of it, and a held event sits at its lease expiry, so the
///   scan reads O(batch) entries (plus events of topics this relay does not
///   route, which it skips).
/// - Per-key order: a keyed event is taken only when no earlier event of its
///   key is still queued (pending, held or waiting for a retry); one probe
///   of `events_key_idx`. A batch therefore holds at most one event per key.
/// - `FOR UPDATE SKIP LOCKED`: concurrent relays take disjoint batches and
///   never wait for each other.
/// - The whole batch gets one fencing token from `outbox.claim_tokens`;
///   `available_at` becomes the lease expiry, so a dead relay's events come
///   due again by themselves.
pub(crate) fn claim(
    conn: &mut PgConnection,
    relay: &str,
    limit: i64,
    lease: std::time::Duration,
    topics: &TopicFilter<'_>,
) -> QueryResult<Claimed> {
    use diesel::sql_types::{Array, BigInt, Bool, Text};
    let rows: Vec<ClaimedRow> = diesel::sql_query(
        "WITH token AS (
             SELECT nextval('outbox.claim_tokens') AS value
         ), claimable AS (
             SELECT e.id
               FROM outbox.events e
              WHERE e.available_at <= now()
                AND ($3 OR e.topic = ANY($4) OR e.topic LIKE ANY($5))
                AND (e.key IS NULL OR NOT EXISTS (
                        SELECT FROM outbox.events earlier
                         WHERE earlier.key = e.key
                           AND earlier.id < e.id))
              ORDER BY e.available_at, e.id
              LIMIT $1
                FOR UPDATE SKIP LOCKED
         )
         UPDATE outbox.events e
            SET attempts = e.attempts + 1,
                claimed_by = $2,
                claim_token = token.value,
                available_at = now() + $6 * interval '1 microsecond'
           FROM claimable, token
          WHERE e.id = claimable.id
      RETURNING token.value AS token, e.id, e.topic, e.key, e.payload, e.headers,
                e.created_at, e.available_at, e.attempts, e.last_error",
    )
    .bind::<BigInt, _>(limit)
    .bind::<Text, _>(relay)
    .bind::<Bool, _>(topics.all)
    .bind::<Array<Text>, _>(topics.exact)
    .bind::<Array<Text>, _>(topics.like)
    .bind::<BigInt, _>(micros(lease))
    .load(conn)?;
    let token = rows.first().map_or(0, |r| r.token);
    let mut rows: Vec<StoredRow> = rows
        .into_iter()
        .map(|r| {
            (
                r.id,
                r.topic,
                r.key,
                r.payload,
                r.headers,
                r.created_at,
                r.available_at,
                r.attempts,
                r.last_error,
            )
        })
        .collect();
    rows.sort_unstable_by_key(|r| r.0);
    Ok(Claimed { token, rows })
}

/// What became of one claimed event, for [`settle`].
#[derive(Clone, Debug)]
pub(crate) enum Verdict {
    /// Acknowledged by its sink: delete it.
    Delivered,
    /// Failed: due again after the delay, with the error kept.
    Retry {
        delay: std::time::Duration,
        error: String,
    },
    /// Never attempted (shutdown): back to the queue, the attempt undone.
    Release,
    /// Permanent failure or attempts exhausted: move to the dead letters.
    Dead { error: String },
}

#[derive(QueryableByName)]
struct SettledId {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
}

/// Settles a batch in one statement and one round trip: deletes the
/// delivered, reschedules retries, releases untried events, and moves dead
/// ones to `outbox.dead_letters` in the same transaction that deletes them.
///
/// Fencing: every branch requires `claim_token = token`, so a relay whose
/// lease expired (and whose events another relay now holds) changes
/// nothing. Returns the ids actually settled; the others were lost.
pub(crate) fn settle(
    conn: &mut PgConnection,
    token: i64,
    verdicts: &[(EventId, Verdict)],
) -> QueryResult<Vec<EventId>> {
    use diesel::sql_types::{Array, BigInt, Text};
    let mut ids = Vec::with_capacity(verdicts.len());
    let mut kinds = Vec::with_capacity(verdicts.len());
    let mut delays = Vec::with_capacity(verdicts.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(verdicts.len());
    for (id, verdict) in verdicts {
        ids.push(id.0);
        let (kind, delay, error) = match verdict {
            Verdict::Delivered => ("delivered", 0, None),
            Verdict::Retry { delay, error } => ("retry", micros(*delay), Some(error.as_str())),
            Verdict::Release => ("release", 0, None),
            Verdict::Dead { error } => ("dead", 0, Some(error.as_str())),
        };
        kinds.push(kind);
        delays.push(delay);
        errors.push(error);
    }
    let settled: Vec<SettledId> = diesel::sql_query(
        "WITH outcome AS (
             SELECT *
               FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[])
                 AS o(id, verdict, delay_us, error)
         ), delivered AS (
             DELETE FROM outbox.events e
              USING outcome o
              WHERE e.id = o.id AND o.verdict = 'delivered' AND e.claim_token = $1
          RETURNING e.id
         ), retried AS (
             UPDATE outbox.events e
                SET available_at = now() + o.delay_us * interval '1 microsecond',
                    last_error = o.error,
                    claim_token = NULL
               FROM outcome o
              WHERE e.id = o.id AND o.verdict = 'retry' AND e.claim_token = $1
          RETURNING e.id
         ), released AS (
             UPDATE outbox.events e
                SET available_at = now(),
                    attempts = greatest(e.attempts - 1, 0),
                    claim_token = NULL
               FROM outcome o
              WHERE e.id = o.id AND o.verdict = 'release' AND e.claim_token = $1
          RETURNING e.id
         ), died AS (
             DELETE FROM outbox.events e
              USING outcome o
              WHERE e.id = o.id AND o.verdict = 'dead' AND e.claim_token = $1
          RETURNING e.id, e.topic, e.key, e.payload, e.headers, e.created_at,
                    e.attempts, o.error
         ), buried AS (
             INSERT INTO outbox.dead_letters
                    (id, topic, key, payload, headers, created_at, attempts, last_error)
             SELECT * FROM died
                 ON CONFLICT (id) DO UPDATE
                SET topic = excluded.topic, key = excluded.key,
                    payload = excluded.payload, headers = excluded.headers,
                    created_at = excluded.created_at, attempts = excluded.attempts,
                    last_error = excluded.last_error, failed_at = now()
          RETURNING id
         )
         SELECT id FROM delivered
         UNION ALL SELECT id FROM retried
         UNION ALL SELECT id FROM released
         UNION ALL SELECT id FROM buried",
    )
    .bind::<BigInt, _>(token)
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<BigInt>, _>(&delays)
    .bind::<Array<diesel::sql_types::Nullable<Text>>, _>(&errors)
    .load(conn)?;
    Ok(settled.into_iter().map(|s| EventId(s.id)).collect())
}

/// Extends the lease of events still held under `token`, for deliveries
/// that run long. Primary key lookups; fenced like [`settle`].
pub(crate) fn extend_lease(
    conn: &mut PgConnection,
    token: i64,
    ids: &[EventId],
    lease: std::time::Duration,
) -> QueryResult<usize> {
    use diesel::sql_types::{Array, BigInt};
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    diesel::sql_query(
        "UPDATE outbox.events
            SET available_at = now() + $3 * interval '1 microsecond'
          WHERE id = ANY($2)
            AND claim_token = $1",
    )
    .bind::<BigInt, _>(token)
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<BigInt, _>(micros(lease))
    .execute(conn)
}

fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
