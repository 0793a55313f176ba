//! Publishing: an event exists if and only if its transaction committed.

use std::collections::HashMap;
use std::time::Duration;

use diesel::prelude::*;
use serde::Serialize;

use crate::common::{approved, count, create_orders, insert_order, OrderApproved};
use crate::pg;

struct Bundle {
    db: pg::TestDb,
    conn: PgConnection,
}

fn setup() -> Bundle {
    let db = pg::test_db();
    let mut conn = db.conn();
    create_orders(&mut conn);
    Bundle { db, conn }
}

/// Asserts the transaction left nothing behind: no order, no event.
fn assert_nothing_written(conn: &mut PgConnection) {
    assert_eq!(count(conn, "orders"), 0, "business row leaked");
    assert_eq!(count(conn, "outbox.events"), 0, "event leaked");
}

#[test]
fn commit_writes_the_business_row_and_the_event_together() {
    let Bundle { db: _db, mut conn } = setup();
    let id = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 7)?;
        tx.publish(&approved(7))
    })
    .unwrap();

    assert_eq!(count(&mut conn, "orders"), 1);
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued.len(), 1);
    let event = &queued[0];
    assert_eq!(event.id, id);
    assert_eq!(event.topic, "order.approved");
    assert_eq!(event.key.as_deref(), Some("order-7"));
    assert_eq!(event.decode::<OrderApproved>().unwrap(), approved(7));
    assert!(event.headers.is_empty());
    assert_eq!(event.attempts, 0);
    assert_eq!(event.last_error, None);
    assert!(event.available_at <= chrono::Utc::now());
}

#[test]
fn rollback_discards_the_event_and_the_business_row() {
    let Bundle { db: _db, mut conn } = setup();
    let result: Result<(), outbox::Error> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 7)?;
        tx.publish(&approved(7))?;
        Err(outbox::Error::InvalidKey {
            reason: "the handler changed its mind",
        })
    });
    assert!(matches!(result, Err(outbox::Error::InvalidKey { .. })));
    assert_nothing_written(&mut conn);
}

#[test]
fn an_application_error_type_needs_only_from_diesel_error() {
    #[derive(Debug)]
    enum AppError {
        Db(diesel::result::Error),
        OutOfStock,
    }
    impl From<diesel::result::Error> for AppError {
        fn from(e: diesel::result::Error) -> Self {
            AppError::Db(e)
        }
    }

    let Bundle { db: _db, mut conn } = setup();
    let result: Result<(), AppError> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 1)?;
        tx.publish(&approved(1))?;
        Err(AppError::OutOfStock)
    });
    assert!(matches!(result, Err(AppError::OutOfStock)));
    assert_nothing_written(&mut conn);

    // A publish failure reaches the application as its own type, and the
    // typed cause is still recoverable.
    let result: Result<(), AppError> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 2)?;
        tx.publish_event(outbox::NewEvent::dynamic("", serde_json::json!({})))?;
        Ok(())
    });
    let Err(AppError::Db(db_error)) = result else {
        panic!("expected AppError::Db, got {result:?}");
    };
    assert!(matches!(
        outbox::Error::from(db_error),
        outbox::Error::InvalidTopic {
            reason: "empty",
            ..
        }
    ));
    assert_nothing_written(&mut conn);
}

#[test]
fn a_nested_transaction_rolls_back_to_its_savepoint_only() {
    let Bundle { db: _db, mut conn } = setup();
    let outer: Result<_, outbox::Error> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 1)?;
        let kept = tx.publish(&approved(1))?;
        let inner: Result<(), outbox::Error> = outbox::transaction(tx.conn(), |inner| {
            insert_order(inner.conn(), 2)?;
            inner.publish(&approved(2))?;
            Err(diesel::result::Error::RollbackTransaction.into())
        });
        assert!(inner.is_err());
        Ok(kept)
    });
    let kept = outer.unwrap();
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued.iter().map(|e| e.id).collect::<Vec<_>>(), [kept]);
    assert_eq!(count(&mut conn, "orders"), 1);
}

