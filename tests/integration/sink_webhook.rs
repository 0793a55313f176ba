//! The webhook sink against a real HTTP server started by the test:
//! Standard Webhooks headers and signature (checked with `ring`, not the
//! sink's own HMAC), and the outcome of every kind of response.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use crossbeam_channel::{unbounded, Receiver};

use crate::common::pending;
use crate::relay_support::{dead_letters, retries, setup, RelayBed, Signal, PATIENCE};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A request as the server saw it.
#[derive(Debug)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the server answers to the n-th request (0-based).
type Respond = dyn Fn(usize) -> (u16, Vec<(&'static str, String)>, Vec<u8>, Duration) + Send + Sync;

/// A real HTTP server on 127.0.0.1 that records requests and answers them
/// with `respond`. Stops when dropped.
struct HookServer {
    server: Arc<tiny_http::Server>,
    url: String,
    requests: Receiver<Seen>,
}

impl HookServer {
    fn start(
        respond: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, Vec<u8>, Duration)
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self::start_on("127.0.0.1:0", Box::new(respond))
    }

    fn start_on(addr: &str, respond: Box<Respond>) -> Self {
        let server = Arc::new(tiny_http::Server::http(addr).unwrap());
        let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
        let (tx, requests) = unbounded();
        let accept = server.clone();
        let respond: Arc<Respond> = Arc::from(respond);
        std::thread::spawn(move || {
            for (n, mut request) in accept.incoming_requests().enumerate() {
                let (tx, respond) = (tx.clone(), respond.clone());
                // One thread per request: a slow answer never holds up the next.
                std::thread::spawn(move || {
                    let mut body = Vec::new();
                    let _ = std::io::Read::read_to_end(request.as_reader(), &mut body);
                    let seen = Seen {
                        path: request.url().to_owned(),
                        headers: request
                            .headers()
                            .iter()
                            .map(|h| (h.field.as_str().to_string(), h.value.as_str().to_owned()))
                            .collect(),
                        body,
                    };
                    let (status, headers, body, delay) = respond(n);
                    let _ = tx.send(seen);
                    std::thread::sleep(delay); // the receiver's own slowness
                    let mut response =
                        tiny_http::Response::from_data(body).with_status_code(status);
                    for (name, value) in headers {
                        response.add_header(tiny_http::Header::from_bytes(name, value).unwrap());
                    }
                    let _ = request.respond(response);
                });
            }
        });
        HookServer {
            server,
            url,
            requests,
        }
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

fn ok() -> (u16, Vec<(&'static str, String)>, Vec<u8>, Duration) {
    (204, vec![], vec![], Duration::ZERO)
}

fn status(code: u16, body: &str) -> (u16, Vec<(&'static str, String)>, Vec<u8>, Duration) {
    (code, vec![], body.as_bytes().to_vec(), Duration::ZERO)
}

fn start_relay(bed: &RelayBed, sink: outbox::WebhookSink) -> outbox::Relay {
    bed.relay().route("*", sink).start().unwrap()
}

/// Verifies a Standard Webhooks signature with ring's HMAC.
fn verify(seen: &Seen) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut signed = format!(
        "{}.{}.",
        seen.header("webhook-id").unwrap(),
        seen.header("webhook-timestamp").unwrap()
    )
    .into_bytes();
    signed.extend_from_slice(&seen.body);
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        &signed,
    );
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    );
    seen.header("webhook-signature")
        .unwrap()
        .split(' ')
        .any(|s| s == expected)
}

#[test]
fn a_signed_delivery_carries_the_standard_webhooks_headers_and_body() {
    let bed = setup();
    let hook = HookServer::start(|_| ok());
    let sink = outbox::WebhookSink::builder(&hook.url)
        .secret(SECRET)
        .header("authorization", "Bearer provider-token")
        .build()
        .unwrap();
    let relay = start_relay(&bed, sink);
    let id = outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic(
                "invoice.paid",
                serde_json::json!({ "invoice": 12, "amount": "9.90" }),
            )
            .key("customer-3")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        )
    })
    .unwrap();
    bed.signals
        .until(|s| s.contains(&Signal::Delivered { id, attempt: 1 }));
    relay.shutdown(PATIENCE).unwrap();

    let seen = hook.requests.try_recv().unwrap();
    assert_eq!(seen.path, "/hook");
    assert_eq!(seen.header("webhook-id"), Some(id.to_string().as_str()));
    let sent_at: i64 = seen.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - sent_at).abs() < 60);
    assert!(verify(&seen), "signature does not verify: {seen:?}");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("authorization"), Some("Bearer provider-token"));
    assert_eq!(seen.header("outbox-topic"), Some("invoice.paid"));
    assert_eq!(seen.header("outbox-key"), Some("customer-3"));
    assert_eq!(seen.header("outbox-attempt"), Some("1"));
    assert_eq!(
        seen.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body["type"], "invoice.paid");
    assert_eq!(
        body["data"],
        serde_json::json!({ "invoice": 12, "amount": "9.90" })
    );
    let timestamp =
        chrono::DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).unwrap();
    assert!(timestamp <= chrono::Utc::now());
    assert!(hook.requests.try_recv().is_err(), "exactly one request");
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_host_name_is_resolved_like_an_ip_address_is_used() {
    // The sink skips the lookup for an IP address (every other test here);
    // a name still goes through ureq's resolver.
    let bed = setup();
    let hook = HookServer::start(|_| ok());
    let by_name = hook.url.replace("127.0.0.1", "localhost");
    let sink = outbox::WebhookSink::builder(&by_name)
        .secret(SECRET)
        .build()
        .unwrap();
    bed.publish(&[("t", None)]);
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    outbox::Sink::deliver(&sink, &event).unwrap();
    let seen = hook.requests.recv_timeout(PATIENCE).unwrap();
    assert_eq!(seen.path, "/hook");
    assert!(verify(&seen));
}

