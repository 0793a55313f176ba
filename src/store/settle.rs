//! The relay's settle: record a batch's outcomes (and wake the deferred
//! successors of what it deletes) in one round trip, and renew a lease.

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Array, BigInt, Nullable, Text};

use super::micros;
use super::prepared::{unknown_parameter, Binds, Prepared};
use crate::event::EventId;

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

/// Settles a batch in one round trip and one transaction, through
/// `outbox.settle` (migration 000004): deletes the delivered, reschedules
/// retries, releases untried events, and moves dead ones to
/// `outbox.dead_letters`; then, in a second statement of the same
/// transaction, makes the next deferred event of every deleted keyed event
/// due at once.
///
/// Fencing: every branch requires `claim_token = token`, so a relay whose
/// lease expired (and whose events another relay now holds) changes
/// nothing. Returns the ids actually settled; the others were lost.
///
/// Why a second statement: a deferral holds `FOR KEY SHARE` on the event it
/// defers behind until it commits, so deleting that event waits for it; the
/// deleting statement keeps its older snapshot and cannot see the deferral,
/// the next statement's snapshot can. Both commit together, so no relay
/// crash or lost reply can leave a successor deferred behind a deleted
/// event (docs/design.md §3).
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
        return settle_delivered(conn, token, &ids);
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
        "SELECT id FROM outbox.settle($1, $2, $3, $4, $5) AS s(id)",
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
/// `outbox.settle_delivered`: primary key deletes, fenced by the token, and
/// the same wake of deferred successors in the same transaction.
fn settle_delivered(conn: &mut PgConnection, token: i64, ids: &[i64]) -> QueryResult<Vec<EventId>> {
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
    struct SettleDeliveredStatement;
    let settled: Vec<SettledId> = Prepared::<SettleDeliveredStatement, _>::new(
        "SELECT id FROM outbox.settle_delivered($1, $2) AS s(id)",
        DeleteBinds { token, ids },
    )
    .load(conn)?;
    Ok(settled.into_iter().map(|s| EventId(s.id)).collect())
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
