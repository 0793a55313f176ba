//! [`transaction`]: business writes and events committed together.

use std::panic::{self, AssertUnwindSafe};

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::{Connection, PgConnection, QueryResult};

use crate::event::{Event, EventId};
use crate::new_event::NewEvent;
use crate::publish;

/// Runs `f` in a database transaction in which it can both write business
/// rows and publish events: either all of it commits, or none of it.
///
/// Follows [`diesel::Connection::transaction`]: commits when `f` returns
/// `Ok`, rolls back when it returns `Err`, and uses a savepoint when `conn`
/// is already inside a transaction.
///
/// Unlike diesel's, it also rolls back on a panic, which then continues:
/// diesel leaves every transaction a panic unwinds through open, so this
/// rolls back *all* open levels, the enclosing ones and any the closure
/// opened itself, and the connection is usable (and poolable) again. Your
/// error type only needs `From<`[`diesel::result::Error`]`>`; errors from
/// [`Tx::publish`] are diesel errors too, and [`Error::from`](crate::Error)
/// turns them back into typed ones.
///
/// Already inside your own `conn.transaction(|conn| …)`? Use
/// [`publish`](crate::publish) on that connection instead.
///
/// ```
/// # #[path = "../tests/support/pg.rs"] mod pg;
/// # let db = pg::test_db();
/// # let mut conn = db.conn();
/// use diesel::prelude::*;
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct OrderApproved { order_id: i64 }
/// impl outbox::Event for OrderApproved { const TOPIC: &'static str = "order.approved"; }
///
/// diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY)").execute(&mut conn)?;
///
/// // Committed: the order and its event exist together.
/// let id = outbox::transaction(&mut conn, |tx| {
///     diesel::sql_query("INSERT INTO orders VALUES (7)").execute(tx.conn())?;
///     tx.publish(&OrderApproved { order_id: 7 })
/// })?;
///
/// // Rolled back: neither the order nor the event exists.
/// let failed: Result<(), outbox::Error> = outbox::transaction(&mut conn, |tx| {
///     diesel::sql_query("INSERT INTO orders VALUES (8)").execute(tx.conn())?;
///     tx.publish(&OrderApproved { order_id: 8 })?;
///     Err(diesel::result::Error::RollbackTransaction.into())
/// });
/// assert!(failed.is_err());
///
/// let queued = outbox::queued_events(&mut conn, 10)?;
/// assert_eq!(queued.len(), 1);
/// assert_eq!(queued[0].id, id);
/// assert_eq!(queued[0].payload, serde_json::json!({ "order_id": 7 }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn transaction<T, E, F>(conn: &mut PgConnection, f: F) -> Result<T, E>
where
    F: FnOnce(&mut Tx<'_>) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        conn.transaction(|conn| f(&mut Tx { conn }))
    }));
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            rollback_all(conn);
            panic::resume_unwind(panic)
        }
    }
}

/// Rolls back every open transaction level. diesel's frames that the panic
/// unwinds through would not, and its depth counter is not public, so roll
/// back until diesel says there is nothing left.
fn rollback_all(conn: &mut PgConnection) {
    // A generous bound on nesting, so a misbehaving manager cannot loop.
    for _ in 0..1024 {
        match AnsiTransactionManager::rollback_transaction(conn) {
            Ok(()) => continue,
            Err(diesel::result::Error::NotInTransaction) => return,
            Err(error) => {
                tracing::warn!(%error, "rollback after a panic in outbox::transaction failed");
                return;
            }
        }
    }
}

/// The open transaction inside [`transaction`]: write business rows through
/// [`Tx::conn`], publish events with the `publish*` methods.
pub struct Tx<'c> {
    conn: &'c mut PgConnection,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl<'c> Tx<'c> {
    /// The connection, inside the transaction, for your own queries.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// Publishes a typed event. Returns its id.
    ///
    /// Fails before writing anything when the payload does not serialize
    /// (or contains `\u0000`); an invalid `E::TOPIC` does not compile. The
    /// error is a [`diesel::result::Error`] so `?` works with your error
    /// type, and `outbox::Error::from` recovers the typed cause. Returning
    /// that error from the closure rolls the whole transaction back.
    pub fn publish<E: Event + ?Sized>(&mut self, event: &E) -> QueryResult<EventId> {
        publish::publish(self.conn, event)
    }

    /// Publishes many typed events of one type, in one round trip per
    /// 10,000. Returns their ids in the same order.
    pub fn publish_all<'e, E, I>(&mut self, events: I) -> QueryResult<Vec<EventId>>
    where
        E: Event + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        publish::publish_all(self.conn, events)
    }

    /// Publishes an event with options (key, headers, delay) or a dynamic
    /// topic. Returns its id.
    pub fn publish_event(&mut self, event: NewEvent) -> QueryResult<EventId> {
        publish::publish_event(self.conn, event)
    }

    /// Publishes any mix of events, in one round trip per 10,000. Returns
    /// their ids in the same order. If one is invalid, none is written.
    pub fn publish_events<I>(&mut self, events: I) -> QueryResult<Vec<EventId>>
    where
        I: IntoIterator<Item = NewEvent>,
    {
        publish::publish_events(self.conn, events)
    }
}
