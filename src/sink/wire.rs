//! What a built-in sink puts on the wire: the message body ([`Body`]) and
//! which event headers travel with it ([`ForwardHeaders`]). Every built-in
//! sink takes both, through the same two builder methods (`.body(…)` and
//! `.forward_headers(…)`), and applies them the same way (docs/sinks.md,
//! "Payload and headers").

use std::collections::BTreeMap;

use serde::Serialize;

use crate::event::{EventId, StoredEvent};

/// What a built-in sink sends as each message's body (the HTTP request
/// body, the NATS / AMQP / MQTT message payload, the Kafka record value,
/// the Redis entry's `payload` field). Either way the body is JSON, with
/// content type `application/json` where the transport has one.
///
/// ```
/// let body = outbox::Body::Envelope;
/// # let _ = body;
/// // KafkaSink::builder(brokers).body(body), NatsSink::builder(url, prefix).body(body), …
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// The event's JSON payload, exactly as published. The default of
    /// every built-in sink except `WebhookSink`, whose default is the
    /// Standard Webhooks body `{"type", "timestamp", "data"}`.
    #[default]
    Payload,
    /// A JSON object with exactly these fields, in this order:
    ///
    /// | field | value |
    /// |---|---|
    /// | `id` | the event id (a number; stable across retries: deduplicate on it) |
    /// | `topic` | the event topic |
    /// | `key` | the ordering key, or `null` |
    /// | `created_at` | when it was published: RFC 3339, UTC, microseconds (`2026-03-01T12:00:00.123456Z`) |
    /// | `headers` | the event headers the sink forwards ([`ForwardHeaders`]), as an object of strings (`{}` when none) |
    /// | `payload` | the payload, as published |
    ///
    /// ```json
    /// {"id":42,"topic":"order.approved","key":"order-7","created_at":"2026-03-01T12:00:00.123456Z","headers":{"traceparent":"00-4bf9…-01"},"payload":{"order_id":7}}
    /// ```
    Envelope,
}

/// Which of an event's headers a built-in sink forwards: as transport
/// headers (HTTP headers, NATS headers, the AMQP header table, Kafka
/// headers, MQTT user properties), in the Redis entry's `headers` field,
/// and in the [`Body::Envelope`]'s `headers`. A header left out is not sent
/// anywhere. The sink's own headers (`webhook-id`, `Nats-Msg-Id`,
/// `outbox-id`, `outbox-topic`, `outbox-attempt`, `outbox-key` …) are always
/// sent: the selection is only about the event's headers.
///
/// Names match ignoring ASCII case (`traceparent` selects `Traceparent`),
/// as HTTP header names do; a forwarded header keeps the name it was
/// published with.
///
/// ```
/// // Only the W3C trace context leaves the process.
/// let headers = outbox::ForwardHeaders::only(["traceparent", "tracestate"]);
/// # let _ = headers;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardHeaders {
    /// Every event header. The default.
    #[default]
    All,
    /// No event header.
    None,
    /// The event headers with these names (ignoring ASCII case).
    Only(Vec<String>),
}

impl ForwardHeaders {
    /// Forwards only the headers with these names (ignoring ASCII case).
    pub fn only<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ForwardHeaders::Only(names.into_iter().map(Into::into).collect())
    }

    /// Whether an event header named `name` is forwarded.
    pub(crate) fn forwards(&self, name: &str) -> bool {
        match self {
            ForwardHeaders::All => true,
            ForwardHeaders::None => false,
            ForwardHeaders::Only(names) => names.iter().any(|n| n.eq_ignore_ascii_case(name)),
        }
    }

    /// The headers of `event` that are forwarded, in name order.
    pub(crate) fn select<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        event
            .headers
            .iter()
            .filter(|(name, _)| self.forwards(name))
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }
}

/// The envelope's fields, in their documented order.
#[derive(Serialize)]
struct Envelope<'a> {
    id: EventId,
    topic: &'a str,
    key: Option<&'a str>,
    created_at: String,
    headers: BTreeMap<&'a str, &'a str>,
    payload: &'a serde_json::Value,
}

impl Body {
    /// The body of `event`'s message (UTF-8 JSON), its envelope holding the
    /// headers `headers` forwards.
    pub(crate) fn render(self, event: &StoredEvent, headers: &ForwardHeaders) -> Vec<u8> {
        let json = match self {
            Body::Payload => serde_json::to_vec(&event.payload),
            Body::Envelope => serde_json::to_vec(&Envelope {
                id: event.id,
                topic: &event.topic,
                key: event.key.as_deref(),
                created_at: event
                    .created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                headers: headers.select(event).collect(),
                payload: &event.payload,
            }),
        };
        // Only a map with non-string keys or a failing Serialize impl can
        // make serde_json fail; a JSON value and this struct have neither.
        json.unwrap_or_else(|_| unreachable!("JSON values always serialize"))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn event() -> StoredEvent {
        let at = chrono::Utc
            .with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
            .unwrap()
            .checked_add_signed(chrono::Duration::microseconds(123_456))
            .unwrap();
        StoredEvent {
            id: EventId(42),
            topic: "order.approved".into(),
            key: Some("order-7".into()),
            payload: serde_json::json!({ "order_id": 7, "lines": [1, 2] }),
            headers: [("traceparent", "00-abc-01"), ("x-tenant", "acme")]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            created_at: at,
            available_at: at,
            attempts: 3,
            last_error: Some("earlier failure".into()),
            subscription: "default".into(),
        }
    }

    fn text(body: Vec<u8>) -> String {
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn the_payload_body_is_the_payload_as_published() {
        assert_eq!(
            text(Body::default().render(&event(), &ForwardHeaders::All)),
            r#"{"lines":[1,2],"order_id":7}"#
        );
    }

    #[test]
    fn the_envelope_has_exactly_the_documented_fields_in_order() {
        assert_eq!(
            text(Body::Envelope.render(&event(), &ForwardHeaders::All)),
            concat!(
                r#"{"id":42,"topic":"order.approved","key":"order-7","#,
                r#""created_at":"2026-03-01T12:00:00.123456Z","#,
                r#""headers":{"traceparent":"00-abc-01","x-tenant":"acme"},"#,
                r#""payload":{"lines":[1,2],"order_id":7}}"#
            )
        );
    }

    #[test]
    fn the_envelope_holds_only_the_forwarded_headers_and_a_null_key() {
        let mut event = event();
        event.key = None;
        let body = Body::Envelope.render(&event, &ForwardHeaders::only(["TraceParent"]));
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["key"], serde_json::Value::Null);
        assert_eq!(
            value["headers"],
            serde_json::json!({ "traceparent": "00-abc-01" })
        );
        let body = Body::Envelope.render(&event, &ForwardHeaders::None);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["headers"], serde_json::json!({}));
    }

    #[test]
    fn the_selection_matches_names_ignoring_ascii_case_and_keeps_their_spelling() {
        let mut event = event();
        event.headers.insert("TraceState".into(), "vendor=1".into());
        let selected = |forward: ForwardHeaders| -> Vec<(String, String)> {
            forward
                .select(&event)
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect()
        };
        let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        assert_eq!(
            selected(ForwardHeaders::only(["tracestate", "TRACEPARENT"])),
            [
                pair("TraceState", "vendor=1"),
                pair("traceparent", "00-abc-01")
            ]
        );
        assert_eq!(selected(ForwardHeaders::None), []);
        assert_eq!(selected(ForwardHeaders::default()).len(), 3);
        assert_eq!(selected(ForwardHeaders::only(Vec::<String>::new())), []);
    }
}
