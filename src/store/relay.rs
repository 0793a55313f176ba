//! The relay's statements: claim a batch, settle it, extend its lease.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};

use super::micros;
use super::prepared::{Binds, Prepared};
use crate::event::{EventId, StoredEvent};

/// A claimed batch: its fencing token and its rows, id order; the events
/// the claim met that wait for an earlier event of their key (to
/// [`defer`]); and, when the batch was not full, how long until the next
/// routed event comes due (a retry, a delayed event, a lease running out).
pub(crate) struct Claimed {
    pub(crate) token: i64,
    pub(crate) rows: Vec<ClaimedRow>,
    pub(crate) blocked: Vec<i64>,
    pub(crate) next_due_in: Option<std::time::Duration>,
}

/// Which topics a claim may take: everything, or exact names and prefixes.
#[derive(Clone, Debug, Default)]
pub(crate) struct TopicFilter {
    pub(crate) all: bool,
    pub(crate) exact: Vec<String>,
    /// `LIKE` patterns (`order.%`), with `%`, `_` and `\` in the prefix escaped.
    pub(crate) like: Vec<String>,
}

/// A claimed row. Payload and headers arrive as JSON *text* and are parsed
/// one row at a time ([`ClaimedRow::into_event`]): jsonb accepts documents
/// serde_json refuses (`1e400`, nesting deeper than 128), and decoding them
/// inside the query would fail the whole batch, every time, forever.
#[derive(QueryableByName)]
pub(crate) struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    token: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    topic: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    key: Option<String>,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = Text)]
    headers: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    available_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    last_error: Option<String>,
    /// Not claimed: an earlier event of its key is still queued (the other
    /// fields are placeholders).
    #[diesel(sql_type = Bool)]
    blocked: bool,
    /// Only on the one row that is not an event (`id` 0): microseconds
    /// until the next routed event comes due.
    #[diesel(sql_type = Nullable<BigInt>)]
    next_due_in_us: Option<i64>,
}

/// Claims up to `limit` due events for `lease`, in one statement.
///
/// - Reads `events_available_at_idx` from the oldest due event: due events
///   are a prefix of it, and a held event sits at its lease expiry, so the
///   scan reads `limit` entries (plus events of topics this relay does not
///   route, which it skips).
/// - Per-key order: a keyed event is taken only when no earlier event of its
///   key is still queued (pending, held or waiting for a retry); one probe
///   of `events_key_idx`. A batch therefore holds at most one event per key.
///   The others are returned as `blocked`, for [`defer`] to move out of the
///   scan's way, so the next claim does not read them again.
/// - `FOR UPDATE SKIP LOCKED`: concurrent relays take disjoint batches and
///   never wait for each other.
/// - The whole batch gets one fencing token from `outbox.claim_tokens`;
///   `available_at` becomes the lease expiry, so a dead relay's events come
///   due again by themselves.
/// - When the batch is not full, one more probe of the same index finds
///   when the next routed event comes due, so the relay can wake for it
///   (a retry or a delayed event is then taken on time, not at the next
///   poll).
pub(crate) fn claim(
    conn: &mut PgConnection,
    relay: &str,
    limit: i64,
    lease: std::time::Duration,
    topics: &TopicFilter,
) -> QueryResult<Claimed> {
    struct ClaimBinds<'a> {
        limit: i64,
        relay: &'a str,
        topics: &'a TopicFilter,
        lease_us: i64,
    }
    impl Binds for ClaimBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<BigInt, _>(&self.limit),
                2 => out.push_bind_param::<Text, _>(self.relay),
                3 => out.push_bind_param::<Bool, _>(&self.topics.all),
                4 => out.push_bind_param::<Array<Text>, _>(&self.topics.exact),
                5 => out.push_bind_param::<Array<Text>, _>(&self.topics.like),
                6 => out.push_bind_param::<BigInt, _>(&self.lease_us),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct ClaimStatement;
    let rows: Vec<ClaimedRow> = Prepared::<ClaimStatement, _>::new(
        "WITH token AS (
             SELECT nextval('outbox.claim_tokens') AS value
         ), window_ AS (
             SELECT e.id,
                    (e.key IS NOT NULL AND EXISTS (
                        SELECT FROM outbox.events earlier
                         WHERE earlier.key = e.key
                           AND earlier.id < e.id)) AS blocked
               FROM outbox.events e
              WHERE e.available_at <= now()
                AND ($3 OR e.topic = ANY($4) OR e.topic LIKE ANY($5))
              ORDER BY e.available_at, e.id
              LIMIT $1
                FOR UPDATE SKIP LOCKED
         ), claimed AS (
             UPDATE outbox.events e
                SET attempts = e.attempts + 1,
                    claimed_by = $2,
                    claim_token = token.value,
                    available_at = now() + $6 * interval '1 microsecond',
                    deferred = false
               FROM window_ w, token
              WHERE e.id = w.id AND NOT w.blocked
          RETURNING token.value AS token, e.id, e.topic, e.key, e.payload::text AS payload,
                    e.headers::text AS headers, e.created_at, e.available_at, e.attempts,
                    e.last_error, false AS blocked, NULL::bigint AS next_due_in_us
         ), next_due AS (
             SELECT e.available_at
               FROM outbox.events e
              WHERE e.available_at > now()
                AND ($3 OR e.topic = ANY($4) OR e.topic LIKE ANY($5))
                AND (SELECT count(*) FROM window_) < $1
              ORDER BY e.available_at, e.id
              LIMIT 1
         )
         SELECT * FROM claimed
         UNION ALL
         SELECT 0, w.id, '', NULL, '', '', now(), now(), 0, NULL, true, NULL
           FROM window_ w
          WHERE w.blocked
         UNION ALL
         SELECT 0, 0, '', NULL, '', '', now(), now(), 0, NULL, false,
                ceil(extract(epoch FROM n.available_at - now()) * 1e6)::bigint
           FROM next_due n",
        ClaimBinds {
            limit,
            relay,
            topics,
            lease_us: micros(lease),
        },
    )
    .load(conn)?;
    let mut next_due_in = None;
    let mut blocked = Vec::new();
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(us) = row.next_due_in_us {
            next_due_in = Some(std::time::Duration::from_micros(us.max(0) as u64));
        } else if row.blocked {
            blocked.push(row.id);
        } else {
            claimed.push(row);
        }
    }
    let token = claimed.first().map_or(0, |r| r.token);
    claimed.sort_unstable_by_key(|r| r.id);
    Ok(Claimed {
        token,
        rows: claimed,
        blocked,
        next_due_in,
    })
}

