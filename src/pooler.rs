//! Running behind a connection pooler in transaction mode (PgBouncer's
//! `pool_mode = transaction`).

use diesel::connection::{CacheSize, Connection};
use diesel::r2d2::CustomizeConnection;
use diesel::PgConnection;

/// Turns off diesel's prepared-statement cache on every connection a pool
/// hands out: what a connection through a transaction-mode pooler needs.
///
/// Diesel caches statements as named prepared statements, which live on
/// one server connection; a transaction-mode pooler (PgBouncer before
/// 1.21, or with `max_prepared_statements = 0`) moves the client to
/// another server connection after each transaction, where the name is
/// unknown or taken by another client ("prepared statement
/// \"__diesel_stmt_0\" already exists"). Without the cache, diesel sends
/// each statement with its parameters in one message, which any pooler
/// passes through. The cost: the server parses and plans every statement
/// (docs/operations.md has the numbers).
///
/// Give it to the relay's pool, and to your application's pool if it
/// publishes through the pooler; the relay's `listen` URL must point past
/// the pooler (a transaction-mode pooler drops `LISTEN` registrations).
///
/// ```no_run
/// use diesel::r2d2::{ConnectionManager, Pool};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::builder()
///     .connection_customizer(Box::new(outbox::NoStatementCache))
///     .build(ConnectionManager::new("postgres://app@pgbouncer:6432/app"))?;
/// let relay = outbox::Relay::builder(pool)
///     .listen("postgres://app@db:5432/app") // direct: LISTEN needs a session
///     .route("*", |_: &outbox::StoredEvent| Ok(()))
///     .start()?;
/// # Ok(()) }
/// ```
///
/// For a single connection: `conn.set_prepared_statement_cache_size(
/// diesel::connection::CacheSize::Disabled)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoStatementCache;

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for NoStatementCache {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        Ok(())
    }
}
