//! Delivery spans (feature `opentelemetry`): one `outbox.deliver` span per
//! event handed to a sink, a child of the trace context the event was
//! published in, so that a trace runs request → publish → delivery → what
//! the sink does. docs/operations.md, "Tracing", has the picture and the
//! reasons.

use opentelemetry::trace::TraceContextExt;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::event::StoredEvent;
use crate::sink::DeliveryError;
use crate::trace_context;

/// The spans of one sink call: one per event, and the span the call runs
/// in.
pub(super) struct Deliveries {
    /// `outbox.deliver`, one per event of the call, in order.
    events: Vec<Span>,
    /// For a call of several events, `outbox.deliver_batch`, linked to
    /// each of their spans: a span has one parent, and their parents are
    /// in different traces. `None` for a call of one event, which runs in
    /// that event's span.
    batch: Option<Span>,
}

impl Deliveries {
    /// Opens the spans of a call delivering `events`. They start now: a
    /// span's duration is the sink call's.
    pub(super) fn open(events: &[&StoredEvent]) -> Self {
        let spans: Vec<Span> = events.iter().map(|event| delivery_span(event)).collect();
        let batch = (spans.len() > 1).then(|| {
            let size = i64::try_from(spans.len()).unwrap_or(i64::MAX);
            let batch = tracing::info_span!("outbox.deliver_batch", outbox.batch_size = size);
            for span in &spans {
                batch.add_link(span.context().span().span_context().clone());
            }
            batch
        });
        Deliveries {
            events: spans,
            batch,
        }
    }

    /// Runs the sink call `deliver` inside the call's span, then records
    /// each event's result on its span and closes them all.
    pub(super) fn around(
        self,
        deliver: impl FnOnce() -> Vec<Result<(), DeliveryError>>,
    ) -> Vec<Result<(), DeliveryError>> {
        let call = self.batch.as_ref().or(self.events.first());
        let results = match call {
            Some(span) => span.in_scope(deliver),
            None => deliver(),
        };
        for (span, result) in self.events.iter().zip(&results) {
            if let Err(error) = result {
                span.record("otel.status_code", "error");
                span.record("otel.status_description", error.message());
            }
        }
        results
    }
}

/// The span of one event's delivery, its parent set to the context in the
/// event's `traceparent` / `tracestate` headers (none: a root span).
fn delivery_span(event: &StoredEvent) -> Span {
    let span = tracing::info_span!(
        "outbox.deliver",
        outbox.event_id = event.id.0,
        outbox.topic = %event.topic,
        outbox.subscription = %event.subscription,
        outbox.attempt = event.attempts,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if span.is_disabled() {
        // No subscriber wants it: skip reading the headers.
        return span;
    }
    let parent = trace_context::extract(&event.headers);
    if parent.span().span_context().is_valid() {
        // Fails only without a tracing-opentelemetry layer (or with the
        // span filtered out): then there is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, Status, TracerProvider as _};
    use opentelemetry::Value;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::event::EventId;

    fn event(id: i64, traceparent: &str) -> StoredEvent {
        StoredEvent {
            id: EventId(id),
            topic: "order.approved".to_owned(),
            key: None,
            payload: serde_json::Value::Null,
            headers: [("traceparent".to_owned(), traceparent.to_owned())].into(),
            created_at: chrono::Utc::now(),
            available_at: chrono::Utc::now(),
            attempts: 3,
            last_error: None,
            subscription: "billing".to_owned(),
        }
    }

    /// Runs `f` with a tracing-opentelemetry layer on this thread; returns
    /// the spans it finished.
    fn traced(f: impl FnOnce()) -> Vec<SpanData> {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test"));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
        exporter.get_finished_spans().unwrap()
    }

    fn named<'s>(spans: &'s [SpanData], name: &str) -> Vec<&'s SpanData> {
        spans.iter().filter(|s| s.name == name).collect()
    }

    fn attribute(span: &SpanData, key: &str) -> Option<Value> {
        let found = span.attributes.iter().find(|kv| kv.key.as_str() == key);
        found.map(|kv| kv.value.clone())
    }

    #[test]
    fn one_event_is_delivered_in_its_span_a_child_of_its_traceparent() {
        let published = event(7, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let spans = traced(|| {
            Deliveries::open(&[&published])
                .around(|| tracing::info_span!("sink.work").in_scope(|| vec![Ok(())]));
        });
        let [delivery] = named(&spans, "outbox.deliver")[..] else {
            panic!("{spans:#?}")
        };
        let context = &delivery.span_context;
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(delivery.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(delivery.parent_span_is_remote);
        assert_eq!(attribute(delivery, "outbox.event_id"), Some(Value::I64(7)));
        assert_eq!(
            attribute(delivery, "outbox.topic"),
            Some("order.approved".into())
        );
        assert_eq!(
            attribute(delivery, "outbox.subscription"),
            Some("billing".into())
        );
        assert_eq!(attribute(delivery, "outbox.attempt"), Some(Value::I64(3)));
        assert_eq!(delivery.status, Status::Unset);
        let [work] = named(&spans, "sink.work")[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(work.parent_span_id, context.span_id());
        assert_eq!(work.span_context.trace_id(), context.trace_id());
        assert!(named(&spans, "outbox.deliver_batch").is_empty());
    }

    #[test]
    fn without_a_valid_traceparent_the_delivery_starts_a_trace() {
        let published = event(7, "00-abc-01");
        let spans = traced(|| {
            Deliveries::open(&[&published]).around(|| vec![Ok(())]);
        });
        let [delivery] = named(&spans, "outbox.deliver")[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(delivery.parent_span_id, SpanId::INVALID);
    }

    #[test]
    fn a_batch_call_runs_in_a_span_linked_to_every_events_delivery_span() {
        let a = event(1, "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-1111111111111111-01");
        let b = event(2, "00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-2222222222222222-01");
        let spans = traced(|| {
            let results = Deliveries::open(&[&a, &b]).around(|| {
                tracing::info_span!("sink.work")
                    .in_scope(|| vec![Ok(()), Err(DeliveryError::transient("broker said no"))])
            });
            assert_eq!(results.len(), 2);
        });
        let deliveries = named(&spans, "outbox.deliver");
        let delivery = |id: i64| {
            let found = deliveries
                .iter()
                .find(|s| attribute(s, "outbox.event_id") == Some(Value::I64(id)));
            *found.unwrap_or_else(|| panic!("no span for {id}: {spans:#?}"))
        };
        let (a, b) = (delivery(1), delivery(2));
        assert_eq!(deliveries.len(), 2);
        assert_eq!(a.parent_span_id.to_string(), "1111111111111111");
        assert_eq!(b.parent_span_id.to_string(), "2222222222222222");
        assert_eq!(a.status, Status::Unset);
        assert_eq!(b.status, Status::error("broker said no"));

        let [batch] = named(&spans, "outbox.deliver_batch")[..] else {
            panic!("{spans:#?}")
        };
        let linked: Vec<_> = batch.links.iter().map(|l| &l.span_context).collect();
        assert_eq!(linked, [&a.span_context, &b.span_context]);
        assert_eq!(attribute(batch, "outbox.batch_size"), Some(Value::I64(2)));
        let [work] = named(&spans, "sink.work")[..] else {
            panic!("{spans:#?}")
        };
        assert_eq!(work.parent_span_id, batch.span_context.span_id());
    }
}
