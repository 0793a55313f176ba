//! Security (docs/security.md): injection strings are stored verbatim and
//! stay inert; secrets never reach output, logs or errors; publisher and
//! relay work under roles with only the grants the document lists. The
//! webhook signature is checked with an independent HMAC (`ring`) in
//! `sink_webhook::a_signed_delivery_carries_the_standard_webhooks_headers_and_body`.

mod injection;
mod roles;
mod secrets;
