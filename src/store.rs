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
