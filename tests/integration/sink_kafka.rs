//! The Kafka sink against librdkafka's own Kafka-protocol mock cluster
//! (in process, one per test), and against a real broker when
//! `KAFKA_BROKERS` is set.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::common::pending;
use crate::kafka_admin;
use crate::relay_support::{count_delivered, dead_letters, retries, setup, Signal, PATIENCE};

/// One record as a consumer read it back.
#[derive(Debug)]
struct Record {
    partition: i32,
    key: Option<String>,
    value: String,
    headers: HashMap<String, String>,
}

/// Every record of `topic`, partition by partition, each in offset order.
/// The count comes from the partitions' high watermarks, so a duplicate
/// would show.
fn records(brokers: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-tests")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut records = Vec::new();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(low))
            .unwrap();
        consumer.assign(&assignment).unwrap();
        for _ in low..high {
            let message = consumer
                .poll(Duration::from_secs(10))
                .expect("a record below the high watermark")
                .unwrap();
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(Record {
                partition: message.partition(),
                key: message
                    .key()
                    .map(|k| String::from_utf8(k.to_vec()).unwrap()),
                value: String::from_utf8(message.payload().unwrap().to_vec()).unwrap(),
                headers,
            });
        }
    }
    records
}

fn cluster(
    topics: &[(&str, i32)],
) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).unwrap();
    for (topic, partitions) in topics {
        cluster.create_topic(topic, *partitions, 1).unwrap();
    }
    cluster
}

#[test]
fn each_event_becomes_one_record_with_its_key_and_headers() {
    let bed = setup();
    let cluster = cluster(&[("order.approved", 1), ("order.shipped", 1)]);
    let brokers = cluster.bootstrap_servers();
    let sink = outbox::KafkaSink::builder(&brokers).build().unwrap();
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

    let approved = records(&brokers, "order.approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0].key.as_deref(), Some("order-7"));
    assert_eq!(approved[0].value, r#"{"order":7}"#);
    let expected: HashMap<String, String> = [
        ("traceparent", "00-abc-01".to_owned()),
        ("outbox-id", ids[0].to_string()),
        ("outbox-topic", "order.approved".to_owned()),
        ("outbox-attempt", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(approved[0].headers, expected);
    let shipped = records(&brokers, "order.shipped");
    assert_eq!(shipped.len(), 1);
    assert_eq!(shipped[0].key, None, "a keyless event has a null key");
    assert_eq!(shipped[0].headers["outbox-id"], ids[1].to_string());
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn the_envelope_and_a_topic_template() {
    let bed = setup();
    let cluster = cluster(&[("outbox.t", 1)]);
    let brokers = cluster.bootstrap_servers();
    let sink = outbox::KafkaSink::builder(&brokers)
        .topic_template("outbox.{topic}")
        .body(outbox::Body::Envelope)
        .build()
        .unwrap();
    bed.publish(&[("t", None)]);
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let got = records(&brokers, "outbox.t");
    assert_eq!(got.len(), 1);
    let value: serde_json::Value = serde_json::from_str(&got[0].value).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "id": event.id.get(),
            "topic": "t",
            "key": null,
            "created_at": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "headers": {},
            "payload": { "n": 0 },
        })
    );
}

#[test]
fn the_envelope_body_and_only_the_forwarded_headers_arrive() {
    let bed = setup();
    let cluster = cluster(&[("order.approved", 1)]);
    let brokers = cluster.bootstrap_servers();
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
    let sink = outbox::KafkaSink::builder(&brokers)
        .body(outbox::Body::Envelope)
        .forward_headers(outbox::ForwardHeaders::only(["traceparent"]))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let got = records(&brokers, "order.approved");

    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key.as_deref(), Some("order-7"));
    let value: serde_json::Value = serde_json::from_str(&got[0].value).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "id": event.id.get(),
            "topic": "order.approved",
            "key": "order-7",
            "created_at": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "headers": { "traceparent": "00-abc-01" },
            "payload": { "order": 7 },
        })
    );
    let expected: HashMap<String, String> = [
        ("traceparent", "00-abc-01".to_owned()),
        ("outbox-id", event.id.to_string()),
        ("outbox-topic", "order.approved".to_owned()),
        ("outbox-attempt", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(got[0].headers, expected, "x-tenant stays behind");
}

#[test]
fn a_keys_records_stay_in_one_partition_in_publish_order() {
    let bed = setup();
    let cluster = cluster(&[("t", 4)]);
    let brokers = cluster.bootstrap_servers();
    let sink = outbox::KafkaSink::builder(&brokers).build().unwrap();
    let relay = bed.relay().workers(4).route("*", sink).start().unwrap();
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    let published: Vec<(&str, Option<&str>)> =
        (0..30).map(|n| ("t", Some(keys[n % keys.len()]))).collect();
    let ids = bed.publish(&published);
    bed.signals.delivered(ids.len());
    relay.shutdown(PATIENCE).unwrap();

    let got = records(&brokers, "t");
    assert_eq!(got.len(), ids.len(), "each event once");
    for key in keys {
        let mine: Vec<&Record> = got
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .collect();
        let partitions: std::collections::BTreeSet<i32> =
            mine.iter().map(|r| r.partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "{key} in one partition: {partitions:?}"
        );
        let order: Vec<String> = mine
            .iter()
            .map(|r| r.headers["outbox-id"].clone())
            .collect();
        let expected: Vec<String> = ids
            .iter()
            .zip(&published)
            .filter(|(_, (_, k))| *k == Some(key))
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(order, expected, "{key} in publish order");
    }
}

#[test]
fn retriable_broker_errors_are_retried_by_the_producer_without_duplicates() {
    let bed = setup();
    let cluster = cluster(&[("t", 1)]);
    let brokers = cluster.bootstrap_servers();
    // The next three produce requests fail with an error the idempotent
    // producer retries itself.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 3],
    );
    let sink = outbox::KafkaSink::builder(&brokers).build().unwrap();
    let relay = bed.relay().workers(1).route("*", sink).start().unwrap();
    let ids = bed.publish(&[("t", None); 5]);
    let seen = bed.signals.until(|s| count_delivered(s) == 5);
    relay.shutdown(PATIENCE).unwrap();
    assert!(
        retries(&seen).is_empty(),
        "the producer retried, not the relay"
    );
    let mut got: Vec<String> = records(&brokers, "t")
        .into_iter()
        .map(|r| r.headers["outbox-id"].clone())
        .collect();
    got.sort();
    let mut expected: Vec<String> = ids.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(got, expected, "every event exactly once");
}

