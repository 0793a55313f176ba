//! Apache Kafka: each event is one record, delivered once the broker's
//! delivery report for that record says so.
//!
//! The producer is librdkafka's idempotent producer (`enable.idempotence`,
//! `acks=all`): its own retries within one delivery never write a record
//! twice. A record:
//! - **topic**: the event topic, or what [`KafkaBuilder::topic_template`] or
//!   [`KafkaBuilder::topic_with`] make of it;
//! - **key**: the event key (no key: a null key), partitioned with
//!   `murmur2_random`, the Java client's partitioner, so a key's records
//!   land in one partition whichever client wrote them, in order;
//! - **value**: the JSON payload, or the envelope
//!   `{id, topic, key, created_at, headers, payload}` ([`KafkaBuilder::body`]);
//! - **headers**: every event header ([`KafkaBuilder::forward_headers`]
//!   chooses which), then `outbox-id`, `outbox-topic` and `outbox-attempt`.
//!
//! A batch from the relay is produced at once and its delivery reports
//! awaited together (`Sink::deliver_batch`); each event gets its own
//! verdict. The producer's delivery timeout (`message.timeout.ms`) is the
//! sink's timeout, so every record gets a report, success or failure,
//! before the call gives up on it.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{Body, DeliveryError, ForwardHeaders, Sink};
use crate::error::{excerpt, Error};
use crate::event::StoredEvent;

/// A [`Sink`] that produces to Apache Kafka. Build it with
/// [`KafkaSink::builder`].
///
/// ```no_run
/// let sink = outbox::KafkaSink::builder("127.0.0.1:9092")
///     .topic_template("outbox.{topic}")
///     .build()?;
/// // Topic order.approved is produced to Kafka topic outbox.order.approved.
/// # Ok::<(), outbox::Error>(())
/// ```
pub struct KafkaSink {
    config: ClientConfig,
    topics: TopicMap,
    body: Body,
    forward: ForwardHeaders,
    timeout: Duration,
    /// Replaced after a fatal error, which leaves an idempotent producer
    /// unusable.
    producer: RwLock<Arc<ThreadedProducer<Reports>>>,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the client configuration: it may hold a SASL password.
        f.debug_struct("KafkaSink")
            .field("topics", &self.topics)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`KafkaSink`].
pub struct KafkaBuilder {
    brokers: String,
    topics: TopicMap,
    body: Body,
    forward: ForwardHeaders,
    timeout: Duration,
    sasl: Option<(String, String)>,
    settings: Vec<(String, String)>,
}

impl fmt::Debug for KafkaBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials, nor settings that may hold secrets.
        f.debug_struct("KafkaBuilder")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How an event's topic becomes a Kafka topic.
#[derive(Clone)]
enum TopicMap {
    Same,
    /// `{topic}` is replaced by the event topic.
    Template(String),
    Function(Arc<dyn Fn(&StoredEvent) -> String + Send + Sync>),
}

impl fmt::Debug for TopicMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicMap::Same => f.write_str("Same"),
            TopicMap::Template(template) => f.debug_tuple("Template").field(template).finish(),
            TopicMap::Function(_) => f.write_str("Function"),
        }
    }
}

impl KafkaSink {
    /// Default delivery timeout of one call (one event, or a batch): the
    /// producer's `message.timeout.ms`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Starts configuring a sink for the Kafka cluster at `brokers` (the
    /// bootstrap servers, `host:port[,host:port…]`), producing topic `t` to
    /// Kafka topic `t`.
    pub fn builder(brokers: impl Into<String>) -> KafkaBuilder {
        KafkaBuilder {
            brokers: brokers.into(),
            topics: TopicMap::Same,
            body: Body::Payload,
            forward: ForwardHeaders::All,
            timeout: Self::DEFAULT_TIMEOUT,
            sasl: None,
            settings: Vec::new(),
        }
    }
}

impl KafkaBuilder {
    /// Produces every event to the Kafka topic `template` makes, with
    /// `{topic}` replaced by the event topic: `"outbox.{topic}"`, or
    /// `"events"` for one topic that takes them all.
    pub fn topic_template(mut self, template: impl Into<String>) -> Self {
        self.topics = TopicMap::Template(template.into());
        self
    }

