//! # outbox: a transactional outbox for diesel and PostgreSQL
//!
//! A request handler that writes to the database and then calls an email
//! API, a payment provider or a webhook has a gap: when the call fails after
//! the commit, the database says "done" and the world never hears about it;
//! when the transaction rolls back after the call, the world heard about
//! something that never happened.
//!
//! `outbox` closes the gap. The event is a row written **in the same
//! transaction** as the business change, so it exists if and only if that
//! transaction committed. A relay delivers the events afterwards, retrying
//! until they succeed, and parks those that never will in a dead-letter
//! table.
//!
//! ## Getting started
//!
//! 1. Apply the schema once per start-up with [`migrate`] (idempotent, safe
//!    when several processes start at once).
//! 2. Declare an [`Event`]: a serde type bound to its topic.
//! 3. Write business rows and publish events in one [`transaction`], or
//!    with [`publish`] inside a transaction you opened yourself.
//!
//! ```
//! # #[path = "../tests/support/pg.rs"] mod pg;
//! # let db = pg::test_db();
//! # let mut conn = db.conn();
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct OrderApproved { order_id: i64, email: String }
//!
//! impl outbox::Event for OrderApproved {
//!     const TOPIC: &'static str = "order.approved";
//! }
//!
//! outbox::migrate(&mut conn)?;
//! let id = outbox::transaction(&mut conn, |tx| {
//!     // ... your diesel writes through tx.conn() ...
//!     tx.publish(&OrderApproved { order_id: 7, email: "ada@example.com".into() })
//! })?;
//! println!("event {id} is queued for delivery");
//! # Ok::<(), outbox::Error>(())
//! ```
//!
//! ## What you get
//!
//! | | |
//! |---|---|
//! | Atomic publish | an event exists if and only if its transaction committed |
//! | Typed events | a topic's payload always has the same shape |
//! | Per-key order | events sharing a key are delivered in the order written |
//! | Delayed delivery | [`NewEvent::delay`] / [`NewEvent::available_at`] |
//! | Batches | [`Tx::publish_all`] writes many events in one round trip |
//! | Any language | the tables are a documented contract (`docs/schema.md`): publish with a plain `INSERT` |
//! | Safe schema | [`migrate`] keeps its bookkeeping in its own schema, next to your own diesel migrations |
//!
//! Bad input (an invalid topic, a payload that does not serialize or that
//! holds `\u0000`) is a typed [`Error`] before anything is written.
//!
//! ## Delivering
//!
//! A [`Relay`] (built with [`Relay::builder`]) claims committed events,
//! hands them to [`Sink`]s routed by topic pattern, retries failures with
//! jittered exponential [`Backoff`], and moves what cannot be delivered to
//! `outbox.dead_letters`. Run as many relays as you like on one database:
//! leased claims with fencing share the work, and per-key order holds
//! across all of them. See the [`Relay`] example and `docs/relay.md`.
//!
//! | sink | cargo feature |
//! |---|---|
//! | typed handler ([`RelayBuilder::handle`]) or any closure / [`Sink`] | — |
//! | `WebhookSink` (Standard Webhooks, signed) | `webhook` |
//! | `NatsSink` (JetStream, deduplicated) | `nats` |
//! | `AmqpSink` (RabbitMQ, publisher confirms) | `amqp` |
//! | `RedisSink` (Streams) | `redis` |
//! | `KafkaSink` (idempotent producer, delivery reports) | `kafka` |
//! | `MqttSink` (MQTT 5, QoS 1 or 2, acknowledged per message) | `mqtt` |
//! | the `outbox` command (migrate, publish, relay, status, dead letters) | `cli` |
//! | trace context from publish to delivery (`traceparent`, delivery spans; `docs/relay.md`) | `opentelemetry` |
//!
//! ## Operating
//!
//! [`status`] counts the queue; [`dead_letters`], [`dead_letter`],
//! [`replay_dead_letters`] and [`purge_dead_letters`] look after the events
//! that will not be delivered; [`Observer`] is where metrics and logs plug
//! in. `docs/operations.md` is the runbook.
#![deny(unsafe_code)]
#![warn(missing_docs)]

// The in-crate tests share tests/support/pg.rs, which names the crate
// `outbox` as the integration tests do.
#[cfg(test)]
extern crate self as outbox;

mod admin;
mod backoff;
mod error;
mod event;
mod migrate;
mod new_event;
mod observe;
mod pooler;
mod publish;
mod queue;
mod relay;
mod sink;
mod store;
#[cfg(feature = "opentelemetry")]
mod trace_context;
mod transaction;

pub use admin::{
    count_dead_letters, dead_letter, dead_letters, purge_dead_letters, register_subscription,
    remove_subscription, replay_dead_letters, status, subscription_status, subscriptions,
    DeadLetter, QueueCounts, Selection, Status, SubscriptionStatus, TopicStatus,
};
pub use backoff::Backoff;
pub use error::{Error, Result};
pub use event::{Event, EventId, Headers, StoredEvent};
pub use migrate::migrate;
pub use new_event::{
    validate_topic, NewEvent, MAX_IDEMPOTENCY_KEY_LEN, MAX_PAYLOAD_DEPTH, MAX_TOPIC_LEN,
};
pub use observe::{NoopObserver, Observer, RelayStats};
pub use pooler::NoStatementCache;
pub use publish::{publish, publish_all, publish_event, publish_events};
pub use queue::queued_events;
pub use relay::{
    PgPool, RateLimit, Relay, RelayBuilder, Stopper, TopicPattern, DEFAULT_SUBSCRIPTION,
};
#[cfg(feature = "amqp")]
pub use sink::{AmqpBuilder, AmqpSink};
pub use sink::{Body, DeliveryError, DeliveryErrorKind, ForwardHeaders, Handler, Sink};
#[cfg(feature = "kafka")]
pub use sink::{KafkaBuilder, KafkaSink};
#[cfg(feature = "mqtt")]
pub use sink::{MqttBuilder, MqttSink};
#[cfg(feature = "nats")]
pub use sink::{NatsBuilder, NatsSink};
#[cfg(feature = "redis")]
pub use sink::{RedisBuilder, RedisSink};
#[cfg(feature = "webhook")]
pub use sink::{WebhookBuilder, WebhookSink};
pub use transaction::{transaction, Tx};

/// The channel the `outbox.events` insert trigger notifies (with an empty
/// payload) after every statement that inserts events.
pub const NOTIFY_CHANNEL: &str = "outbox_events";
