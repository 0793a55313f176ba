//! Reading what subscriptions still owe, without claiming it.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Jsonb, Nullable, Text, Timestamptz};

use super::StoredRow;

/// The oldest `limit` events some subscription still owes (due, delayed,
/// retrying or held by a relay), in id order, one row per subscription
/// that owes it (`outbox.pending`). Takes no locks. An event waiting behind
/// an earlier one of its key shows `available_at` as the latest time a
/// `DateTime<Utc>` holds: it is due once that one settles.
pub(crate) fn queued_events(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<StoredRow>> {
    #[derive(QueryableByName)]
    struct Row {
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
        created_at: chrono::DateTime<chrono::Utc>,
        #[diesel(sql_type = Timestamptz)]
        available_at: chrono::DateTime<chrono::Utc>,
        #[diesel(sql_type = Integer)]
        attempts: i32,
        #[diesel(sql_type = Nullable<Text>)]
        last_error: Option<String>,
    }
    let rows: Vec<Row> = diesel::sql_query(
        // A row waiting behind an earlier event of its key is due at
        // 'infinity' (once that one settles), which no DateTime holds: it
        // shows as the latest time chrono represents (to the microsecond).
        "SELECT subscription, id, topic, key, payload, headers, created_at,
                CASE WHEN available_at = 'infinity'
                     THEN '262142-12-31 23:59:59.999999+00'::timestamptz
                     ELSE available_at END AS available_at,
                attempts, last_error
           FROM outbox.pending
          ORDER BY id, subscription
          LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(rows
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
                r.subscription,
            )
        })
        .collect())
}