/// How far past its key's earlier event (its lease end or retry time) a
/// deferred event is moved. Only a safety net: settling that earlier event
/// makes the next one due again at once. A long margin keeps a key with a
/// huge backlog from being rescanned often.
const DEFER_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How far ahead an event is deferred at most (before the margin), however
/// late its earlier event is due: if that one is deleted by hand, or its
/// delay is years, the deferred event is looked at again after this.
const DEFER_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Moves events that wait for an earlier event of their key (`ids`, from a
/// claim) out of the claim's way: `available_at` past that earlier event's
/// own `available_at` (at most [`DEFER_AT_MOST`] ahead) plus
/// [`DEFER_MARGIN`], and `deferred` set so that settling the earlier event
/// makes them due again ([`settle`]).
///
/// A statement of its own, after the claim has committed. It locks the
/// earlier event (`FOR KEY SHARE`) before deferring, so a settle deleting
/// that event waits for the deferral and then makes the event due again;
/// it cannot slip in between. `SKIP LOCKED`: an earlier event that a settle
/// is deleting right now (or a claim holds) is passed over, and the event
/// is then deferred behind a still earlier one or not at all (the next
/// claim reads it again). Never waiting for an earlier event also means a
/// deferral and a settle can never wait for each other in a cycle.
/// Events claimed or made due by others in between are left alone.
pub(crate) fn defer(conn: &mut PgConnection, ids: &[i64]) -> QueryResult<usize> {
    struct DeferBinds<'a> {
        ids: &'a [i64],
        margin_us: i64,
        at_most_us: i64,
    }
    impl Binds for DeferBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<Array<BigInt>, _>(self.ids),
                2 => out.push_bind_param::<BigInt, _>(&self.margin_us),
                3 => out.push_bind_param::<BigInt, _>(&self.at_most_us),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct DeferStatement;
    Prepared::<DeferStatement, _>::new(
        "UPDATE outbox.events e
            SET available_at = least(greatest(earlier.available_at, now()),
                                     now() + $3 * interval '1 microsecond')
                               + $2 * interval '1 microsecond',
                deferred = true
           FROM unnest($1::bigint[]) AS b(id)
          CROSS JOIN LATERAL (
                SELECT earlier.available_at
                  FROM outbox.events earlier
                 WHERE earlier.key = (SELECT key FROM outbox.events WHERE id = b.id)
                   AND earlier.id < b.id
                 ORDER BY earlier.id
                 LIMIT 1
                   FOR KEY SHARE SKIP LOCKED
          ) earlier
          WHERE e.id = b.id
            AND e.available_at <= now()",
        DeferBinds {
            ids,
            margin_us: micros(DEFER_MARGIN),
            at_most_us: micros(DEFER_AT_MOST),
        },
    )
    .execute(conn)
}

