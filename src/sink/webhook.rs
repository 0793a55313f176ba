//! HTTP webhooks, signed per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>).
//!
//! Each event is one `POST` with body
//! `{"type": <topic>, "timestamp": <created_at, RFC 3339>, "data": <payload>}`
//! (the Standard Webhooks payload structure), or what
//! [`WebhookBuilder::body`] chooses (the bare payload, or the envelope),
//! and headers:
//!
//! | header | value |
//! |---|---|
//! | `webhook-id` | the event id (stable across retries: deduplicate on it) |
//! | `webhook-timestamp` | Unix seconds at sending |
//! | `webhook-signature` | `v1,` + base64 HMAC-SHA256 of `id.timestamp.body` (with a secret) |
//! | `content-type` | `application/json` |
//! | `outbox-topic`, `outbox-attempt` | the topic, the attempt number (1 for the first) |
//! | `outbox-key` | the ordering key, when the event has one |
//! | each event header | forwarded as is (e.g. `traceparent`); [`WebhookBuilder::forward_headers`] chooses which |
//!
//! Outcomes: any 2xx is delivered. 408, 425, 429, any 5xx, a timeout or a
//! connection error is retried (a `Retry-After` in seconds is honoured,
//! within the relay's backoff cap). Any other status, a redirect included
//! (redirects are not followed: a signed POST must not be replayed
//! elsewhere), is permanent: the dead letter records the status and the
//! start of the response body.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use ureq::http::{HeaderName, HeaderValue, Uri};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use super::{Body, DeliveryError, ForwardHeaders, Sink};
use crate::error::{excerpt, Error};
use crate::event::StoredEvent;

/// How much of an error response's body the dead letter keeps.
const ERROR_BODY_EXCERPT: u64 = 512;

/// Headers the sink sets itself; an event header of the same name is not
/// forwarded.
const RESERVED_HEADERS: [&str; 9] = [
    "content-type",
    "content-length",
    "host",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "outbox-topic",
    "outbox-attempt",
    "outbox-key",
];

/// A [`Sink`] that POSTs each event to one URL. Build it with
/// [`WebhookSink::builder`].
///
/// ```no_run
/// use std::time::Duration;
///
/// let sink = outbox::WebhookSink::builder("https://hooks.example.com/outbox")
///     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .header("authorization", "Bearer token-from-the-provider")
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// # let pool = diesel::r2d2::Pool::builder()
/// #     .build_unchecked(diesel::r2d2::ConnectionManager::new("postgres://localhost/app"));
/// let relay = outbox::Relay::builder(pool).route("billing.*", sink).start()?;
/// # Ok::<(), outbox::Error>(())
/// ```
pub struct WebhookSink {
    agent: ureq::Agent,
    url: Uri,
    key: Option<Vec<u8>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `None`: the Standard Webhooks body.
    body: Option<Body>,
    forward: ForwardHeaders,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, never header values (they carry API tokens).
        f.debug_struct("WebhookSink")
            .field("url", &redact_uri(&self.url))
            .field("signed", &self.key.is_some())
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish()
    }
}

/// Settings of a [`WebhookSink`].
pub struct WebhookBuilder {
    url: String,
    secret: Option<String>,
    headers: Vec<(String, String)>,
    timeout: Duration,
    body: Option<Body>,
    forward: ForwardHeaders,
}

impl std::fmt::Debug for WebhookBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a password from the URL, the secret, or header values (they
        // carry API tokens).
        f.debug_struct("WebhookBuilder")
            .field("url", &crate::error::redact_passwords(&self.url))
            .field("signed", &self.secret.is_some())
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("body", &self.body)
            .field("forward_headers", &self.forward)
            .finish()
    }
}

impl WebhookSink {
    /// Default limit on one request, connection and response included.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Starts configuring a webhook to `url` (`http://` or `https://`).
    pub fn builder(url: impl Into<String>) -> WebhookBuilder {
        WebhookBuilder {
            url: url.into(),
            secret: None,
            headers: Vec::new(),
            timeout: Self::DEFAULT_TIMEOUT,
            body: None,
            forward: ForwardHeaders::All,
        }
    }
}

