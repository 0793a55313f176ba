//! The RabbitMQ sink against the machine's broker (guest/guest at
//! 127.0.0.1:5672), with an exchange and a queue of its own per test.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::common::pending;
use crate::relay_support::{
    claimed_and_delivered, outage_then_recovery, setup, BatchSizes, RelayBed, Signal, PATIENCE,
};
use crate::tcp_proxy::free_port;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A message as the queue holds it.
#[derive(Debug, PartialEq)]
struct Got {
    routing_key: String,
    message_id: String,
    persistent: bool,
    key: Option<String>,
    body: String,
}

/// An exchange (topic) and a queue owned by one test, deleted when dropped.
struct Broker {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    _connection: Connection,
    name: String,
}

impl Broker {
    fn for_bed(bed: &RelayBed) -> Broker {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (connection, channel) = runtime.block_on(async {
            let connection = Connection::connect(AMQP, ConnectionProperties::default())
                .await
                .unwrap();
            let channel = connection.create_channel().await.unwrap();
            (connection, channel)
        });
        let broker = Broker {
            runtime,
            channel,
            _connection: connection,
            name: bed.db.name().to_owned(),
        };
        broker.runtime.block_on(async {
            broker
                .channel
                .exchange_declare(
                    broker.name.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            broker
                .channel
                .queue_declare(
                    broker.name.as_str().into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        });
        broker
    }

    /// Routes every routing key of the exchange to the queue.
    fn bind(&self) {
        self.bind_only("#");
    }

    /// Routes the routing keys matching `pattern` to the queue.
    fn bind_only(&self, pattern: &str) {
        self.runtime
            .block_on(self.channel.queue_bind(
                self.name.as_str().into(),
                self.name.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .unwrap();
    }

    /// Takes every message from the queue.
    fn drain(&self) -> Vec<Got> {
        self.runtime.block_on(async {
            let mut out = Vec::new();
            while let Some(message) = self
                .channel
                .basic_get(self.name.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                let d = message.delivery;
                let key = d.properties.headers().as_ref().and_then(|h| {
                    match h.inner().get("outbox-key") {
                        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                        _ => None,
                    }
                });
                out.push(Got {
                    routing_key: d.routing_key.to_string(),
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                    persistent: *d.properties.delivery_mode() == Some(2),
                    key,
                    body: String::from_utf8(d.data).unwrap(),
                });
            }
            out
        })
    }
}

impl Broker {
    /// Takes the one message in the queue: (its header table, content
    /// type, message id, body).
    fn take_one(&self) -> (BTreeMap<String, String>, String, String, Vec<u8>) {
        let d = self.runtime.block_on(async {
            self.channel
                .basic_get(self.name.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
                .expect("a message in the queue")
                .delivery
        });
        let headers = d
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .iter()
            .map(|(name, value)| match value {
                AMQPValue::LongString(s) => (name.to_string(), s.to_string()),
                other => panic!("header {name} is not a string: {other:?}"),
            })
            .collect();
        let property = |p: &Option<lapin::types::ShortString>| {
            p.as_ref().map(|s| s.to_string()).unwrap_or_default()
        };
        (
            headers,
            property(d.properties.content_type()),
            property(d.properties.message_id()),
            d.data,
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.runtime.block_on(async {
            let _ = self
                .channel
                .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                .await;
            self.channel
                .exchange_delete(self.name.as_str().into(), ExchangeDeleteOptions::default())
                .await
        });
    }
}

#[test]
fn events_are_published_persistent_and_confirmed() {
    let bed = setup();
    let broker = Broker::for_bed(&bed);
    broker.bind();
    let sink = outbox::AmqpSink::builder(AMQP, &broker.name)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("order.approved", Some("order-7")), ("order.shipped", None)]);
    bed.signals.delivered(2);
    relay.shutdown(PATIENCE).unwrap();
    let mut got = broker.drain();
    got.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    assert_eq!(
        got,
        [
            Got {
                routing_key: "order.approved".into(),
                message_id: ids[0].to_string(),
                persistent: true,
                key: Some("order-7".into()),
                body: r#"{"n":0}"#.into(),
            },
            Got {
                routing_key: "order.shipped".into(),
                message_id: ids[1].to_string(),
                persistent: true,
                key: None,
                body: r#"{"n":1}"#.into(),
            },
        ]
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_claimed_batch_is_published_in_one_call_and_confirmed_in_order() {
    let bed = setup();
    let broker = Broker::for_bed(&bed);
    broker.bind();
    let ids = bed.publish(&[("order.approved", None); 20]);
    let sink = outbox::AmqpSink::builder(AMQP, &broker.name)
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
    let got: Vec<String> = broker.drain().into_iter().map(|g| g.message_id).collect();
    let expected: Vec<String> = delivered.iter().map(|id| id.to_string()).collect();
    assert_eq!(delivered.len(), ids.len());
    assert_eq!(got, expected, "every event confirmed, in delivery order");
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn each_event_of_a_batch_gets_its_own_verdict() {
    let bed = setup();
    let broker = Broker::for_bed(&bed);
    // Only order.* reaches the queue: other.* comes back unroutable.
    broker.bind_only("order.#");
    let ids = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_events([
            outbox::NewEvent::dynamic("order.approved", serde_json::json!({ "n": 0 })),
            outbox::NewEvent::dynamic("other.thing", serde_json::json!({ "n": 1 })),
            outbox::NewEvent::dynamic("order.noted", serde_json::json!({ "n": 2 }))
                .header("x".repeat(256), "a name AMQP cannot carry"),
            outbox::NewEvent::dynamic("order.shipped", serde_json::json!({ "n": 3 })),
        ])
    })
    .unwrap();
    let events = outbox::queued_events(&mut bed.conn(), 10).unwrap();
    let sink = outbox::AmqpSink::builder(AMQP, &broker.name)
        .build()
        .unwrap();
    use outbox::Sink;
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
                outbox::DeliveryErrorKind::Transient,
                format!(
                    "unroutable: no queue is bound to exchange {:?} for routing key \"other.thing\" (312 NO_ROUTE)",
                    broker.name
                )
            )),
            Err((
                outbox::DeliveryErrorKind::Permanent,
                "an event header name is longer than AMQP allows (255 bytes)".to_owned()
            )),
            Ok(()),
        ]
    );
    let got: Vec<String> = broker.drain().into_iter().map(|g| g.message_id).collect();
    assert_eq!(got, [ids[0].to_string(), ids[3].to_string()]);
}

#[test]
fn an_unroutable_message_is_retried_until_a_queue_is_bound() {
    let bed = setup();
    let broker = Broker::for_bed(&bed);
    let sink = outbox::AmqpSink::builder(AMQP, &broker.name)
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
            "unroutable: no queue is bound to exchange {:?} for routing key \"order.approved\" (312 NO_ROUTE)",
            broker.name
        )
    );
    broker.bind();
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    let got = broker.drain();
    assert_eq!(got.len(), 1, "the unroutable attempts left nothing behind");
    assert_eq!(got[0].message_id, ids[0].to_string());
}

