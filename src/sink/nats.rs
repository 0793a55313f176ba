//! NATS JetStream: each event is one message on `<prefix>.<topic>`,
//! delivered once the stream's PubAck arrives.
//!
//! The message body is the JSON payload, or the envelope
//! ([`NatsBuilder::body`]). Headers: `Nats-Msg-Id` (the event id: JetStream
//! drops a second message with the same id within the stream's duplicate
//! window, 2 minutes by default), `outbox-topic`, `outbox-attempt`,
//! `outbox-key` (when the event has one), and every event header
//! ([`NatsBuilder::forward_headers`] chooses which).
//!
//! A subject that no stream captures is a transient failure with a clear
//! message ("no JetStream stream captures subject …"): creating the stream
//! lets the retries through, and the relay dead-letters the event after its
//! last attempt otherwise.
//!
//! A batch from the relay is published at once and its PubAcks awaited
//! together (`Sink::deliver_batch`); each event still gets its own verdict.
//!
//! The client (`async-nats`) is asynchronous; its tokio runtime (one thread)
//! stays inside the sink, whose API is synchronous like every other sink.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::context::{Context, PublishError, PublishErrorKind};
use async_nats::{HeaderMap, HeaderName, HeaderValue};

use super::{Body, DeliveryError, ForwardHeaders, Sink};
use crate::error::{excerpt, Error};
use crate::event::StoredEvent;

/// A [`Sink`] that publishes to NATS JetStream. Build it with
/// [`NatsSink::builder`].
///
/// ```no_run
/// let sink = outbox::NatsSink::builder("nats://127.0.0.1:4222", "outbox").build()?;
/// // Topic order.approved is published on subject outbox.order.approved.
/// # Ok::<(), outbox::Error>(())
/// ```
pub struct NatsSink {
    runtime: tokio::runtime::Runtime,
    /// The URL without credentials: the client logs its server address.
    url: String,
    credentials: Credentials,
    prefix: String,
    timeout: Duration,
    body: Body,
    forward: ForwardHeaders,
    /// Connected on first use, and again after a failed connection attempt.
    context: Mutex<Option<Context>>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("subject_prefix", &self.prefix)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`NatsSink`].
pub struct NatsBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    body: Body,
    forward: ForwardHeaders,
}

impl std::fmt::Debug for NatsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password or a token.
        f.debug_struct("NatsBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// Default limit on connecting and on waiting for the PubAcks of one
    /// call (one event, or a batch).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Starts configuring a sink for the NATS server at `url`, publishing
    /// topic `t` on subject `<subject_prefix>.t`.
    pub fn builder(url: impl Into<String>, subject_prefix: impl Into<String>) -> NatsBuilder {
        NatsBuilder {
            url: url.into(),
            prefix: subject_prefix.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            body: Body::Payload,
            forward: ForwardHeaders::All,
        }
    }
}

