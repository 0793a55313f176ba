//! RabbitMQ (AMQP 0-9-1): each event is one persistent message, delivered
//! once the broker confirms it (publisher confirms).
//!
//! Published to the configured exchange with the topic as routing key (or a
//! fixed routing key), `mandatory` set. Properties: `message_id` = the
//! event id (consumers deduplicate on it), `delivery_mode` 2 (persistent),
//! `content_type` `application/json`, `timestamp` = publish time; headers
//! `outbox-topic`, `outbox-attempt`, `outbox-key` (when the event has one)
//! and every event header ([`AmqpBuilder::forward_headers`] chooses which).
//! The body is the JSON payload, or the envelope ([`AmqpBuilder::body`]).
//!
//! Outcomes:
//!
//! | broker answer | verdict |
//! |---|---|
//! | ack | delivered |
//! | ack, but the message came back unroutable (no queue bound for the routing key) | transient: "unroutable …"; binding a queue lets the retries through |
//! | nack (the broker could not take it) | transient |
//! | the exchange does not exist (channel closed with 404) | transient: "exchange … not found" |
//! | connection lost, timeout | transient; the sink reconnects on the next delivery |
//!
//! A batch from the relay is published at once on the sink's channel and
//! its confirms awaited together (`Sink::deliver_batch`); each event still
//! gets its own verdict.
//!
//! The client (`lapin`) is asynchronous; its tokio runtime (one thread)
//! stays inside the sink, whose API is synchronous like every other sink.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};

use super::{Body, DeliveryError, ForwardHeaders, Sink};
use crate::error::{excerpt, Error};
use crate::event::StoredEvent;

/// A [`Sink`] that publishes to a RabbitMQ exchange. Build it with
/// [`AmqpSink::builder`].
///
/// ```no_run
/// let sink = outbox::AmqpSink::builder("amqp://guest:guest@127.0.0.1:5672/%2f", "events").build()?;
/// // Topic order.approved goes to exchange "events" with routing key order.approved.
/// # Ok::<(), outbox::Error>(())
/// ```
pub struct AmqpSink {
    runtime: tokio::runtime::Runtime,
    url: String,
    exchange: String,
    routing_key: Option<String>,
    timeout: Duration,
    body: Body,
    forward: ForwardHeaders,
    /// Opened on first use, and again after any failure.
    open: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it carries the password.
        f.debug_struct("AmqpSink")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

/// Settings of an [`AmqpSink`].
pub struct AmqpBuilder {
    url: String,
    exchange: String,
    routing_key: Option<String>,
    timeout: Duration,
    body: Body,
    forward: ForwardHeaders,
}

impl std::fmt::Debug for AmqpBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password or a token.
        f.debug_struct("AmqpBuilder")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("timeout", &self.timeout)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// Default limit on connecting and on waiting for the confirms of one
    /// call (one event, or a batch).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Starts configuring a sink that publishes to `exchange` on the broker
    /// at `url` (`amqp://user:password@host:port/vhost`).
    pub fn builder(url: impl Into<String>, exchange: impl Into<String>) -> AmqpBuilder {
        AmqpBuilder {
            url: url.into(),
            exchange: exchange.into(),
            routing_key: None,
            timeout: Self::DEFAULT_TIMEOUT,
            body: Body::Payload,
            forward: ForwardHeaders::All,
        }
    }
}

impl AmqpBuilder {
    /// Publishes every event with this routing key instead of its topic.
    /// Defaults to the topic.
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }

    /// Limits connecting, and waiting for the confirms of one call (one
    /// event, or a whole batch: they are awaited together); keep it below
    /// half the relay's lease. Defaults to [`AmqpSink::DEFAULT_TIMEOUT`]
    /// (5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What each message's body is: [`Body::Payload`], the payload, or
    /// [`Body::Envelope`], `{id, topic, key, created_at, headers, payload}`
    /// (content type `application/json` either way). Defaults to
    /// [`Body::Payload`].
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Which event headers go into the message's header table (and into
    /// the envelope's `headers`): see [`ForwardHeaders`]. The sink's own
    /// (`outbox-topic`, `outbox-attempt`, `outbox-key`) and the
    /// `message_id` property are always sent. Defaults to
    /// [`ForwardHeaders::All`].
    pub fn forward_headers(mut self, headers: ForwardHeaders) -> Self {
        self.forward = headers;
        self
    }

    /// Checks the settings and starts the client's runtime. Does not
    /// connect: a broker that is down is retried like any other outage.
    pub fn build(self) -> Result<AmqpSink, Error> {
        let config = |field, reason: String| Error::Config { field, reason };
        if self.url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(config(
                "amqp.url",
                "is not an amqp:// or amqps:// URL".into(),
            ));
        }
        if self.exchange.len() > 255 {
            return Err(config("amqp.exchange", "is longer than 255 bytes".into()));
        }
        if self.routing_key.as_ref().is_some_and(|k| k.len() > 255) {
            return Err(config(
                "amqp.routing_key",
                "is longer than 255 bytes".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(config("amqp.timeout", "must be greater than zero".into()));
        }
        let runtime = super::private_runtime("amqp")?;
        Ok(AmqpSink {
            runtime,
            url: self.url,
            exchange: self.exchange,
            routing_key: self.routing_key,
            timeout: self.timeout,
            body: self.body,
            forward: self.forward,
            open: Mutex::new(None),
        })
    }
}

