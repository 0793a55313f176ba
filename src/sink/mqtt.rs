//! MQTT 5: each event is one message on `<prefix>/<topic>`, the topic's
//! dots turned into levels (`order.approved` → `outbox/order/approved`),
//! delivered once the broker's PUBACK (QoS 1) or PUBCOMP (QoS 2) carries a
//! success reason code.
//!
//! The payload is the JSON payload, or the envelope ([`MqttBuilder::body`]),
//! with content type `application/json` and payload format indicator 1
//! (UTF-8). User properties: every event header
//! ([`MqttBuilder::forward_headers`] chooses which), then `outbox-id` (the event id: QoS 1 may deliver a message
//! twice, consumers deduplicate on it), `outbox-topic` (the event's topic,
//! exactly), `outbox-attempt`, and `outbox-key` when the event has one.
//!
//! A batch from the relay is published at once and its acknowledgements
//! awaited together (`Sink::deliver_batch`); each event gets its own
//! verdict. One connection carries every call; `link.rs` matches each
//! message to its packet id and each acknowledgement to its caller.

mod link;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::tokio_rustls::rustls;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;

use self::link::{Answer, Link, Message};
use super::{Body, DeliveryError, ForwardHeaders, Sink};
use crate::error::{excerpt, Error};
use crate::event::StoredEvent;

/// A [`Sink`] that publishes to an MQTT 5 broker. Build it with
/// [`MqttSink::builder`].
///
/// ```no_run
/// let sink = outbox::MqttSink::builder("mqtt://app:s3cret@127.0.0.1:1883", "outbox")
///     .qos(2) // PUBCOMP instead of PUBACK: exactly once per publish
///     .build()?;
/// // Topic order.approved is published on MQTT topic outbox/order/approved.
/// # Ok::<(), outbox::Error>(())
/// ```
pub struct MqttSink {
    options: MqttOptions,
    prefix: String,
    qos: QoS,
    timeout: Duration,
    max_inflight: u16,
    retry_without_subscribers: bool,
    body: Body,
    forward: ForwardHeaders,
    /// Connected on first use, and again after the connection was lost.
    link: Mutex<Option<Arc<Link>>>,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the options: they hold the password.
        f.debug_struct("MqttSink")
            .field("broker", &self.options.broker_address())
            .field("topic_prefix", &self.prefix)
            .field("qos", &self.qos)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

/// Settings of an [`MqttSink`].
pub struct MqttBuilder {
    url: String,
    prefix: String,
    qos: u8,
    timeout: Duration,
    client_id: Option<String>,
    max_inflight: u16,
    retry_without_subscribers: bool,
    root_certificates: Option<Vec<u8>>,
    body: Body,
    forward: ForwardHeaders,
}

impl std::fmt::Debug for MqttBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("MqttBuilder")
            .field("prefix", &self.prefix)
            .field("qos", &self.qos)
            .field("timeout", &self.timeout)
            .field("client_id", &self.client_id)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

impl MqttSink {
    /// Default limit on connecting and on waiting for the acknowledgements
    /// of one call (one event, or a batch).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default QoS: 1, at least once (PUBACK).
    pub const DEFAULT_QOS: u8 = 1;
    /// Default cap on unacknowledged messages on the connection (the
    /// broker's receive maximum lowers it).
    pub const DEFAULT_MAX_INFLIGHT: u16 = 100;

    /// Starts configuring a sink for the broker at `url`
    /// (`mqtt://[user:password@]host[:port]`, port 1883, or `mqtts://…`,
    /// TLS, port 8883), publishing topic `a.b` on `<topic_prefix>/a/b`.
    pub fn builder(url: impl Into<String>, topic_prefix: impl Into<String>) -> MqttBuilder {
        MqttBuilder {
            url: url.into(),
            prefix: topic_prefix.into(),
            qos: Self::DEFAULT_QOS,
            timeout: Self::DEFAULT_TIMEOUT,
            client_id: None,
            max_inflight: Self::DEFAULT_MAX_INFLIGHT,
            retry_without_subscribers: false,
            root_certificates: None,
            body: Body::Payload,
            forward: ForwardHeaders::All,
        }
    }
}

impl MqttBuilder {
    /// 1 (at least once: delivered on PUBACK) or 2 (exactly once per
    /// publish: delivered on PUBCOMP). Defaults to
    /// [`MqttSink::DEFAULT_QOS`] (1).
    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }

    /// Limits connecting, and waiting for the acknowledgements of one call
    /// (one event, or a whole batch: they are awaited together); keep it
    /// below half the relay's lease. Defaults to
    /// [`MqttSink::DEFAULT_TIMEOUT`] (5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The MQTT client identifier. The sink connects with a clean start,
    /// so no session outlives a connection. Defaults to
    /// `outbox-<process id>-<n>`, unique to each sink of the process.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// The most unacknowledged messages on the connection, and so the most
    /// events the relay hands to one call; the broker's receive maximum
    /// lowers it. Defaults to [`MqttSink::DEFAULT_MAX_INFLIGHT`] (100).
    pub fn max_inflight(mut self, max_inflight: u16) -> Self {
        self.max_inflight = max_inflight;
        self
    }

    /// Whether a message that no subscription matched (reason code 0x10,
    /// "No matching subscribers") is a transient failure, retried until a
    /// subscriber appears or the relay gives up, instead of delivered: the
    /// broker accepted it, but (without a retained or queued copy) nobody
    /// got it. Defaults to `false`: delivered.
    pub fn retry_without_subscribers(mut self, retry: bool) -> Self {
        self.retry_without_subscribers = retry;
        self
    }

    /// For `mqtts://`: the PEM certificates of the authorities the broker's
    /// certificate is checked against (a private CA). Defaults to the
    /// system's bundle: the file `SSL_CERT_FILE` names, or the first of
    /// `/etc/ssl/certs/ca-certificates.crt`,
    /// `/etc/pki/tls/certs/ca-bundle.crt`, `/etc/ssl/cert.pem` that exists.
    pub fn root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates = Some(pem.into());
        self
    }

    /// What each message's payload is: [`Body::Payload`], the event's
    /// payload, or [`Body::Envelope`], `{id, topic, key, created_at,
    /// headers, payload}` (content type `application/json` either way).
    /// Defaults to [`Body::Payload`].
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Which event headers become user properties (and go into the
    /// envelope's `headers`): see [`ForwardHeaders`]. The sink's own
    /// (`outbox-id`, `outbox-topic`, `outbox-attempt`, `outbox-key`) are
    /// always sent. Defaults to [`ForwardHeaders::All`].
    pub fn forward_headers(mut self, headers: ForwardHeaders) -> Self {
        self.forward = headers;
        self
    }

    /// Checks the settings. Does not connect: a broker that is down is
    /// retried like any other outage.
    pub fn build(self) -> Result<MqttSink, Error> {
        let config = |field, reason: String| Error::Config { field, reason };
        let broker = Broker::parse(&self.url).map_err(|reason| config("mqtt.url", reason))?;
        if let Some(problem) = prefix_problem(&self.prefix) {
            return Err(config(
                "mqtt.topic_prefix",
                format!("{:?} {problem}", excerpt(&self.prefix)),
            ));
        }
        let qos = match self.qos {
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            other => return Err(config("mqtt.qos", format!("must be 1 or 2, not {other}"))),
        };
        if self.timeout.is_zero() {
            return Err(config("mqtt.timeout", "must be greater than zero".into()));
        }
        if self.max_inflight == 0 {
            return Err(config("mqtt.max_inflight", "must be at least 1".into()));
        }
        let client_id = match self.client_id {
            Some(id) if id.is_empty() || id.contains('\0') => {
                return Err(config(
                    "mqtt.client_id",
                    "must be non-empty, without NUL".into(),
                ))
            }
            Some(id) => id,
            None => default_client_id(),
        };
        let mut options = MqttOptions::new(client_id, broker.host, broker.port);
        options
            .set_clean_start(true)
            // rumqttc counts whole seconds.
            .set_connection_timeout(self.timeout.as_secs_f64().ceil() as u64)
            .set_outgoing_inflight_upper_limit(self.max_inflight);
        let mut network = rumqttc::NetworkOptions::new();
        // rumqttc writes each publish on its own: without TCP_NODELAY every
        // write after the first waits for the broker's delayed ACK (40 ms).
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(options.connection_timeout());
        options.set_network_options(network);
        if let Some((user, password)) = broker.credentials {
            options.set_credentials(user, password);
        }
        if broker.tls {
            let tls = tls_config(self.root_certificates)
                .map_err(|reason| config("mqtt.root_certificates", reason))?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ));
        }
        Ok(MqttSink {
            options,
            prefix: self.prefix,
            qos,
            timeout: self.timeout,
            max_inflight: self.max_inflight,
            retry_without_subscribers: self.retry_without_subscribers,
            body: self.body,
            forward: self.forward,
            link: Mutex::new(None),
        })
    }
}

impl MqttSink {
    /// The live connection, or a new one if there is none.
    fn link(&self) -> Result<Arc<Link>, DeliveryError> {
        let mut slot = self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(link) = &*slot {
            if !link.is_closed() {
                return Ok(link.clone());
            }
        }
        let link = Link::open(self.options.clone())?;
        *slot = Some(link.clone());
        Ok(link)
    }