impl NatsBuilder {
    /// Limits connecting, and waiting for the PubAcks of one call (one
    /// event, or a whole batch: they are awaited together); keep it below
    /// half the relay's lease. Defaults to [`NatsSink::DEFAULT_TIMEOUT`]
    /// (5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What each message's body is: [`Body::Payload`], the payload, or
    /// [`Body::Envelope`], `{id, topic, key, created_at, headers, payload}`.
    /// Defaults to [`Body::Payload`].
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Which event headers become NATS headers (and go into the envelope's
    /// `headers`): see [`ForwardHeaders`]. The sink's own (`Nats-Msg-Id`,
    /// `outbox-topic`, `outbox-attempt`, `outbox-key`) are always sent.
    /// Defaults to [`ForwardHeaders::All`].
    pub fn forward_headers(mut self, headers: ForwardHeaders) -> Self {
        self.forward = headers;
        self
    }

    /// Checks the settings and starts the client's runtime. Does not
    /// connect: a server that is down is retried like any other outage.
    pub fn build(self) -> Result<NatsSink, Error> {
        let config = |field, reason: String| Error::Config { field, reason };
        if !valid_subject(&self.prefix) {
            return Err(config(
                "nats.subject_prefix",
                format!("{:?} is not a NATS subject", excerpt(&self.prefix)),
            ));
        }
        if self.url.is_empty() {
            return Err(config("nats.url", "must not be empty".into()));
        }
        if self.timeout.is_zero() {
            return Err(config("nats.timeout", "must be greater than zero".into()));
        }
        let runtime = super::private_runtime("nats")?;
        let (url, credentials) = split_credentials(&self.url);
        Ok(NatsSink {
            runtime,
            url,
            credentials,
            prefix: self.prefix,
            timeout: self.timeout,
            body: self.body,
            forward: self.forward,
            context: Mutex::new(None),
        })
    }
}

impl NatsSink {
    fn context(&self) -> Result<Context, DeliveryError> {
        let mut slot = self
            .context
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(context) = &*slot {
            return Ok(context.clone());
        }
        let options = async_nats::ConnectOptions::new().connection_timeout(self.timeout);
        let options = match &self.credentials {
            Credentials::None => options,
            Credentials::Token(token) => options.token(token.clone()),
            Credentials::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
        };
        let context = self
            .runtime
            .block_on(async {
                // Inside the runtime: the JetStream context starts a task.
                let client = options.connect(self.url.as_str()).await?;
                Ok::<_, async_nats::ConnectError>(async_nats::jetstream::new(client))
            })
            .map_err(|e| DeliveryError::transient(format!("NATS unreachable: {e}")))?;
        *slot = Some(context.clone());
        Ok(context)
    }

    fn headers(&self, event: &StoredEvent) -> Result<HeaderMap, DeliveryError> {
        let mut headers = HeaderMap::new();
        let mut put = |name: &str, value: &str| -> Result<(), DeliveryError> {
            let name: HeaderName = name.parse().map_err(|_| {
                DeliveryError::permanent(format!(
                    "{:?} is not a valid NATS header name",
                    excerpt(name)
                ))
            })?;
            let value: HeaderValue = value.parse().map_err(|_| {
                DeliveryError::permanent(format!("header {name} has a value NATS cannot carry"))
            })?;
            headers.insert(name, value);
            Ok(())
        };
        for (name, value) in self.forward.select(event) {
            put(name, value)?;
        }
        put("Nats-Msg-Id", &event.id.to_string())?;
        put("outbox-topic", &event.topic)?;
        put("outbox-attempt", &event.attempts.to_string())?;
        if let Some(key) = &event.key {
            put("outbox-key", key)?;
        }
        Ok(headers)
    }
}

impl NatsSink {
    /// The subject, headers and body of `event`'s message, or why it cannot
    /// be one (checked before anything is sent).
    fn message(&self, event: &StoredEvent) -> Result<(String, HeaderMap, Vec<u8>), DeliveryError> {
        let subject = format!("{}.{}", self.prefix, event.topic);
        if !valid_subject(&subject) {
            return Err(DeliveryError::permanent(format!(
                "topic {:?} does not make a NATS subject",
                excerpt(&event.topic)
            )));
        }
        let headers = self.headers(event)?;
        Ok((subject, headers, self.body.render(event, &self.forward)))
    }

    /// The verdict on a message to `subject`, from its publish and PubAck
    /// (`None`: the timeout ran out first).
    fn verdict(
        &self,
        subject: &str,
        acked: Option<Result<(), PublishError>>,
    ) -> Result<(), DeliveryError> {
        match acked {
            Some(Ok(())) => Ok(()),
            Some(Err(error)) => Err(match error.kind() {
                PublishErrorKind::StreamNotFound => DeliveryError::transient(format!(
                    "no JetStream stream captures subject {subject}"
                )),
                PublishErrorKind::MaxPayloadExceeded => {
                    DeliveryError::permanent(format!("NATS: {error}"))
                }
                _ => DeliveryError::transient(format!("NATS: {error}")),
            }),
            None => Err(DeliveryError::transient(format!(
                "NATS: no PubAck within {:?}",
                self.timeout
            ))),
        }
    }
}

impl Sink for NatsSink {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self.deliver_batch(&[event])
            .pop()
            .unwrap_or_else(|| Err(DeliveryError::transient("NATS: no result")))
    }

