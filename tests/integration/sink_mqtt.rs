//! The MQTT sink against the machine's Mosquitto (127.0.0.1:1883), with a
//! topic prefix unique to each test database, read back by a real rumqttc
//! v5 subscriber.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver};
use outbox::{DeliveryErrorKind, EventId, Sink, StoredEvent};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};

use crate::common::pending;
use crate::relay_support::{dead_letters, outage_then_recovery, setup, RelayBed, Signal, PATIENCE};
use crate::tcp_proxy::{free_port, TcpProxy};

const MQTT: &str = "mqtt://127.0.0.1:1883";

/// How long a subscriber listens for a message that should not come.
const QUIET: Duration = Duration::from_millis(300);

/// A topic prefix unique to this test database.
fn prefix(bed: &RelayBed) -> String {
    bed.db.name().to_owned()
}

/// A message as the subscriber got it.
#[derive(Debug)]
struct Got {
    topic: String,
    payload: String,
    qos: QoS,
    content_type: Option<String>,
    payload_format: Option<u8>,
    properties: Vec<(String, String)>,
}

impl Got {
    fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn id(&self) -> String {
        self.property("outbox-id").unwrap().to_owned()
    }
}

/// A subscriber on `<prefix>/#`, subscribed (SUBACK received) once built.
struct Subscriber {
    client: Client,
    messages: Receiver<Publish>,
}

impl Subscriber {
    fn on(prefix: &str, qos: QoS) -> Subscriber {
        let options = MqttOptions::new(format!("{prefix}-sub"), "127.0.0.1", 1883);
        let (client, mut connection) = Client::new(options, 100);
        client.subscribe(format!("{prefix}/#"), qos).unwrap();
        let (tx, messages) = unbounded();
        let (subscribed, suback) = bounded(1);
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if tx.send(publish).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        suback.recv_timeout(PATIENCE).expect("no SUBACK");
        Subscriber { client, messages }
    }

    /// Exactly `n` messages: waits for them, then checks that no more come.
    fn take(&self, n: usize) -> Vec<Got> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.messages.recv_timeout(PATIENCE) {
                Ok(publish) => got.push(decode(publish)),
                Err(_) => panic!("{} of {n} messages arrived: {got:#?}", got.len()),
            }
        }
        if let Ok(extra) = self.messages.recv_timeout(QUIET) {
            panic!("a message beyond the {n} expected: {:#?}", decode(extra));
        }
        got
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

fn decode(publish: Publish) -> Got {
    let properties = publish.properties.unwrap_or_default();
    Got {
        topic: String::from_utf8(publish.topic.to_vec()).unwrap(),
        payload: String::from_utf8(publish.payload.to_vec()).unwrap(),
        qos: publish.qos,
        content_type: properties.content_type,
        payload_format: properties.payload_format_indicator,
        properties: properties.user_properties,
    }
}

/// The queued events of `bed`, oldest first.
fn queued(bed: &RelayBed) -> Vec<StoredEvent> {
    outbox::queued_events(&mut bed.conn(), 1000).unwrap()
}

fn kinds(
    results: &[Result<(), outbox::DeliveryError>],
) -> Vec<Result<(), (DeliveryErrorKind, String)>> {
    results
        .iter()
        .map(|r| r.clone().map_err(|e| (e.kind(), e.message().to_owned())))
        .collect()
}

