//! The tables as a contract for other languages: plain SQL in, the library
//! reads it back; constraints reject what the library would; the trigger
//! wakes listeners once per statement.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::common::{approved, count, OrderApproved};
use crate::pg;

/// The statement `docs/schema.md` shows to publishers in other languages.
const PLAIN_INSERT: &str = "\
INSERT INTO outbox.events (topic, key, payload, headers)
VALUES ('order.approved', 'order-7',
        '{\"order_id\": 7, \"email\": \"customer7@example.com\"}',
        '{\"traceparent\": \"00-abc-01\"}')
RETURNING id";

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[test]
fn an_event_inserted_with_plain_sql_reads_back_through_the_library() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let id = diesel::sql_query(PLAIN_INSERT)
        .get_result::<Id>(&mut conn)
        .unwrap()
        .id;

    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued.len(), 1);
    let event = &queued[0];
    assert_eq!(event.id, outbox::EventId(id));
    assert_eq!(event.topic, "order.approved");
    assert_eq!(event.key.as_deref(), Some("order-7"));
    assert_eq!(event.decode::<OrderApproved>().unwrap(), approved(7));
    assert_eq!(event.headers["traceparent"], "00-abc-01");
    assert_eq!(event.attempts, 0);
    // Owed to the default subscription, the only one there is.
    assert_eq!(event.subscription, "default");
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Column {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    set_by: String,
}

#[test]
fn the_log_has_the_documented_columns_and_fills_in_what_publishers_leave_out() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let columns = diesel::sql_query(
        "SELECT column_name::text AS name,
                CASE WHEN is_generated = 'ALWAYS' THEN 'computed'
                     WHEN is_identity = 'YES' THEN 'identity'
                     WHEN column_default IS NOT NULL THEN 'default'
                     WHEN is_nullable = 'YES' THEN 'optional'
                     ELSE 'required' END AS set_by
           FROM information_schema.columns
          WHERE table_schema = 'outbox' AND table_name = 'events'
          ORDER BY ordinal_position",
    )
    .load::<Column>(&mut conn)
    .unwrap();
    let expected = [
        ("id", "identity"),
        ("topic", "required"),
        ("key", "optional"),
        ("payload", "required"),
        ("headers", "default"),
        ("created_at", "default"),
        ("available_at", "default"),
        ("tx", "default"),
        ("lane", "computed"),
    ]
    .map(|(name, set_by)| Column {
        name: name.to_owned(),
        set_by: set_by.to_owned(),
    });
    assert_eq!(columns, expected);
    // The queue's columns are gone: nothing updates a row of the log.
    for column in [
        "attempts",
        "last_error",
        "claimed_by",
        "claim_token",
        "deferred",
    ] {
        let error = diesel::sql_query(format!("SELECT {column} FROM outbox.events"))
            .execute(&mut conn)
            .expect_err(column);
        assert!(error.to_string().contains("does not exist"), "{error}");
    }
    // tx is the publishing transaction's, and lane follows the key.
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ok: bool,
    }
    let ok = conn
        .transaction(|conn| {
            diesel::sql_query(PLAIN_INSERT).execute(conn)?;
            diesel::sql_query(
                "SELECT bool_and(tx = pg_current_xact_id()
                                 AND lane = (hashtext(key) & 7)) AS ok
                   FROM outbox.events",
            )
            .get_result::<Row>(conn)
        })
        .unwrap()
        .ok;
    assert!(ok);
    let error =
        diesel::sql_query("INSERT INTO outbox.events (topic, payload, lane) VALUES ('t', '{}', 0)")
            .execute(&mut conn)
            .expect_err("lane is computed");
    assert!(error.to_string().contains("lane"), "{error}");
}