    /// Publishes every message, then waits for their PubAcks, all within
    /// one timeout; each event gets its own verdict.
    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        let messages: Vec<_> = events.iter().map(|event| self.message(event)).collect();
        if messages.iter().all(Result::is_err) {
            return messages.into_iter().map(|m| m.map(drop)).collect();
        }
        let context = match self.context() {
            Ok(context) => context,
            Err(error) => {
                return messages
                    .into_iter()
                    .map(|m| m.and(Err(error.clone())))
                    .collect()
            }
        };
        self.runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + self.timeout;
            // Publish them all: each returns once the message is on its
            // way, with a future of its PubAck.
            let mut sent = Vec::with_capacity(messages.len());
            for message in messages {
                let (subject, headers, body) = match message {
                    Ok(message) => message,
                    Err(error) => {
                        sent.push(Err(error));
                        continue;
                    }
                };
                let publish = context.publish_with_headers(subject.clone(), headers, body.into());
                let published = tokio::time::timeout_at(deadline, publish).await.ok();
                sent.push(Ok((subject, published)));
            }
            // Then every PubAck, in order, until the deadline.
            let mut results = Vec::with_capacity(sent.len());
            for message in sent {
                results.push(match message {
                    Err(error) => Err(error),
                    Ok((subject, None)) => self.verdict(&subject, None),
                    Ok((subject, Some(Err(error)))) => self.verdict(&subject, Some(Err(error))),
                    Ok((subject, Some(Ok(ack)))) => {
                        let acked = tokio::time::timeout_at(deadline, ack).await.ok();
                        self.verdict(&subject, acked.map(|a| a.map(drop)))
                    }
                });
            }
            results
        })
    }

    /// The relay's whole batch: PubAcks are awaited together.
    fn max_batch(&self) -> usize {
        usize::MAX
    }
}

/// Credentials taken out of the URL and given to the client separately:
/// async-nats logs the server address (URL included) at debug level.
enum Credentials {
    None,
    Token(String),
    UserPassword(String, String),
}

/// `nats://user:password@host:4222` → (`nats://host:4222`, credentials).
fn split_credentials(url: &str) -> (String, Credentials) {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return (url.to_owned(), Credentials::None);
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), Credentials::None);
    };
    let userinfo = &rest[..at];
    let stripped = format!("{}{}", &url[..scheme_end], &rest[at + 1..]);
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => Credentials::UserPassword(user.to_owned(), password.to_owned()),
        None => Credentials::Token(userinfo.to_owned()),
    };
    (stripped, credentials)
}

/// Dot-separated non-empty tokens, no whitespace, no wildcards.
fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c.is_whitespace() || c == '*' || c == '>')
        })
}

#[cfg(test)]
mod tests {
    use super::valid_subject;

    #[test]
    fn credentials_leave_the_url() {
        let (url, credentials) = super::split_credentials("nats://app:s3cret@127.0.0.1:4222");
        assert_eq!(url, "nats://127.0.0.1:4222");
        assert!(
            matches!(credentials, super::Credentials::UserPassword(u, p) if u == "app" && p == "s3cret")
        );
        let (url, credentials) = super::split_credentials("nats://tok3n@host");
        assert_eq!(url, "nats://host");
        assert!(matches!(credentials, super::Credentials::Token(t) if t == "tok3n"));
        let (url, credentials) = super::split_credentials("nats://host:4222");
        assert_eq!(url, "nats://host:4222");
        assert!(matches!(credentials, super::Credentials::None));
    }

    #[test]
    fn subjects_are_checked() {
        assert!(valid_subject("outbox.order.approved"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\tb"] {
            assert!(!valid_subject(bad), "{bad:?}");
        }
    }
}