#[test]
fn a_record_too_large_is_dead_lettered_and_the_rest_delivered() {
    let bed = setup();
    let cluster = cluster(&[("t", 1), ("big", 1)]);
    let brokers = cluster.bootstrap_servers();
    let sink = outbox::KafkaSink::builder(&brokers)
        .set("message.max.bytes", "1000")
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let big = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(outbox::NewEvent::dynamic(
            "big",
            serde_json::json!({ "blob": "x".repeat(2000) }),
        ))
    })
    .unwrap();
    let small = bed.publish(&[("t", None)]);
    let seen = bed.signals.until(|s| {
        s.iter().any(|s| matches!(s, Signal::Dead { .. }))
            && s.iter().any(|s| matches!(s, Signal::Delivered { .. }))
    });
    relay.shutdown(PATIENCE).unwrap();
    assert!(retries(&seen).is_empty(), "{seen:?}");
    let dead = dead_letters(&mut bed.conn());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, big.get());
    assert_eq!(dead[0].2, 1, "no retry");
    assert_eq!(
        dead[0].3,
        "permanent failure: Kafka: Message production error: MessageSizeTooLarge (Broker: Message size too large)"
    );
    assert_eq!(records(&brokers, "big").len(), 0);
    let got = records(&brokers, "t");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["outbox-id"], small[0].to_string());
}

/// Publishes one event of `topic` to `sink` and waits for it to be
/// dead-lettered at its first attempt; returns its last error.
fn dead_at_once(sink: outbox::KafkaSink, topic: &str) -> String {
    let bed = setup();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[(topic, None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    assert!(retries(&seen).is_empty(), "{seen:?}");
    let mut dead = dead_letters(&mut bed.conn());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, ids[0].get());
    dead.remove(0).3
}

#[test]
fn a_broker_that_rejects_the_size_dead_letters_the_event() {
    let cluster = cluster(&[("t", 1)]);
    let brokers = cluster.bootstrap_servers();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let sink = outbox::KafkaSink::builder(&brokers).build().unwrap();
    assert_eq!(
        dead_at_once(sink, "t"),
        "permanent failure: Kafka: Message production error: MessageSizeTooLarge (Broker: Message size too large)"
    );
    assert_eq!(records(&brokers, "t").len(), 0);
}

#[test]
fn all_brokers_down_is_transient_then_delivered_after_recovery() {
    let bed = setup();
    let cluster = cluster(&[("t", 1)]);
    let brokers = cluster.bootstrap_servers();
    cluster.broker_down(1).unwrap();
    let sink = outbox::KafkaSink::builder(&brokers)
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("t", None)]);
    let seen = bed.signals.until(|s| retries(s).len() == 2);
    for (_, _, error) in retries(&seen) {
        assert!(error.starts_with("Kafka: "), "{error}");
    }
    cluster.broker_up(1).unwrap();
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    match seen.last() {
        Some(Signal::Delivered { id, attempt }) => {
            assert_eq!(*id, ids[0]);
            assert!(*attempt >= 3, "delivered at attempt {attempt}");
        }
        other => panic!("expected a delivery, got {other:?}"),
    }
    let got = records(&brokers, "t");
    assert_eq!(got.len(), 1, "once, however many attempts");
    assert_eq!(got[0].headers["outbox-id"], ids[0].to_string());
    assert_eq!(dead_letters(&mut bed.conn()), []);
}