#[test]
fn constraints_reject_what_the_library_would() {
    let db = pg::test_db();
    let mut conn = db.conn();
    for (values, constraint) in [
        ("('t', NULL, '{}')", "null value in column \"payload\""),
        ("('', '{}', '{}')", "events_topic_valid"),
        ("(E't\\n', '{}', '{}')", "events_topic_valid"),
        ("('t', '{}', '[]')", "events_headers_string_map"),
        ("('t', '{}', '{\"n\": 1}')", "events_headers_string_map"),
        (
            "('t', '{}', '{\"a\": [\"x\"]}')",
            "events_headers_string_map",
        ),
        ("('t', '{}', '{\"a\": []}')", "events_headers_string_map"),
        ("('t', '{}', 'null')", "events_headers_string_map"),
    ] {
        let error = diesel::sql_query(format!(
            "INSERT INTO outbox.events (topic, payload, headers) VALUES {values}"
        ))
        .execute(&mut conn)
        .expect_err(values);
        assert!(error.to_string().contains(constraint), "{values}: {error}");
    }
    let error = diesel::sql_query(
        "INSERT INTO outbox.events (topic, payload) VALUES ('t', '{\"a\": \"\\u0000\"}')",
    )
    .execute(&mut conn)
    .expect_err("jsonb must reject NUL");
    assert!(
        error
            .to_string()
            .contains("unsupported Unicode escape sequence"),
        "{error}"
    );
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

/// The notifications `listener` has received so far.
fn notifications(listener: &mut PgConnection) -> Vec<(String, String)> {
    // Every commit happened before this point, so its notification is
    // already queued on the listener's connection (a round trip reads it).
    diesel::sql_query("SELECT 1").execute(listener).unwrap();
    listener
        .notifications_iter()
        .map(|n| n.unwrap())
        .map(|n| (n.channel, n.payload))
        .collect()
}

fn arm_wakeup(conn: &mut PgConnection, until: &str) {
    diesel::sql_query(format!(
        "INSERT INTO outbox.relay_wakeup (armed_until) VALUES ({until})
         ON CONFLICT (only_row) DO UPDATE SET armed_until = excluded.armed_until"
    ))
    .execute(conn)
    .unwrap();
}

#[test]
fn the_trigger_notifies_once_per_insert_statement_while_a_relay_is_asleep() {
    let db = pg::test_db();
    let mut listener = db.conn();
    diesel::sql_query(format!("LISTEN {}", outbox::NOTIFY_CHANNEL))
        .execute(&mut listener)
        .unwrap();
    let mut publisher = db.conn();
    let events: Vec<_> = (1..=10).map(approved).collect();

    // No relay has said it sleeps: publishers commit without notifying.
    outbox::transaction(&mut publisher, |tx| tx.publish_all(&events)).unwrap();
    assert_eq!(notifications(&mut listener), []);

    // A relay armed the flag: one empty notification per statement.
    arm_wakeup(&mut publisher, "now() + interval '1 minute'");
    outbox::transaction(&mut publisher, |tx| tx.publish_all(&events)).unwrap();
    outbox::transaction(&mut publisher, |tx| tx.publish(&approved(11))).unwrap();
    let expected = ("outbox_events".to_owned(), String::new());
    assert_eq!(notifications(&mut listener), [expected.clone(), expected]);

    // Expired (the relay that armed it died), or cleared (it woke up).
    arm_wakeup(&mut publisher, "now() - interval '1 second'");
    outbox::transaction(&mut publisher, |tx| tx.publish(&approved(12))).unwrap();
    arm_wakeup(&mut publisher, "NULL");
    outbox::transaction(&mut publisher, |tx| tx.publish(&approved(13))).unwrap();
    assert_eq!(notifications(&mut listener), []);
    assert_eq!(count(&mut publisher, "outbox.events"), 23);
}

#[test]
fn every_table_and_column_is_commented() {
    #[derive(QueryableByName, Debug)]
    #[allow(dead_code)] // read through Debug
    struct Uncommented {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let db = pg::test_db();
    let mut conn = db.conn();
    let missing = diesel::sql_query(
        "SELECT c.relname || coalesce('.' || a.attname, '') AS name
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          WHERE n.nspname = 'outbox'
            AND c.relname IN ('events', 'dead_letters', 'relay_wakeup')
            AND col_description(c.oid, coalesce(a.attnum, 0)) IS NULL
            AND (a.attnum IS NOT NULL OR obj_description(c.oid, 'pg_class') IS NULL)",
    )
    .load::<Uncommented>(&mut conn)
    .unwrap();
    assert!(missing.is_empty(), "uncommented: {missing:?}");
}

#[test]
fn the_deliveries_table_vacuums_after_a_fixed_number_of_dead_rows() {
    #[derive(QueryableByName)]
    struct Options {
        #[diesel(sql_type = Text)]
        options: String,
    }
    let db = pg::test_db();
    let mut conn = db.conn();
    // outbox.deliveries is the queue now (the log is insert-only and
    // reclaimed by TRUNCATE): it is vacuumed by a fixed count of dead rows.
    let options = diesel::sql_query(
        "SELECT array_to_string(reloptions, ',') AS options FROM pg_class
          WHERE oid = 'outbox.deliveries'::regclass",
    )
    .get_result::<Options>(&mut conn)
    .unwrap()
    .options;
    assert!(
        options.contains("autovacuum_vacuum_scale_factor=0"),
        "{options}"
    );
    assert!(
        options.contains("autovacuum_vacuum_threshold=1000"),
        "{options}"
    );
    assert!(
        options.contains("autovacuum_vacuum_cost_delay=0"),
        "{options}"
    );
}
