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
    idempotency_key: Option<String>,
}

/// The longest idempotency key accepted, in bytes (the table enforces the
/// same limit).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

impl NewEvent {
    /// An event of type `E`, under `E::TOPIC`, with `event.key()` as its key.
    ///
    /// An invalid `E::TOPIC` is a build error wherever an `E` is published
    /// (checked when this function is instantiated for `E`):
    ///
    /// ```compile_fail,E0080
    /// # use serde::Serialize;
    /// #[derive(Serialize)]
    /// struct Broken;
    /// impl outbox::Event for Broken { const TOPIC: &'static str = "order\napproved"; }
    ///
    /// let _ = outbox::NewEvent::typed(&Broken); // error: invalid `Event::TOPIC`
    /// ```
    pub fn typed<E: Event + ?Sized>(event: &E) -> Self {
        const {
            assert!(
                topic_problem(E::TOPIC).is_none(),
                "invalid `Event::TOPIC`: it must be 1 to 255 bytes without control characters"
            )
        };
        NewEvent {
            topic: E::TOPIC.to_owned(),
            payload: serde_json::to_string(event),
            key: event.key(),
            headers: Headers::new(),
            available_at: None,
            idempotency_key: None,
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
            idempotency_key: None,
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

    /// Makes the publish idempotent: while an event with the same key was
    /// published within the window (7 days by default, docs/schema.md),
    /// publishing this one writes nothing and returns that event's id.
    ///
    /// Safe under concurrency: of two transactions publishing one key at
    /// once, the second waits for the first to commit (then writes nothing
    /// and gets the first's id) or roll back (then writes its own). Under
    /// `REPEATABLE READ` or `SERIALIZABLE`, the second fails with a
    /// serialization error instead, to be retried like any other. 1 to
    /// [`MAX_IDEMPOTENCY_KEY_LEN`] bytes, no NUL.
    ///
    /// ```
    /// let event = outbox::NewEvent::dynamic("order.approved", serde_json::json!({ "order": 7 }))
    ///     .idempotency_key("order-7-approved");
    /// # let _ = event;
    /// ```
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
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
    /// a typed error before any row is written. Every publish path passes
    /// through here, so with the `opentelemetry` feature this is also where
    /// the current trace context goes into the headers.
    #[cfg_attr(not(feature = "opentelemetry"), allow(unused_mut))]
    pub(crate) fn into_valid(mut self) -> Result<ValidEvent> {
        #[cfg(feature = "opentelemetry")]
        crate::trace_context::record_current(&mut self.headers);
        validate_topic(&self.topic)?;
        if self.key.as_deref().is_some_and(|key| key.contains('\0')) {
            return Err(Error::InvalidKey {
                reason: "contains a NUL character",
            });
        }
        if let Some(key) = &self.idempotency_key {
            let reason = if key.is_empty() {
                Some("empty")
            } else if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
                Some("longer than 255 bytes")
            } else if key.contains('\0') {
                Some("contains a NUL character")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::InvalidIdempotencyKey { reason });
            }
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
            idempotency_key: self.idempotency_key,
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
    pub(crate) idempotency_key: Option<String>,
}

/// Checks a topic: 1 to [`MAX_TOPIC_LEN`] bytes, no control characters.
///
/// A typed event's `Event::TOPIC` gets the same check at compile time; this
/// one is for topics chosen at run time ([`NewEvent::dynamic`]).
pub fn validate_topic(topic: &str) -> Result<()> {
    match topic_problem(topic) {
        Some(reason) => Err(Error::InvalidTopic {
            topic: excerpt(topic),
            reason,
        }),
        None => Ok(()),
    }
}

/// What is wrong with a topic, if anything. A `const fn` so that a typed
/// event's topic is checked at compile time by exactly the rule run-time
/// topics meet.
pub(crate) const fn topic_problem(topic: &str) -> Option<&'static str> {
    let bytes = topic.as_bytes();
    if bytes.is_empty() {
        return Some("empty");
    }
    if bytes.len() > MAX_TOPIC_LEN {
        return Some("longer than 255 bytes");
    }
    // `char::is_control` is U+0000..=U+001F and U+007F..=U+009F. In UTF-8
    // the first range and U+007F are single bytes; U+0080..=U+009F are
    // 0xC2 followed by 0x80..=0x9F (0xC2 is only ever a lead byte).
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x20 || b == 0x7F || (b == 0xC2 && i + 1 < bytes.len() && bytes[i + 1] <= 0x9F) {
            return Some("contains a control character");
        }
        i += 1;
    }
    None
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
    fn the_byte_scan_finds_exactly_the_control_characters() {
        // Every character of the first three UTF-8 lengths, and some of the
        // fourth: the const scan agrees with `char::is_control`.
        for c in (0..=0x1_0FFF).filter_map(char::from_u32) {
            let topic = format!("a{c}b");
            assert_eq!(
                topic_problem(&topic).is_some(),
                c.is_control(),
                "U+{:04X}",
                c as u32
            );
        }
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
            ("order\u{85}", "contains a control character"),
            ("order\u{9f}x", "contains a control character"),
        ] {
            match validate_topic(topic) {
                Err(Error::InvalidTopic { reason: got, .. }) => assert_eq!(got, reason),
                other => panic!("{topic:?}: {other:?}"),
            }
        }
    }
}
