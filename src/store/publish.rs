//! Writing events: the publisher's inserts.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::schema::events;
use super::RawJson;
use crate::event::EventId;
use crate::new_event::ValidEvent;

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

/// Rows per insert statement: 5 bind parameters a row, and PostgreSQL
/// takes at most 65,535 parameters in one statement.
const ROWS_PER_INSERT: usize = 10_000;

/// Inserts many events, one statement and one round trip per 10,000.
/// Returns their ids in input order: identity values are drawn row by row
/// in input order, so sorting each statement's ids restores it.
pub(crate) fn insert_events(
    conn: &mut PgConnection,
    batch: &[ValidEvent],
) -> QueryResult<Vec<EventId>> {
    let mut all = Vec::with_capacity(batch.len());
    for chunk in batch.chunks(ROWS_PER_INSERT) {
        let rows: Vec<EventValues<'_>> = chunk.iter().map(event_values).collect();
        let mut ids: Vec<i64> = diesel::insert_into(events::table)
            .values(rows)
            .returning(events::id)
            .get_results(conn)?;
        ids.sort_unstable();
        all.extend(ids.into_iter().map(EventId));
    }
    Ok(all)
}
