//! Reading the queue without claiming it.

use diesel::prelude::*;

use super::schema::events;
use super::{StoredRow, STORED_COLUMNS};

/// The oldest queued events, delivered or not yet due alike, in id order.
/// Reads the primary key index; takes no locks.
pub(crate) fn queued_events(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<StoredRow>> {
    events::table
        .select(STORED_COLUMNS)
        .order(events::id)
        .limit(limit)
        .load(conn)
}
