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
/// takes no lock anyone else waits on (relays skip uncommitted rows). An
/// event with an idempotency key goes through [`insert_idempotent`].
pub(crate) fn insert_event(conn: &mut PgConnection, event: &ValidEvent) -> QueryResult<EventId> {
    if let Some(key) = &event.idempotency_key {
        return insert_idempotent(conn, event, key);
    }
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
/// in input order, so sorting each statement's ids restores it. Events
/// with an idempotency key go one statement each, in their place, so ids
/// keep the input order.
pub(crate) fn insert_events(
    conn: &mut PgConnection,
    batch: &[ValidEvent],
) -> QueryResult<Vec<EventId>> {
    if batch.iter().all(|e| e.idempotency_key.is_none()) {
        return insert_plain_events(conn, batch);
    }
    let mut all = Vec::with_capacity(batch.len());
    let mut rest = batch;
    while let Some(first) = rest.first() {
        if let Some(key) = &first.idempotency_key {
            all.push(insert_idempotent(conn, first, key)?);
            rest = &rest[1..];
            continue;
        }
        let plain = rest
            .iter()
            .position(|e| e.idempotency_key.is_some())
            .unwrap_or(rest.len());
        all.extend(insert_plain_events(conn, &rest[..plain])?);
        rest = &rest[plain..];
    }
    Ok(all)
}

/// [`insert_events`] for events without idempotency keys.
fn insert_plain_events(conn: &mut PgConnection, batch: &[ValidEvent]) -> QueryResult<Vec<EventId>> {
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

/// Writes `event` under the idempotency `key`, in one statement: the key's
/// row is taken (or, past its window, taken over) and the event inserted
/// with the id drawn for it; when the key is taken within its window,
/// nothing is written and the id is that of the key's event.
///
/// The upsert waits on the key's unique index for a concurrent publisher of
/// the same key: when that one commits, this one writes nothing (`DO
/// UPDATE … WHERE` finds the key unexpired); when it rolls back, this one
/// takes the key. The key's event id is then read by a statement of its
/// own, whose snapshot (in `READ COMMITTED`) sees the other's commit.
fn insert_idempotent(
    conn: &mut PgConnection,
    event: &ValidEvent,
    key: &str,
) -> QueryResult<EventId> {
    use diesel::pg::Pg;
    use diesel::query_builder::AstPass;
    use diesel::sql_types::{BigInt, Jsonb, Nullable, Text, Timestamptz};

    use super::prepared::{unknown_parameter, Binds, Prepared};

    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    struct WriteBinds<'a> {
        key: &'a str,
        event: &'a ValidEvent,
        payload: RawJson<'a>,
        headers: RawJson<'a>,
    }
    impl Binds for WriteBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            let e = self.event;
            match n {
                1 => out.push_bind_param::<Text, _>(self.key),
                2 => out.push_bind_param::<Text, _>(e.topic.as_str()),
                3 => out.push_bind_param::<Nullable<Text>, _>(&e.key),
                4 => out.push_bind_param::<Jsonb, _>(&self.payload),
                5 => out.push_bind_param::<Jsonb, _>(&self.headers),
                6 => out.push_bind_param::<Nullable<Timestamptz>, _>(&e.available_at),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct WriteStatement;
    let written = Prepared::<WriteStatement, _>::new(
        "WITH k AS (
             INSERT INTO outbox.idempotency_keys AS k (key) VALUES ($1)
             ON CONFLICT (key) DO UPDATE
                 SET event_id = excluded.event_id, expires_at = excluded.expires_at
                 WHERE k.expires_at <= now()
             RETURNING k.event_id)
         INSERT INTO outbox.events (id, topic, key, payload, headers, available_at)
         SELECT k.event_id, $2, $3, $4, $5, coalesce($6, now()) FROM k
         RETURNING id",
        WriteBinds {
            key,
            event,
            payload: RawJson(&event.payload),
            headers: RawJson(event.headers.as_deref().unwrap_or("{}")),
        },
    )
    .get_result::<Id>(conn)
    .optional()?;
    if let Some(written) = written {
        return Ok(EventId(written.id));
    }
    struct TakenBinds<'a>(&'a str);
    impl Binds for TakenBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<Text, _>(self.0),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct TakenStatement;
    Prepared::<TakenStatement, _>::new(
        "SELECT event_id AS id FROM outbox.idempotency_keys WHERE key = $1",
        TakenBinds(key),
    )
    .get_result::<Id>(conn)
    .map(|taken| EventId(taken.id))
}
