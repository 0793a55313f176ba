//! `outbox::migrate`: idempotent, concurrent-safe, and invisible to the host
//! application's own diesel migrations.

use std::sync::{Arc, Barrier};

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};

use crate::common::count;
use crate::pg;

/// The migrations in `migrations/`, all applied by a first `migrate`.
const MIGRATIONS: usize = 6;

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
            "20261202000004",
            "20261207000005",
            "20261207000006"
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
            "20261202000004",
            "20261207000005",
            "20261207000006"
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
        r#"relation "outbox.pending" does not exist"#
    );
}

#[test]
fn an_up_to_date_migrate_needs_only_read_access() {
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

/// A database at migration 000004 (the queue before subscriptions), as
/// `outbox::migrate` of that release left it.
fn database_at_000004() -> pg::TestDb {
    let db = pg::empty_db();
    let mut conn = db.conn();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
    conn.transaction(|conn| {
        conn.batch_execute(
            "CREATE SCHEMA outbox;
             CREATE TABLE outbox.__diesel_schema_migrations (
                 version VARCHAR(50) PRIMARY KEY NOT NULL,
                 run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        )?;
        for name in [
            "2026-11-28-000001_create_outbox",
            "2026-11-28-000002_wake_on_demand",
            "2026-11-28-000003_defer_blocked_keys",
            "2026-12-02-000004_settle_wakes_successors",
        ] {
            let sql = std::fs::read_to_string(format!("{dir}/{name}/up.sql")).unwrap();
            conn.batch_execute(&sql)?;
            let version: String = name.chars().filter(char::is_ascii_digit).collect();
            conn.batch_execute(&format!(
                "INSERT INTO outbox.__diesel_schema_migrations (version) VALUES ('{version}')"
            ))?;
        }
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    db
}

/// Inserts a row into the old queue; returns (id, due time).
fn old_event(
    conn: &mut PgConnection,
    key: Option<&str>,
    columns: &str,
    values: &str,
) -> (i64, chrono::DateTime<chrono::Utc>) {
    #[derive(QueryableByName)]
    struct Inserted {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        available_at: chrono::DateTime<chrono::Utc>,
    }
    let sep = if columns.is_empty() { "" } else { ", " };
    let row = diesel::sql_query(format!(
        "INSERT INTO outbox.events (topic, key, payload{sep}{columns})
         VALUES ('t', $1, '{{}}'{sep}{values})
         RETURNING id, available_at"
    ))
    .bind::<diesel::sql_types::Nullable<Text>, _>(key)
    .get_result::<Inserted>(conn)
    .unwrap();
    (row.id, row.available_at)
}

#[test]
fn a_queue_at_000004_upgrades_and_every_event_is_delivered_once_in_key_order() {
    use std::collections::HashMap;
    use std::sync::Mutex;

    let db = database_at_000004();
    let mut conn = db.conn();
    // What a running 000004 system holds: queued, retrying, delayed and
    // in-flight events, events deferred behind an earlier one of their key,
    // and dead letters (with ids above the events').
    let (q1, _) = old_event(&mut conn, Some("a"), "", "");
    let (q2, _) = old_event(&mut conn, None, "", "");
    let (r1, _) = old_event(
        &mut conn,
        Some("b"),
        "attempts, last_error, available_at",
        "2, 'timeout', now() - interval '1 second'",
    );
    let (d1, d1_due) = old_event(
        &mut conn,
        None,
        "available_at",
        "now() + interval '2 seconds'",
    );
    let (f1, _) = old_event(
        &mut conn,
        Some("c"),
        "attempts, claimed_by, claim_token, available_at",
        "1, 'old-relay', 77, now() + interval '30 seconds'",
    );
    let (a2, _) = old_event(
        &mut conn,
        Some("a"),
        "deferred, available_at",
        "true, now() + interval '90 seconds'",
    );
    let (b2, _) = old_event(
        &mut conn,
        Some("b"),
        "deferred, available_at",
        "true, now() + interval '90 seconds'",
    );
    let (c2, _) = old_event(
        &mut conn,
        Some("c"),
        "deferred, available_at",
        "true, now() + interval '90 seconds'",
    );
    let (e1, e1_due) = old_event(
        &mut conn,
        Some("e"),
        "available_at",
        "now() + interval '2 seconds'",
    );
    // Due, not deferred yet, but behind the delayed e1 of its key.
    let (e2, _) = old_event(&mut conn, Some("e"), "", "");
    conn.batch_execute(
        "INSERT INTO outbox.dead_letters (id, topic, key, payload, headers, created_at, attempts, last_error)
         VALUES (500, 't', 'a', '{}', '{}', now(), 3, 'gave up'),
                (501, 't', NULL, '{}', '{}', now(), 1, 'permanent failure: no')",
    )
    .unwrap();

    assert_eq!(outbox::migrate(&mut conn).unwrap(), 2, "000005 and 000006");

    // Everything is owed to the default subscription, as it was queued.
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Delivery {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        reason: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempts: i32,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        last_error: Option<String>,
        #[diesel(sql_type = Text)]
        due: String,
    }
    let queued = diesel::sql_query(
        "SELECT id, reason, attempts, last_error,
                CASE WHEN available_at = 'infinity' THEN 'infinity'
                     WHEN available_at <= now() THEN 'now' ELSE 'later' END AS due
           FROM outbox.deliveries WHERE subscription = 'default' ORDER BY seq",
    )
    .load::<Delivery>(&mut conn)
    .unwrap();
    let row = |id, reason: &str, attempts, last_error: Option<&str>, due: &str| Delivery {
        id,
        reason: reason.to_owned(),
        attempts,
        last_error: last_error.map(str::to_owned),
        due: due.to_owned(),
    };
    assert_eq!(
        queued,
        [
            row(q1, "queued", 0, None, "now"),
            row(q2, "queued", 0, None, "now"),
            row(r1, "retry", 2, Some("timeout"), "now"),
            row(d1, "delayed", 0, None, "later"),
            row(f1, "queued", 1, None, "now"),
            row(a2, "blocked", 0, None, "infinity"),
            row(b2, "blocked", 0, None, "infinity"),
            row(c2, "blocked", 0, None, "infinity"),
            row(e1, "delayed", 0, None, "later"),
            row(e2, "blocked", 0, None, "infinity"),
        ]
    );
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Letter {
        #[diesel(sql_type = Text)]
        subscription: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let letters = || {
        diesel::sql_query("SELECT subscription, id FROM outbox.dead_letters ORDER BY id")
            .load::<Letter>(&mut db.conn())
            .unwrap()
    };
    let kept = [
        Letter {
            subscription: "default".into(),
            id: 500,
        },
        Letter {
            subscription: "default".into(),
            id: 501,
        },
    ];
    assert_eq!(letters(), kept);

    // Events published after the upgrade go on from there: ids above every
    // old one (dead letters included), and behind the old events of their
    // key.
    let new: Vec<i64> = outbox::transaction(&mut conn, |tx| {
        tx.publish_events([
            outbox::NewEvent::dynamic("t", serde_json::json!({})).key("a"),
            outbox::NewEvent::dynamic("t", serde_json::json!({})),
        ])
    })
    .unwrap()
    .into_iter()
    .map(|id| id.get())
    .collect();
    assert!(new.iter().all(|id| *id > 501), "{new:?}");

    // A relay delivers every one of them once, in key order, the delayed
    // ones not before their time.
    type Call = (
        i64,
        Option<String>,
        i32,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
    );
    let calls: std::sync::Arc<Mutex<Vec<Call>>> = Default::default();
    let log = calls.clone();
    let (observer, signals) = crate::relay_support::recorder();
    let relay = outbox::Relay::builder(crate::relay_support::pool(&db))
        .listen(db.url())
        .observer(observer)
        .poll_interval(std::time::Duration::from_millis(100))
        .route("*", move |e: &outbox::StoredEvent| {
            log.lock().unwrap().push((
                e.id.get(),
                e.key.clone(),
                e.attempts,
                e.last_error.clone(),
                chrono::Utc::now(),
            ));
            Ok(())
        })
        .start()
        .unwrap();
    signals.delivered(12);
    relay.shutdown(crate::relay_support::PATIENCE).unwrap();

    let calls = calls.lock().unwrap().clone();
    let mut ids: Vec<i64> = calls.iter().map(|c| c.0).collect();
    ids.sort();
    let mut expected = vec![q1, q2, r1, d1, f1, a2, b2, c2, e1, e2, new[0], new[1]];
    expected.sort();
    assert_eq!(ids, expected, "each event delivered exactly once");
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (id, key, ..) in &calls {
        if let Some(key) = key {
            per_key.entry(key.clone()).or_default().push(*id);
        }
    }
    assert_eq!(per_key["a"], [q1, a2, new[0]]);
    assert_eq!(per_key["b"], [r1, b2]);
    assert_eq!(per_key["c"], [f1, c2]);
    assert_eq!(per_key["e"], [e1, e2]);
    let call = |id| calls.iter().find(|c| c.0 == id).unwrap().clone();
    // The retry and the one in flight keep their attempts and error.
    assert_eq!((call(r1).2, call(r1).3), (3, Some("timeout".to_owned())));
    assert_eq!((call(f1).2, call(f1).3), (2, None));
    assert_eq!(call(q1).2, 1);
    assert!(call(d1).4 >= d1_due, "{:?} before {d1_due}", call(d1).4);
    assert!(call(e1).4 >= e1_due, "{:?} before {e1_due}", call(e1).4);
    assert!(call(e2).4 >= e1_due);
    assert_eq!(crate::common::pending(&mut conn), 0);
    assert_eq!(letters(), kept);
}