impl WebhookBuilder {
    /// Signs every request with this Standard Webhooks secret (`whsec_`
    /// followed by the base64 key). Defaults to unsigned.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Adds a header to every request (an API token, say). Defaults to none.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends this as the request body instead of the Standard Webhooks
    /// body: [`Body::Payload`], the bare payload, or [`Body::Envelope`],
    /// `{id, topic, key, created_at, headers, payload}`. The signature
    /// covers whichever body is sent. Defaults to the Standard Webhooks
    /// body `{"type": topic, "timestamp": created_at, "data": payload}`.
    pub fn body(mut self, body: Body) -> Self {
        self.body = Some(body);
        self
    }

    /// Which event headers become request headers (and go into the
    /// envelope's `headers`): see [`ForwardHeaders`]. The sink's own
    /// (`webhook-*`, `outbox-*`, `content-type`) and those set with
    /// [`header`](Self::header) are always sent. Defaults to
    /// [`ForwardHeaders::All`].
    pub fn forward_headers(mut self, headers: ForwardHeaders) -> Self {
        self.forward = headers;
        self
    }

    /// Limits each request, from connecting to reading the response; keep
    /// it below the relay's lease. Defaults to
    /// [`WebhookSink::DEFAULT_TIMEOUT`] (10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks the settings: a typed [`Error::Config`] names the one at fault.
    pub fn build(self) -> Result<WebhookSink, Error> {
        let url: Uri = self.url.parse().map_err(|e| {
            config(
                "webhook.url",
                format!("{:?} is not a URL: {e}", excerpt(&self.url)),
            )
        })?;
        match url.scheme_str() {
            Some("http" | "https") if url.host().is_some() => {}
            _ => {
                return Err(config(
                    "webhook.url",
                    format!(
                        "{} must be an http:// or https:// URL with a host",
                        redact_uri(&url)
                    ),
                ))
            }
        }
        let key = match self.secret {
            None => None,
            Some(secret) => {
                let encoded = secret
                    .strip_prefix("whsec_")
                    .ok_or_else(|| config("webhook.secret", "must start with whsec_".into()))?;
                let key = BASE64.decode(encoded).map_err(|_| {
                    config("webhook.secret", "is not whsec_ followed by base64".into())
                })?;
                if key.is_empty() {
                    return Err(config("webhook.secret", "has an empty key".into()));
                }
                Some(key)
            }
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            let parsed = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .zip(HeaderValue::from_str(&value).ok())
                .ok_or_else(|| {
                    config(
                        "webhook.header",
                        format!("{:?} is not a valid HTTP header", excerpt(&name)),
                    )
                })?;
            headers.push(parsed);
        }
        if self.timeout.is_zero() {
            return Err(config(
                "webhook.timeout",
                "must be greater than zero".into(),
            ));
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("outbox/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent =
            ureq::Agent::with_parts(config, DefaultConnector::default(), IpLiteral::default());
        Ok(WebhookSink {
            agent,
            url,
            key,
            headers,
            body: self.body,
            forward: self.forward,
        })
    }
}

impl WebhookSink {
    /// The Standard Webhooks signature of `body` for `id` at `timestamp`:
    /// `v1,` + base64(HMAC-SHA256(key, "id.timestamp.body")).
    fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
        // HMAC accepts keys of any length: new_from_slice cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl Sink for WebhookSink {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        // What is sent is what is signed.
        let body = match self.body {
            Some(body) => body.render(event, &self.forward),
            None => serde_json::to_vec(&serde_json::json!({
                "type": event.topic,
                "timestamp": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "data": event.payload,
            }))
            .map_err(|e| {
                DeliveryError::permanent(format!("could not encode the request body: {e}"))
            })?,
        };
        let id = event.id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());

        let mut request = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("outbox-topic", &event.topic)
            .header("outbox-attempt", event.attempts.to_string());
        if let Some(key) = &event.key {
            let value = HeaderValue::from_str(key).map_err(|_| {
                DeliveryError::permanent(format!(
                    "key {:?} cannot be an HTTP header value",
                    excerpt(key)
                ))
            })?;
            request = request.header("outbox-key", value);
        }
        if let Some(secret) = &self.key {
            request = request.header(
                "webhook-signature",
                Self::sign(secret, &id, timestamp, &body),
            );
        }
        for (name, value) in self.forward.select(event) {
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                continue;
            }
            let header = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .zip(HeaderValue::from_str(value).ok());
            let Some((name, value)) = header else {
                return Err(DeliveryError::permanent(format!(
                    "event header {:?} is not a valid HTTP header",
                    excerpt(name)
                )));
            };
            request = request.header(name, value);
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }

