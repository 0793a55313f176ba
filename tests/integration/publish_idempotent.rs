//! Idempotent publish: a second publish of an idempotency key within its
//! window writes nothing and returns the first event's id, however the
//! publishers interleave.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text};

use crate::common::count;
use crate::pg;

fn approved(key: &str) -> outbox::NewEvent {
    outbox::NewEvent::dynamic("order.approved", serde_json::json!({ "order": 7 }))
        .idempotency_key(key)
}

fn publish(conn: &mut PgConnection, event: outbox::NewEvent) -> outbox::EventId {
    outbox::transaction(conn, |tx| tx.publish_event(event)).unwrap()
}

#[test]
fn a_second_publish_of_a_key_writes_nothing_and_returns_the_first_id() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let first = publish(&mut conn, approved("order-7-approved"));
    let again = publish(&mut conn, approved("order-7-approved"));
    let other = publish(&mut conn, approved("order-8-approved"));
    let plain = publish(
        &mut conn,
        outbox::NewEvent::dynamic("order.approved", serde_json::json!({})),
    );
    assert_eq!(again, first);
    assert_ne!(other, first);
    assert_eq!(count(&mut conn, "outbox.events"), 3);
    assert_eq!(count(&mut conn, "outbox.idempotency_keys"), 2);
    let queued: Vec<outbox::EventId> = outbox::queued_events(&mut conn, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(queued, [first, other, plain]);
}

#[test]
fn publish_all_maps_every_event_to_its_id_whatever_was_skipped() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let before = publish(&mut conn, approved("k1"));
    let ids = outbox::transaction(&mut conn, |tx| {
        tx.publish_events([
            outbox::NewEvent::dynamic("t", serde_json::json!(0)),
            approved("k1"), // taken before the batch
            approved("k2"),
            outbox::NewEvent::dynamic("t", serde_json::json!(3)),
            approved("k2"), // taken earlier in the batch
            approved("k3"),
        ])
    })
    .unwrap();
    assert_eq!(ids[1], before);
    assert_eq!(ids[4], ids[2]);
    let written: Vec<outbox::EventId> = [0, 2, 3, 5].iter().map(|&i| ids[i]).collect();
    let queued: Vec<outbox::EventId> = outbox::queued_events(&mut conn, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(queued, [vec![before], written].concat());
}

/// The backend pid of `conn`.
fn backend_pid(conn: &mut PgConnection) -> i32 {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .unwrap()
        .pid
}

/// Waits (polling the server, never guessing a time) until `pid` waits
/// for a lock.
fn until_waiting_for_a_lock(observer: &mut PgConnection, pid: i32) {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = Bool)]
        waiting: bool,
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = diesel::sql_query(
            "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) AS waiting
               FROM pg_stat_activity WHERE pid = $1",
        )
        .bind::<Integer, _>(pid)
        .get_result::<Waiting>(observer)
        .unwrap()
        .waiting;
        if waiting {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} never waited for a lock");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Two transactions publish one key at once: the second waits on the
/// first; `commit` decides whether the first commits or rolls back.
/// Returns (first's id, second's id, events in the log).
fn two_publishers_at_once(commit: bool) -> (outbox::EventId, outbox::EventId, i64) {
    let db = pg::test_db();
    let mut observer = db.conn();
    // The first publishes inside a transaction it keeps open until told.
    let (first_tx, first_rx) = mpsc::channel();
    let (decide_tx, decide_rx) = mpsc::channel::<bool>();
    let url = db.url().to_owned();
    let first = std::thread::spawn(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        let _ = conn.transaction(|conn| {
            let id = outbox::publish_event(conn, approved("once"))?;
            first_tx.send(id).unwrap();
            if decide_rx.recv().unwrap() {
                Ok(())
            } else {
                Err(diesel::result::Error::RollbackTransaction)
            }
        });
    });
    let first_id = first_rx.recv().unwrap();

    let (pid_tx, pid_rx) = mpsc::channel();
    let url = db.url().to_owned();
    let second = std::thread::spawn(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        pid_tx.send(backend_pid(&mut conn)).unwrap();
        publish(&mut conn, approved("once"))
    });
    let pid = pid_rx.recv().unwrap();
    until_waiting_for_a_lock(&mut observer, pid);
    decide_tx.send(commit).unwrap();
    first.join().unwrap();
    let second_id = second.join().unwrap();
    (first_id, second_id, count(&mut observer, "outbox.events"))
}

