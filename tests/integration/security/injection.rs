//! Injection strings in topic, key, headers and payload are stored,
//! delivered, dead-lettered and replayed verbatim, and stay inert.

use std::sync::{Arc, Mutex};

use outbox::{DeliveryError, StoredEvent};

use crate::common::count;
use crate::relay_support::{Signal, PATIENCE};

/// Strings that would do damage if anything spliced them into SQL.
const TOPIC: &str = "order'; DROP TABLE outbox.events; --";
const KEY: &str = "k' OR '1'='1";
const HEADER: &str = "x-evil');DELETE FROM outbox.dead_letters;--";
const VALUE: &str = "'; TRUNCATE outbox.events, outbox.dead_letters; --";
const PAYLOAD_TEXT: &str = "'); DROP SCHEMA outbox CASCADE; --";

#[test]
fn injection_strings_are_stored_delivered_and_dead_lettered_verbatim() {
    let bed = crate::relay_support::setup();
    let mut conn = bed.conn();
    let event = || {
        outbox::NewEvent::dynamic(TOPIC, serde_json::json!({ "sql": PAYLOAD_TEXT }))
            .key(KEY)
            .header(HEADER, VALUE)
    };
    let ids = outbox::transaction(&mut conn, |tx| tx.publish_events([event(), event()])).unwrap();
    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    for stored in &queued {
        assert_eq!(
            (stored.topic.as_str(), stored.key.as_deref()),
            (TOPIC, Some(KEY))
        );
        assert_eq!(stored.headers[HEADER], VALUE);
        assert_eq!(stored.payload["sql"], PAYLOAD_TEXT);
    }

    // The first is delivered, the second fails for good; the prefix route
    // carries the quote into the claim's LIKE pattern.
    let received: Arc<Mutex<Vec<StoredEvent>>> = Arc::default();
    let seen = received.clone();
    let first = ids[0];
    let relay = bed
        .relay()
        .route("order'*", move |e: &StoredEvent| {
            seen.lock().unwrap().push(e.clone());
            if e.id == first {
                Ok(())
            } else {
                Err(DeliveryError::permanent(VALUE))
            }
        })
        .start()
        .unwrap();
    bed.signals.until(|s| {
        s.iter().any(|s| matches!(s, Signal::Delivered { .. }))
            && s.iter().any(|s| matches!(s, Signal::Dead { .. }))
    });
    relay.shutdown(PATIENCE).unwrap();
    let received = received.lock().unwrap();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].payload, queued[0].payload);
    assert_eq!(received[0].headers, queued[0].headers);

    let dead = outbox::dead_letters(&mut conn, None, Some(TOPIC), None, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].id,
            dead[0].key.as_deref(),
            dead[0].last_error.as_str()
        ),
        (
            ids[1],
            Some(KEY),
            format!("permanent failure: {VALUE}").as_str()
        )
    );
    assert_eq!(dead[0].headers[HEADER], VALUE);
    let replayed = outbox::replay_dead_letters(
        &mut conn,
        None,
        &outbox::Selection::Topic(TOPIC.into()),
        10,
        |_| {},
    )
    .unwrap();
    assert_eq!(replayed, 1);
    // Inert: every table is still there, holding exactly what it should:
    // the log both events, the replayed one owed again, no dead letter.
    assert_eq!(count(&mut conn, "outbox.events"), 2);
    let owed: Vec<_> = outbox::queued_events(&mut conn, 10)
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.topic, e.key))
        .collect();
    assert_eq!(owed, [(ids[1], TOPIC.to_owned(), Some(KEY.to_owned()))]);
    assert_eq!(count(&mut conn, "outbox.dead_letters"), 0);
}

#[cfg(feature = "cli")]
#[test]
fn injection_strings_pass_through_the_command_line_verbatim() {
    let db = crate::pg::test_db();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let header = format!("{HEADER}={VALUE}");
    let payload = serde_json::json!({ "sql": PAYLOAD_TEXT }).to_string();
    let id = run(&[
        "publish",
        "--topic",
        TOPIC,
        "--key",
        KEY,
        "--header",
        &header,
        "--payload",
        &payload,
    ]);
    let lines: Vec<serde_json::Value> = run(&[
        "relay",
        "--sink",
        "stdout",
        "--drain",
        "--poll-interval",
        "100ms",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"].to_string(), id.trim());
    assert_eq!(
        (
            &lines[0]["topic"],
            &lines[0]["key"],
            &lines[0]["headers"][HEADER],
            &lines[0]["payload"]["sql"]
        ),
        (
            &serde_json::json!(TOPIC),
            &serde_json::json!(KEY),
            &serde_json::json!(VALUE),
            &serde_json::json!(PAYLOAD_TEXT)
        )
    );
    let status: serde_json::Value = serde_json::from_str(&run(&["status", "--json"])).unwrap();
    assert_eq!(status["pending"], 0);
    assert_eq!(count(&mut db.conn(), "outbox.dead_letters"), 0);
}
