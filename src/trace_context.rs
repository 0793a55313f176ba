//! Trace context in event headers (feature `opentelemetry`): W3C
//! `traceparent` and `tracestate`, written when an event is published and
//! read when it is delivered. docs/operations.md, "Tracing", says what the
//! spans look like.
//!
//! Always the W3C format through [`TraceContextPropagator`], whatever
//! propagator the application installed globally: the header names are
//! part of the table contract (docs/schema.md), which relays and consumers
//! in other languages read too.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::event::Headers;

/// The W3C header holding the trace id, the parent span id and the flags.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// Records the current trace context in `headers`, unless they already
/// hold a `traceparent` (under any case): the caller's own, kept as is.
///
/// The current context is the current `tracing` span's (through a
/// `tracing-opentelemetry` layer), else OpenTelemetry's current context.
/// Without a valid span context nothing is written. `tracestate` is
/// written beside `traceparent` when it is not empty.
pub(crate) fn record_current(headers: &mut Headers) {
    if get(headers, TRACEPARENT).is_some() {
        return;
    }
    let mut cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        cx = Context::current();
    }
    // The propagator writes nothing for an invalid span context.
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The trace context recorded in `headers`: a context with a remote parent
/// span when they hold a valid `traceparent`, else an empty context.
pub(crate) fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// A header by name: the exact name first, then ignoring ASCII case (HTTP
/// header names are case-insensitive, and callers write either).
fn get<'h>(headers: &'h Headers, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .or_else(|| {
            headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value)
        })
        .map(String::as_str)
}

/// Writes the propagator's fields into event headers; an empty value (an
/// empty `tracestate`) removes the header instead, so that a stale one
/// never stays beside a new `traceparent`.
struct HeaderInjector<'h>(&'h mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            self.0.remove(key);
        } else {
            self.0.insert(key.to_owned(), value);
        }
    }
}

/// Reads the propagator's fields from event headers, ignoring ASCII case.
struct HeaderExtractor<'h>(&'h Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        get(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn remote(trace_state: &str) -> Context {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            trace_state.parse::<TraceState>().unwrap(),
        );
        Context::new().with_remote_span_context(span)
    }

    #[test]
    fn the_current_context_is_recorded_with_its_tracestate() {
        let _attached = remote("vendor=x").attach();
        let mut headers = Headers::new();
        record_current(&mut headers);
        assert_eq!(headers[TRACEPARENT], PARENT);
        assert_eq!(headers["tracestate"], "vendor=x");
    }

    #[test]
    fn an_empty_tracestate_is_not_written() {
        let _attached = remote("").attach();
        let mut headers = Headers::new();
        record_current(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [TRACEPARENT]);
    }

    #[test]
    fn a_traceparent_of_the_caller_is_kept_under_any_case() {
        let _attached = remote("vendor=x").attach();
        let mut headers = Headers::from([("TraceParent".to_owned(), "mine".to_owned())]);
        record_current(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["TraceParent"], "mine");
    }

    #[test]
    fn without_a_span_context_nothing_is_written() {
        let mut headers = Headers::new();
        record_current(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_recorded_context_reads_back() {
        let headers = Headers::from([
            ("Traceparent".to_owned(), PARENT.to_owned()),
            ("tracestate".to_owned(), "vendor=x".to_owned()),
        ]);
        let cx = extract(&headers);
        let span = cx.span();
        let read = span.span_context();
        assert!(read.is_valid() && read.is_remote());
        assert_eq!(read.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(read.trace_state().header(), "vendor=x");
        assert!(!extract(&Headers::new()).span().span_context().is_valid());
    }
}
