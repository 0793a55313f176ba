//! The relay's claim: take a batch of due events under a lease, and move
//! the keyed events that must wait for an earlier one out of the way.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};

use super::micros;
use super::prepared::{unknown_parameter, Binds, Prepared};
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
    /// Claimed events that came due by their deferral margin rather than
    /// being woken (see [`ClaimedRow`]).
    pub(crate) rescued: Vec<EventId>,
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
    /// Claimed while still flagged deferred: it came due by its margin, so
    /// nothing woke it when its earlier event went away (deleted by hand,
    /// purged). Counted as a rescue; zero when relays alone settle.
    #[diesel(sql_type = Bool)]
    came_due_deferred: bool,
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
///   key is still queued (pending, held or waiting for a retry), one probe
///   of `events_key_idx`, and no other event of its key is in flight (a
///   replayed dead letter has an older id than the event being delivered),
///   one probe of the tiny `events_held_key_idx`. So at most one event per
///   key is in flight, across all relays.
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
             SELECT e.id, e.deferred,
                    (e.key IS NOT NULL AND (
                        EXISTS (SELECT FROM outbox.events earlier
                                 WHERE earlier.key = e.key
                                   AND earlier.id < e.id)
                        OR EXISTS (SELECT FROM outbox.events held
                                    WHERE held.key = e.key
                                      AND held.claim_token IS NOT NULL
                                      AND held.available_at > now()
                                      AND held.id <> e.id))) AS blocked
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
                    e.last_error, false AS blocked, w.deferred AS came_due_deferred,
                    NULL::bigint AS next_due_in_us
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
         SELECT 0, w.id, '', NULL, '', '', now(), now(), 0, NULL, true, false, NULL
           FROM window_ w
          WHERE w.blocked
         UNION ALL
         SELECT 0, 0, '', NULL, '', '', now(), now(), 0, NULL, false, false,
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
    let rescued = claimed
        .iter()
        .filter(|r| r.came_due_deferred)
        .map(|r| EventId(r.id))
        .collect();
    Ok(Claimed {
        token,
        rows: claimed,
        blocked,
        next_due_in,
        rescued,
    })
}

/// How far past its key's earlier event (its lease end or retry time) a
/// deferred event is moved. Settling that earlier event makes the next one
/// due again at once, in the settle's own transaction; the margin only
/// matters when the earlier event is deleted some other way (by hand, or
/// `purge`), and then the event comes due by itself. A long margin keeps a
/// key with a huge backlog from being rescanned often.
const DEFER_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How far ahead an event is deferred at most (before the margin), however
/// late its earlier event is due: if that one is deleted by hand, or its
/// delay is years, the deferred event is looked at again after this.
const DEFER_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// How long an event is set aside, not deferred, when its earlier event is
/// locked right now (a claim or settle in progress, or someone's own
/// transaction): out of the next claims' way, so they do not read it again
/// and again, and looked at again soon.
const SET_ASIDE: std::time::Duration = std::time::Duration::from_millis(200);

