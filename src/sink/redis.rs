//! Redis Streams: each event is one `XADD` entry.
//!
//! Entry fields: `id` (the event id), `topic`, `key` (omitted when the
//! event has none), `payload` (the JSON payload, or the envelope:
//! [`RedisBuilder::body`]), `headers` (a JSON object of the event headers
//! [`RedisBuilder::forward_headers`] selects, `{}` when none), `created_at`
//! (RFC 3339). The entry id is Redis's own (`*`).
//!
//! A batch from the relay is one pipeline of `XADD`s (one round trip,
//! `Sink::deliver_batch`); each event gets its verdict from its own reply.
//!
//! Delivered once `XADD` returns. Redis Streams have no deduplication: an
//! event delivered twice (a relay died between `XADD` and settling) is two
//! entries with the same `id` field, and consumers deduplicate on it.

use std::time::Duration;

use redis::{Client, RedisError};

use super::{Body, DeliveryError, ForwardHeaders, Sink};
use crate::error::Error;
use crate::event::StoredEvent;

/// A [`Sink`] that appends events to Redis Streams. Build it with
/// [`RedisSink::builder`].
///
/// ```no_run
/// let sink = outbox::RedisSink::builder("redis://127.0.0.1:6379")
///     .stream_prefix("events:") // one stream per topic: events:order.approved
///     .build()?;
/// # Ok::<(), outbox::Error>(())
/// ```
pub struct RedisSink {
    pool: diesel::r2d2::Pool<Client>,
    target: Target,
    body: Body,
    forward: ForwardHeaders,
}

enum Target {
    /// One stream per topic: prefix + topic.
    PerTopic(String),
    /// Every event into this stream.
    Single(String),
}

/// Settings of a [`RedisSink`].
pub struct RedisBuilder {
    url: String,
    prefix: String,
    stream: Option<String>,
    timeout: Duration,
    body: Body,
    forward: ForwardHeaders,
}

impl std::fmt::Debug for RedisBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password or a token.
        f.debug_struct("RedisBuilder")
            .field("prefix", &self.prefix)
            .field("stream", &self.stream)
            .field("timeout", &self.timeout)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

impl RedisSink {
    /// Default prefix of per-topic stream names.
    pub const DEFAULT_STREAM_PREFIX: &'static str = "outbox:";
    /// Default limit on connecting and on each command.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Starts configuring a sink for the Redis server at `url`
    /// (`redis://[:password@]host[:port][/db]`).
    pub fn builder(url: impl Into<String>) -> RedisBuilder {
        RedisBuilder {
            url: url.into(),
            prefix: Self::DEFAULT_STREAM_PREFIX.to_owned(),
            stream: None,
            timeout: Self::DEFAULT_TIMEOUT,
            body: Body::Payload,
            forward: ForwardHeaders::All,
        }
    }
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.target {
            Target::PerTopic(prefix) => format!("{prefix}<topic>"),
            Target::Single(stream) => stream.clone(),
        };
        f.debug_struct("RedisSink")
            .field("stream", &target)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

impl RedisBuilder {
    /// Streams are named `prefix` + topic. Defaults to
    /// [`RedisSink::DEFAULT_STREAM_PREFIX`] (`outbox:`).
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Appends every event to this one stream instead of one per topic.
    /// Defaults to one stream per topic.
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// Limits connecting and each command; keep it below the relay's lease.
    /// Defaults to [`RedisSink::DEFAULT_TIMEOUT`] (5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What each entry's `payload` field holds: [`Body::Payload`], the
    /// payload, or [`Body::Envelope`], `{id, topic, key, created_at,
    /// headers, payload}`. The entry's other fields stay as they are.
    /// Defaults to [`Body::Payload`].
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Which event headers go into each entry's `headers` field (and into
    /// the envelope's `headers`): see [`ForwardHeaders`]. The `id`,
    /// `topic`, `key` and `created_at` fields are always there. Defaults to
    /// [`ForwardHeaders::All`].
    pub fn forward_headers(mut self, headers: ForwardHeaders) -> Self {
        self.forward = headers;
        self
    }

