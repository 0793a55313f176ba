//! The relay's claim: the next rows of one lane of a subscription's cursor,
//! and the due rows of its `outbox.deliveries`, under one fencing token.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, SmallInt, Text, Timestamptz};

use super::micros;
use super::prepared::{unknown_parameter, Binds, Prepared};
use crate::event::{EventId, StoredEvent};

/// A claimed batch: its fencing token, the lane whose cursor it holds (if
/// it took rows of the log), its rows in delivery order, and, when the
/// batch was not full, how long until the next retry or delayed event of
/// the subscription comes due (1 ms at most when a lane with news was
/// locked by someone else: look again then).
pub(crate) struct Claimed {
    pub(crate) token: i64,
    pub(crate) lane: Option<i16>,
    pub(crate) rows: Vec<ClaimedRow>,
    pub(crate) next_due_in: Option<std::time::Duration>,
    /// The claim's snapshot: (xmin, xmax), as transaction ids.
    pub(crate) snapshot: (i64, i64),
    /// Whether the claim armed the wake-up flag anew (it was off) while
    /// renewing it.
    pub(crate) rearmed: bool,
}

/// Which topics a claim may take: everything, or exact names and prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TopicFilter {
    pub(crate) all: bool,
    pub(crate) exact: Vec<String>,
    /// `LIKE` patterns (`order.%`), with `%`, `_` and `\` in the prefix escaped.
    pub(crate) like: Vec<String>,
}

/// Where a claimed event lives, to settle it: a row of the log (its
/// transaction) or a row of `outbox.deliveries` (its `seq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Log { tx: i64 },
    Deliveries { seq: i64 },
}

/// A claimed row. Payload and headers arrive as JSON *text* and are parsed
/// one row at a time ([`ClaimedRow::into_event`]): jsonb accepts documents
/// serde_json refuses (`1e400`, nesting deeper than 128), and decoding them
/// inside the query would fail the whole batch, every time, forever.
#[derive(QueryableByName)]
pub(crate) struct ClaimedRow {
    #[diesel(sql_type = BigInt)]
    token: i64,
    #[diesel(sql_type = Nullable<SmallInt>)]
    lane: Option<i16>,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    tx: Option<i64>,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Nullable<Text>)]
    key: Option<String>,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = Text)]
    headers: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    available_at: DateTime<Utc>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    /// Only on the last row, which is not an event (`id` 0; its `tx` and
    /// `seq` carry the claim's snapshot's xmin and xmax, its `attempts`
    /// whether it armed the wake-up flag anew): microseconds until the next
    /// deliveries row comes due, or until a lane locked by someone else
    /// should be looked at again.
    #[diesel(sql_type = Nullable<BigInt>)]
    next_due_in_us: Option<i64>,
}

/// Claims up to `limit` events of `subscription` for `lease`, in one call
/// of `outbox.claim` (migration 000005), starting the search for a lane
/// with work at `lane`:
///
/// - **The log.** The first lane from `lane` on that no other relay leases
///   and that has committed rows beyond its cursor is leased, and its next
///   rows are read in commit order, `(tx, id)`, by a range of
///   `events_lane_tx_idx`: O(batch), however long the backlog. Rows that
///   must wait (delayed, a topic outside `routed`, or a key with rows in
///   `outbox.deliveries`) are copied there instead of returned.
/// - **`outbox.deliveries`.** Due rows that head their key, `FOR NO KEY
///   UPDATE SKIP LOCKED`, of routed topics.
///
/// So one lane is read by one relay worker at a time, and a key (which
/// hashes to one lane) has at most one event in flight per subscription.
#[allow(clippy::too_many_arguments)] // one per parameter of outbox.claim
pub(crate) fn claim(
    conn: &mut PgConnection,
    subscription: &str,
    lane: usize,
    relay: &str,
    limit: i64,
    lease: std::time::Duration,
    routed: &TopicFilter,
    arm: Option<std::time::Duration>,
) -> QueryResult<Claimed> {
    struct ClaimBinds<'a> {
        subscription: &'a str,
        lane: i32,
        relay: &'a str,
        limit: i32,
        lease_us: i64,
        routed: &'a TopicFilter,
        arm_us: Option<i64>,
    }
    impl Binds for ClaimBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            match n {
                1 => out.push_bind_param::<Text, _>(self.subscription),
                2 => out.push_bind_param::<Integer, _>(&self.lane),
                3 => out.push_bind_param::<Text, _>(self.relay),
                4 => out.push_bind_param::<Integer, _>(&self.limit),
                5 => out.push_bind_param::<BigInt, _>(&self.lease_us),
                6 => out.push_bind_param::<Bool, _>(&self.routed.all),
                7 => out.push_bind_param::<Array<Text>, _>(&self.routed.exact),
                8 => out.push_bind_param::<Array<Text>, _>(&self.routed.like),
                9 => out.push_bind_param::<Nullable<BigInt>, _>(&self.arm_us),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct ClaimStatement;
    let rows: Vec<ClaimedRow> = Prepared::<ClaimStatement, _>::new(
        "SELECT * FROM outbox.claim($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        ClaimBinds {
            subscription,
            lane: i32::try_from(lane % 8).unwrap_or(0),
            relay,
            limit: i32::try_from(limit).unwrap_or(i32::MAX),
            lease_us: micros(lease),
            routed,
            arm_us: arm.map(micros),
        },
    )
    .load(conn)?;
    let mut next_due_in = None;
    let mut snapshot = (0, 0);
    let mut rearmed = false;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        // The last row is not an event (id 0; event ids start at 1).
        if row.id == 0 {
            next_due_in = row
                .next_due_in_us
                .map(|us| std::time::Duration::from_micros(us.max(0) as u64));
            snapshot = (row.tx.unwrap_or(0), row.seq.unwrap_or(0));
            rearmed = row.attempts == 1;
        } else {
            claimed.push(row);
        }
    }
    Ok(Claimed {
        token: claimed.first().map_or(0, |r| r.token),
        lane: claimed.iter().find_map(|r| r.lane),
        rows: claimed,
        next_due_in,
        snapshot,
        rearmed,
    })
}

impl ClaimedRow {
    /// The event's id.
    pub(crate) fn event_id(&self) -> EventId {
        EventId(self.id)
    }

    /// Where the row lives, for the settle.
    pub(crate) fn place(&self) -> Place {
        match self.seq {
            Some(seq) => Place::Deliveries { seq },
            None => Place::Log {
                tx: self.tx.unwrap_or(0),
            },
        }
    }

    /// Parses the row into a [`StoredEvent`], and says why it cannot be
    /// delivered if it cannot be read: then the event is as far as it can
    /// be told (the payload as its raw JSON text, a JSON string; the
    /// headers if they parse, else none), so that observers still hear of
    /// it.
    pub(crate) fn into_event(self, subscription: &str) -> (StoredEvent, Option<String>) {
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
            subscription: subscription.to_owned(),
        };
        (event, problem)
    }
}
