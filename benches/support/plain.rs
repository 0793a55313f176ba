//! The plain-client baselines of `benches/sinks.rs`: each target's own
//! client sending the messages the sink sends (same headers, properties,
//! fields and signature) and waiting for the same acknowledgements, either
//! one at a time or pipelined a batch at a time.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Messages a pipelined baseline sends before waiting for their
/// acknowledgements: the relay's default batch size.
pub const PIPELINE: usize = 100;

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A bare `ureq` agent (default settings) POSTing what `WebhookSink`
/// POSTs, signed the same way.
pub struct Webhook {
    pub agent: ureq::Agent,
    pub url: String,
    /// The decoded `whsec_` key.
    pub key: Vec<u8>,
}

impl Webhook {
    /// One request after the other, each waiting for its response.
    pub fn sequential(&self, messages: &[Value]) {
        use base64::Engine;
        use hmac::Mac;
        for (n, data) in messages.iter().enumerate() {
            let body = serde_json::to_vec(&serde_json::json!({
                "type": "order.approved",
                "timestamp": now_rfc3339(),
                "data": data,
            }))
            .unwrap();
            let id = n.to_string();
            let timestamp = unix_seconds().to_string();
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).unwrap();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(&body);
            let signature = format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            );
            let response = self
                .agent
                .post(&self.url)
                .header("content-type", "application/json")
                .header("webhook-id", &id)
                .header("webhook-timestamp", &timestamp)
                .header("outbox-topic", "order.approved")
                .header("outbox-attempt", "1")
                .header("webhook-signature", signature)
                .send(&body[..])
                .unwrap();
            assert_eq!(response.status().as_u16(), 204);
        }
    }
}

/// A plain `redis` connection sending the sink's `XADD`.
pub struct Redis {
    pub conn: redis::Connection,
    pub stream: &'static str,
}

impl Redis {
    fn xadd(&self, n: usize, data: &Value) -> redis::Cmd {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(self.stream)
            .arg("*")
            .arg("id")
            .arg(n)
            .arg("topic")
            .arg("order.approved")
            .arg("payload")
            .arg(data.to_string())
            .arg("headers")
            .arg("{}")
            .arg("created_at")
            .arg(now_rfc3339());
        xadd
    }

    /// One `XADD` after the other, each waiting for its reply.
    pub fn sequential(&mut self, messages: &[Value]) {
        for (n, data) in messages.iter().enumerate() {
            self.xadd(n, data).query::<String>(&mut self.conn).unwrap();
        }
    }

    /// [`PIPELINE`] `XADD`s in one pipeline, then their replies.
    pub fn pipelined(&mut self, messages: &[Value]) {
        for (chunk_no, chunk) in messages.chunks(PIPELINE).enumerate() {
            let mut pipe = redis::pipe();
            for (n, data) in chunk.iter().enumerate() {
                pipe.add_command(self.xadd(chunk_no * PIPELINE + n, data));
            }
            let ids: Vec<String> = pipe.query(&mut self.conn).unwrap();
            assert_eq!(ids.len(), chunk.len());
        }
    }
}

/// A plain `async-nats` JetStream context publishing what `NatsSink`
/// publishes.
pub struct Nats {
    pub runtime: tokio::runtime::Runtime,
    pub context: async_nats::jetstream::Context,
    pub subject: &'static str,
    pub next_id: usize,
}

impl Nats {
    fn headers(&mut self) -> async_nats::HeaderMap {
        self.next_id += 1;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("plain-{}", self.next_id).as_str());
        headers.insert("outbox-topic", "order.approved");
        headers.insert("outbox-attempt", "1");
        headers
    }

    /// One publish after the other, each waiting for its PubAck.
    pub fn sequential(&mut self, messages: &[Value]) {
        for data in messages {
            let headers = self.headers();
            self.runtime.block_on(async {
                self.context
                    .publish_with_headers(self.subject, headers, data.to_string().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            });
        }
    }

    /// [`PIPELINE`] publishes, then their PubAcks.
    pub fn pipelined(&mut self, messages: &[Value]) {
        for chunk in messages.chunks(PIPELINE) {
            let headers: Vec<_> = chunk.iter().map(|_| self.headers()).collect();
            self.runtime.block_on(async {
                let mut acks = Vec::with_capacity(chunk.len());
                for (data, headers) in chunk.iter().zip(headers) {
                    let ack = self
                        .context
                        .publish_with_headers(self.subject, headers, data.to_string().into())
                        .await
                        .unwrap();
                    acks.push(ack);
                }
                for ack in acks {
                    ack.await.unwrap();
                }
            });
        }
    }
}

/// A plain `lapin` channel in confirm mode publishing what `AmqpSink`
/// publishes.
pub struct Amqp {
    pub runtime: tokio::runtime::Runtime,
    pub channel: lapin::Channel,
    pub exchange: &'static str,
}

