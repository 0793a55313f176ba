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

/// Creates the schema the migrations and their bookkeeping live in, unless
/// it exists: `CREATE SCHEMA IF NOT EXISTS` would demand the CREATE
/// privilege on the database at every start-up, even with nothing to do.
pub(crate) fn create_schema(conn: &mut PgConnection) -> QueryResult<()> {
    let exists: bool = diesel::select(diesel::dsl::exists(
        pg_namespace::table.filter(pg_namespace::nspname.eq("outbox")),
    ))
    .get_result(conn)?;
    if exists {
        return Ok(());
    }
    conn.batch_execute("CREATE SCHEMA outbox")
}

/// The versions recorded in `outbox.__diesel_schema_migrations`, or `None`
/// when that table does not exist yet. Reads only: no privilege beyond
/// `USAGE` on the schema and `SELECT` on the table.
pub(crate) fn applied_migrations(conn: &mut PgConnection) -> QueryResult<Option<Vec<String>>> {
    let exists: bool =
        diesel::select(to_regclass("outbox.__diesel_schema_migrations").is_not_null())
            .get_result(conn)?;
    if !exists {
        return Ok(None);
    }
    bookkeeping::table
        .select(bookkeeping::version)
        .load(conn)
        .map(Some)
}

diesel::define_sql_function! {
    /// The table's oid, or NULL when it does not exist (never an error).
    fn to_regclass(name: diesel::sql_types::Text) -> diesel::sql_types::Nullable<diesel::sql_types::Oid>;
}

diesel::table! {
    /// diesel's bookkeeping of our migrations, kept in our schema.
    outbox.__diesel_schema_migrations (version) {
        version -> VarChar,
    }
}

use __diesel_schema_migrations as bookkeeping;

diesel::table! {
    /// The system catalog of schemas.
    pg_catalog.pg_namespace (oid) {
        oid -> Oid,
        nspname -> Text,
    }
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