#[test]
fn events_are_published_on_prefix_slash_topic_levels_with_their_properties() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let sink = outbox::MqttSink::builder(MQTT, &prefix).build().unwrap();
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
    let mut got = subscriber.take(2);
    got.sort_by_key(|g| g.topic.clone());
    assert_eq!(got[0].topic, format!("{prefix}/order/approved"));
    assert_eq!(got[0].payload, r#"{"order":7}"#);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(got[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(got[0].payload_format, Some(1));
    let property = |n: &str, v: &str| (n.to_owned(), v.to_owned());
    assert_eq!(
        got[0].properties,
        [
            property("traceparent", "00-abc-01"),
            property("outbox-id", &ids[0].to_string()),
            property("outbox-topic", "order.approved"),
            property("outbox-attempt", "1"),
            property("outbox-key", "order-7"),
        ]
    );
    assert_eq!(got[1].topic, format!("{prefix}/order/shipped"));
    assert_eq!(
        got[1].properties,
        [
            property("outbox-id", &ids[1].to_string()),
            property("outbox-topic", "order.shipped"),
            property("outbox-attempt", "1"),
        ]
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn the_envelope_body_and_only_the_forwarded_headers_arrive() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic("order.approved", serde_json::json!({ "order": 7 }))
                .key("order-7")
                .header("traceparent", "00-abc-01")
                .header("x-tenant", "acme"),
        )
    })
    .unwrap();
    let event = queued(&bed).remove(0);
    let sink = outbox::MqttSink::builder(MQTT, &prefix)
        .body(outbox::Body::Envelope)
        .forward_headers(outbox::ForwardHeaders::only(["traceparent"]))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let got = subscriber.take(1).remove(0);

    let envelope: serde_json::Value = serde_json::from_str(&got.payload).unwrap();
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
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.payload_format, Some(1));
    let property = |n: &str, v: &str| (n.to_owned(), v.to_owned());
    assert_eq!(
        got.properties,
        [
            property("traceparent", "00-abc-01"),
            property("outbox-id", &event.id.to_string()),
            property("outbox-topic", "order.approved"),
            property("outbox-attempt", "1"),
            property("outbox-key", "order-7"),
        ],
        "x-tenant stays behind"
    );
}

#[test]
fn every_event_arrives_once_and_in_order_per_key() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let keys = ["k0", "k1", "k2", "k3"];
    let events: Vec<(&str, Option<&str>)> = (0..40)
        .map(|n| ("order.changed", Some(keys[n % 4])))
        .collect();
    let ids = bed.publish(&events);
    let sink = outbox::MqttSink::builder(MQTT, &prefix).build().unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(40);
    relay.shutdown(PATIENCE).unwrap();
    let got = subscriber.take(40);
    let mut got_ids: Vec<String> = got.iter().map(Got::id).collect();
    got_ids.sort();
    let mut expected: Vec<String> = ids.iter().map(EventId::to_string).collect();
    expected.sort();
    assert_eq!(got_ids, expected, "each event exactly once");
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for message in &got {
        per_key
            .entry(message.property("outbox-key").unwrap().to_owned())
            .or_default()
            .push(message.id().parse().unwrap());
    }
    for key in keys {
        let expected: Vec<i64> = ids
            .iter()
            .enumerate()
            .filter(|(n, _)| keys[n % 4] == key)
            .map(|(_, id)| id.get())
            .collect();
        assert_eq!(per_key[key], expected, "order of key {key}");
    }
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn qos_2_delivers_each_event_once_on_pubcomp() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::ExactlyOnce);
    let ids = bed.publish(&[("a", None), ("b", None), ("c", None)]);
    let sink = outbox::MqttSink::builder(MQTT, &prefix)
        .qos(2)
        .build()
        .unwrap();
    let results = sink.deliver_batch(&queued(&bed).iter().collect::<Vec<_>>());
    assert_eq!(kinds(&results), [Ok(()), Ok(()), Ok(())]);
    let got = subscriber.take(3);
    let got: Vec<(String, QoS, String)> = got
        .iter()
        .map(|g| (g.topic.clone(), g.qos, g.id()))
        .collect();
    let expected: Vec<(String, QoS, String)> = ["a", "b", "c"]
        .iter()
        .zip(&ids)
        .map(|(t, id)| (format!("{prefix}/{t}"), QoS::ExactlyOnce, id.to_string()))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn each_event_of_a_batch_gets_its_own_verdict() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let ids = bed.publish(&[
        ("order.approved", None),
        ("order.+", None),
        ("order..x", None),
        ("order.shipped", None),
    ]);
    let sink = outbox::MqttSink::builder(MQTT, &prefix).build().unwrap();
    let results = sink.deliver_batch(&queued(&bed).iter().collect::<Vec<_>>());
    let permanent = |m: &str| Err((DeliveryErrorKind::Permanent, m.to_owned()));
    assert_eq!(
        kinds(&results),
        [
            Ok(()),
            permanent("topic \"order.+\" does not make an MQTT topic name: wildcards (+, #) are not allowed"),
            permanent("topic \"order..x\" does not make an MQTT topic name: empty levels are not allowed"),
            Ok(()),
        ]
    );
    let got: Vec<String> = subscriber.take(2).iter().map(Got::id).collect();
    assert_eq!(got, [ids[0].to_string(), ids[3].to_string()]);
}