impl ClaimedRow {
    /// The event id, readable whatever the payload holds.
    pub(crate) fn id(&self) -> EventId {
        EventId(self.id)
    }

    /// Parses the row into a [`StoredEvent`]; the error says what is wrong.
    pub(crate) fn into_event(self) -> Result<StoredEvent, String> {
        let payload = serde_json::from_str(&self.payload)
            .map_err(|e| format!("payload is valid jsonb but not readable here: {e}"))?;
        let headers = serde_json::from_str(&self.headers)
            .map_err(|e| format!("headers are not a JSON object of strings: {e}"))?;
        Ok(StoredEvent {
            id: EventId(self.id),
            topic: self.topic,
            key: self.key,
            payload,
            headers,
            created_at: self.created_at,
            available_at: self.available_at,
            attempts: self.attempts,
            last_error: self.last_error,
        })
    }
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
///
/// A delivered or dead keyed event makes the next deferred event of its key
/// due at once, in the same statement (so a relay dying right after cannot
/// leave it waiting); one probe of the small `events_deferred_idx`. If an
/// earlier event of the key is still queued, the next claim defers it
/// again. Only deferred rows are written: writing every next row would
/// double a keyed workload's writes (measured: the relay at 0.37x of raw
/// SQL). A deferral this statement's snapshot cannot see (one it waited
/// for, through the `FOR KEY SHARE` lock on the deleted event) is caught by
/// [`wake_successors`], run after.
pub(crate) fn settle(
    conn: &mut PgConnection,
    token: i64,
    verdicts: &[(EventId, Verdict)],
) -> QueryResult<Vec<EventId>> {
    let ids: Vec<i64> = verdicts.iter().map(|(id, _)| id.0).collect();
    if verdicts
        .iter()
        .all(|(_, v)| matches!(v, Verdict::Delivered))
    {
        return delete_delivered(conn, token, &ids);
    }
    let mut kinds = Vec::with_capacity(verdicts.len());
    let mut delays = Vec::with_capacity(verdicts.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(verdicts.len());
    for (_, verdict) in verdicts {
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
    struct SettleBinds<'a> {
        token: i64,
        ids: &'a [i64],
        kinds: &'a [&'a str],
        delays: &'a [i64],
        errors: &'a [Option<&'a str>],
    }
    impl Binds for SettleBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<BigInt, _>(&self.token),
                2 => out.push_bind_param::<Array<BigInt>, _>(self.ids),
                3 => out.push_bind_param::<Array<Text>, _>(self.kinds),
                4 => out.push_bind_param::<Array<BigInt>, _>(self.delays),
                5 => out.push_bind_param::<Array<Nullable<Text>>, _>(self.errors),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct SettleStatement;
    let settled: Vec<SettledId> = Prepared::<SettleStatement, _>::new(
        "WITH outcome AS (
             SELECT *
               FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[])
                 AS o(id, verdict, delay_us, error)
         ), delivered AS (
             DELETE FROM outbox.events e
              USING outcome o
              WHERE e.id = o.id AND o.verdict = 'delivered' AND e.claim_token = $1
          RETURNING e.id, e.key
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
         ), pulled AS (
             UPDATE outbox.events e
                SET available_at = now(),
                    deferred = false
               FROM (SELECT id, key FROM delivered UNION ALL SELECT id, key FROM died) done
              WHERE done.key IS NOT NULL
                AND e.id = (SELECT min(next.id) FROM outbox.events next
                             WHERE next.key = done.key AND next.id > done.id
                               AND next.deferred)
                AND e.deferred
         )
         SELECT id FROM delivered
         UNION ALL SELECT id FROM retried
         UNION ALL SELECT id FROM released
         UNION ALL SELECT id FROM buried",
        SettleBinds {
            token,
            ids: &ids,
            kinds: &kinds,
            delays: &delays,
            errors: &errors,
        },
    )
    .load(conn)?;
    Ok(settled.into_iter().map(|s| EventId(s.id)).collect())
}

/// The common case of [`settle`]: every event of the batch was delivered.
/// Primary key lookups, fenced by the token like every settle, and the
/// same wake-up of deferred successors.
fn delete_delivered(conn: &mut PgConnection, token: i64, ids: &[i64]) -> QueryResult<Vec<EventId>> {
    struct DeleteBinds<'a> {
        token: i64,
        ids: &'a [i64],
    }
    impl Binds for DeleteBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<BigInt, _>(&self.token),
                2 => out.push_bind_param::<Array<BigInt>, _>(self.ids),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct DeleteDeliveredStatement;
    let settled: Vec<SettledId> = Prepared::<DeleteDeliveredStatement, _>::new(
        "WITH delivered AS (
             DELETE FROM outbox.events
              WHERE id = ANY($2)
                AND claim_token = $1
          RETURNING id, key
         ), pulled AS (
             UPDATE outbox.events e
                SET available_at = now(),
                    deferred = false
               FROM delivered done
              WHERE done.key IS NOT NULL
                AND e.id = (SELECT min(next.id) FROM outbox.events next
                             WHERE next.key = done.key AND next.id > done.id
                               AND next.deferred)
                AND e.deferred
         )
         SELECT id FROM delivered",
        DeleteBinds { token, ids },
    )
    .load(conn)?;
    Ok(settled.into_iter().map(|s| EventId(s.id)).collect())
}

