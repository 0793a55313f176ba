//! Publishing on a connection that is already inside the caller's own
//! transaction: [`publish`] and its batch and [`NewEvent`] forms.

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::{PgConnection, QueryResult};

use crate::error::Error;
use crate::event::{Event, EventId};
use crate::new_event::NewEvent;
use crate::store;

/// Publishes a typed event on a connection that is inside a transaction you
/// opened yourself (with diesel's [`Connection::transaction`], a test
/// transaction, or an enclosing [`transaction`](crate::transaction)).
/// Returns its id. The event commits or rolls back with that transaction.
///
/// Refuses a connection that is not inside a transaction with
/// [`Error::NotInTransaction`]: the event would commit on its own, whatever
/// happens to the business writes around it. (diesel tracks transactions it
/// opened; a `BEGIN` sent as raw SQL is invisible to it and refused too.)
///
/// Errors are [`diesel::result::Error`], so `?` works inside diesel's
/// closure; `outbox::Error::from` recovers the typed cause.
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
/// # diesel::sql_query("CREATE TABLE orders (id bigint PRIMARY KEY)").execute(&mut conn)?;
/// let id = conn.transaction(|conn| {
///     diesel::sql_query("INSERT INTO orders VALUES (7)").execute(conn)?;
///     outbox::publish(conn, &OrderApproved { order_id: 7 })
/// })?;
///
/// // Outside a transaction it is refused, and nothing is written.
/// let refused = outbox::publish(&mut conn, &OrderApproved { order_id: 8 }).unwrap_err();
/// assert!(matches!(outbox::Error::from(refused), outbox::Error::NotInTransaction));
/// assert_eq!(outbox::queued_events(&mut conn, 10)?.len(), 1);
/// # let _ = id;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`Connection::transaction`]: diesel::Connection::transaction
pub fn publish<E: Event + ?Sized>(conn: &mut PgConnection, event: &E) -> QueryResult<EventId> {
    publish_event(conn, NewEvent::typed(event))
}

/// Publishes many typed events of one type on a connection inside a
/// transaction, in one round trip per 10,000. Returns their ids in the same
/// order. Refused outside a transaction, as [`publish`].
pub fn publish_all<'e, E, I>(conn: &mut PgConnection, events: I) -> QueryResult<Vec<EventId>>
where
    E: Event + 'e,
    I: IntoIterator<Item = &'e E>,
{
    publish_events(conn, events.into_iter().map(NewEvent::typed))
}

/// Publishes an event with options (key, headers, delay) or a dynamic topic
/// on a connection inside a transaction. Returns its id. Refused outside a
/// transaction, as [`publish`].
pub fn publish_event(conn: &mut PgConnection, event: NewEvent) -> QueryResult<EventId> {
    ensure_in_transaction(conn)?;
    let event = event.into_valid()?;
    store::insert_event(conn, &event)
}

/// Publishes any mix of events on a connection inside a transaction, in one
/// round trip per 10,000. Returns their ids in the same order. If one is
/// invalid, none is written. Refused outside a transaction, as [`publish`].
pub fn publish_events<I>(conn: &mut PgConnection, events: I) -> QueryResult<Vec<EventId>>
where
    I: IntoIterator<Item = NewEvent>,
{
    ensure_in_transaction(conn)?;
    let events = events
        .into_iter()
        .map(NewEvent::into_valid)
        .collect::<Result<Vec<_>, _>>()?;
    store::insert_events(conn, &events)
}

/// Whether diesel has a transaction open on `conn`. Reads diesel's own
/// bookkeeping: no round trip.
fn ensure_in_transaction(conn: &mut PgConnection) -> QueryResult<()> {
    match AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth()? {
        Some(_) => Ok(()),
        None => Err(Error::NotInTransaction.into()),
    }
}