#[test]
fn an_event_without_an_mqtt_topic_is_dead_lettered_and_the_others_delivered() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let sink = outbox::MqttSink::builder(MQTT, &prefix).build().unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("a", None), ("b.#", None), ("c", None)]);
    let seen = bed.signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Delivered { .. } | Signal::Dead { .. }))
            .count()
            == 3
    });
    relay.shutdown(PATIENCE).unwrap();
    let mut delivered: Vec<EventId> = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Delivered { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    delivered.sort();
    assert_eq!(delivered, [ids[0], ids[2]]);
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(
        letters,
        [(
            ids[1].get(),
            "b.#".to_owned(),
            1,
            "permanent failure: topic \"b.#\" does not make an MQTT topic name: wildcards (+, #) are not allowed"
                .to_owned()
        )]
    );
    let mut got: Vec<String> = subscriber.take(2).iter().map(Got::id).collect();
    got.sort();
    assert_eq!(got, [ids[0].to_string(), ids[2].to_string()]);
}

#[test]
fn no_matching_subscribers_is_delivered_unless_configured_to_retry() {
    let bed = setup();
    let prefix = prefix(&bed);
    let ids = bed.publish(&[("nobody.listens", None)]);
    let events = queued(&bed);
    let for_qos = |qos: u8, retry: bool| {
        outbox::MqttSink::builder(MQTT, &prefix)
            .qos(qos)
            .retry_without_subscribers(retry)
            .build()
            .unwrap()
    };
    let retry = Err((
        DeliveryErrorKind::Transient,
        format!("MQTT: no subscriber matches topic {prefix}/nobody/listens (reason code 0x10)"),
    ));
    // Mosquitto 2 answers a QoS 1 message nobody subscribed to with a
    // PUBACK of reason code 0x10.
    assert_eq!(kinds(&[for_qos(1, false).deliver(&events[0])]), [Ok(())]);
    assert_eq!(kinds(&[for_qos(1, true).deliver(&events[0])]), [retry]);
    // Its PUBREC (QoS 2) says success whether anyone subscribed or not, so
    // QoS 2 is delivered either way (the PUBREC 0x10 path has a unit test).
    assert_eq!(kinds(&[for_qos(2, false).deliver(&events[0])]), [Ok(())]);
    assert_eq!(kinds(&[for_qos(2, true).deliver(&events[0])]), [Ok(())]);
    // With a subscriber, the retrying sink delivers.
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    assert_eq!(kinds(&[for_qos(1, true).deliver(&events[0])]), [Ok(())]);
    assert_eq!(subscriber.take(1)[0].id(), ids[0].to_string());
}