#[test]
fn publish_all_writes_many_events_in_order() {
    let Bundle { db: _db, mut conn } = setup();
    let events: Vec<OrderApproved> = (1..=10).map(approved).collect();
    let ids = outbox::transaction(&mut conn, |tx| tx.publish_all(&events)).unwrap();
    assert_eq!(ids.len(), 10);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let queued = outbox::queued_events(&mut conn, 100).unwrap();
    let stored: Vec<(outbox::EventId, OrderApproved)> =
        queued.iter().map(|e| (e.id, e.decode().unwrap())).collect();
    let expected: Vec<_> = ids.iter().copied().zip(events).collect();
    assert_eq!(stored, expected);
}

#[test]
fn publish_events_mixes_topics_keys_headers_and_delays() {
    let Bundle { db: _db, mut conn } = setup();
    let before = chrono::Utc::now();
    let ids = outbox::transaction(&mut conn, |tx| {
        tx.publish_events([
            outbox::NewEvent::typed(&approved(1)).without_key(),
            outbox::NewEvent::dynamic("audit.login", serde_json::json!({ "user": 42 }))
                .key("user-42")
                .header("traceparent", "00-abc-01")
                .header("content-type", "application/json"),
            outbox::NewEvent::typed(&approved(2)).delay(Duration::from_secs(3600)),
        ])
    })
    .unwrap();
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued.iter().map(|e| e.id).collect::<Vec<_>>(), ids);

    assert_eq!(queued[0].key, None);
    assert_eq!(queued[0].topic, "order.approved");

    assert_eq!(queued[1].topic, "audit.login");
    assert_eq!(queued[1].key.as_deref(), Some("user-42"));
    assert_eq!(queued[1].payload, serde_json::json!({ "user": 42 }));
    assert_eq!(
        queued[1].headers,
        outbox::Headers::from([
            ("content-type".to_owned(), "application/json".to_owned()),
            ("traceparent".to_owned(), "00-abc-01".to_owned()),
        ])
    );

    let delayed = queued[2].available_at - before;
    assert!(
        delayed >= chrono::Duration::seconds(3599) && delayed <= chrono::Duration::seconds(3660),
        "delayed by {delayed}"
    );
    assert_eq!(queued[2].key.as_deref(), Some("order-2"));
}

#[test]
fn one_invalid_event_in_a_batch_writes_none_of_it() {
    let Bundle { db: _db, mut conn } = setup();
    let result: Result<_, outbox::Error> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 1)?;
        Ok(tx.publish_events([
            outbox::NewEvent::typed(&approved(1)),
            outbox::NewEvent::dynamic("bad\ttopic", serde_json::json!(1)),
        ])?)
    });
    assert!(
        matches!(
            result,
            Err(outbox::Error::InvalidTopic {
                reason: "contains a control character",
                ..
            })
        ),
        "{result:?}"
    );
    assert_nothing_written(&mut conn);
}

#[test]
fn a_payload_that_fails_to_serialize_is_a_typed_error() {
    #[derive(Serialize)]
    struct Unserializable {
        // JSON object keys must be strings.
        by_pair: HashMap<(i32, i32), i32>,
    }
    impl outbox::Event for Unserializable {
        const TOPIC: &'static str = "broken";
    }

    let Bundle { db: _db, mut conn } = setup();
    let result: Result<_, outbox::Error> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 1)?;
        Ok(tx.publish(&Unserializable {
            by_pair: HashMap::from([((1, 2), 3)]),
        })?)
    });
    let Err(outbox::Error::Serialize(cause)) = result else {
        panic!("expected Error::Serialize, got {result:?}");
    };
    assert_eq!(cause.to_string(), "key must be a string");
    assert_nothing_written(&mut conn);
}

#[test]
fn a_payload_with_a_nul_character_is_a_typed_error() {
    let Bundle { db: _db, mut conn } = setup();
    let result: Result<_, outbox::Error> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 1)?;
        Ok(tx.publish(&OrderApproved {
            order_id: 1,
            email: "nul\u{0}@example.com".into(),
        })?)
    });
    assert!(
        matches!(result, Err(outbox::Error::NulInPayload)),
        "{result:?}"
    );
    assert_nothing_written(&mut conn);
}

