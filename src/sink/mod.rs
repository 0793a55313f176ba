//! Where events go: the [`Sink`] trait and the verdict it returns.

#[cfg(feature = "amqp")]
mod amqp;
mod handler;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "mqtt")]
mod mqtt;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "webhook")]
mod webhook;
// Its helpers serve the built-in sinks: unused in a build without one.
#[cfg_attr(
    not(any(
        feature = "webhook",
        feature = "nats",
        feature = "amqp",
        feature = "redis",
        feature = "kafka",
        feature = "mqtt"
    )),
    allow(dead_code)
)]
mod wire;

use std::fmt;
use std::time::Duration;

use crate::event::StoredEvent;

#[cfg(feature = "redis")]
pub use self::redis::{RedisBuilder, RedisSink};
#[cfg(feature = "amqp")]
pub use amqp::{AmqpBuilder, AmqpSink};
pub use handler::Handler;
#[cfg(feature = "kafka")]
pub use kafka::{KafkaBuilder, KafkaSink};
#[cfg(feature = "mqtt")]
pub use mqtt::{MqttBuilder, MqttSink};
#[cfg(feature = "nats")]
pub use nats::{NatsBuilder, NatsSink};
#[cfg(feature = "webhook")]
pub use webhook::{WebhookBuilder, WebhookSink};
pub use wire::{Body, ForwardHeaders};

/// A destination for events: an HTTP endpoint, a broker, an in-process
/// handler.
///
/// The contract:
/// - **It may block.** Each relay worker calls its sinks one call at a
///   time on its own thread (one event per call, or several for a sink
///   that takes batches: see below). A call should finish within half the
///   relay's lease duration (time out your own I/O below it): the relay
///   renews the lease between calls, but it cannot interrupt one, and if
///   the lease runs out another relay may deliver the same events again.
/// - **It receives the stable event id** (`event.id`) to pass on for
///   deduplication, and **the attempt number** (`event.attempts`, 1 for the
///   first try).
/// - **It decides the retry**, through its result: `Ok(())` means delivered
///   (the event is deleted); [`DeliveryError::transient`] retries after the
///   relay's backoff; [`DeliveryError::retry_after`] retries after the given
///   delay (capped by the backoff cap); [`DeliveryError::permanent`] moves
///   the event to the dead letters at once. Retries stop after the relay's
///   `max_attempts`, and the event is dead-lettered with the last error.
/// - **A panic is a transient failure**: the relay catches it and retries.
/// - **Per-key order is the relay's job**: a sink never sees an event while
///   an earlier event of the same key is undelivered.
/// - **Batches are optional**: a sink whose target acknowledges
///   asynchronously (a broker) can take several events in one call, send
///   them all and wait for all the acknowledgements at once: override
///   [`deliver_batch`](Sink::deliver_batch) and
///   [`max_batch`](Sink::max_batch). Without them the relay calls
///   [`deliver`](Sink::deliver) once per event.
pub trait Sink: Send + Sync + 'static {
    /// Delivers one event.
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError>;

    /// Delivers `events` and returns one result per event, in the same
    /// order: each event keeps its own verdict.
    ///
    /// The relay calls it with up to [`max_batch`](Sink::max_batch) events
    /// of one claimed batch that are routed to this sink, in delivery order
    /// (oldest first). The default delivers them one by one through
    /// [`deliver`](Sink::deliver). A sink that overrides it:
    /// - **returns exactly one result per event**, in the order given (the
    ///   relay counts a missing result as a transient failure of its
    ///   event, and ignores extra ones);
    /// - **reports an event `Ok(())` only once its target acknowledged it**,
    ///   whatever happened to the others; an event it did not get to send,
    ///   or whose acknowledgement did not come, is a failure (transient
    ///   unless retrying cannot help), never a success;
    /// - **may send the events concurrently or pipelined**: they never
    ///   include two events of the same key (the relay splits its batch so
    ///   that a key's next event waits for the verdict on the one before),
    ///   so per-key order holds whatever order the target receives them in;
    /// - **finishes the whole call within half the relay's lease**: the
    ///   relay renews the lease between calls, not during one, so a sink
    ///   sets [`max_batch`](Sink::max_batch) and its timeouts so that a
    ///   whole batch fits;
    /// - may panic like `deliver`: the relay catches it and every event of
    ///   the call fails as transient.
    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        events.iter().map(|event| self.deliver(event)).collect()
    }

    /// The most events the relay hands to one
    /// [`deliver_batch`](Sink::deliver_batch) call (the relay's batch size
    /// caps it too). Defaults to 1: one event per call, with the lease
    /// renewed and shutdown checked between calls, which is right for a
    /// sink that delivers one event at a time anyway. A sink that pipelines
    /// returns more.
    fn max_batch(&self) -> usize {
        1
    }
}

impl<F> Sink for F
where
    F: Fn(&StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
{
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self(event)
    }
}

/// The one-thread tokio runtime an async client lives on, private to its
/// sink: the sink's API stays synchronous and no runtime leaks out.
#[cfg(any(feature = "nats", feature = "amqp"))]
fn private_runtime(client: &'static str) -> Result<tokio::runtime::Runtime, crate::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("outbox-{client}"))
        .enable_all()
        .build()
        .map_err(|e| crate::Error::Config {
            field: client,
            reason: format!("could not start the client runtime: {e}"),
        })
}

/// A shared sink: give one sink (and its connections) to several relays or
/// routes.
impl<S: Sink + ?Sized> Sink for std::sync::Arc<S> {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        (**self).deliver(event)
    }

    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        (**self).deliver_batch(events)
    }

    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }
}

/// Why a delivery failed, and what the relay should do about it.
///
/// `?` turns any error into a transient failure, so a handler can use it on
/// I/O calls directly; say [`DeliveryError::permanent`] explicitly for
/// failures that retrying cannot fix.
#[derive(Clone, PartialEq, Eq)]
pub struct DeliveryError {
    kind: DeliveryErrorKind,
    message: String,
}

/// What the relay does after a failed delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryErrorKind {
    /// Retry after the relay's backoff.
    Transient,
    /// Retry after this delay (capped at the backoff cap).
    RetryAfter(Duration),
    /// Do not retry: move the event to the dead letters.
    Permanent,
}

impl DeliveryError {
    /// A failure worth retrying (timeouts, 5xx, a broker that is down).
    pub fn transient(message: impl fmt::Display) -> Self {
        Self::new(DeliveryErrorKind::Transient, message)
    }

    /// A failure worth retrying after `delay` (an HTTP `Retry-After`).
    pub fn retry_after(delay: Duration, message: impl fmt::Display) -> Self {
        Self::new(DeliveryErrorKind::RetryAfter(delay), message)
    }

    /// A failure that retrying cannot fix (a rejected payload, a 4xx): the
    /// event goes to the dead letters with this message.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::new(DeliveryErrorKind::Permanent, message)
    }

    fn new(kind: DeliveryErrorKind, message: impl fmt::Display) -> Self {
        DeliveryError {
            kind,
            message: message.to_string(),
        }
    }

    /// What the relay does about it.
    pub fn kind(&self) -> DeliveryErrorKind {
        self.kind
    }

    /// The message recorded as the event's `last_error`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error is a transient failure, with its whole source chain as the
/// message. (`DeliveryError` itself is not a `std::error::Error`, which is
/// what makes this blanket conversion possible.)
impl<E: std::error::Error> From<E> for DeliveryError {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        DeliveryError::transient(message)
    }
}
