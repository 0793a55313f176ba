//! Typed in-process handlers: a closure that receives the event as its Rust
//! type.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use super::{DeliveryError, Sink};
use crate::event::{Event, StoredEvent};

/// A [`Sink`] that decodes the payload into `E` and calls a closure with it
/// and the stored event (id, attempt, headers …). Built by
/// [`RelayBuilder::handle`](crate::RelayBuilder::handle).
///
/// A payload that no longer decodes into `E` (a producer wrote another
/// shape under the topic) is a permanent failure carrying serde's message:
/// retrying cannot fix it.
pub struct Handler<E, F> {
    handler: F,
    _event: PhantomData<fn() -> E>,
}

impl<E, F> Handler<E, F>
where
    E: Event + DeserializeOwned + 'static,
    F: Fn(E, &StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
{
    /// Wraps `handler` for events of type `E`.
    pub fn new(handler: F) -> Self {
        Handler {
            handler,
            _event: PhantomData,
        }
    }
}

impl<E, F> Sink for Handler<E, F>
where
    E: Event + DeserializeOwned + 'static,
    F: Fn(E, &StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
{
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        let typed = E::deserialize(&event.payload).map_err(|e| {
            DeliveryError::permanent(format!(
                "payload does not decode into {}: {e}",
                std::any::type_name::<E>()
            ))
        })?;
        (self.handler)(typed, event)
    }
}