#[test]
fn of_two_publishers_at_once_the_second_waits_and_gets_the_first_id() {
    let (first, second, events) = two_publishers_at_once(true);
    assert_eq!(second, first);
    assert_eq!(events, 1);
}

#[test]
fn when_the_first_publisher_rolls_back_the_second_writes_its_own() {
    let (first, second, events) = two_publishers_at_once(false);
    assert_ne!(second, first);
    assert_eq!(events, 1, "only the second's event");
}

#[test]
fn after_the_window_the_key_publishes_again_and_expired_keys_are_deleted() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let first = publish(&mut conn, approved("k"));
    conn.batch_execute(
        "UPDATE outbox.idempotency_keys SET expires_at = now() - interval '1 second'",
    )
    .unwrap();
    let second = publish(&mut conn, approved("k"));
    assert_ne!(second, first, "a new event once the window ended");
    assert_eq!(
        publish(&mut conn, approved("k")),
        second,
        "and a new window"
    );
    conn.batch_execute(
        "UPDATE outbox.idempotency_keys SET expires_at = now() - interval '1 second';
         INSERT INTO outbox.idempotency_keys (key, event_id) VALUES ('fresh', 0);",
    )
    .unwrap();
    #[derive(QueryableByName)]
    struct Expired {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    let expired = diesel::sql_query("SELECT outbox.expire_idempotency_keys() AS n")
        .get_result::<Expired>(&mut conn)
        .unwrap()
        .n;
    assert_eq!(expired, 1);
    assert_eq!(
        count(&mut conn, "outbox.idempotency_keys"),
        1,
        "the fresh one stays"
    );
}

#[test]
fn a_plain_sql_publisher_claims_the_key_and_writes_in_one_statement() {
    let db = pg::test_db();
    let mut conn = db.conn();
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    // As docs/schema.md writes it.
    let insert = "WITH k AS (INSERT INTO outbox.idempotency_keys (key) VALUES ($1)
                             ON CONFLICT (key) DO NOTHING RETURNING event_id)
                  INSERT INTO outbox.events (id, topic, payload)
                  SELECT event_id, 'order.approved', '{\"order\": 7}' FROM k RETURNING id";
    let first: Vec<Id> = diesel::sql_query(insert)
        .bind::<Text, _>("sql-key")
        .load(&mut conn)
        .unwrap();
    let again: Vec<Id> = diesel::sql_query(insert)
        .bind::<Text, _>("sql-key")
        .load(&mut conn)
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(again.is_empty(), "nothing written the second time");
    let taken = diesel::sql_query(
        "SELECT event_id AS id FROM outbox.idempotency_keys WHERE key = 'sql-key'",
    )
    .get_result::<Id>(&mut conn)
    .unwrap();
    assert_eq!(taken.id, first[0].id);
    // The Rust API sees the same key, and ids keep coming from the log's
    // own sequence.
    assert_eq!(publish(&mut conn, approved("sql-key")).get(), first[0].id);
    let plain = publish(
        &mut conn,
        outbox::NewEvent::dynamic("t", serde_json::json!({})),
    );
    // Each publish of a taken key draws an id it does not use.
    assert_eq!(plain.get(), first[0].id + 3);
    assert_eq!(count(&mut conn, "outbox.events"), 2);
}

#[test]
fn a_bad_key_is_a_typed_error_and_writes_nothing() {
    let db = pg::test_db();
    let mut conn = db.conn();
    for (key, reason) in [
        (String::new(), "empty"),
        ("k".repeat(256), "longer than 255 bytes"),
        ("a\0b".to_owned(), "contains a NUL character"),
    ] {
        let error = outbox::transaction(&mut conn, |tx| tx.publish_event(approved(&key)))
            .map_err(outbox::Error::from)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("invalid idempotency key: {reason}")
        );
    }
    assert_eq!(count(&mut conn, "outbox.events"), 0);
    assert_eq!(count(&mut conn, "outbox.idempotency_keys"), 0);
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_publishes_once_per_key() {
    use crate::cli::{outbox, stderr};
    let db = pg::test_db();
    let args = [
        "publish",
        "--topic",
        "order.approved",
        "--idempotency-key",
        "order-7-approved",
        "--payload",
        "{}",
    ];
    let first = outbox(db.url(), &args);
    let again = outbox(db.url(), &args);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(first.stdout, again.stdout);
    assert_eq!(count(&mut db.conn(), "outbox.events"), 1);
}
