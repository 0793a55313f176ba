//! `outbox::migrate`: idempotent, concurrent-safe, and invisible to the host
//! application's own diesel migrations.

use std::sync::{Arc, Barrier};

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};

use crate::common::count;
use crate::pg;

/// The migrations in `migrations/`, all applied by a first `migrate`.
const MIGRATIONS: usize = 4;

fn app_migrations() -> FileBasedMigrations {
    FileBasedMigrations::from_path(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/app_migrations"
    ))
    .expect("app migrations")
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

fn versions(conn: &mut PgConnection, table: &str) -> Vec<String> {
    diesel::sql_query(format!("SELECT version FROM {table} ORDER BY version"))
        .load::<Version>(conn)
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect()
}

#[test]
fn migrate_applies_once_then_finds_nothing_to_do() {
    let db = pg::empty_db();
    let mut conn = db.conn();
    assert_eq!(outbox::migrate(&mut conn).unwrap(), MIGRATIONS);
    assert_eq!(outbox::migrate(&mut conn).unwrap(), 0);
    assert_eq!(count(&mut conn, "outbox.events"), 0);
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 0);
    assert_eq!(
        versions(&mut conn, "outbox.__diesel_schema_migrations"),
        [
            "20261128000001",
            "20261128000002",
            "20261128000003",
            "20261202000004"
        ]
    );
}

#[test]
fn concurrent_migrations_apply_exactly_once() {
    let db = Arc::new(pg::empty_db());
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (db, barrier) = (db.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut conn = db.conn();
                barrier.wait();
                outbox::migrate(&mut conn)
            })
        })
        .collect();
    let applied: Vec<usize> = handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("migrate failed under concurrency"))
        .collect();
    assert_eq!(
        applied.iter().sum::<usize>(),
        MIGRATIONS,
        "applied: {applied:?}"
    );
    assert_eq!(
        applied.iter().filter(|&&n| n > 0).count(),
        1,
        "applied: {applied:?}"
    );
    let mut conn = db.conn();
    assert_eq!(
        count(&mut conn, "outbox.__diesel_schema_migrations"),
        MIGRATIONS as i64
    );
}

#[test]
fn host_application_migrations_run_revert_and_redo_beside_outbox() {
    let db = pg::empty_db();
    let mut conn = db.conn();
    outbox::migrate(&mut conn).unwrap();

    // What `diesel migration run` does for the application.
    let applied = conn.run_pending_migrations(app_migrations()).unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(
        versions(&mut conn, "public.__diesel_schema_migrations"),
        ["20260101000000"]
    );
    assert_eq!(count(&mut conn, "public.orders"), 0);

    // `diesel migration redo`: revert, then run again.
    conn.revert_last_migration(app_migrations()).unwrap();
    assert!(conn.applied_migrations().unwrap().is_empty());
    conn.run_pending_migrations(app_migrations()).unwrap();
    // `diesel migration revert` once more must only touch the application.
    conn.revert_last_migration(app_migrations()).unwrap();
    assert!(diesel::sql_query("SELECT 1 FROM public.orders")
        .execute(&mut conn)
        .is_err());

    // Ours is untouched throughout, and still up to date.
    assert_eq!(
        versions(&mut conn, "outbox.__diesel_schema_migrations"),
        [
            "20261128000001",
            "20261128000002",
            "20261128000003",
            "20261202000004"
        ]
    );
    assert_eq!(outbox::migrate(&mut conn).unwrap(), 0);
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

#[test]
fn outbox_migrates_after_the_application_has_its_own_migrations() {
    let db = pg::empty_db();
    let mut conn = db.conn();
    conn.run_pending_migrations(app_migrations()).unwrap();
    assert_eq!(outbox::migrate(&mut conn).unwrap(), MIGRATIONS);
    assert_eq!(
        versions(&mut conn, "public.__diesel_schema_migrations"),
        ["20260101000000"]
    );
    assert!(conn
        .has_pending_migration(app_migrations())
        .map(|p| !p)
        .unwrap());
}

#[test]
fn migrate_inside_a_transaction_restores_the_search_path() {
    let db = pg::empty_db();
    let mut conn = db.conn();
    #[derive(QueryableByName)]
    struct Path {
        #[diesel(sql_type = Text)]
        search_path: String,
    }
    let before = diesel::sql_query("SHOW search_path")
        .get_result::<Path>(&mut conn)
        .unwrap()
        .search_path;
    conn.transaction(|conn| {
        outbox::migrate(conn).unwrap();
        let inside = diesel::sql_query("SHOW search_path")
            .get_result::<Path>(conn)
            .unwrap()
            .search_path;
        assert_eq!(inside, before);
        Ok::<_, diesel::result::Error>(())
    })
    .unwrap();
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

#[test]
fn queries_against_an_unmigrated_database_are_typed_errors() {
    let db = pg::empty_db();
    let mut conn = db.conn();
    let error = outbox::queued_events(&mut conn, 10).unwrap_err();
    let outbox::Error::Database(cause) = &error else {
        panic!("expected a database error, got {error:?}");
    };
    assert_eq!(
        cause.to_string(),
        r#"relation "outbox.events" does not exist"#
    );
}

#[test]
fn an_up_to_date_migrate_needs_only_read_access() {
    use diesel::connection::SimpleConnection;
    let db = pg::test_db();
    let role = format!("{}_app", db.name());
    db.conn()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA outbox TO {role};
             GRANT SELECT ON outbox.__diesel_schema_migrations TO {role};"
        ))
        .unwrap();
    // No CREATE on the database nor on the schema: only read access.
    let applied = PgConnection::establish(&pg::with_user(db.url(), &role))
        .map_err(outbox::Error::from)
        .and_then(|mut app| outbox::migrate(&mut app));
    drop(db);
    pg::admin()
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .unwrap();
    assert_eq!(applied.unwrap(), 0);
}
