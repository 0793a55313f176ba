//! The NATS JetStream sink against the machine's NATS server
//! (127.0.0.1:4222, JetStream on), with a stream of its own per test.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use outbox::Sink;

use crate::common::pending;
use crate::relay_support::{
    claimed_and_delivered, outage_then_recovery, setup, BatchSizes, RelayBed, Signal, PATIENCE,
};
use crate::tcp_proxy::free_port;

const NATS: &str = "nats://127.0.0.1:4222";

/// A JetStream stream owned by one test, deleted when dropped.
struct Stream {
    runtime: tokio::runtime::Runtime,
    context: jetstream::Context,
    name: String,
    prefix: String,
}

impl Stream {
    /// The subject prefix for `bed`; the stream is not created yet.
    fn for_bed(bed: &RelayBed) -> Stream {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let context =
            runtime.block_on(async { jetstream::new(async_nats::connect(NATS).await.unwrap()) });
        let prefix = bed.db.name().to_owned();
        Stream {
            runtime,
            context,
            name: prefix.to_uppercase(),
            prefix,
        }
    }

    fn create(&self) {
        self.create_capturing(&format!("{}.>", self.prefix));
    }

    /// Creates the stream, capturing only `subjects`.
    fn create_capturing(&self, subjects: &str) {
        self.runtime
            .block_on(self.context.create_stream(stream::Config {
                name: self.name.clone(),
                subjects: vec![subjects.to_owned()],
                ..Default::default()
            }))
            .unwrap();
    }

    /// Every message: (subject, Nats-Msg-Id, outbox-key, payload).
    fn messages(&self) -> Vec<(String, String, Option<String>, String)> {
        self.runtime.block_on(async {
            let mut stream = self.context.get_stream(&self.name).await.unwrap();
            let total = stream.info().await.unwrap().state.messages;
            let mut out = Vec::new();
            for seq in 1..=total {
                let m = stream.get_raw_message(seq).await.unwrap();
                let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
                out.push((
                    m.subject.to_string(),
                    header("Nats-Msg-Id").unwrap(),
                    header("outbox-key"),
                    String::from_utf8(m.payload.to_vec()).unwrap(),
                ));
            }
            out
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self
            .runtime
            .block_on(self.context.delete_stream(&self.name));
    }
}

#[test]
fn events_are_published_and_acknowledged_on_prefix_dot_topic() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    stream.create();
    let sink = outbox::NatsSink::builder(NATS, &stream.prefix)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("order.approved", Some("order-7")), ("order.shipped", None)]);
    bed.signals.delivered(2);
    relay.shutdown(PATIENCE).unwrap();
    let mut messages = stream.messages();
    messages.sort();
    assert_eq!(
        messages,
        [
            (
                format!("{}.order.approved", stream.prefix),
                ids[0].to_string(),
                Some("order-7".into()),
                r#"{"n":0}"#.into()
            ),
            (
                format!("{}.order.shipped", stream.prefix),
                ids[1].to_string(),
                None,
                r#"{"n":1}"#.into()
            ),
        ]
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_claimed_batch_is_published_in_one_call_and_acknowledged_in_order() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    stream.create();
    let topics: Vec<(String, Option<&str>)> =
        (0..20).map(|n| (format!("order.{n}"), None)).collect();
    let topics: Vec<(&str, Option<&str>)> = topics.iter().map(|(t, k)| (t.as_str(), *k)).collect();
    let ids = bed.publish(&topics);
    let sink = outbox::NatsSink::builder(NATS, &stream.prefix)
        .build()
        .unwrap();
    let (sink, sizes) = BatchSizes::new(sink);
    let relay = bed.relay().workers(1).route("*", sink).start().unwrap();
    // One call for each claimed batch (a claim reads one lane of the log,
    // and keyless events spread over the lanes), in delivery order.
    let (claimed, delivered) = claimed_and_delivered(&bed, 20);
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(
        *sizes.lock().unwrap(),
        claimed,
        "one call for each claimed batch"
    );
    let got: Vec<(String, String)> = stream
        .messages()
        .into_iter()
        .map(|(subject, id, _, _)| (subject, id))
        .collect();
    let expected: Vec<(String, String)> = delivered
        .iter()
        .map(|id| {
            let n = ids.iter().position(|i| i == id).unwrap();
            (format!("{}.order.{n}", stream.prefix), id.to_string())
        })
        .collect();
    assert_eq!(got, expected, "every event acknowledged, in delivery order");
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn each_event_of_a_batch_gets_its_own_verdict() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    // Only order.* is captured: other.* has no stream to answer it.
    stream.create_capturing(&format!("{}.order.>", stream.prefix));
    let ids = bed.publish(&[
        ("order.approved", None),
        ("order has spaces", None),
        ("other.thing", None),
        ("order.shipped", None),
    ]);
    let events = outbox::queued_events(&mut bed.conn(), 10).unwrap();
    let sink = outbox::NatsSink::builder(NATS, &stream.prefix)
        .build()
        .unwrap();
    let results = sink.deliver_batch(&events.iter().collect::<Vec<_>>());
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
                "topic \"order has spaces\" does not make a NATS subject".to_owned()
            )),
            Err((
                outbox::DeliveryErrorKind::Transient,
                format!(
                    "no JetStream stream captures subject {}.other.thing",
                    stream.prefix
                )
            )),
            Ok(()),
        ]
    );
    let got: Vec<String> = stream.messages().into_iter().map(|m| m.1).collect();
    assert_eq!(got, [ids[0].to_string(), ids[3].to_string()]);
}