    /// `event`'s message, or why it cannot be one (checked before anything
    /// is sent).
    fn message(&self, event: &StoredEvent) -> Result<Message, DeliveryError> {
        let topic = mqtt_topic(&self.prefix, &event.topic)?;
        let mut properties = Vec::with_capacity(event.headers.len() + 4);
        for (name, value) in self.forward.select(event) {
            if !OWN_PROPERTIES.contains(&name) {
                properties.push((name.to_owned(), value.to_owned()));
            }
        }
        properties.push(("outbox-id".to_owned(), event.id.to_string()));
        properties.push(("outbox-topic".to_owned(), event.topic.clone()));
        properties.push(("outbox-attempt".to_owned(), event.attempts.to_string()));
        if let Some(key) = &event.key {
            properties.push(("outbox-key".to_owned(), key.clone()));
        }
        for (name, value) in &properties {
            if !mqtt_string(name) || !mqtt_string(value) {
                return Err(DeliveryError::permanent(format!(
                    "header {:?} cannot be an MQTT user property",
                    excerpt(name)
                )));
            }
        }
        Ok(Message {
            topic,
            qos: self.qos,
            payload: self.body.render(event, &self.forward),
            properties: PublishProperties {
                payload_format_indicator: Some(1),
                content_type: Some("application/json".to_owned()),
                user_properties: properties,
                ..PublishProperties::default()
            },
        })
    }

    /// The verdict on a message to `topic`.
    fn verdict(&self, topic: &str, answer: Answer) -> Result<(), DeliveryError> {
        verdict(topic, answer, self.retry_without_subscribers)
    }
}

impl Sink for MqttSink {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self.deliver_batch(&[event])
            .pop()
            .unwrap_or_else(|| Err(DeliveryError::transient("MQTT: no result")))
    }

    /// Publishes every message, then waits for their acknowledgements, all
    /// within one timeout; each event gets its own verdict.
    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        let deadline = Instant::now() + self.timeout;
        let messages: Vec<_> = events.iter().map(|event| self.message(event)).collect();
        if messages.iter().all(Result::is_err) {
            return messages.into_iter().map(|m| m.map(drop)).collect();
        }
        let every = |messages: Vec<Result<Message, DeliveryError>>, error: DeliveryError| {
            messages
                .into_iter()
                .map(|m| m.and(Err(error.clone())))
                .collect()
        };
        let link = match self
            .link()
            .and_then(|link| link.connected(deadline).map(|_| link))
        {
            Ok(link) => link,
            Err(error) => return every(messages, error),
        };
        let (reply, answers) = crossbeam_channel::unbounded();
        let mut results: Vec<Option<Result<(), DeliveryError>>> = vec![None; events.len()];
        let mut topics = vec![String::new(); events.len()];
        let mut awaited = 0;
        for (index, message) in messages.into_iter().enumerate() {
            let sent = message.and_then(|message| {
                topics[index].clone_from(&message.topic);
                link.publish(message, index, reply.clone())
            });
            match sent {
                Ok(()) => awaited += 1,
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        drop(reply);
        while awaited > 0 {
            let (index, answer) = match answers.recv_deadline(deadline) {
                Ok(answer) => answer,
                Err(_) => {
                    // No acknowledgement in time: the connection is
                    // suspect. Closing it answers every message still
                    // waiting on it; the next call reconnects.
                    link.close(format!(
                        "MQTT: no acknowledgement within {:?}",
                        self.timeout
                    ));
                    match answers.try_recv() {
                        Ok(answer) => answer,
                        Err(_) => break,
                    }
                }
            };
            results[index] = Some(self.verdict(&topics[index], answer));
            awaited -= 1;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(DeliveryError::transient("MQTT: no acknowledgement"))))
            .collect()
    }

    /// rumqttc's inflight cap (`max_inflight`). The broker's receive
    /// maximum (Mosquitto: 20) only meters the sending: rumqttc holds the
    /// rest of a larger call until acknowledgements free the window, and
    /// while the call keeps sending, acknowledgements keep streaming back.
    /// Capping a call at the receive maximum instead made every call end
    /// on an idle wait (the broker's delayed PUBACKs, ~40 ms on Linux
    /// without TCP_NODELAY on its side): 5x slower with one worker.
    fn max_batch(&self) -> usize {
        usize::from(self.max_inflight)
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        let link = self
            .link
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(link) = link.take() {
            link.close("MQTT: the sink was dropped".to_owned());
        }
    }
}

/// User properties the sink sets itself; event headers of these names are
/// left out rather than sent twice.
const OWN_PROPERTIES: [&str; 4] = ["outbox-id", "outbox-topic", "outbox-attempt", "outbox-key"];

