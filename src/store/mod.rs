//! Every SQL statement of the crate, one function per query.
//!
//! Nothing outside this module writes SQL. Each query says which index it
//! relies on and which locks it takes.

mod admin;
mod claim;
pub(crate) mod maintenance;
mod migrations;
mod prepared;
mod publish;
mod queue;
#[cfg(test)]
mod relay_model_tests;
#[cfg(test)]
mod relay_race_tests;
// The test bed of the integration tests (a database per test), shared by
// the in-crate protocol tests below.
#[cfg(test)]
#[path = "../../tests/support/pg.rs"]
mod pg;
mod settle;
mod subscriptions;
pub(crate) mod wakeup;

use std::io::Write;

use diesel::pg::Pg;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Jsonb;

use crate::error::{Error, Result};
use crate::event::{EventId, Headers, StoredEvent};

pub(crate) use admin::{
    count_dead_letters, get_dead_letter, list_dead_letters, purge_dead_letters,
    replay_dead_letters, status_by_topic, DeadLetterRow,
};
pub(crate) use claim::{claim, Place, TopicFilter};
pub(crate) use migrations::{
    applied_migrations, create_schema, lock_migrations, search_path, set_local_search_path,
};
pub(crate) use publish::{insert_event, insert_events};
pub(crate) use queue::queued_events;
pub(crate) use settle::{extend_lease, settle, Settlement, Verdict};
pub(crate) use subscriptions::{
    list_subscriptions, reclaim, remove_subscription, subscribe, wake_stranded,
};

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

/// A [`StoredEvent`] row as diesel reads it (`id, topic, key, payload,
/// headers, created_at, available_at, attempts, last_error, subscription`).
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
    String,
);

/// Turns a row into a [`StoredEvent`]. Headers are a JSON object of strings
/// (a table constraint), so the conversion fails only on a schema mismatch.
pub(crate) fn stored_event(row: StoredRow) -> Result<StoredEvent> {
    let (
        id,
        topic,
        key,
        payload,
        headers,
        created_at,
        available_at,
        attempts,
        last_error,
        subscription,
    ) = row;
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
        subscription,
    })
}

fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