#[test]
fn retryable_statuses_are_retried_honouring_retry_after_within_the_cap() {
    let bed = setup();
    let hook = HookServer::start(|n| match n {
        0 => status(503, "maintenance"),
        1 => (
            429,
            vec![("Retry-After", "3600".into())],
            b"slow down".to_vec(),
            Duration::ZERO,
        ),
        _ => ok(),
    });
    let relay = start_relay(
        &bed,
        outbox::WebhookSink::builder(&hook.url).build().unwrap(),
    );
    let ids = bed.publish(&[("t", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();

    let retries = retries(&seen);
    let origin = hook.url.trim_end_matches("/hook");
    assert_eq!(
        retries,
        [
            (
                1,
                Duration::from_millis(50),
                format!("HTTP 503 from {origin}/hook: maintenance")
            ),
            // Retry-After: 3600 s, capped at the relay's backoff cap (400 ms).
            (
                2,
                Duration::from_millis(400),
                format!("HTTP 429 from {origin}/hook: slow down")
            ),
        ]
    );
    let requests: Vec<Seen> = hook.requests.try_iter().collect();
    let attempts: Vec<_> = requests
        .iter()
        .map(|r| r.header("outbox-attempt").unwrap().to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(requests
        .iter()
        .all(|r| r.header("webhook-id") == Some(ids[0].to_string().as_str())));
}

#[test]
fn a_client_error_dead_letters_with_the_status_and_the_start_of_the_body() {
    let bed = setup();
    let hook = HookServer::start(|_| {
        status(
            422,
            &format!("invalid email address{}", "!".repeat(5_000_000)),
        )
    });
    let relay = start_relay(
        &bed,
        outbox::WebhookSink::builder(&hook.url).build().unwrap(),
    );
    let ids = bed.publish(&[("t", None)]);
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();

    let letters = dead_letters(&mut bed.conn());
    assert_eq!(letters.len(), 1);
    let (id, _, attempts, error) = &letters[0];
    assert_eq!((*id, *attempts), (ids[0].get(), 1));
    let expected_start = format!(
        "permanent failure: HTTP 422 from {}: invalid email address!!!",
        hook.url
    );
    assert!(error.starts_with(&expected_start), "{error}");
    // Only the start of a 5 MB body is kept.
    assert!(error.len() < 700, "{} bytes of error kept", error.len());
}

#[test]
fn a_redirect_is_not_followed_and_is_permanent() {
    let bed = setup();
    let hook = HookServer::start(|_| {
        (
            302,
            vec![("Location", "http://127.0.0.1:1/elsewhere".into())],
            vec![],
            Duration::ZERO,
        )
    });
    let relay = start_relay(
        &bed,
        outbox::WebhookSink::builder(&hook.url).build().unwrap(),
    );
    bed.publish(&[("t", None)]);
    bed.signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    let letters = dead_letters(&mut bed.conn());
    assert!(
        letters[0].3.starts_with("permanent failure: HTTP 302 from"),
        "{letters:?}"
    );
    assert_eq!(hook.requests.try_iter().count(), 1);
}

#[test]
fn a_timeout_is_retried() {
    let bed = setup();
    let hook = HookServer::start(|n| match n {
        0 => (200, vec![], vec![], Duration::from_secs(2)),
        _ => ok(),
    });
    let sink = outbox::WebhookSink::builder(&hook.url)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let relay = start_relay(&bed, sink);
    let ids = bed.publish(&[("t", None)]);
    let seen = bed.signals.until(|s| {
        s.contains(&Signal::Delivered {
            id: ids[0],
            attempt: 2,
        })
    });
    relay.shutdown(PATIENCE).unwrap();
    let error = seen
        .iter()
        .find_map(|s| match s {
            Signal::Retry { error, .. } => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert!(error.starts_with("request failed: timeout"), "{error}");
}

#[test]
fn an_unreachable_endpoint_is_retried_with_backoff_until_it_comes_back() {
    let bed = setup();
    // A port nobody listens on, until the server starts on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let relay = start_relay(&bed, outbox::WebhookSink::builder(&url).build().unwrap());
    let ids = bed.publish(&[("t", None)]);
    // Three failed attempts, spaced by the backoff (50, 100, 200 ms).
    let seen = bed.signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Retry { .. }))
            .count()
            == 3
    });
    let delays: Vec<Duration> = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Retry { delay, error, .. } => {
                assert!(error.starts_with("request failed:"), "{error}");
                Some(*delay)
            }
            _ => None,
        })
        .collect();
    assert_eq!(delays, [50, 100, 200].map(Duration::from_millis));

    let requests: Arc<Mutex<usize>> = Arc::default();
    let counter = requests.clone();
    let _hook = HookServer::start_on(
        &format!("127.0.0.1:{port}"),
        Box::new(move |_| {
            *counter.lock().unwrap() += 1;
            ok()
        }),
    );
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    let Some(Signal::Delivered { id, attempt }) = seen.last() else {
        unreachable!()
    };
    assert_eq!(*id, ids[0]);
    assert!((4..=6).contains(attempt), "delivered at attempt {attempt}");
    assert_eq!(*requests.lock().unwrap(), 1);
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn the_envelope_body_and_only_the_forwarded_headers_arrive() {
    let bed = setup();
    let hook = HookServer::start(|_| ok());
    outbox::transaction(&mut bed.conn(), |tx| {
        tx.publish_event(
            outbox::NewEvent::dynamic("invoice.paid", serde_json::json!({ "invoice": 12 }))
                .key("customer-3")
                .header("traceparent", "00-abc-01")
                .header("x-tenant", "acme"),
        )
    })
    .unwrap();
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    let sink = outbox::WebhookSink::builder(&hook.url)
        .secret(SECRET)
        .body(outbox::Body::Envelope)
        .forward_headers(outbox::ForwardHeaders::only(["traceparent"]))
        .build()
        .unwrap();
    let relay = start_relay(&bed, sink);
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();
    let seen = hook.requests.try_recv().unwrap();

    let envelope: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        envelope,
        serde_json::json!({
            "id": event.id.get(),
            "topic": "invoice.paid",
            "key": "customer-3",
            "created_at": event.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "headers": { "traceparent": "00-abc-01" },
            "payload": { "invoice": 12 },
        })
    );
    assert!(verify(&seen), "the signature covers the envelope: {seen:?}");
    assert_eq!(seen.header("traceparent"), Some("00-abc-01"));
    assert_eq!(seen.header("x-tenant"), None, "not forwarded");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(
        seen.header("webhook-id"),
        Some(event.id.to_string().as_str())
    );
    assert_eq!(seen.header("outbox-topic"), Some("invoice.paid"));
    assert_eq!(seen.header("outbox-attempt"), Some("1"));
    assert_eq!(seen.header("outbox-key"), Some("customer-3"));
    assert!(hook.requests.try_recv().is_err(), "exactly one request");
}

#[test]
fn the_bare_payload_body_is_signed_as_sent() {
    let bed = setup();
    let hook = HookServer::start(|_| ok());
    bed.publish(&[("t", None)]);
    let event = outbox::queued_events(&mut bed.conn(), 1).unwrap().remove(0);
    let sink = outbox::WebhookSink::builder(&hook.url)
        .secret(SECRET)
        .body(outbox::Body::Payload)
        .build()
        .unwrap();
    outbox::Sink::deliver(&sink, &event).unwrap();
    let seen = hook.requests.recv_timeout(PATIENCE).unwrap();
    assert_eq!(seen.body, br#"{"n":0}"#);
    assert!(verify(&seen));
}
