//! The relay's settle: record a batch's outcomes in one round trip and one
//! transaction, and renew a lease.

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};

use super::claim::Place;
use super::micros;
use super::prepared::{unknown_parameter, Binds, Prepared};
use crate::event::EventId;

/// What became of one claimed event, for [`settle`].
#[derive(Clone, Debug)]
pub(crate) enum Verdict {
    /// Acknowledged by its sink.
    Delivered,
    /// Failed: due again after the delay, with the error kept.
    Retry {
        delay: std::time::Duration,
        error: String,
    },
    /// Never attempted (shutdown, lease lost): back to the queue, the
    /// attempt undone.
    Release,
    /// Not attempted because an earlier event of its key in the same batch
    /// failed: it waits behind that one.
    Held,
    /// Permanent failure or attempts exhausted: move to the dead letters.
    Dead { error: String },
}

/// One claimed event's outcome.
#[derive(Clone, Debug)]
pub(crate) struct Settlement {
    pub(crate) id: EventId,
    pub(crate) place: Place,
    pub(crate) verdict: Verdict,
}

#[derive(QueryableByName)]
struct SettledId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// The columns of a batch, as `outbox.settle` and `outbox.extend_lease`
/// take them.
struct Columns<'a> {
    seqs: Vec<Option<i64>>,
    txs: Vec<Option<i64>>,
    ids: Vec<i64>,
    kinds: Vec<&'static str>,
    delays: Vec<i64>,
    errors: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn of(batch: &'a [Settlement]) -> Self {
        let mut columns = Columns {
            seqs: Vec::with_capacity(batch.len()),
            txs: Vec::with_capacity(batch.len()),
            ids: Vec::with_capacity(batch.len()),
            kinds: Vec::with_capacity(batch.len()),
            delays: Vec::with_capacity(batch.len()),
            errors: Vec::with_capacity(batch.len()),
        };
        for s in batch {
            let (seq, tx) = match s.place {
                Place::Log { tx } => (None, Some(tx)),
                Place::Deliveries { seq } => (Some(seq), None),
            };
            let (kind, delay, error) = match &s.verdict {
                Verdict::Delivered => ("delivered", 0, None),
                Verdict::Retry { delay, error } => ("retry", micros(*delay), Some(error.as_str())),
                Verdict::Release => ("release", 0, None),
                Verdict::Held => ("held", 0, None),
                Verdict::Dead { error } => ("dead", 0, Some(error.as_str())),
            };
            columns.seqs.push(seq);
            columns.txs.push(tx);
            columns.ids.push(s.id.0);
            columns.kinds.push(kind);
            columns.delays.push(delay);
            columns.errors.push(error);
        }
        columns
    }
}

/// Settles a batch through `outbox.settle` (migration 000005), in one
/// transaction:
///
/// - Log rows, fenced by the lane's token: the cursor moves past the
///   batch, retries and held or released rows are copied to
///   `outbox.deliveries` (in order, so a key's copies keep its order), dead
///   ones go to `outbox.dead_letters`, and the lane's lease ends. If the
///   token no longer holds the lane, none is settled.
/// - `outbox.deliveries` rows, each fenced by the token: deleted,
///   rescheduled, put back or moved to the dead letters; then, in a second
///   statement (a new snapshot), the next row of every key whose head was
///   deleted becomes due. A claim that parks rows behind a head holds `FOR
///   KEY SHARE` on it, so the delete waits for that claim and the wake sees
///   what it parked (docs/design.md §4).
///
/// Returns the ids actually settled; the others were lost to another relay.
pub(crate) fn settle(
    conn: &mut PgConnection,
    subscription: &str,
    token: i64,
    lane: Option<i16>,
    batch: &[Settlement],
) -> QueryResult<Vec<EventId>> {
    struct SettleBinds<'a> {
        subscription: &'a str,
        token: i64,
        lane: Option<i32>,
        columns: Columns<'a>,
    }
    impl Binds for SettleBinds<'_> {
        fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            let c = &self.columns;
            match n {
                1 => out.push_bind_param::<Text, _>(self.subscription),
                2 => out.push_bind_param::<BigInt, _>(&self.token),
                3 => out.push_bind_param::<Nullable<Integer>, _>(&self.lane),
                4 => out.push_bind_param::<Array<Nullable<BigInt>>, _>(&c.seqs),
                5 => out.push_bind_param::<Array<Nullable<BigInt>>, _>(&c.txs),
                6 => out.push_bind_param::<Array<BigInt>, _>(&c.ids),
                7 => out.push_bind_param::<Array<Text>, _>(&c.kinds),
                8 => out.push_bind_param::<Array<BigInt>, _>(&c.delays),
                9 => out.push_bind_param::<Array<Nullable<Text>>, _>(&c.errors),
                _ => Err(unknown_parameter(n)),
            }
        }
    }
    struct SettleStatement;
    let settled: Vec<SettledId> = Prepared::<SettleStatement, _>::new(
        "SELECT id FROM outbox.settle($1, $2, $3, $4, $5, $6, $7, $8, $9) AS s(id)",
        SettleBinds {
            subscription,
            token,
            lane: lane.map(i32::from),
            columns: Columns::of(batch),
        },
    )
    .load(conn)?;
    Ok(settled.into_iter().map(|s| EventId(s.id)).collect())
}

/// Extends the lease of a batch still held under `token`, for deliveries
/// that run long: the lane's lease, and each `outbox.deliveries` row's.
/// Returns the ids still held: an event missing from it was taken over by
/// another relay.
pub(crate) fn extend_lease(
    conn: &mut PgConnection,
    subscription: &str,
    token: i64,
    lane: Option<i16>,
    batch: &[(EventId, Place)],
    lease: std::time::Duration,
) -> QueryResult<Vec<EventId>> {
    let mut log_ids = Vec::new();
    let mut seqs = Vec::new();
    for (id, place) in batch {
        match place {
            Place::Log { .. } => log_ids.push(id.0),
            Place::Deliveries { seq } => seqs.push(*seq),
        }
    }
    let held: Vec<SettledId> =
        diesel::sql_query("SELECT id FROM outbox.extend_lease($1, $2, $3, $4, $5, $6) AS s(id)")
            .bind::<Text, _>(subscription)
            .bind::<BigInt, _>(token)
            .bind::<Nullable<Integer>, _>(lane.map(i32::from))
            .bind::<BigInt, _>(micros(lease))
            .bind::<Array<BigInt>, _>(&log_ids)
            .bind::<Array<BigInt>, _>(&seqs)
            .load(conn)?;
    Ok(held.into_iter().map(|s| EventId(s.id)).collect())
}