    /// Produces each event to the Kafka topic `topic_of` returns for it.
    pub fn topic_with(
        mut self,
        topic_of: impl Fn(&StoredEvent) -> String + Send + Sync + 'static,
    ) -> Self {
        self.topics = TopicMap::Function(Arc::new(topic_of));
        self
    }

    /// What each record's value is: [`Body::Payload`], the payload, or
    /// [`Body::Envelope`], `{id, topic, key, created_at, headers, payload}`.
    /// Defaults to [`Body::Payload`].
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Which event headers become record headers (and go into the
    /// envelope's `headers`): see [`ForwardHeaders`]. The sink's own
    /// (`outbox-id`, `outbox-topic`, `outbox-attempt`) are always sent.
    /// Defaults to [`ForwardHeaders::All`].
    pub fn forward_headers(mut self, headers: ForwardHeaders) -> Self {
        self.forward = headers;
        self
    }

    /// Limits the delivery of one call (one event, or a whole batch: their
    /// reports are awaited together), librdkafka's retries included; keep it
    /// below half the relay's lease. Defaults to
    /// [`KafkaSink::DEFAULT_TIMEOUT`] (10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Authenticates with SASL/PLAIN (`security.protocol=SASL_PLAINTEXT`).
    /// The password never appears in `Debug`, logs or errors.
    pub fn sasl_plain(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.sasl = Some((username.into(), password.into()));
        self
    }

    /// Sets any other librdkafka producer property (`compression.type`,
    /// `linger.ms`, `security.protocol`, …). The sink's own settings
    /// (`enable.idempotence`, `acks`, `message.timeout.ms`, the brokers)
    /// cannot be changed this way: [`build`](Self::build) refuses them.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }

    /// Checks the settings and creates the producer. Does not wait for the
    /// brokers: a cluster that is down is retried like any other outage.
    pub fn build(self) -> Result<KafkaSink, Error> {
        let config = |field, reason: String| Error::Config { field, reason };
        if self.brokers.trim().is_empty() {
            return Err(config("kafka.brokers", "must not be empty".into()));
        }
        if self.timeout < Duration::from_millis(1) {
            return Err(config(
                "kafka.timeout",
                "must be at least one millisecond".into(),
            ));
        }
        if let TopicMap::Template(template) = &self.topics {
            let sample = template.replace("{topic}", "t");
            if let Err(reason) = kafka_topic_problem(&sample) {
                return Err(config(
                    "kafka.topic_template",
                    format!(
                        "{:?} does not make a Kafka topic: {reason}",
                        excerpt(template)
                    ),
                ));
            }
        }
        const OWN: [&str; 7] = [
            "bootstrap.servers",
            "metadata.broker.list",
            "enable.idempotence",
            "acks",
            "request.required.acks",
            "message.timeout.ms",
            "delivery.timeout.ms",
        ];
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "outbox")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            // Send as soon as a record is produced: the relay batches
            // already, and a lone event should not wait.
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                self.timeout.as_millis().min(i32::MAX as u128).to_string(),
            )
            // How long a topic the cluster does not know may take to
            // appear before its records fail as unknown (permanent):
            // within the delivery timeout, or they would only time out.
            .set(
                "topic.metadata.propagation.max.ms",
                (self.timeout.as_millis() / 2).clamp(1, 30_000).to_string(),
            )
            .set_log_level(RDKafkaLogLevel::Warning);
        if let Some((username, password)) = &self.sasl {
            client
                .set("security.protocol", "SASL_PLAINTEXT")
                .set("sasl.mechanisms", "PLAIN")
                .set("sasl.username", username)
                .set("sasl.password", password);
        }
        for (key, value) in &self.settings {
            if OWN.contains(&key.as_str()) {
                return Err(config(
                    "kafka.set",
                    format!("{key:?} is set by the sink itself"),
                ));
            }
            client.set(key, value);
        }
        let producer = create_producer(&client)?;
        Ok(KafkaSink {
            config: client,
            topics: self.topics,
            body: self.body,
            forward: self.forward,
            timeout: self.timeout,
            producer: RwLock::new(producer),
        })
    }
}

/// A producer for `config`, or a configuration error that names the
/// property but never its value (it may be a password).
fn create_producer(config: &ClientConfig) -> Result<Arc<ThreadedProducer<Reports>>, Error> {
    config
        .create_with_context(Reports)
        .map(Arc::new)
        .map_err(config_error)
}

