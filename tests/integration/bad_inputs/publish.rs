//! Bad payloads, topics and schedules on the way in, through the library
//! and through plain SQL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Datelike, SubsecRound, TimeZone, Utc};
use diesel::prelude::*;

use crate::common::{count, pending};
use crate::pg;
use crate::relay_support::{setup, Signal, PATIENCE};

fn publish(conn: &mut PgConnection, event: outbox::NewEvent) -> outbox::Result<outbox::EventId> {
    outbox::transaction(conn, |tx| tx.publish_event(event)).map_err(outbox::Error::from)
}

#[test]
fn a_50_mb_payload_is_stored_and_delivered_whole() {
    let bed = setup();
    let blob = "x".repeat(50 << 20);
    let received: Arc<Mutex<Option<usize>>> = Arc::default();
    let seen = received.clone();
    let relay = bed
        .relay()
        .route("*", move |e: &outbox::StoredEvent| {
            let text = e.payload["blob"].as_str().unwrap_or_default();
            let whole = text.len() == 50 << 20 && text.bytes().all(|b| b == b'x');
            *seen.lock().unwrap() = Some(if whole { text.len() } else { 0 });
            Ok(())
        })
        .start()
        .unwrap();
    let id = publish(
        &mut bed.conn(),
        outbox::NewEvent::dynamic("big", serde_json::json!({ "blob": blob })),
    )
    .unwrap();
    assert_eq!(bed.signals.delivered(1), [id]);
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(*received.lock().unwrap(), Some(50 << 20));
    assert_eq!(pending(&mut bed.conn()), 0);
}

/// `depth` nested arrays around `1`.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]))
}

#[test]
fn a_payload_nested_deeper_than_the_relay_reads_is_refused_and_the_deepest_readable_is_delivered() {
    let bed = setup();
    let mut conn = bed.conn();
    let too_deep = publish(
        &mut conn,
        outbox::NewEvent::dynamic("deep", nested(outbox::MAX_PAYLOAD_DEPTH + 1)),
    );
    assert!(
        matches!(too_deep, Err(outbox::Error::PayloadTooDeep { limit: 127 })),
        "{too_deep:?}"
    );
    assert_eq!(count(&mut conn, "outbox.events"), 0);

    let relay = bed
        .relay()
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let id = publish(
        &mut conn,
        outbox::NewEvent::dynamic("deep", nested(outbox::MAX_PAYLOAD_DEPTH)),
    )
    .unwrap();
    assert_eq!(bed.signals.delivered(1), [id]);
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_payload_nested_too_deep_by_plain_sql_is_dead_lettered_with_the_reason() {
    let bed = setup();
    let relay = bed
        .relay()
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let deep = "[".repeat(1000) + &"]".repeat(1000);
    // A readable event beside it, delivered as usual.
    diesel::sql_query(format!(
        "INSERT INTO outbox.events (topic, payload) VALUES ('deep', '{deep}'), ('t', '{{}}')"
    ))
    .execute(&mut bed.conn())
    .unwrap();
    // The unreadable one is dead-lettered like any other: its hook fires
    // (with the raw payload text, since it cannot be parsed).
    let seen = bed.signals.until(|s| {
        s.iter().any(|s| matches!(s, Signal::Delivered { .. }))
            && s.iter().any(|s| matches!(s, Signal::Dead { .. }))
    });
    assert!(
        seen.iter().any(|s| matches!(s, Signal::Dead { id, error }
            if id.get() == 1 && error.starts_with("unreadable event: payload is valid jsonb"))),
        "{seen:#?}"
    );
    assert_eq!(relay.stats().dead_lettered, 1);
    relay.shutdown(PATIENCE).unwrap();
    let letters = crate::relay_support::dead_letters(&mut bed.conn());
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].0, letters[0].2, letters[0].3.as_str()),
        (
            1,
            1,
            "unreadable event: payload is valid jsonb but not readable here: \
             recursion limit exceeded at line 1 column 128"
        )
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_10000_character_topic_is_refused_by_the_library_and_by_the_table() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let topic = "t".repeat(10_000);
    let result = publish(
        &mut conn,
        outbox::NewEvent::dynamic(&topic, serde_json::json!({})),
    );
    let Err(outbox::Error::InvalidTopic {
        topic: shown,
        reason,
    }) = result
    else {
        panic!("expected InvalidTopic, got {result:?}");
    };
    assert_eq!(reason, "longer than 255 bytes");
    // The message quotes only the start of the topic.
    assert_eq!(shown, format!("{}…", "t".repeat(64)));
    let error = diesel::sql_query(format!(
        "INSERT INTO outbox.events (topic, payload) VALUES ('{topic}', '{{}}')"
    ))
    .execute(&mut conn)
    .unwrap_err();
    assert!(error.to_string().contains("events_topic_valid"), "{error}");
    assert_eq!(count(&mut conn, "outbox.events"), 0);
}

