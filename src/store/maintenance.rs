//! Keeping the relay's hot tables (`outbox.deliveries`, `outbox.cursors`)
//! small: the relay's own VACUUM, and finding what keeps VACUUM from
//! removing dead rows.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};

/// Whether this role may VACUUM `outbox.deliveries` (PostgreSQL 15: superuser,
/// the table's owner or the database's owner, or a member of theirs).
pub(crate) fn may_vacuum_events(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct May {
        #[diesel(sql_type = Bool)]
        may: bool,
    }
    diesel::sql_query(
        "SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
             OR pg_has_role(c.relowner, 'USAGE')
             OR pg_has_role(d.datdba, 'USAGE') AS may
           FROM pg_class c, pg_database d
          WHERE c.oid = 'outbox.deliveries'::regclass
            AND d.datname = current_database()",
    )
    .get_result::<May>(conn)
    .map(|row| row.may)
}

/// VACUUMs `outbox.deliveries` and `outbox.cursors` unless another VACUUM (autovacuum, another
/// relay) holds it: then it returns at once. Runs outside a transaction.
///
/// `TRUNCATE false`: giving empty pages at the end back to the file system
/// needs an exclusive lock, which VACUUM keeps trying to take for up to 5 s
/// while publishers insert (measured: 3.4 to 5 s per vacuum instead of
/// 60 ms). The free pages are reused by the next inserts anyway;
/// autovacuum still truncates when the table is quiet.
pub(crate) fn vacuum_queues(conn: &mut PgConnection) -> QueryResult<()> {
    diesel::sql_query("VACUUM (SKIP_LOCKED, TRUNCATE false) outbox.deliveries, outbox.cursors")
        .execute(conn)
        .map(drop)
}

/// Dead rows VACUUM could not remove yet, as of the last VACUUM or ANALYZE
/// (statistics, so approximate).
pub(crate) fn dead_rows_left(conn: &mut PgConnection) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Dead {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT coalesce(sum(n_dead_tup), 0)::bigint AS n FROM pg_stat_user_tables
          WHERE relid IN ('outbox.deliveries'::regclass, 'outbox.cursors'::regclass)",
    )
    .get_result::<Dead>(conn)
    .map(|row| row.n)
    .or_else(|error| match error {
        diesel::result::Error::NotFound => Ok(0),
        other => Err(other),
    })
}

/// The session of this database whose snapshot is the oldest: while it is
/// open, VACUUM keeps every row deleted after it began.
#[derive(QueryableByName, Debug)]
pub(crate) struct OldestSnapshot {
    #[diesel(sql_type = Integer)]
    pub(crate) pid: i32,
    /// In transactions: how many began since its snapshot was taken.
    #[diesel(sql_type = Integer)]
    pub(crate) xmin_age: i32,
    /// NULL unless this role may see the other session's details
    /// (`pg_read_all_stats`).
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) state: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) transaction_age: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) application_name: Option<String>,
}

/// The other session holding the oldest snapshot, if any.
pub(crate) fn oldest_snapshot(conn: &mut PgConnection) -> QueryResult<Option<OldestSnapshot>> {
    diesel::sql_query(
        "SELECT pid, age(backend_xmin) AS xmin_age, state,
                date_trunc('second', now() - xact_start)::text AS transaction_age,
                nullif(application_name, '') AS application_name
           FROM pg_stat_activity
          WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
            -- Only this database's sessions (and those of none, such as
            -- replication) hold back the vacuum of its tables.
            AND (datname = current_database() OR datname IS NULL)
          ORDER BY age(backend_xmin) DESC
          LIMIT 1",
    )
    .get_result::<OldestSnapshot>(conn)
    .optional()
}

/// Idempotency keys deleted per call of [`expire_idempotency_keys`].
pub(crate) const EXPIRE_KEYS_PER_CALL: i32 = 10_000;

/// Deletes up to [`EXPIRE_KEYS_PER_CALL`] idempotency keys whose window
/// ended (`outbox.expire_idempotency_keys`); returns how many.
pub(crate) fn expire_idempotency_keys(conn: &mut PgConnection) -> QueryResult<i32> {
    #[derive(diesel::QueryableByName)]
    struct Expired {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        expired: i32,
    }
    diesel::sql_query("SELECT outbox.expire_idempotency_keys($1) AS expired")
        .bind::<diesel::sql_types::Integer, _>(EXPIRE_KEYS_PER_CALL)
        .get_result::<Expired>(conn)
        .map(|row| row.expired)
}
