//! The statements `outbox::migrate` runs around diesel's migration harness.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

/// Serializes concurrent `outbox::migrate` calls: a transaction-scoped
/// advisory lock on a key no other part of the crate uses.
pub(crate) fn lock_migrations(conn: &mut PgConnection) -> QueryResult<()> {
    // "outbox" in ASCII: easy to recognise in pg_locks.
    const MIGRATION_LOCK_KEY: i64 = 0x6f75_7462_6f78;
    diesel::select(pg_advisory_xact_lock(MIGRATION_LOCK_KEY)).execute(conn)?;
    Ok(())
}

/// Creates the schema the migrations and their bookkeeping live in.
pub(crate) fn create_schema(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("CREATE SCHEMA IF NOT EXISTS outbox")
}

/// The session's `search_path`, to restore after migrating.
pub(crate) fn search_path(conn: &mut PgConnection) -> QueryResult<String> {
    diesel::select(current_setting("search_path")).get_result(conn)
}

/// Sets `search_path` until the end of the current transaction.
pub(crate) fn set_local_search_path(conn: &mut PgConnection, path: &str) -> QueryResult<()> {
    diesel::select(set_config("search_path", path, true)).execute(conn)?;
    Ok(())
}

diesel::define_sql_function! {
    /// Waits for an advisory lock held until the transaction ends.
    fn pg_advisory_xact_lock(key: diesel::sql_types::BigInt);
}

diesel::define_sql_function! {
    /// Reads a run-time setting.
    fn current_setting(name: diesel::sql_types::Text) -> diesel::sql_types::Text;
}

diesel::define_sql_function! {
    /// Sets a run-time setting; `is_local` limits it to the transaction.
    fn set_config(
        name: diesel::sql_types::Text,
        value: diesel::sql_types::Text,
        is_local: diesel::sql_types::Bool,
    ) -> diesel::sql_types::Text;
}