fn config_error(error: KafkaError) -> Error {
    let reason = match error {
        // librdkafka's description may quote the value.
        KafkaError::ClientConfig(_, _, key, _) if secret(&key) => {
            format!("property {key:?} has a value librdkafka does not accept")
        }
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("property {key:?}: {description}")
        }
        other => other.to_string(),
    };
    Error::Config {
        field: "kafka",
        reason,
    }
}

/// Properties whose value is a secret.
fn secret(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.contains("jaas")
}

/// Where one record's delivery report goes: the waiting call's channel, and
/// the record's place in its batch.
struct Ticket {
    index: usize,
    reports: Sender<(usize, Result<(), DeliveryError>)>,
}

/// The producer's callbacks: delivery reports to the waiting call, and
/// librdkafka's own logs and errors to `tracing`.
struct Reports;

impl ClientContext for Reports {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Connection trouble is reported per record too; this is the
        // client-wide view (e.g. "all brokers down").
        tracing::warn!("Kafka: {error}: {reason}");
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, report: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        let verdict = match report {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(verdict(error)),
        };
        // The call may have given up waiting: then nobody listens.
        let _ = ticket.reports.send((ticket.index, verdict));
    }
}

/// The verdict on a record that failed: permanent for what no retry can
/// fix, transient for the rest.
fn verdict(error: &KafkaError) -> DeliveryError {
    use RDKafkaErrorCode as Code;
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::InvalidTimestamp
                | Code::InvalidTopic
                | Code::UnknownTopic
                | Code::UnknownTopicOrPartition
                | Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::PolicyViolation
                | Code::InvalidArgument
        )
    );
    if permanent {
        DeliveryError::permanent(format!("Kafka: {error}"))
    } else {
        DeliveryError::transient(format!("Kafka: {error}"))
    }
}