fn unknown_parameter(n: usize) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(format!("statement has no parameter ${n}").into())
}

/// Makes the next deferred event of each key due at once: `done` are the
/// (id, key) of keyed events just deleted (delivered or dead-lettered) by a
/// settle that has committed.
///
/// The settle already does this for what its snapshot shows; this second
/// look, with a snapshot taken after the settle committed, catches a
/// deferral the settle waited for (its `FOR KEY SHARE` lock on the deleted
/// event) and so could not see. A deferral that starts later finds the
/// event gone and defers nothing. If this fails, such an event comes due by
/// itself [`DEFER_MARGIN`] after its predecessor's lease.
pub(crate) fn wake_successors(conn: &mut PgConnection, done: &[(i64, &str)]) -> QueryResult<usize> {
    struct WakeBinds {
        ids: Vec<i64>,
        keys: Vec<String>,
    }
    impl Binds for WakeBinds {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<Array<BigInt>, _>(&self.ids),
                2 => out.push_bind_param::<Array<Text>, _>(&self.keys),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct WakeSuccessorsStatement;
    Prepared::<WakeSuccessorsStatement, _>::new(
        "UPDATE outbox.events e
            SET available_at = now(),
                deferred = false
           FROM unnest($1::bigint[], $2::text[]) AS done(id, key)
          WHERE e.id = (SELECT min(next.id) FROM outbox.events next
                         WHERE next.key = done.key AND next.id > done.id
                           AND next.deferred)
            AND e.deferred",
        WakeBinds {
            ids: done.iter().map(|(id, _)| *id).collect(),
            keys: done.iter().map(|(_, key)| (*key).to_owned()).collect(),
        },
    )
    .execute(conn)
}

/// The safety net behind [`settle`] and [`wake_successors`]: makes due at
/// once every deferred event that is the first queued event of its key
/// (its earlier events are gone, yet nothing woke it: a relay killed at the
/// wrong moment, a row deleted by hand). Walks the keys of deferred events
/// through `events_deferred_idx` one key at a time (a loose index scan),
/// so it costs one probe per key with deferred events, however many
/// events each has.
pub(crate) fn wake_stranded(conn: &mut PgConnection) -> QueryResult<usize> {
    struct NoBinds;
    impl Binds for NoBinds {
        fn push<'b>(&'b self, n: usize, _: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            Err(unknown_parameter(n))
        }
    }
    struct WakeStrandedStatement;
    Prepared::<WakeStrandedStatement, _>::new(
        "WITH RECURSIVE heads AS (
             (SELECT key, id FROM outbox.events
               WHERE deferred ORDER BY key, id LIMIT 1)
             UNION ALL
             SELECT next.key, next.id
               FROM heads h
              CROSS JOIN LATERAL (
                    SELECT key, id FROM outbox.events
                     WHERE deferred AND key > h.key
                     ORDER BY key, id LIMIT 1) next
         )
         UPDATE outbox.events e
            SET available_at = now(),
                deferred = false
           FROM heads h
          WHERE e.id = h.id
            AND e.deferred
            AND NOT EXISTS (SELECT FROM outbox.events earlier
                             WHERE earlier.key = h.key AND earlier.id < h.id)",
        NoBinds,
    )
    .execute(conn)
}

/// Extends the lease of events still held under `token`, for deliveries
/// that run long. Primary key lookups; fenced like [`settle`]. Returns the
/// ids still held: an event missing from it was taken over by another relay.
pub(crate) fn extend_lease(
    conn: &mut PgConnection,
    token: i64,
    ids: &[EventId],
    lease: std::time::Duration,
) -> QueryResult<Vec<EventId>> {
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let held: Vec<SettledId> = diesel::sql_query(
        "UPDATE outbox.events
            SET available_at = now() + $3 * interval '1 microsecond'
          WHERE id = ANY($2)
            AND claim_token = $1
      RETURNING id",
    )
    .bind::<BigInt, _>(token)
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<BigInt, _>(micros(lease))
    .load(conn)?;
    Ok(held.into_iter().map(|s| EventId(s.id)).collect())
}