#[test]
fn invalid_topics_are_typed_errors() {
    let Bundle { db: _db, mut conn } = setup();
    let long = "t".repeat(256);
    for (topic, reason) in [
        ("", "empty"),
        (long.as_str(), "longer than 255 bytes"),
        ("order\u{0}approved", "contains a control character"),
        ("order\napproved", "contains a control character"),
    ] {
        let result: Result<_, outbox::Error> = outbox::transaction(&mut conn, |tx| {
            insert_order(tx.conn(), 1)?;
            Ok(tx.publish_event(outbox::NewEvent::dynamic(topic, serde_json::json!({})))?)
        });
        match result {
            Err(outbox::Error::InvalidTopic { reason: got, .. }) => assert_eq!(got, reason),
            other => panic!("topic {topic:?}: expected InvalidTopic, got {other:?}"),
        }
        assert_nothing_written(&mut conn);
    }
}

#[test]
fn invalid_keys_and_headers_are_typed_errors() {
    let Bundle { db: _db, mut conn } = setup();
    let bad_key = outbox::NewEvent::typed(&approved(1)).key("a\u{0}b");
    let result: Result<_, outbox::Error> =
        outbox::transaction(&mut conn, |tx| Ok(tx.publish_event(bad_key)?));
    assert!(
        matches!(result, Err(outbox::Error::InvalidKey { .. })),
        "{result:?}"
    );

    let bad_header = outbox::NewEvent::typed(&approved(1)).header("", "x");
    let result: Result<_, outbox::Error> =
        outbox::transaction(&mut conn, |tx| Ok(tx.publish_event(bad_header)?));
    assert!(
        matches!(
            &result,
            Err(outbox::Error::InvalidHeader {
                reason: "empty name",
                ..
            })
        ),
        "{result:?}"
    );
    assert_nothing_written(&mut conn);
}

#[test]
fn a_panic_in_the_closure_rolls_back_and_keeps_the_connection_usable() {
    let Bundle { db, mut conn } = setup();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<(), outbox::Error> = outbox::transaction(&mut conn, |tx| {
            insert_order(tx.conn(), 1)?;
            tx.publish(&approved(1))?;
            panic!("handler bug");
        });
    }));
    let payload = outcome.expect_err("the panic must propagate");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"handler bug"));
    assert_nothing_written(&mut db.conn());

    // The connection left the transaction: this one commits for real.
    let id = outbox::transaction(&mut conn, |tx| tx.publish(&approved(2))).unwrap();
    let seen_elsewhere = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(
        seen_elsewhere.iter().map(|e| e.id).collect::<Vec<_>>(),
        [id]
    );
}

#[test]
fn a_connection_that_breaks_mid_transaction_writes_nothing() {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let Bundle { db, mut conn } = setup();
    let result: Result<_, outbox::Error> = outbox::transaction(&mut conn, |tx| {
        insert_order(tx.conn(), 1)?;
        let own = diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(tx.conn())?
            .pid;
        // Waits (up to 5 s) until the backend is gone.
        diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
            .bind::<diesel::sql_types::Integer, _>(own)
            .execute(&mut db.conn())?;
        Ok(tx.publish(&approved(1))?)
    });
    assert!(
        matches!(result, Err(outbox::Error::Database(_))),
        "{result:?}"
    );
    assert_nothing_written(&mut db.conn());
}

#[test]
fn a_batch_larger_than_one_statement_allows_is_split_in_one_transaction() {
    let Bundle { db: _db, mut conn } = setup();
    // 5 bind parameters a row: one statement holds at most 13,107 rows.
    let events: Vec<OrderApproved> = (0..25_000).map(approved).collect();
    let ids = outbox::transaction(&mut conn, |tx| tx.publish_all(&events)).unwrap();
    assert_eq!(ids.len(), 25_000);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(count(&mut conn, "outbox.events"), 25_000);
    let first = &outbox::queued_events(&mut conn, 1).unwrap()[0];
    assert_eq!(
        (first.id, first.decode::<OrderApproved>().unwrap()),
        (ids[0], approved(0))
    );
}

#[test]
fn a_panic_inside_a_nested_diesel_transaction_leaves_no_transaction_open() {
    let Bundle { db, mut conn } = setup();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<(), outbox::Error> = outbox::transaction(&mut conn, |tx| {
            tx.publish(&approved(1))?;
            tx.conn().transaction(|inner| {
                insert_order(inner, 1)?;
                panic!("bug inside a savepoint")
            })
        });
    }));
    assert!(outcome.is_err());
    assert_nothing_written(&mut db.conn());
    // A fresh top-level transaction commits: nothing was left open.
    let id = outbox::transaction(&mut conn, |tx| tx.publish(&approved(2))).unwrap();
    let seen = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(seen.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
}