#[test]
fn concurrent_callers_each_get_their_own_verdicts() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let topics: Vec<String> = (0..80)
        .map(|n| {
            if n % 7 == 3 {
                format!("bad.+.{n}")
            } else {
                format!("t.{n}")
            }
        })
        .collect();
    let events: Vec<(&str, Option<&str>)> = topics.iter().map(|t| (t.as_str(), None)).collect();
    bed.publish(&events);
    let events = Arc::new(queued(&bed));
    let sink = Arc::new(
        outbox::MqttSink::builder(MQTT, &prefix)
            .max_inflight(16)
            .build()
            .unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (sink, events) = (sink.clone(), events.clone());
            std::thread::spawn(move || {
                // Each caller takes every fourth event, in batches of 10.
                let mine: Vec<&StoredEvent> = events.iter().skip(t).step_by(4).collect();
                let mut verdicts = Vec::new();
                for batch in mine.chunks(10) {
                    for (event, result) in batch.iter().zip(sink.deliver_batch(batch)) {
                        verdicts.push((event.topic.clone(), result.map_err(|e| e.kind())));
                    }
                }
                verdicts
            })
        })
        .collect();
    let mut verdicts: Vec<(String, Result<(), DeliveryErrorKind>)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    verdicts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected: Vec<(String, Result<(), DeliveryErrorKind>)> = topics
        .iter()
        .map(|t| {
            let verdict = if t.starts_with("bad") {
                Err(DeliveryErrorKind::Permanent)
            } else {
                Ok(())
            };
            (t.clone(), verdict)
        })
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(verdicts, expected);
    let good = expected.iter().filter(|(_, v)| v.is_ok()).count();
    let mut got: Vec<String> = subscriber.take(good).into_iter().map(|g| g.topic).collect();
    got.sort();
    let mut want: Vec<String> = expected
        .iter()
        .filter(|(_, v)| v.is_ok())
        .map(|(t, _)| format!("{prefix}/{}", t.replace('.', "/")))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn an_unreachable_broker_is_retried_with_backoff_until_it_comes_back() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let port = free_port();
    let sink = outbox::MqttSink::builder(format!("mqtt://127.0.0.1:{port}"), &prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let (id, _) = outage_then_recovery(&bed, relay, port, "127.0.0.1:1883", "MQTT unreachable");
    let got = subscriber.take(1);
    assert_eq!(got[0].id(), id.to_string());
}

#[test]
fn a_lost_connection_fails_its_calls_and_the_next_call_reconnects() {
    let bed = setup();
    let prefix = prefix(&bed);
    let subscriber = Subscriber::on(&prefix, QoS::AtLeastOnce);
    let topics: Vec<String> = (0..15).map(|n| format!("t.{n}")).collect();
    let events: Vec<(&str, Option<&str>)> = topics.iter().map(|t| (t.as_str(), None)).collect();
    let ids = bed.publish(&events);
    let events = queued(&bed);
    let batch = |range: std::ops::Range<usize>| events[range].iter().collect::<Vec<_>>();
    let port = free_port();
    let sink = outbox::MqttSink::builder(format!("mqtt://127.0.0.1:{port}"), &prefix)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let proxy = TcpProxy::start(port, "127.0.0.1:1883");
    let first = sink.deliver_batch(&batch(0..5));
    assert_eq!(kinds(&first), vec![Ok(()); 5]);
    assert_eq!(subscriber.take(5).len(), 5);

    drop(proxy); // cuts the connection, and nothing listens any more
    let down = sink.deliver_batch(&batch(5..10));
    assert_eq!(down.len(), 5);
    for result in &down {
        let error = result.as_ref().unwrap_err();
        assert_eq!(error.kind(), DeliveryErrorKind::Transient);
        assert!(
            error.message().starts_with("MQTT unreachable")
                || error.message().starts_with("MQTT connection lost"),
            "{error:?}"
        );
    }

    let _proxy = TcpProxy::start(port, "127.0.0.1:1883");
    let again = sink.deliver_batch(&batch(5..15));
    assert_eq!(kinds(&again), vec![Ok(()); 10]);
    let mut got: Vec<String> = subscriber.take(10).iter().map(Got::id).collect();
    got.sort();
    let mut want: Vec<String> = ids[5..].iter().map(EventId::to_string).collect();
    want.sort();
    assert_eq!(got, want, "nothing lost, nothing sent while down");
}
