//! The roles of docs/security.md, created for real: a publisher that can
//! only insert events, a relay that cannot touch business tables, an
//! operator for the CLI's status and dead-letter commands. Roles are
//! cluster-wide, so their names carry the test database's name.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use outbox::{DeliveryError, StoredEvent};

use crate::common::{count, create_orders, insert_order};
use crate::pg;
use crate::relay_support::{recorder, Signal, PATIENCE};

/// The grants of docs/security.md, role by role. `{role}` is replaced by
/// the role's name. A table the document lists that this schema version
/// does not have yet is skipped (see [`grant`]).
const PUBLISHER: &[&str] = &[
    "GRANT USAGE ON SCHEMA outbox TO {role}",
    "GRANT INSERT ON outbox.events TO {role}",
    // The library's insert says RETURNING id.
    "GRANT SELECT (id) ON outbox.events TO {role}",
];
const RELAY: &[&str] = &[
    "GRANT USAGE ON SCHEMA outbox TO {role}",
    // The log is read, never written: cursors move instead.
    "GRANT SELECT ON outbox.events TO {role}",
    // A relay registers its subscription (outbox.subscribe).
    "GRANT SELECT, INSERT, UPDATE ON outbox.subscriptions TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON outbox.cursors TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.deliveries TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON outbox.dead_letters TO {role}",
    "GRANT USAGE ON SEQUENCE outbox.claim_tokens TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON outbox.relay_wakeup TO {role}",
    // The command-line relay's --drain and metrics read what is owed.
    "GRANT SELECT ON outbox.pending TO {role}",
    // The claim reads the log segment by segment, and outbox.reclaim()
    // locks and truncates the segments all subscriptions have passed.
    "GRANT SELECT, TRUNCATE ON outbox.events_0 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_1 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_2 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_3 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_4 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_5 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_6 TO {role}",
    "GRANT SELECT, TRUNCATE ON outbox.events_7 TO {role}",
];
const OPERATOR: &[&str] = &[
    "GRANT USAGE ON SCHEMA outbox TO {role}",
    "GRANT SELECT, INSERT ON outbox.events TO {role}",
    // Status reads what every subscription still owes.
    "GRANT SELECT ON outbox.pending TO {role}",
    // Listing and removing subscriptions.
    "GRANT SELECT, DELETE ON outbox.subscriptions TO {role}",
    // Replay sends dead letters back to their subscription.
    "GRANT SELECT, INSERT ON outbox.deliveries TO {role}",
    // UPDATE: replay locks the rows it moves (SELECT … FOR UPDATE).
    "GRANT SELECT, UPDATE, DELETE ON outbox.dead_letters TO {role}",
];

/// Runs each grant, skipping one on a table this schema does not have
/// (a database migrated by an older release has no `outbox.relay_wakeup`).
fn grant(conn: &mut PgConnection, role: &str, grants: &[&str]) {
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        exists: bool,
    }
    for statement in grants {
        let table = statement
            .split(" ON ")
            .nth(1)
            .and_then(|rest| rest.split(" TO ").next())
            .map(|t| {
                t.trim_start_matches("SEQUENCE ")
                    .trim_start_matches("SCHEMA ")
            })
            .unwrap();
        let exists =
            diesel::sql_query("SELECT to_regclass($1) IS NOT NULL OR $1 = 'outbox' AS exists")
                .bind::<diesel::sql_types::Text, _>(table)
                .get_result::<Exists>(conn)
                .unwrap()
                .exists;
        if exists {
            conn.batch_execute(&statement.replace("{role}", role))
                .unwrap();
        }
    }
}

/// The test database and its roles; drops the database first (roles with
/// privileges in it cannot be dropped), then the roles, even on panic.
struct Bed {
    db: Option<pg::TestDb>,
    roles: Vec<String>,
}

impl Bed {
    fn new() -> Self {
        let db = pg::test_db();
        let roles: Vec<String> = ["publisher", "relay", "operator"]
            .iter()
            .map(|r| format!("{}_{r}", db.name()))
            .collect();
        let mut conn = db.conn();
        for role in &roles {
            conn.batch_execute(&format!("CREATE ROLE {role} LOGIN"))
                .unwrap();
        }
        create_orders(&mut conn);
        // The application's own grant: the publisher writes business rows.
        conn.batch_execute(&format!("GRANT INSERT ON orders TO {}", roles[0]))
            .unwrap();
        grant(&mut conn, &roles[0], PUBLISHER);
        grant(&mut conn, &roles[1], RELAY);
        grant(&mut conn, &roles[2], OPERATOR);
        Bed {
            db: Some(db),
            roles,
        }
    }

    fn url(&self, role: usize) -> String {
        pg::with_user(self.db.as_ref().unwrap().url(), &self.roles[role])
    }

    fn conn(&self, role: usize) -> PgConnection {
        PgConnection::establish(&self.url(role)).unwrap()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        drop(self.db.take());
        let mut admin = pg::admin();
        for role in &self.roles {
            let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {role}"));
        }
    }
}

