//! Bad databases: dropped under a running relay, never migrated, or not
//! there at all.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;

use crate::pg;
use crate::relay_support::{recorder, Signal, PATIENCE};

/// A pool that gives up on a checkout quickly, so that a relay whose
/// database is gone reports errors at a steady pace.
fn impatient_pool(url: &str) -> crate::relay_support::PgPool {
    Pool::builder()
        .max_size(4)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(500))
        .build_unchecked(ConnectionManager::<PgConnection>::new(url))
}

fn errors(signals: &[Signal]) -> Vec<&str> {
    signals
        .iter()
        .filter_map(|s| match s {
            Signal::Error(e) => Some(e.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_relay_whose_database_is_dropped_keeps_retrying_and_shuts_down_cleanly() {
    let db = pg::test_db();
    let (observer, signals) = recorder();
    let relay = outbox::Relay::builder(impatient_pool(db.url()))
        .listen(db.url())
        .observer(observer)
        .poll_interval(Duration::from_millis(100))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let id = outbox::transaction(&mut db.conn(), |tx| {
        tx.publish_event(outbox::NewEvent::dynamic("t", serde_json::json!({})))
    })
    .unwrap();
    assert_eq!(signals.delivered(1), [id]);

    pg::admin()
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db.name()))
        .unwrap();
    // Workers and listener report the loss and keep trying.
    let seen = signals.until(|s| errors(s).len() >= 4);
    for error in errors(&seen) {
        assert!(
            error.starts_with("database error")
                || error.starts_with("could not get a database connection from the pool")
                || error.starts_with("notification listener failed"),
            "{error}"
        );
    }
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_relay_on_an_unmigrated_database_reports_it_and_delivers_once_migrated() {
    let db = pg::empty_db();
    let (observer, signals) = recorder();
    let relay = outbox::Relay::builder(impatient_pool(db.url()))
        .observer(observer)
        .poll_interval(Duration::from_millis(100))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let seen = signals.until(|s| !errors(s).is_empty());
    assert_eq!(errors(&seen)[0], "database error");
    let mut conn = db.conn();
    outbox::migrate(&mut conn).unwrap();
    let id = outbox::transaction(&mut conn, |tx| {
        tx.publish_event(outbox::NewEvent::dynamic("t", serde_json::json!({})))
    })
    .unwrap();
    // The worker's retry delay grows to 5 s at most: well within PATIENCE.
    assert_eq!(signals.delivered(1), [id]);
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_relay_started_against_an_unreachable_database_reports_errors_and_stops() {
    let url = "postgres://postgres@127.0.0.1:1/nowhere";
    let (observer, signals) = recorder();
    let relay = outbox::Relay::builder(impatient_pool(url))
        .listen(url)
        .observer(observer)
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .expect("start() does not touch the database");
    let from_pool = "could not get a database connection from the pool";
    let seen = signals.until(|s| errors(s).contains(&from_pool));
    assert!(errors(&seen).iter().any(|e| e.starts_with(
        "notification listener failed: connection to server at \"127.0.0.1\", port 1 failed"
    )));
    relay.shutdown(PATIENCE).unwrap();
}
