//! What an event is: the [`Event`] trait, its [`EventId`], and the
//! [`StoredEvent`] a relay reads back.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Headers travel beside the payload (trace context, content type …) and are
/// forwarded by sinks. Stored as a JSON object of strings.
pub type Headers = BTreeMap<String, String>;

/// A typed event: a serializable payload bound to its topic at compile time,
/// so every event of a topic has the same shape.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderApproved { order_id: i64, email: String }
///
/// impl outbox::Event for OrderApproved {
///     const TOPIC: &'static str = "order.approved";
///
///     // Events of one order are delivered in the order they were written.
///     fn key(&self) -> Option<String> {
///         Some(self.order_id.to_string())
///     }
/// }
/// ```
pub trait Event: Serialize {
    /// The topic every event of this type is published under: 1 to
    /// [`MAX_TOPIC_LEN`](crate::MAX_TOPIC_LEN) bytes, no control characters.
    /// Checked at compile time: a program that publishes an event with an
    /// invalid topic does not build.
    const TOPIC: &'static str;

    /// The ordering key of this event: events sharing a key are delivered one
    /// at a time, in the order they were written. Defaults to none (no
    /// ordering constraint, fully parallel delivery).
    fn key(&self) -> Option<String> {
        None
    }
}

/// The stable id of an event, assigned when it is written. Every delivery
/// carries it, so receivers can deduplicate; a replayed dead letter keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub i64);

impl EventId {
    /// The id as stored in the `id` column.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<i64> for EventId {
    fn from(id: i64) -> Self {
        EventId(id)
    }
}

/// An event as stored in `outbox.events`: what a relay hands to a sink,
/// for one subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// The stable event id.
    pub id: EventId,
    /// The topic it was published under.
    pub topic: String,
    /// The ordering key, if any.
    pub key: Option<String>,
    /// The payload, as published.
    pub payload: serde_json::Value,
    /// The headers, as published.
    pub headers: Headers,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// Not delivered before this time.
    pub available_at: DateTime<Utc>,
    /// How many times a relay has claimed it, including a current claim.
    pub attempts: i32,
    /// Why the previous attempt failed, if one did.
    pub last_error: Option<String>,
    /// The subscription this delivery is for ([`crate::DEFAULT_SUBSCRIPTION`]
    /// for `.route` and `.handle`; in [`crate::queued_events`], the one that
    /// still owes it).
    #[serde(default)]
    pub subscription: String,
}

impl StoredEvent {
    /// Deserializes the payload into its typed form.
    ///
    /// Fails with [`Error::Decode`] when the payload no longer matches `E`
    /// (a producer wrote another shape under the same topic).
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E> {
        E::deserialize(&self.payload).map_err(|source| Error::Decode {
            id: self.id,
            source,
        })
    }
}