impl AmqpSink {
    /// The open channel (in confirm mode), opening it if needed.
    async fn channel(&self) -> Result<Channel, DeliveryError> {
        if let Some((_, channel)) = &*self.lock() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| DeliveryError::transient(format!("RabbitMQ unreachable: {e}")))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| DeliveryError::transient(format!("RabbitMQ: opening a channel: {e}")))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| DeliveryError::transient(format!("RabbitMQ: enabling confirms: {e}")))?;
        *self.lock() = Some((connection, channel.clone()));
        Ok(channel)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Connection, Channel)>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn properties(&self, event: &StoredEvent) -> BasicProperties {
        let mut headers = FieldTable::default();
        let mut put = |name: &str, value: &str| {
            headers.insert(ShortString::from(name), AMQPValue::LongString(value.into()));
        };
        for (name, value) in self.forward.select(event) {
            put(name, value);
        }
        put("outbox-topic", &event.topic);
        put("outbox-attempt", &event.attempts.to_string());
        if let Some(key) = &event.key {
            put("outbox-key", key);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        BasicProperties::default()
            .with_message_id(event.id.to_string().into())
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_timestamp(now)
            .with_headers(headers)
    }

    /// The routing key of `event`'s message.
    fn routing_key<'a>(&'a self, event: &'a StoredEvent) -> &'a str {
        self.routing_key.as_deref().unwrap_or(&event.topic)
    }

    /// Why `event` cannot be a message, checked before anything is sent.
    fn check(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        if self.forward.select(event).any(|(name, _)| name.len() > 255) {
            return Err(DeliveryError::permanent(
                "an event header name is longer than AMQP allows (255 bytes)",
            ));
        }
        Ok(())
    }

    /// Sends `event`'s message; returns the future of its confirm.
    async fn send(
        &self,
        channel: &Channel,
        event: &StoredEvent,
    ) -> Result<PublisherConfirm, DeliveryError> {
        let body = self.body.render(event, &self.forward);
        channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key(event).into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                self.properties(event),
            )
            .await
            .map_err(|e| self.failed(e))
    }

    /// The verdict on a message the broker answered.
    fn verdict(&self, routing_key: &str, confirm: Confirmation) -> Result<(), DeliveryError> {
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(DeliveryError::transient(format!(
                "unroutable: no queue is bound to exchange {:?} for routing key {:?} ({} {})",
                self.exchange, routing_key, returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(DeliveryError::transient(format!(
                "RabbitMQ refused the message (nack) on exchange {:?}",
                self.exchange
            ))),
            Confirmation::NotRequested => Err(DeliveryError::transient(
                "RabbitMQ did not confirm the message",
            )),
        }
    }

    /// Forgets the connection when the timeout runs out (the broker may be
    /// stuck) and says so.
    fn timed_out(&self) -> DeliveryError {
        self.lock().take();
        DeliveryError::transient(format!("RabbitMQ: no confirm within {:?}", self.timeout))
    }

    /// Forgets the connection after an error (the channel is closed by the
    /// broker on most of them) and explains it.
    fn failed(&self, error: lapin::Error) -> DeliveryError {
        self.lock().take();
        let message = error.to_string();
        if message.contains("NOT_FOUND") {
            DeliveryError::transient(format!(
                "RabbitMQ: exchange {:?} not found: {}",
                excerpt(&self.exchange),
                message
            ))
        } else {
            DeliveryError::transient(format!("RabbitMQ: {message}"))
        }
    }
}

impl Sink for AmqpSink {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self.deliver_batch(&[event])
            .pop()
            .unwrap_or_else(|| Err(DeliveryError::transient("RabbitMQ: no result")))
    }

    /// Publishes every message, then waits for their confirms, all within
    /// one timeout; each event gets its own verdict.
    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        let checked: Vec<_> = events.iter().map(|event| self.check(event)).collect();
        if checked.iter().all(Result::is_err) {
            return checked;
        }
        self.runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + self.timeout;
            let channel = match tokio::time::timeout_at(deadline, self.channel()).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(error)) => {
                    return checked
                        .into_iter()
                        .map(|c| c.and(Err(error.clone())))
                        .collect()
                }
                Err(_) => {
                    let error = self.timed_out();
                    return checked
                        .into_iter()
                        .map(|c| c.and(Err(error.clone())))
                        .collect();
                }
            };
            // Publish them all on the channel, in order...
            let mut sent = Vec::with_capacity(events.len());
            for (event, check) in events.iter().zip(checked) {
                sent.push(match check {
                    Err(error) => Err(error),
                    Ok(()) => tokio::time::timeout_at(deadline, self.send(&channel, event))
                        .await
                        .unwrap_or_else(|_| Err(self.timed_out())),
                });
            }
            // ... then take every confirm, until the deadline.
            let mut results = Vec::with_capacity(sent.len());
            for (event, confirm) in events.iter().zip(sent) {
                results.push(match confirm {
                    Err(error) => Err(error),
                    Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                        Ok(Ok(confirm)) => self.verdict(self.routing_key(event), confirm),
                        Ok(Err(error)) => Err(self.failed(error)),
                        Err(_) => Err(self.timed_out()),
                    },
                });
            }
            results
        })
    }

    /// The relay's whole batch: confirms are awaited together.
    fn max_batch(&self) -> usize {
        usize::MAX
    }
}
