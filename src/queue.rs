//! Reading the queue without delivering it.

use diesel::PgConnection;

use crate::error::Result;
use crate::event::StoredEvent;
use crate::store;

/// The oldest `limit` events some subscription still owes (due, delayed,
/// retrying, or held by a relay), in id order, one per subscription that
/// owes it (`StoredEvent::subscription` says which). For inspection and
/// tests: it takes no locks and claims nothing.
///
/// ```no_run
/// # let mut conn = <diesel::PgConnection as diesel::Connection>::establish("postgres://localhost/app")?;
/// for event in outbox::queued_events(&mut conn, 20)? {
///     println!("{} {} attempts={}", event.id, event.topic, event.attempts);
/// }
/// # Ok::<(), outbox::Error>(())
/// ```
pub fn queued_events(conn: &mut PgConnection, limit: u32) -> Result<Vec<StoredEvent>> {
    store::queued_events(conn, i64::from(limit))?
        .into_iter()
        .map(store::stored_event)
        .collect()
}