/// Moves events that wait for an earlier event of their key (`ids`, from a
/// claim) out of the claim's way, and never waits for a lock:
///
/// - Each event is locked first, `FOR UPDATE SKIP LOCKED`, and only while
///   it is still due (`available_at <= now()`): one that another relay has
///   claimed since, or that a claim is taking right now, is left alone (the
///   fence), and the defer never waits behind a claim.
/// - Then its key's first earlier event is locked `FOR KEY SHARE SKIP
///   LOCKED`: a settle deleting that event waits for this deferral to
///   commit, and its wake (a later statement of its transaction) sees it.
///   The event is deferred: `available_at` past the earlier event's own
///   (at most [`DEFER_AT_MOST`] ahead) plus [`DEFER_MARGIN`], `deferred`
///   set so that the settle wakes it.
/// - If every earlier event is locked (being claimed or settled right now),
///   or the event waits only for a *later* event of its key that is in
///   flight (it is a replayed dead letter), it is only set aside for
///   [`SET_ASIDE`], not flagged: no settle needs to wake it, and the claims
///   do not meet it again at once.
/// - If no earlier event is left, the event is due and left as it is.
///
/// Returns how many events were moved (deferred or set aside).
pub(crate) fn defer(conn: &mut PgConnection, ids: &[i64]) -> QueryResult<usize> {
    struct DeferBinds<'a> {
        ids: &'a [i64],
        margin_us: i64,
        at_most_us: i64,
        aside_us: i64,
    }
    impl Binds for DeferBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<Array<BigInt>, _>(self.ids),
                2 => out.push_bind_param::<BigInt, _>(&self.margin_us),
                3 => out.push_bind_param::<BigInt, _>(&self.at_most_us),
                4 => out.push_bind_param::<BigInt, _>(&self.aside_us),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct DeferStatement;
    Prepared::<DeferStatement, _>::new(
        "WITH target AS (
             SELECT e.id, e.key
               FROM outbox.events e
              WHERE e.id = ANY($1)
                AND e.key IS NOT NULL
                AND e.available_at <= now()
                FOR UPDATE SKIP LOCKED
         ), placed AS (
             SELECT t.id, earlier.available_at AS behind
               FROM target t
               LEFT JOIN LATERAL (
                    SELECT earlier.available_at
                      FROM outbox.events earlier
                     WHERE earlier.key = t.key
                       AND earlier.id < t.id
                     ORDER BY earlier.id
                     LIMIT 1
                       FOR KEY SHARE SKIP LOCKED
               ) earlier ON true
              WHERE EXISTS (SELECT FROM outbox.events any_earlier
                             WHERE any_earlier.key = t.key AND any_earlier.id < t.id)
                 OR EXISTS (SELECT FROM outbox.events held
                             WHERE held.key = t.key
                               AND held.claim_token IS NOT NULL
                               AND held.available_at > now()
                               AND held.id <> t.id)
         )
         UPDATE outbox.events e
            SET available_at = CASE
                    WHEN p.behind IS NULL THEN now() + $4 * interval '1 microsecond'
                    ELSE least(greatest(p.behind, now()), now() + $3 * interval '1 microsecond')
                         + $2 * interval '1 microsecond'
                END,
                deferred = p.behind IS NOT NULL
           FROM placed p
          WHERE e.id = p.id",
        DeferBinds {
            ids,
            margin_us: micros(DEFER_MARGIN),
            at_most_us: micros(DEFER_AT_MOST),
            aside_us: micros(SET_ASIDE),
        },
    )
    .execute(conn)
}

impl ClaimedRow {
    /// The event id, readable whatever the payload holds.
    #[cfg(test)]
    pub(crate) fn id(&self) -> EventId {
        EventId(self.id)
    }

    /// Parses the row into a [`StoredEvent`], and says why it cannot be
    /// delivered if it cannot be read: then the event is as far as it can
    /// be told (the payload as its raw JSON text, a JSON string; the
    /// headers if they parse, else none), so that observers still hear of
    /// it.
    pub(crate) fn into_event(self) -> (StoredEvent, Option<String>) {
        let payload = serde_json::from_str(&self.payload)
            .map_err(|e| format!("payload is valid jsonb but not readable here: {e}"));
        let headers = serde_json::from_str(&self.headers)
            .map_err(|e| format!("headers are not a JSON object of strings: {e}"));
        let problem = match (&payload, &headers) {
            (Err(reason), _) | (_, Err(reason)) => Some(reason.clone()),
            _ => None,
        };
        let event = StoredEvent {
            id: EventId(self.id),
            topic: self.topic,
            key: self.key,
            payload: payload.unwrap_or(serde_json::Value::String(self.payload)),
            headers: headers.unwrap_or_default(),
            created_at: self.created_at,
            available_at: self.available_at,
            attempts: self.attempts,
            last_error: self.last_error,
        };
        (event, problem)
    }
}
