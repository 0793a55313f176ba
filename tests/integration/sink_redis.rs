//! The Redis Streams sink against the machine's Redis (127.0.0.1:6379),
//! with stream names unique to each test.

use std::collections::HashMap;

use redis::Commands;

use crate::common::pending;
use crate::relay_support::{
    claimed_and_delivered, dead_letters, outage_then_recovery, setup, BatchSizes, RelayBed, Signal,
    PATIENCE,
};
use crate::tcp_proxy::free_port;

const REDIS: &str = "redis://127.0.0.1:6379";

fn redis() -> redis::Connection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_connection()
        .unwrap()
}

/// The entries of `stream` as field maps, oldest first.
fn entries(stream: &str) -> Vec<HashMap<String, String>> {
    let reply: redis::streams::StreamRangeReply = redis().xrange_all(stream).unwrap();
    reply
        .ids
        .into_iter()
        .map(|entry| {
            entry
                .map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap()))
                .collect()
        })
        .collect()
}

/// A stream prefix unique to this test database.
fn prefix(bed: &RelayBed) -> String {
    format!("{}:", bed.db.name())
}

fn cleanup(keys: &[String]) {
    let _: () = redis().del(keys).unwrap();
}

#[test]
fn each_event_becomes_one_stream_entry_per_topic() {
    let bed = setup();
    let prefix = prefix(&bed);
    let sink = outbox::RedisSink::builder(REDIS)
        .stream_prefix(&prefix)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events([
            outbox::NewEvent::dynamic("order.approved", serde_json::json!({ "order": 7 }))
                .key("order-7")
                .header("traceparent", "00-abc-01"),
            outbox::NewEvent::dynamic("order.shipped", serde_json::json!({ "order": 7 })),
        ])
    })
    .unwrap();
    bed.signals.delivered(2);
    relay.shutdown(PATIENCE).unwrap();

    let approved = entries(&format!("{prefix}order.approved"));
    let shipped = entries(&format!("{prefix}order.shipped"));
    cleanup(&[
        format!("{prefix}order.approved"),
        format!("{prefix}order.shipped"),
    ]);
    assert_eq!(approved.len(), 1);
    let entry = &approved[0];
    assert_eq!(entry["id"], ids[0].to_string());
    assert_eq!(entry["topic"], "order.approved");
    assert_eq!(entry["key"], "order-7");
    assert_eq!(entry["payload"], r#"{"order":7}"#);
    assert_eq!(entry["headers"], r#"{"traceparent":"00-abc-01"}"#);
    assert!(chrono::DateTime::parse_from_rfc3339(&entry["created_at"]).is_ok());
    assert_eq!(shipped.len(), 1);
    assert_eq!(shipped[0]["id"], ids[1].to_string());
    assert!(
        !shipped[0].contains_key("key"),
        "no key field for a keyless event"
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn one_configured_stream_takes_every_topic() {
    let bed = setup();
    let stream = format!("{}all", prefix(&bed));
    let sink = outbox::RedisSink::builder(REDIS)
        .stream(&stream)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("a", Some("k")), ("b", Some("k"))]);
    bed.signals.delivered(2);
    relay.shutdown(PATIENCE).unwrap();
    let got = entries(&stream);
    cleanup(&[stream]);
    let seen: Vec<(String, String)> = got
        .iter()
        .map(|e| (e["id"].clone(), e["topic"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (ids[0].to_string(), "a".into()),
            (ids[1].to_string(), "b".into())
        ]
    );
}

#[test]
fn a_claimed_batch_is_one_pipeline_and_lands_in_order() {
    let bed = setup();
    let stream = format!("{}batch", prefix(&bed));
    let ids = bed.publish(&[("t", None); 20]);
    let sink = outbox::RedisSink::builder(REDIS)
        .stream(&stream)
        .build()
        .unwrap();
    let (sink, sizes) = BatchSizes::new(sink);
    let relay = bed.relay().workers(1).route("*", sink).start().unwrap();
    // One call for each claimed batch (a claim reads one lane of the log,
    // and keyless events spread over the lanes), in delivery order.
    let (claimed, delivered) = claimed_and_delivered(&bed, 20);
    relay.shutdown(PATIENCE).unwrap();
    let got: Vec<String> = entries(&stream)
        .into_iter()
        .map(|e| e["id"].clone())
        .collect();
    cleanup(&[stream]);
    assert_eq!(
        *sizes.lock().unwrap(),
        claimed,
        "one call for each claimed batch"
    );
    let expected: Vec<String> = delivered.iter().map(|id| id.to_string()).collect();
    assert_eq!(delivered.len(), ids.len());
    assert_eq!(got, expected, "every event appended, in delivery order");
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn each_event_of_a_pipeline_gets_its_own_verdict() {
    let bed = setup();
    let prefix = prefix(&bed);
    let _: () = redis().set(format!("{prefix}b"), "a plain string").unwrap();
    let ids = bed.publish(&[("a", None), ("b", None), ("a", None)]);
    let events = outbox::queued_events(&mut bed.conn(), 10).unwrap();
    let sink = outbox::RedisSink::builder(REDIS)
        .stream_prefix(&prefix)
        .build()
        .unwrap();
    use outbox::Sink;
    let results = sink.deliver_batch(&events.iter().collect::<Vec<_>>());
    let got: Vec<String> = entries(&format!("{prefix}a"))
        .into_iter()
        .map(|e| e["id"].clone())
        .collect();
    cleanup(&[format!("{prefix}a"), format!("{prefix}b")]);
    let verdicts: Vec<_> = results
        .iter()
        .map(|r| r.clone().map_err(|e| (e.kind(), e.message().to_owned())))
        .collect();
    assert_eq!(
        verdicts,
        [
            Ok(()),
            Err((
                outbox::DeliveryErrorKind::Permanent,
                "Redis: \"WRONGTYPE\": Operation against a key holding the wrong kind of value"
                    .to_owned()
            )),
            Ok(()),
        ]
    );
    assert_eq!(got, [ids[0].to_string(), ids[2].to_string()]);
}

#[test]
fn an_event_delivered_twice_is_two_entries_with_the_same_id() {
    let bed = setup();
    let stream = format!("{}dup", prefix(&bed));
    let sink = outbox::RedisSink::builder(REDIS)
        .stream(&stream)
        .build()
        .unwrap();
    bed.publish(&[("t", None)]);
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    // What happens when a relay dies between XADD and settling: the next
    // relay delivers the same event again.
    use outbox::Sink;
    sink.deliver(&event).unwrap();
    sink.deliver(&event).unwrap();
    let got = entries(&stream);
    cleanup(&[stream]);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["id"], event.id.to_string());
    assert_eq!(got[1]["id"], event.id.to_string());
    assert_eq!(got[0]["payload"], got[1]["payload"]);
}

#[test]
fn a_key_of_another_type_is_a_permanent_failure() {
    let bed = setup();
    let stream = format!("{}not-a-stream", prefix(&bed));
    let _: () = redis().set(&stream, "a plain string").unwrap();
    let sink = outbox::RedisSink::builder(REDIS)
        .stream(&stream)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("t", None)]);
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    cleanup(&[stream]);
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].0, letters[0].2), (ids[0].get(), 1));
    assert_eq!(
        letters[0].3,
        "permanent failure: Redis: \"WRONGTYPE\": Operation against a key holding the wrong kind of value"
    );
}