impl Amqp {
    fn properties(n: usize) -> lapin::BasicProperties {
        use lapin::types::{AMQPValue, FieldTable, ShortString};
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("outbox-topic"),
            AMQPValue::LongString("order.approved".into()),
        );
        headers.insert(
            ShortString::from("outbox-attempt"),
            AMQPValue::LongString("1".into()),
        );
        lapin::BasicProperties::default()
            .with_message_id(n.to_string().into())
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_timestamp(unix_seconds())
            .with_headers(headers)
    }

    async fn publish(&self, n: usize, data: &Value) -> lapin::PublisherConfirm {
        self.channel
            .basic_publish(
                self.exchange.into(),
                "order.approved".into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                data.to_string().as_bytes(),
                Self::properties(n),
            )
            .await
            .unwrap()
    }

    /// One publish after the other, each waiting for its confirm.
    pub fn sequential(&self, messages: &[Value]) {
        self.runtime.block_on(async {
            for (n, data) in messages.iter().enumerate() {
                let confirm = self.publish(n, data).await.await.unwrap();
                assert!(matches!(confirm, lapin::Confirmation::Ack(None)));
            }
        })
    }

    /// [`PIPELINE`] publishes, then their confirms.
    pub fn pipelined(&self, messages: &[Value]) {
        self.runtime.block_on(async {
            for (chunk_no, chunk) in messages.chunks(PIPELINE).enumerate() {
                let mut confirms = Vec::with_capacity(chunk.len());
                for (n, data) in chunk.iter().enumerate() {
                    confirms.push(self.publish(chunk_no * PIPELINE + n, data).await);
                }
                for confirm in confirms {
                    let confirm = confirm.await.unwrap();
                    assert!(matches!(confirm, lapin::Confirmation::Ack(None)));
                }
            }
        })
    }
}

/// A plain rumqttc v5 client publishing what `MqttSink` publishes (QoS 1,
/// same properties), polling its own event loop for the PUBACKs.
pub struct Mqtt {
    pub client: rumqttc::v5::Client,
    pub connection: rumqttc::v5::Connection,
    pub topic: &'static str,
}

impl Mqtt {
    /// A client for the broker at 127.0.0.1:`port`, room for a pipeline.
    pub fn connect(port: u16, topic: &'static str) -> Mqtt {
        let mut options = rumqttc::v5::MqttOptions::new("outbox-bench-plain", "127.0.0.1", port);
        // As the sink does: without it, each publish after the first waits
        // for a delayed ACK.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, connection) = rumqttc::v5::Client::new(options, PIPELINE);
        Mqtt {
            client,
            connection,
            topic,
        }
    }

    /// [`PIPELINE`] publishes, then their PUBACKs.
    pub fn pipelined(&mut self, messages: &[Value]) {
        use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
        use rumqttc::v5::Event;
        for (chunk_no, chunk) in messages.chunks(PIPELINE).enumerate() {
            for (n, data) in chunk.iter().enumerate() {
                let properties = PublishProperties {
                    payload_format_indicator: Some(1),
                    content_type: Some("application/json".into()),
                    user_properties: vec![
                        ("outbox-id".into(), (chunk_no * PIPELINE + n).to_string()),
                        ("outbox-topic".into(), "order.approved".into()),
                        ("outbox-attempt".into(), "1".into()),
                    ],
                    ..PublishProperties::default()
                };
                self.client
                    .publish_with_properties(
                        self.topic,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        data.to_string().into_bytes(),
                        properties,
                    )
                    .unwrap();
            }
            let mut acked = 0;
            while acked < chunk.len() {
                if let Event::Incoming(Packet::PubAck(ack)) =
                    self.connection.recv().unwrap().unwrap()
                {
                    use rumqttc::v5::mqttbytes::v5::PubAckReason;
                    assert!(matches!(
                        ack.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ));
                    acked += 1;
                }
            }
        }
    }
}

/// An idempotent librdkafka producer (`acks=all`, as `KafkaSink`'s)
/// producing what the sink produces, waiting for every delivery report of
/// a pipeline.
pub struct Kafka {
    pub producer: rdkafka::producer::BaseProducer,
    pub topic: String,
}

impl Kafka {
    pub fn connect(brokers: &str, topic: &str) -> Kafka {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        Kafka {
            producer,
            topic: topic.to_owned(),
        }
    }

    /// [`PIPELINE`] records, then all their delivery reports (a failed one
    /// panics).
    pub fn pipelined(&mut self, messages: &[Value]) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseRecord, Producer};
        for (chunk_no, chunk) in messages.chunks(PIPELINE).enumerate() {
            for (n, data) in chunk.iter().enumerate() {
                let id = (chunk_no * PIPELINE + n).to_string();
                let value = data.to_string();
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "outbox-id",
                        value: Some(&id),
                    })
                    .insert(Header {
                        key: "outbox-topic",
                        value: Some("order.approved"),
                    })
                    .insert(Header {
                        key: "outbox-attempt",
                        value: Some("1"),
                    });
                let record = BaseRecord::<(), _>::to(&self.topic)
                    .payload(&value)
                    .headers(headers);
                self.producer.send(record).map_err(|(e, _)| e).unwrap();
            }
            // Every delivery report, polled as they come (`flush` waits
            // on a coarser poll).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while self.producer.in_flight_count() > 0 {
                assert!(std::time::Instant::now() < deadline, "no delivery reports");
                self.producer.poll(std::time::Duration::from_millis(1));
            }
        }
    }
}