/// The broker's answer (or its absence) as a verdict. Reason codes that
/// retrying the same message cannot change are permanent: not authorized
/// (0x87), topic name invalid (0x90), packet too large (0x95), payload
/// format invalid (0x99). The rest may pass later: unspecified (0x80),
/// implementation specific (0x83), packet identifier in use (0x91) or not
/// found (0x92), quota exceeded (0x97), and a lost connection.
fn verdict(
    topic: &str,
    answer: Answer,
    retry_without_subscribers: bool,
) -> Result<(), DeliveryError> {
    match answer {
        Answer::Acked {
            no_subscribers: true,
        } if retry_without_subscribers => Err(DeliveryError::transient(format!(
            "MQTT: no subscriber matches topic {topic} (reason code 0x10)"
        ))),
        Answer::Acked { .. } => Ok(()),
        Answer::Refused(code) => {
            let message = format!(
                "MQTT: the broker refused topic {topic}: {} (reason code {code:#04x})",
                reason_name(code)
            );
            if matches!(code, 0x87 | 0x90 | 0x95 | 0x99) {
                Err(DeliveryError::permanent(message))
            } else {
                Err(DeliveryError::transient(message))
            }
        }
        Answer::Lost(message) => Err(DeliveryError::transient(message)),
    }
}

/// The MQTT 5 name of a PUBACK / PUBREC / PUBCOMP reason code.
fn reason_name(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x92 => "packet identifier not found",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        _ => "unknown reason",
    }
}

/// `<prefix>/<topic with dots as levels>`, or why it is no MQTT topic name.
fn mqtt_topic(prefix: &str, topic: &str) -> Result<String, DeliveryError> {
    let name = format!("{prefix}/{}", topic.replace('.', "/"));
    match topic_problem(&name) {
        None => Ok(name),
        Some(problem) => Err(DeliveryError::permanent(format!(
            "topic {:?} does not make an MQTT topic name: {problem}",
            excerpt(topic)
        ))),
    }
}

/// What keeps `name` from being an MQTT topic name this sink publishes to:
/// wildcards, NUL, empty levels, more than 65,535 bytes.
fn topic_problem(name: &str) -> Option<&'static str> {
    if name.len() > usize::from(u16::MAX) {
        Some("longer than 65535 bytes")
    } else if name.contains(['+', '#']) {
        Some("wildcards (+, #) are not allowed")
    } else if name.contains('\0') {
        Some("NUL is not allowed")
    } else if name.split('/').any(str::is_empty) {
        Some("empty levels are not allowed")
    } else {
        None
    }
}

fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        Some("must not be empty")
    } else if prefix.starts_with('$') {
        Some("must not start with $ (reserved for the broker)")
    } else {
        topic_problem(prefix)
    }
}

/// An MQTT UTF-8 string: no NUL, at most 65,535 bytes.
fn mqtt_string(s: &str) -> bool {
    s.len() <= usize::from(u16::MAX) && !s.contains('\0')
}

fn default_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("outbox-{}-{n}", std::process::id())
}

/// Where the URL points, and the credentials taken out of it.
#[derive(Debug, PartialEq)]
struct Broker {
    tls: bool,
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
}

impl Broker {
    /// `mqtt://[user[:password]@]host[:port][/]` or `mqtts://…`. The reason
    /// never quotes the URL: it may hold a password.
    fn parse(url: &str) -> Result<Broker, String> {
        let expected = "is not mqtt://[user:password@]host[:port] or mqtts://…";
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!("{expected}: unknown scheme"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(format!("{expected}: no path or query allowed"));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{expected}: bad port"))?;
                (host, port)
            }
            _ => (hostport, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{expected}: no host"));
        }
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let decode =
                    |s| percent_decode(s).ok_or_else(|| format!("{expected}: bad %-escape"));
                Some((decode(user)?, decode(password)?))
            }
        };
        Ok(Broker {
            tls,
            host: host.to_owned(),
            port,
            credentials,
        })
    }
}

/// `%40` → `@` (a password may hold `@`, `:` or `/` escaped).
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The rustls client configuration for `mqtts://`, with its crypto provider
/// named here rather than taken from the process default (which panics when
/// several providers are compiled in and none was installed): ring, which
/// the `mqtt` feature brings (lighter to build than aws-lc-rs).
fn tls_config(pem: Option<Vec<u8>>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = match pem {
        Some(pem) => pem,
        None => system_roots()?,
    };
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err("no usable CA certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn system_roots() -> Result<Vec<u8>, String> {
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(std::path::PathBuf::from),
        );
    for path in candidates {
        if let Ok(pem) = std::fs::read(&path) {
            return Ok(pem);
        }
    }
    Err("no system CA bundle found: set root_certificates_pem or SSL_CERT_FILE".into())
}

#[cfg(test)]
mod tests;