/// Why `topic` cannot be a Kafka topic, if it cannot: 1 to 249 of ASCII
/// letters, digits, `.`, `_` and `-`, and not `.` or `..`.
fn kafka_topic_problem(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("empty");
    }
    if topic.len() > 249 {
        return Err("longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return Err("`.` and `..` are not topics");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// One record, ready to produce.
struct Record {
    topic: String,
    key: Option<String>,
    value: Vec<u8>,
    headers: OwnedHeaders,
}

impl KafkaSink {
    /// The record of `event`, or why it cannot be one (checked before
    /// anything is produced).
    fn record(&self, event: &StoredEvent) -> Result<Record, DeliveryError> {
        let topic = match &self.topics {
            TopicMap::Same => event.topic.clone(),
            TopicMap::Template(template) => template.replace("{topic}", &event.topic),
            TopicMap::Function(topic_of) => topic_of(event),
        };
        if let Err(reason) = kafka_topic_problem(&topic) {
            return Err(DeliveryError::permanent(format!(
                "topic {:?} does not make a Kafka topic ({:?}: {reason})",
                excerpt(&event.topic),
                excerpt(&topic)
            )));
        }
        let value = self.body.render(event, &self.forward);
        let id = event.id.to_string();
        let attempt = event.attempts.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len() + 3);
        for (name, value) in self.forward.select(event) {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        for (name, value) in [
            ("outbox-id", &id),
            ("outbox-topic", &event.topic),
            ("outbox-attempt", &attempt),
        ] {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        Ok(Record {
            topic,
            key: event.key.clone(),
            value,
            headers,
        })
    }

    fn producer(&self) -> Arc<ThreadedProducer<Reports>> {
        Arc::clone(
            &self
                .producer
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// After a fatal error (the idempotent producer lost its sequence
    /// state), the next call gets a new producer.
    fn replace_if_fatal(&self, producer: &Arc<ThreadedProducer<Reports>>) {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return;
        };
        tracing::error!("Kafka producer failed fatally ({code}: {reason}); starting a new one");
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if Arc::ptr_eq(&slot, producer) {
            match create_producer(&self.config) {
                Ok(fresh) => *slot = fresh,
                Err(error) => tracing::error!("could not start a new Kafka producer: {error}"),
            }
        }
    }

    /// Waits for the report of every record produced (`pending`), until
    /// the timeout and a grace period have passed.
    fn await_reports(
        &self,
        reports: &Receiver<(usize, Result<(), DeliveryError>)>,
        results: &mut [Option<Result<(), DeliveryError>>],
        mut pending: usize,
        started: Instant,
    ) {
        // librdkafka reports every record by message.timeout.ms; the grace
        // covers the report's way to this thread.
        let deadline = started + self.timeout + Duration::from_secs(1);
        while pending > 0 {
            let Ok((index, verdict)) = reports.recv_deadline(deadline) else {
                break;
            };
            if let Some(slot) = results.get_mut(index) {
                if slot.is_none() {
                    pending -= 1;
                }
                *slot = Some(verdict);
            }
        }
    }
}

impl Sink for KafkaSink {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self.deliver_batch(&[event])
            .pop()
            .unwrap_or_else(|| Err(DeliveryError::transient("Kafka: no result")))
    }

    /// Produces every record, then waits for their delivery reports, all
    /// within one timeout; each event gets its own verdict.
    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        let started = Instant::now();
        let producer = self.producer();
        let (sender, reports) = crossbeam_channel::unbounded();
        let mut results: Vec<Option<Result<(), DeliveryError>>> = vec![None; events.len()];
        let mut pending = 0;
        for (index, event) in events.iter().enumerate() {
            let record = match self.record(event) {
                Ok(record) => record,
                Err(error) => {
                    results[index] = Some(Err(error));
                    continue;
                }
            };
            let ticket = Box::new(Ticket {
                index,
                reports: sender.clone(),
            });
            let mut base = BaseRecord::with_opaque_to(&record.topic, ticket)
                .payload(&record.value)
                .headers(record.headers);
            if let Some(key) = &record.key {
                base = base.key(key.as_str());
            }
            match producer.send(base) {
                Ok(()) => pending += 1,
                Err((error, _)) => results[index] = Some(Err(verdict(&error))),
            }
        }
        drop(sender);
        self.await_reports(&reports, &mut results, pending, started);
        if results.iter().any(|r| matches!(r, Some(Err(_)))) {
            self.replace_if_fatal(&producer);
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(DeliveryError::transient(format!(
                        "Kafka: no delivery report within {:?}",
                        self.timeout
                    )))
                })
            })
            .collect()
    }

    /// The relay's whole batch: the delivery reports are awaited together.
    fn max_batch(&self) -> usize {
        usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_topics_are_checked() {
        for good in ["orders", "outbox.order-approved_v2", &"a".repeat(249)] {
            assert_eq!(kafka_topic_problem(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "order/approved",
            "é",
            &"a".repeat(250),
        ] {
            assert!(kafka_topic_problem(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_password_never_shows() {
        let builder = KafkaSink::builder("127.0.0.1:9092").sasl_plain("app", "s3cret");
        assert!(!format!("{builder:?}").contains("s3cret"));
        let sink = builder.build().unwrap();
        assert!(!format!("{sink:?}").contains("s3cret"));
        // A bad value of a secret property is named, never shown.
        let error = config_error(KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"s3cret\" for configuration property".into(),
            "ssl.key.password".into(),
            "s3cret".into(),
        ));
        assert_eq!(
            error.to_string(),
            "invalid relay configuration: kafka property \"ssl.key.password\" has a value librdkafka does not accept"
        );
        // Other properties keep librdkafka's description.
        let error = KafkaSink::builder("127.0.0.1:9092")
            .set("no.such.property", "x")
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("no.such.property"), "{error}");
    }

    #[test]
    fn the_sink_keeps_its_own_settings() {
        let error = KafkaSink::builder("127.0.0.1:9092")
            .set("acks", "1")
            .build()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            Error::Config {
                field: "kafka.set",
                reason: "\"acks\" is set by the sink itself".into()
            }
            .to_string()
        );
    }

    #[test]
    fn failures_that_no_retry_fixes_are_permanent() {
        use crate::DeliveryErrorKind as Kind;
        let kind = |code| verdict(&KafkaError::MessageProduction(code)).kind();
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidRecord,
        ] {
            assert_eq!(kind(code), Kind::Permanent, "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::Fatal,
        ] {
            assert_eq!(kind(code), Kind::Transient, "{code:?}");
        }
    }
}
