//! Applying the embedded schema migrations.

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::{Connection, PgConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::{Error, Result};
use crate::store;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Creates or upgrades the `outbox` schema: the `outbox.events` and
/// `outbox.dead_letters` tables, their indexes, and the trigger that wakes
/// relays. Returns how many migrations it applied (0 when up to date).
///
/// - **Idempotent**: run it at every start-up.
/// - **Safe under concurrency**: processes that migrate at the same moment
///   queue on an advisory lock; one applies, the others find nothing to do.
/// - **Separate bookkeeping**: applied versions are recorded in
///   `outbox.__diesel_schema_migrations`, never in the application's own
///   `__diesel_schema_migrations`, so `diesel migration run / revert / redo`
///   for your own migrations keep working and never see ours.
/// - **All or nothing**: everything runs in one transaction (a savepoint if
///   `conn` is already in one).
/// - **Least privilege when up to date**: with nothing to apply it only
///   reads `outbox.__diesel_schema_migrations`, so an application role with
///   `USAGE` on schema `outbox` and `SELECT` on that table may call it at
///   start-up; applying migrations needs `CREATE` on the database (first
///   time) or on the schema.
///
/// ```no_run
/// let mut conn = <diesel::PgConnection as diesel::Connection>::establish("postgres://localhost/app")?;
/// outbox::migrate(&mut conn)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn migrate(conn: &mut PgConnection) -> Result<usize> {
    conn.transaction(|conn| {
        store::lock_migrations(conn)?;
        if up_to_date(conn)? {
            return Ok(0);
        }
        store::create_schema(conn)?;
        let previous_path = store::search_path(conn)?;
        // diesel's harness creates and reads its bookkeeping table through
        // the search path: point it at our schema only.
        store::set_local_search_path(conn, "outbox")?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(Error::Migration)?
            .len();
        // Restore explicitly: when `conn` was already in a transaction, a
        // local setting would otherwise outlive our savepoint.
        store::set_local_search_path(conn, &previous_path)?;
        if applied > 0 {
            tracing::info!(applied, "outbox schema migrated");
        }
        Ok(applied)
    })
}

/// Whether every embedded migration is recorded as applied, found without
/// any DDL (diesel's harness starts with `CREATE TABLE IF NOT EXISTS`,
/// which needs the CREATE privilege even when the table exists).
fn up_to_date(conn: &mut PgConnection) -> Result<bool> {
    let Some(applied) = store::applied_migrations(conn)? else {
        return Ok(false);
    };
    let embedded = MigrationSource::<Pg>::migrations(&MIGRATIONS).map_err(Error::Migration)?;
    Ok(embedded
        .iter()
        .all(|migration| applied.contains(&migration.name().version().to_string())))
}