#[test]
fn an_event_due_in_the_far_future_waits_and_holds_back_its_key_only() {
    let bed = setup();
    let mut conn = bed.conn();
    let year_9999 = Utc.with_ymd_and_hms(9999, 12, 31, 0, 0, 0).unwrap();
    let later = publish(
        &mut conn,
        outbox::NewEvent::dynamic("t", serde_json::json!(1))
            .key("k")
            .available_at(year_9999),
    )
    .unwrap();
    let blocked = publish(
        &mut conn,
        outbox::NewEvent::dynamic("t", serde_json::json!(2)).key("k"),
    )
    .unwrap();
    let free = publish(
        &mut conn,
        outbox::NewEvent::dynamic("t", serde_json::json!(3)),
    )
    .unwrap();
    let relay = bed
        .relay()
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    // All three were committed before the relay started, so its first
    // claim saw them all and took only the free one.
    let seen = bed.signals.until(|s| s.len() >= 2);
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        seen[..2],
        [
            Signal::Claimed(vec![free]),
            Signal::Delivered {
                id: free,
                attempt: 1
            }
        ]
    );
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    let ids: Vec<_> = queued.iter().map(|e| (e.id, e.attempts)).collect();
    assert_eq!(ids, [(later, 0), (blocked, 0)]);
    assert_eq!(queued[0].available_at, year_9999);
    // The claim met the held-back event and parked it in outbox.deliveries
    // behind the far one, due when that one settles (so the next claims
    // do not read it again). If the far one is deleted or re-dated by hand,
    // it stays the head of its key: nothing needs a margin any more.
    assert_eq!(
        deliveries(&mut bed.conn()),
        [
            (later.get(), "delayed".to_owned(), year_9999.to_rfc3339()),
            (blocked.get(), "blocked".to_owned(), "infinity".to_owned()),
        ]
    );
    let status = outbox::status(&mut conn).unwrap();
    assert_eq!((status.total.scheduled, status.total.due_now), (2, 0));
}

#[test]
fn a_delay_beyond_the_calendar_is_stored_as_the_latest_representable_time() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let id = publish(
        &mut conn,
        outbox::NewEvent::dynamic("t", serde_json::json!({})).delay(Duration::MAX),
    )
    .unwrap();
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    assert_eq!(queued[0].id, id);
    // PostgreSQL keeps microseconds.
    assert_eq!(
        queued[0].available_at,
        DateTime::<Utc>::MAX_UTC.trunc_subsecs(6)
    );
    assert_eq!(queued[0].available_at.year(), 262_142);
    assert_eq!(outbox::status(&mut conn).unwrap().total.scheduled, 1);
}

/// The rows of `outbox.deliveries`, in queue order: (id, reason, due time
/// as RFC 3339, or `infinity`).
fn deliveries(conn: &mut diesel::PgConnection) -> Vec<(i64, String, String)> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        reason: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        due: String,
    }
    diesel::sql_query(
        "SELECT id, reason,
                CASE WHEN available_at = 'infinity' THEN 'infinity'
                     ELSE to_char(available_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')
                END AS due
           FROM outbox.deliveries ORDER BY seq",
    )
    .load::<Row>(conn)
    .unwrap()
    .into_iter()
    .map(|r| (r.id, r.reason, r.due))
    .collect()
}