#[test]
fn relaying_the_same_event_twice_leaves_one_message_in_the_stream() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    stream.create();
    let sink = outbox::NatsSink::builder(NATS, &stream.prefix)
        .build()
        .unwrap();
    bed.publish(&[("order.approved", None)]);
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    // A relay that died after the PubAck but before settling: the next
    // relay publishes the same event again, with the same Nats-Msg-Id.
    sink.deliver(&event).unwrap();
    sink.deliver(&event).unwrap();
    let messages = stream.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].1, event.id.to_string());
}

#[test]
fn a_missing_stream_is_a_clear_error_retried_until_the_stream_exists() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    let sink = outbox::NatsSink::builder(NATS, &stream.prefix)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("order.approved", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Retry { .. })));
    let Some(Signal::Retry { error, .. }) = seen.last() else {
        unreachable!()
    };
    assert_eq!(
        error,
        &format!(
            "no JetStream stream captures subject {}.order.approved",
            stream.prefix
        )
    );
    stream.create();
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    assert!(matches!(seen.last(), Some(Signal::Delivered { id, .. }) if *id == ids[0]));
    assert_eq!(stream.messages().len(), 1);
}

#[test]
fn an_unreachable_server_is_retried_with_backoff_until_it_comes_back() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    stream.create();
    let port = free_port();
    let sink = outbox::NatsSink::builder(format!("nats://127.0.0.1:{port}"), &stream.prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    outage_then_recovery(&bed, relay, port, "127.0.0.1:4222", "NATS unreachable");
    assert_eq!(stream.messages().len(), 1);
}

#[test]
fn the_envelope_body_and_only_the_forwarded_headers_arrive() {
    let bed = setup();
    let stream = Stream::for_bed(&bed);
    stream.create();
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
    let sink = outbox::NatsSink::builder(NATS, &stream.prefix)
        .body(outbox::Body::Envelope)
        .forward_headers(outbox::ForwardHeaders::only(["traceparent"]))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let (headers, payload) = stream.runtime.block_on(async {
        let stream = stream.context.get_stream(&stream.name).await.unwrap();
        let m = stream.get_raw_message(1).await.unwrap();
        let headers: std::collections::BTreeMap<String, String> = m
            .headers
            .iter()
            .map(|(name, values)| (name.to_string(), values[0].as_str().to_owned()))
            .collect();
        (headers, m.payload.to_vec())
    });

    let envelope: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        envelope,
        serde_json::json!({
            "id": event.id.get(),
            "topic": "order.approved",
            "key": "order-7",
            "created_at": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "headers": { "traceparent": "00-abc-01" },
            "payload": { "order": 7 },
        })
    );
    let expected: std::collections::BTreeMap<String, String> = [
        ("traceparent", "00-abc-01".to_owned()),
        ("Nats-Msg-Id", event.id.to_string()),
        ("outbox-topic", "order.approved".to_owned()),
        ("outbox-attempt", "1".to_owned()),
        ("outbox-key", "order-7".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(headers, expected, "x-tenant stays behind");
}
