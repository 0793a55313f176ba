//! The wake-up flag (`outbox.relay_wakeup`): a sleeping relay arms it, the
//! insert trigger sends a NOTIFY only while it is armed, and the relay that
//! is woken disarms it. See docs/design.md for why.

use diesel::prelude::*;
use diesel::sql_types::BigInt;

/// Disarms the flag: no relay is asleep any more, so publishers stop
/// notifying. Run by the listener, on its own connection, after a
/// notification. Touches only the unlogged one-row table: no WAL flush.
pub(crate) const DISARM: &str = "UPDATE outbox.relay_wakeup SET armed_until = NULL";

/// Arms the flag for `valid_for`: until then (or until a woken relay
/// disarms it) every insert into `outbox.events` sends a NOTIFY. Never
/// shortens what another relay armed. An upsert, because the unlogged row is
/// gone after a server crash.
pub(crate) fn arm(conn: &mut PgConnection, valid_for: std::time::Duration) -> QueryResult<()> {
    let micros = i64::try_from(valid_for.as_micros()).unwrap_or(i64::MAX);
    diesel::sql_query(
        "INSERT INTO outbox.relay_wakeup AS w (armed_until)
         VALUES (now() + $1 * interval '1 microsecond')
         ON CONFLICT (only_row) DO UPDATE
            SET armed_until = greatest(w.armed_until, excluded.armed_until)",
    )
    .bind::<BigInt, _>(micros)
    .execute(conn)
    .map(drop)
}