fn denied(conn: &mut PgConnection, sql: &str) {
    let error = conn.batch_execute(sql).expect_err(sql);
    assert!(
        error.to_string().starts_with("permission denied for"),
        "{sql}: {error}"
    );
}

#[test]
fn a_publisher_can_only_insert_events() {
    let bed = Bed::new();
    let mut publisher = bed.conn(0);
    let id = outbox::transaction(&mut publisher, |tx| {
        insert_order(tx.conn(), 1)?;
        tx.publish(&crate::common::approved(1))
    })
    .unwrap();
    assert_eq!(id.get(), 1);
    for sql in [
        "SELECT payload FROM outbox.events",
        "SELECT count(*) FROM outbox.events WHERE topic = 'x'",
        "UPDATE outbox.events SET payload = '{}'",
        "DELETE FROM outbox.events",
        "TRUNCATE outbox.events_0",
        "SELECT * FROM outbox.deliveries",
        "SELECT * FROM outbox.cursors",
        "SELECT * FROM outbox.pending",
        "SELECT * FROM outbox.dead_letters",
        "INSERT INTO outbox.dead_letters (subscription, id, topic, payload, headers, created_at, attempts, last_error) VALUES ('default', 9, 't', '{}', '{}', now(), 1, 'x')",
        "SELECT nextval('outbox.claim_tokens')",
    ] {
        denied(&mut publisher, sql);
    }
    assert!(outbox::status(&mut publisher).is_err());
    let mut admin = bed.db.as_ref().unwrap().conn();
    assert_eq!(count(&mut admin, "outbox.events"), 1);
}

#[test]
fn a_relay_role_delivers_retries_and_dead_letters_without_business_access() {
    let bed = Bed::new();
    let mut publisher = bed.conn(0);
    let ids = outbox::transaction(&mut publisher, |tx| {
        insert_order(tx.conn(), 1)?;
        tx.publish_events(
            (0..3).map(|n| outbox::NewEvent::dynamic("t", serde_json::json!({ "n": n }))),
        )
    })
    .unwrap();
    let mut relay_conn = bed.conn(1);
    denied(&mut relay_conn, "SELECT * FROM orders");

    let (observer, signals) = recorder();
    let pool = crate::relay_support::PgPool::builder()
        .max_size(4)
        .build_unchecked(diesel::r2d2::ConnectionManager::new(bed.url(1)));
    let relay = outbox::Relay::builder(pool)
        .listen(bed.url(1))
        .observer(observer)
        .poll_interval(Duration::from_millis(100))
        .backoff(outbox::Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(20),
            1.0,
            0.0,
        ))
        .route("t", |e: &StoredEvent| {
            match (e.payload["n"].as_i64(), e.attempts) {
                (Some(1), 1) => Err(DeliveryError::transient("try again")),
                (Some(2), _) => Err(DeliveryError::permanent("never")),
                _ => Ok(()),
            }
        })
        .start()
        .unwrap();
    let seen = signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Delivered { .. }))
            .count()
            == 2
            && s.iter().any(|s| matches!(s, Signal::Dead { .. }))
    });
    // Idle, it asks publishers for notifications: it may write the flag.
    crate::relay_wakeup::wait_for_flag(&mut bed.conn(0), true);
    relay.shutdown(PATIENCE).unwrap();
    let errors: Vec<_> = signals
        .0
        .try_iter()
        .chain(seen)
        .filter(|s| matches!(s, Signal::Error(_)))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let mut operator = bed.conn(2);
    let status = outbox::status(&mut operator).unwrap();
    assert_eq!((status.total.pending, status.total.dead_letters), (0, 1));
    let dead = outbox::dead_letters(&mut operator, None, None, None, 10).unwrap();
    assert_eq!(
        (dead[0].id, dead[0].last_error.as_str()),
        (ids[2], "permanent failure: never")
    );
    let replayed =
        outbox::replay_dead_letters(&mut operator, None, &outbox::Selection::All, 10, |_| {})
            .unwrap();
    assert_eq!(replayed, 1);
    // The operator reads the queue but has no business access either.
    denied(&mut operator, "SELECT * FROM orders");
}

#[cfg(feature = "cli")]
#[test]
fn the_command_line_relay_runs_as_the_relay_role() {
    let bed = Bed::new();
    let id = outbox::transaction(&mut bed.conn(0), |tx| {
        tx.publish_event(outbox::NewEvent::dynamic("t", serde_json::json!({})))
    })
    .unwrap();
    // `outbox relay` also reads the queue's counts (start check, gauges).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--sink",
            "stdout",
            "--drain",
            "--poll-interval",
            "100ms",
        ])
        .env("DATABASE_URL", bed.url(1))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // Ends with: a relay that may not VACUUM says so in a log line first.
    assert!(
        stderr.ends_with(
            "drained: delivered 1, retried 0, dead-lettered 0; 0 still pending (not due yet)\n"
        ),
        "{stderr}"
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["id"], id.get());
}