#[test]
fn an_event_topic_that_is_no_kafka_topic_is_dead_lettered() {
    let cluster = cluster(&[]);
    let sink = outbox::KafkaSink::builder(cluster.bootstrap_servers())
        .build()
        .unwrap();
    assert_eq!(
        dead_at_once(sink, "order/approved"),
        "permanent failure: topic \"order/approved\" does not make a Kafka topic (\"order/approved\": only ASCII letters, digits, '.', '_' and '-' are allowed)"
    );
}

/// Runs only with `KAFKA_BROKERS` (a real Kafka-protocol broker, e.g.
/// tansu: docs/sinks.md); says it skipped otherwise.
#[test]
fn a_real_broker_when_kafka_brokers_is_set() {
    let Ok(brokers) = std::env::var("KAFKA_BROKERS") else {
        eprintln!("skipped: set KAFKA_BROKERS to run against a real Kafka-protocol broker");
        return;
    };
    let bed = setup();
    let topic = format!("outbox-test-{}", bed.db.name());
    kafka_admin::create_topic(&brokers, &topic, 3);
    let sink = outbox::KafkaSink::builder(&brokers)
        .topic_template(&topic)
        .build()
        .unwrap();
    let relay = bed.relay().route("*", sink).start().unwrap();
    let ids = bed.publish(&[("a", Some("k")), ("b", Some("k")), ("c", Some("k"))]);
    bed.signals.delivered(3);
    // One key: one partition, whatever the topic's partition count.
    relay.shutdown(PATIENCE).unwrap();
    let got: Vec<String> = records(&brokers, &topic)
        .into_iter()
        .map(|r| r.headers["outbox-id"].clone())
        .collect();
    let expected: Vec<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(got, expected);
}

#[test]
fn a_topic_the_cluster_does_not_have_is_dead_lettered() {
    let cluster = cluster(&[]);
    // The mock creates topics on first use; this one it reports unknown,
    // as a cluster with auto-creation off does.
    cluster
        .topic_error(
            "missing",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    let sink = outbox::KafkaSink::builder(cluster.bootstrap_servers())
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_eq!(
        dead_at_once(sink, "missing"),
        "permanent failure: Kafka: Message production error: UnknownTopicOrPartition (Broker: Unknown topic or partition)"
    );
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_relay_delivers_to_kafka() {
    use crate::cli::{outbox, stderr};
    let bed = setup();
    let cluster = cluster(&[("outbox.order.approved", 1)]);
    let brokers = cluster.bootstrap_servers();
    let ids = bed.publish(&[
        ("order.approved", Some("order-7")),
        ("order.approved", Some("order-7")),
    ]);
    let output = outbox(
        bed.db.url(),
        &[
            "relay",
            "--sink",
            "kafka",
            "--brokers",
            &brokers,
            "--kafka-topic",
            "outbox.{topic}",
            "--drain",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("drained: delivered 2, retried 0, dead-lettered 0"),
        "{}",
        stderr(&output)
    );
    let got: Vec<(Option<String>, String)> = records(&brokers, "outbox.order.approved")
        .into_iter()
        .map(|r| (r.key, r.headers["outbox-id"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (Some("order-7".to_owned()), ids[0].to_string()),
            (Some("order-7".to_owned()), ids[1].to_string())
        ]
    );
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_refuses_a_kafka_user_without_a_password() {
    let output = crate::cli::outbox(
        "postgres://nowhere.invalid/x",
        &[
            "relay",
            "--sink",
            "kafka",
            "--brokers",
            "b:9092",
            "--kafka-username",
            "app",
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        crate::cli::stderr(&output).contains("--kafka-password"),
        "{}",
        crate::cli::stderr(&output)
    );
}