    /// Checks the settings. Does not connect: a Redis that is down when the
    /// relay starts is retried like any other outage.
    pub fn build(self) -> Result<RedisSink, Error> {
        let client = Client::open(self.url.as_str()).map_err(|e| Error::Config {
            field: "redis.url",
            reason: format!(
                "is not a Redis URL: {}",
                e.detail().unwrap_or("unrecognised")
            ),
        })?;
        if self.timeout.is_zero() {
            return Err(Error::Config {
                field: "redis.timeout",
                reason: "must be greater than zero".into(),
            });
        }
        let target = match self.stream {
            Some(stream) if stream.is_empty() => {
                return Err(Error::Config {
                    field: "redis.stream",
                    reason: "must not be empty".into(),
                })
            }
            Some(stream) => Target::Single(stream),
            None => Target::PerTopic(self.prefix),
        };
        let pool = diesel::r2d2::Pool::builder()
            .max_size(8)
            .min_idle(Some(0))
            .connection_timeout(self.timeout)
            // No PING on every checkout (a round trip per event): a broken
            // connection fails its XADD, which is retried, and the pool
            // drops connections that report themselves closed.
            .test_on_check_out(false)
            .connection_customizer(Box::new(Timeouts(self.timeout)))
            .build_unchecked(client);
        Ok(RedisSink {
            pool,
            target,
            body: self.body,
            forward: self.forward,
        })
    }
}

impl RedisSink {
    /// The `XADD` that appends `event`.
    fn xadd(&self, event: &StoredEvent) -> redis::Cmd {
        let stream = match &self.target {
            Target::PerTopic(prefix) => format!("{prefix}{}", event.topic),
            Target::Single(stream) => stream.clone(),
        };
        let headers: std::collections::BTreeMap<&str, &str> = self.forward.select(event).collect();
        let headers = serde_json::to_string(&headers).unwrap_or_else(|_| "{}".to_owned());
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&stream)
            .arg("*")
            .arg("id")
            .arg(event.id.get())
            .arg("topic")
            .arg(&event.topic);
        if let Some(key) = &event.key {
            xadd.arg("key").arg(key);
        }
        xadd.arg("payload")
            .arg(self.body.render(event, &self.forward))
            .arg("headers")
            .arg(headers)
            .arg("created_at")
            .arg(
                event
                    .created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            );
        xadd
    }
}

impl Sink for RedisSink {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self.deliver_batch(&[event])
            .pop()
            .unwrap_or_else(|| Err(DeliveryError::transient("Redis: no result")))
    }

    /// Sends every `XADD` in one pipeline and reads their replies: one
    /// round trip. Each event gets its own verdict from its own reply.
    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        let every = |error: DeliveryError| events.iter().map(|_| Err(error.clone())).collect();
        let mut conn = match self.pool.get() {
            Ok(conn) => conn,
            Err(e) => return every(DeliveryError::transient(format!("Redis unreachable: {e}"))),
        };
        let mut pipe = redis::pipe();
        for event in events {
            pipe.add_command(self.xadd(event));
        }
        // Replies one by one: an error reply fails its own event only.
        let replies: Vec<redis::RedisResult<String>> = match pipe.ignore_errors().query(&mut *conn)
        {
            Ok(replies) => replies,
            Err(error) => return every(redis_error(error)),
        };
        let mut replies = replies.into_iter();
        events
            .iter()
            .map(|_| match replies.next() {
                Some(Ok(_entry_id)) => Ok(()),
                Some(Err(error)) => Err(redis_error(error)),
                None => Err(DeliveryError::transient("Redis: no reply to XADD")),
            })
            .collect()
    }

    /// The relay's whole batch, in one pipeline.
    fn max_batch(&self) -> usize {
        usize::MAX
    }
}

/// Sets the read and write timeouts once, when the pool opens a connection.
#[derive(Debug)]
struct Timeouts(Duration);

impl diesel::r2d2::CustomizeConnection<redis::Connection, RedisError> for Timeouts {
    fn on_acquire(&self, conn: &mut redis::Connection) -> Result<(), RedisError> {
        conn.set_read_timeout(Some(self.0))?;
        conn.set_write_timeout(Some(self.0))
    }
}

/// A key of another type at the stream's name (`WRONGTYPE`) will reject
/// every retry: permanent. Everything else (I/O, timeouts, a loading, busy,
/// read-only or out-of-memory server, a full client table) may pass later.
fn redis_error(error: RedisError) -> DeliveryError {
    let message = format!("Redis: {error}");
    if error.code() == Some("WRONGTYPE") {
        DeliveryError::permanent(message)
    } else {
        DeliveryError::transient(message)
    }
}
