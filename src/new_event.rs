//! [`NewEvent`]: an event on its way into `outbox.events`, and the checks it
//! passes before anything is written.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{excerpt, Error, Result};
use crate::event::{Event, Headers};

/// The longest topic accepted, in bytes (the table enforces the same limit).
pub const MAX_TOPIC_LEN: usize = 255;

/// The deepest nesting of arrays and objects a payload may have. serde_json,
/// which the relay reads payloads with, refuses anything deeper (its
/// recursion limit), so such an event could only ever be dead-lettered:
/// publishing refuses it instead ([`Error::PayloadTooDeep`]).
pub const MAX_PAYLOAD_DEPTH: usize = 127;

/// An event to publish, with options: ordering key, headers, delayed
/// delivery. Built from a typed [`Event`] or, for generic code, from a topic
/// string and a JSON value.
///
/// Building never fails; problems (an invalid topic, a payload that does not
/// serialize) are reported by the `publish_*` call, before anything is
/// written.
///
/// ```
/// # use serde::Serialize;
/// # #[derive(Serialize)] struct Shipped { order_id: i64 }
/// # impl outbox::Event for Shipped { const TOPIC: &'static str = "order.shipped"; }
/// use std::time::Duration;
/// use outbox::NewEvent;
///
/// let typed = NewEvent::typed(&Shipped { order_id: 7 })
///     .key("order-7")
///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
///     .delay(Duration::from_secs(60));
///
/// let dynamic = NewEvent::dynamic("audit.login", serde_json::json!({ "user": 42 }));
/// # let _ = (typed, dynamic);
/// ```
#[derive(Debug)]
pub struct NewEvent {
    topic: String,
    payload: std::result::Result<String, serde_json::Error>,
    key: Option<String>,
    headers: Headers,
    available_at: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// An event of type `E`, under `E::TOPIC`, with `event.key()` as its key.
    pub fn typed<E: Event + ?Sized>(event: &E) -> Self {
        NewEvent {
            topic: E::TOPIC.to_owned(),
            payload: serde_json::to_string(event),
            key: event.key(),
            headers: Headers::new(),
            available_at: None,
        }
    }

    /// An event under a topic chosen at run time, for generic code (bridges,
    /// replays, other languages' payloads). Prefer [`NewEvent::typed`]: it
    /// keeps every payload of a topic the same shape.
    pub fn dynamic(topic: impl Into<String>, payload: serde_json::Value) -> Self {
        NewEvent {
            topic: topic.into(),
            payload: serde_json::to_string(&payload),
            key: None,
            headers: Headers::new(),
            available_at: None,
        }
    }

    /// Sets the ordering key, replacing the one the event type gave. Events
    /// sharing a key are delivered one at a time, in the order written.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Removes the ordering key: delivered in parallel with everything.
    pub fn without_key(mut self) -> Self {
        self.key = None;
        self
    }

    /// Adds a header (replacing one of the same name), forwarded by sinks.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Delays delivery until `at`.
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        self.available_at = Some(at);
        self
    }

    /// Delays delivery by `delay`, measured from now on this machine's clock.
    pub fn delay(mut self, delay: Duration) -> Self {
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        self.available_at = Some(
            Utc::now()
                .checked_add_signed(delay)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        );
        self
    }

    /// Checks everything the database would reject, so that a bad event is
    /// a typed error before any row is written.
    pub(crate) fn into_valid(self) -> Result<ValidEvent> {
        validate_topic(&self.topic)?;
        if self.key.as_deref().is_some_and(|key| key.contains('\0')) {
            return Err(Error::InvalidKey {
                reason: "contains a NUL character",
            });
        }
        for (name, value) in &self.headers {
            let reason = if name.is_empty() {
                "empty name"
            } else if name.contains('\0') || value.contains('\0') {
                "contains a NUL character"
            } else {
                continue;
            };
            return Err(Error::InvalidHeader {
                name: excerpt(name),
                reason,
            });
        }
        let payload = self.payload.map_err(Error::Serialize)?;
        if json_has_nul(&payload) {
            return Err(Error::NulInPayload);
        }
        if json_depth(&payload) > MAX_PAYLOAD_DEPTH {
            return Err(Error::PayloadTooDeep {
                limit: MAX_PAYLOAD_DEPTH,
            });
        }
        let headers = if self.headers.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&self.headers).map_err(Error::Serialize)?)
        };
        Ok(ValidEvent {
            topic: self.topic,
            key: self.key,
            payload,
            headers,
            available_at: self.available_at,
        })
    }
}