#[test]
fn an_unreachable_redis_is_retried_with_backoff_until_it_comes_back() {
    let bed = setup();
    let stream = format!("{}outage", prefix(&bed));
    let port = free_port();
    let sink = outbox::RedisSink::builder(format!("redis://127.0.0.1:{port}"))
        .stream(&stream)
        .timeout(std::time::Duration::from_secs(1))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let (id, _) = outage_then_recovery(&bed, relay, port, "127.0.0.1:6379", "Redis unreachable");
    let got = entries(&stream);
    cleanup(&[stream]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], id.to_string());
}

#[test]
fn the_envelope_body_and_only_the_forwarded_headers_arrive() {
    let bed = setup();
    let stream = format!("{}envelope", prefix(&bed));
    outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic("order.approved", serde_json::json!({ "order": 7 }))
                .key("order-7")
                .header("traceparent", "00-abc-01")
                .header("x-tenant", "acme"),
        )
    })
    .unwrap();
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    let sink = outbox::RedisSink::builder(REDIS)
        .stream(&stream)
        .body(outbox::Body::Envelope)
        .forward_headers(outbox::ForwardHeaders::only(["traceparent"]))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let got = entries(&stream);
    cleanup(&[stream]);

    assert_eq!(got.len(), 1);
    let created_at = event
        .created_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let envelope: serde_json::Value = serde_json::from_str(&got[0]["payload"]).unwrap();
    assert_eq!(
        envelope,
        serde_json::json!({
            "id": event.id.get(),
            "topic": "order.approved",
            "key": "order-7",
            "created_at": created_at,
            "headers": { "traceparent": "00-abc-01" },
            "payload": { "order": 7 },
        })
    );
    // The other fields stay; `headers` holds the forwarded headers only.
    let expected: HashMap<String, String> = [
        ("id", event.id.to_string()),
        ("topic", "order.approved".to_owned()),
        ("key", "order-7".to_owned()),
        ("payload", got[0]["payload"].clone()),
        ("headers", r#"{"traceparent":"00-abc-01"}"#.to_owned()),
        ("created_at", created_at),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(got[0], expected);
}