        let mut response = match request.send(&body[..]) {
            Ok(response) => response,
            Err(error) => return Err(transport_error(error)),
        };
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut excerpt_bytes = Vec::new();
        let _ = response
            .body_mut()
            .as_reader()
            .take(ERROR_BODY_EXCERPT)
            .read_to_end(&mut excerpt_bytes);
        let message = format!(
            "HTTP {status} from {}: {}",
            redact_uri(&self.url),
            String::from_utf8_lossy(&excerpt_bytes).trim()
        );
        Err(match status {
            408 | 425 | 429 | 500..=599 => match retry_after {
                Some(delay) => DeliveryError::retry_after(delay, message),
                None => DeliveryError::transient(message),
            },
            _ => DeliveryError::permanent(message),
        })
    }
}

/// ureq's resolver, except for a URL whose host is an IP address: that
/// needs no lookup.
///
/// ureq (3.5) resolves the host before every request, even one that reuses
/// a pooled connection, and under a timeout (ours is global, so it covers
/// resolving) it does so on a new thread each time: for a sink that POSTs
/// to one URL over a kept-alive connection, a thread created and joined per
/// event, about 40 µs of a 130 µs request on the project's machine
/// (docs/benchmarks.md). A host name still goes through ureq's resolver,
/// whose lookup stays bounded by the timeout.
#[derive(Debug, Default)]
struct IpLiteral(DefaultResolver);

impl Resolver for IpLiteral {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let ip = uri
            .host()
            .map(|host| host.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|host| host.parse::<IpAddr>().ok());
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => None,
        });
        match (ip, port) {
            (Some(ip), Some(port)) => {
                let mut addrs = self.empty();
                addrs.push(SocketAddr::new(ip, port));
                Ok(addrs)
            }
            _ => self.0.resolve(uri, config, timeout),
        }
    }
}

/// Timeouts and connection problems are worth retrying; a request the
/// client refuses to build is not.
fn transport_error(error: ureq::Error) -> DeliveryError {
    match error {
        ureq::Error::Http(_) | ureq::Error::BadUri(_) => {
            DeliveryError::permanent(format!("invalid request: {error}"))
        }
        other => DeliveryError::transient(format!("request failed: {other}")),
    }
}

/// A URL without user info (which may carry a password) for messages.
fn redact_uri(uri: &Uri) -> String {
    match (uri.scheme_str(), uri.host()) {
        (Some(scheme), Some(host)) => {
            let port = uri.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}://{host}{port}{}", uri.path())
        }
        _ => "<invalid URL>".to_owned(),
    }
}

fn config(field: &'static str, reason: String) -> Error {
    Error::Config { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = BASE64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            WebhookSink::sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn bad_settings_are_config_errors_naming_the_field() {
        let field = |b: WebhookBuilder| match b.build() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(WebhookSink::builder("not a url")), "webhook.url");
        assert_eq!(
            field(WebhookSink::builder("ftp://example.com/x")),
            "webhook.url"
        );
        assert_eq!(field(WebhookSink::builder("/relative")), "webhook.url");
        let ok = || WebhookSink::builder("https://example.com/hook");
        assert_eq!(field(ok().secret("nope")), "webhook.secret");
        assert_eq!(field(ok().secret("whsec_!!!")), "webhook.secret");
        assert_eq!(field(ok().header("bad header", "x")), "webhook.header");
        assert_eq!(
            field(ok().header("x-token", "line\nbreak")),
            "webhook.header"
        );
        assert_eq!(field(ok().timeout(Duration::ZERO)), "webhook.timeout");
        assert!(ok()
            .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .build()
            .is_ok());
    }

    #[test]
    fn a_builder_never_shows_its_secrets() {
        let builder = WebhookSink::builder("https://user:hunter2@example.com/hook")
            .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .header("authorization", "Bearer tok-123");
        let shown = format!("{builder:?}");
        for secret in ["hunter2", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "tok-123"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("signed: true"), "{shown}");
    }

    #[test]
    fn messages_never_show_user_info() {
        let uri: Uri = "https://user:hunter2@example.com:8443/hook?token=x"
            .parse()
            .unwrap();
        assert_eq!(redact_uri(&uri), "https://example.com:8443/hook");
    }
}