/// A [`NewEvent`] that passed validation, ready to insert.
#[derive(Debug)]
pub(crate) struct ValidEvent {
    pub(crate) topic: String,
    pub(crate) key: Option<String>,
    pub(crate) payload: String,
    /// `None` for no headers: the column default `{}` applies.
    pub(crate) headers: Option<String>,
    /// `None` for "now": the column default applies.
    pub(crate) available_at: Option<DateTime<Utc>>,
}

/// Checks a topic: 1 to [`MAX_TOPIC_LEN`] bytes, no control characters.
pub fn validate_topic(topic: &str) -> Result<()> {
    let reason = if topic.is_empty() {
        Some("empty")
    } else if topic.len() > MAX_TOPIC_LEN {
        Some("longer than 255 bytes")
    } else if topic.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidTopic {
            topic: excerpt(topic),
            reason,
        }),
        None => Ok(()),
    }
}

/// Whether serde_json output contains an escaped NUL (`\u0000`) inside a
/// string. serde_json writes NUL only in that form, and writes a literal
/// backslash as `\\`, so walking the escapes pairwise is exact.
fn json_has_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2; // skip the escaped character
        } else {
            i += 1;
        }
    }
    false
}

/// The deepest nesting of arrays and objects in serde_json output. Brackets
/// inside strings do not count; escapes are skipped pairwise as in
/// [`json_has_nul`].
fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string) = (0usize, 0usize, false);
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => i += 1, // skip the escaped character
            (_, b'"') => in_string = !in_string,
            (false, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        "[".repeat(depth) + &"]".repeat(depth)
    }

    #[test]
    fn the_depth_limit_is_exactly_what_serde_json_reads() {
        let deepest = nested(MAX_PAYLOAD_DEPTH);
        assert_eq!(json_depth(&deepest), MAX_PAYLOAD_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(&deepest).is_ok());
        let too_deep = nested(MAX_PAYLOAD_DEPTH + 1);
        assert_eq!(json_depth(&too_deep), MAX_PAYLOAD_DEPTH + 1);
        let error = serde_json::from_str::<serde_json::Value>(&too_deep).unwrap_err();
        assert!(error.to_string().starts_with("recursion limit exceeded"));
    }

    #[test]
    fn brackets_inside_strings_do_not_nest() {
        assert_eq!(json_depth(r#"{"a":"[[[{{{","b":["\"[["]}"#), 2);
        assert_eq!(json_depth(r#""\\""#), 0);
        assert_eq!(json_depth("1"), 0);
    }

    #[test]
    fn escaped_nul_is_found_and_escaped_backslash_is_not() {
        let with_nul = serde_json::to_string(&serde_json::json!({ "a": "x\u{0}y" })).unwrap();
        assert!(json_has_nul(&with_nul));
        let lookalike = serde_json::to_string(&serde_json::json!({ "a": "\\u0000" })).unwrap();
        assert_eq!(lookalike, r#"{"a":"\\u0000"}"#);
        assert!(!json_has_nul(&lookalike));
        assert!(!json_has_nul(r#"{"a":"\\\\"}"#));
    }

    #[test]
    fn topics_are_checked() {
        assert!(validate_topic("order.approved").is_ok());
        assert!(validate_topic(&"a".repeat(255)).is_ok());
        for (topic, reason) in [
            ("", "empty"),
            (&"a".repeat(256)[..], "longer than 255 bytes"),
            ("order\napproved", "contains a control character"),
            ("order\u{7f}", "contains a control character"),
        ] {
            match validate_topic(topic) {
                Err(Error::InvalidTopic { reason: got, .. }) => assert_eq!(got, reason),
                other => panic!("{topic:?}: {other:?}"),
            }
        }
    }
}