#[test]
fn a_missing_exchange_is_a_clear_transient_error() {
    let bed = setup();
    let exchange = format!("{}_missing", bed.db.name());
    let sink = outbox::AmqpSink::builder(AMQP, &exchange).build().unwrap();
    let relay = bed
        .relay()
        .max_attempts(2)
        .route("*", sink)
        .start()
        .unwrap();
    bed.publish(&[("t", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    let Some(Signal::Dead { error, .. }) = seen.last() else {
        unreachable!()
    };
    assert!(
        error.starts_with(&format!(
            "gave up after 2 attempts: RabbitMQ: exchange {exchange:?} not found"
        )),
        "{error}"
    );
}

#[test]
fn an_unreachable_broker_is_retried_with_backoff_until_it_comes_back() {
    let bed = setup();
    let broker = Broker::for_bed(&bed);
    broker.bind();
    let port = free_port();
    let sink = outbox::AmqpSink::builder(
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        &broker.name,
    )
    .timeout(Duration::from_secs(2))
    .build()
    .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let (id, errors) =
        outage_then_recovery(&bed, relay, port, "127.0.0.1:5672", "RabbitMQ unreachable");
    assert!(
        errors.iter().all(|e| !e.contains("guest:guest")),
        "the password leaked: {errors:?}"
    );
    let got = broker.drain();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, id.to_string());
}

#[test]
fn the_envelope_body_and_only_the_forwarded_headers_arrive() {
    let bed = setup();
    let broker = Broker::for_bed(&bed);
    broker.bind();
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
    let sink = outbox::AmqpSink::builder(AMQP, &broker.name)
        .body(outbox::Body::Envelope)
        .forward_headers(outbox::ForwardHeaders::only(["traceparent"]))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let (headers, content_type, message_id, body) = broker.take_one();

    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
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
    assert_eq!(content_type, "application/json");
    assert_eq!(message_id, event.id.to_string());
    let expected: BTreeMap<String, String> = [
        ("traceparent", "00-abc-01"),
        ("outbox-topic", "order.approved"),
        ("outbox-attempt", "1"),
        ("outbox-key", "order-7"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(headers, expected, "x-tenant stays behind");
}
