//! `outbox::publish` and its forms on a connection inside the caller's own
//! diesel transaction: atomic with it, and refused outside one.

use diesel::prelude::*;

use crate::common::{approved, count, create_orders, insert_order, OrderApproved};
use crate::pg;

fn setup() -> (pg::TestDb, PgConnection) {
    let db = pg::test_db();
    let mut conn = db.conn();
    create_orders(&mut conn);
    (db, conn)
}

fn assert_refused(result: QueryResult<impl std::fmt::Debug>) {
    match result.map_err(outbox::Error::from) {
        Err(outbox::Error::NotInTransaction) => {}
        other => panic!("expected NotInTransaction, got {other:?}"),
    }
}

#[test]
fn inside_diesels_transaction_the_event_commits_with_the_business_row() {
    let (_db, mut conn) = setup();
    let id = conn
        .transaction(|conn| {
            insert_order(conn, 7)?;
            outbox::publish(conn, &approved(7))
        })
        .unwrap();
    assert_eq!(count(&mut conn, "orders"), 1);
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, id);
    assert_eq!(queued[0].decode::<OrderApproved>().unwrap(), approved(7));
}

#[test]
fn inside_diesels_transaction_a_rollback_discards_the_event_too() {
    let (_db, mut conn) = setup();
    let result: QueryResult<()> = conn.transaction(|conn| {
        insert_order(conn, 7)?;
        outbox::publish(conn, &approved(7))?;
        outbox::publish_all(conn, [&approved(8), &approved(9)])?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(result.is_err());
    assert_eq!(count(&mut conn, "orders"), 0);
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

#[test]
fn every_form_refuses_a_connection_outside_a_transaction_and_writes_nothing() {
    let (_db, mut conn) = setup();
    assert_refused(outbox::publish(&mut conn, &approved(1)));
    assert_refused(outbox::publish_all(&mut conn, [&approved(2)]));
    assert_refused(outbox::publish_event(
        &mut conn,
        outbox::NewEvent::dynamic("audit.login", serde_json::json!({ "user": 1 })),
    ));
    assert_refused(outbox::publish_events(
        &mut conn,
        [outbox::NewEvent::typed(&approved(3))],
    ));
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

#[test]
fn the_refusal_is_checked_before_the_event_so_it_wins_over_a_bad_topic() {
    let (_db, mut conn) = setup();
    assert_refused(outbox::publish_event(
        &mut conn,
        outbox::NewEvent::dynamic("", serde_json::json!(1)),
    ));
    // Inside a transaction the same event meets the topic check.
    let invalid = conn.transaction(|conn| {
        outbox::publish_event(conn, outbox::NewEvent::dynamic("", serde_json::json!(1)))
    });
    assert!(matches!(
        invalid.map_err(outbox::Error::from),
        Err(outbox::Error::InvalidTopic {
            reason: "empty",
            ..
        })
    ));
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

#[test]
fn nested_and_test_transactions_count_as_transactions() {
    let (_db, mut conn) = setup();
    // A savepoint inside a transaction: the inner rollback drops its event.
    let kept = conn
        .transaction(|conn| {
            let kept = outbox::publish(conn, &approved(1))?;
            let inner: QueryResult<()> = conn.transaction(|conn| {
                outbox::publish(conn, &approved(2))?;
                Err(diesel::result::Error::RollbackTransaction)
            });
            assert!(inner.is_err());
            Ok::<_, diesel::result::Error>(kept)
        })
        .unwrap();
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued.iter().map(|e| e.id).collect::<Vec<_>>(), [kept]);

    // diesel's test transaction (never committed) is a transaction too.
    conn.begin_test_transaction().unwrap();
    outbox::publish(&mut conn, &approved(3)).unwrap();
    assert_eq!(count(&mut conn, "outbox.events"), 2);
}

#[test]
fn a_raw_begin_is_invisible_to_diesel_and_refused() {
    let (_db, mut conn) = setup();
    diesel::sql_query("BEGIN").execute(&mut conn).unwrap();
    assert_refused(outbox::publish(&mut conn, &approved(1)));
    diesel::sql_query("ROLLBACK").execute(&mut conn).unwrap();
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}
