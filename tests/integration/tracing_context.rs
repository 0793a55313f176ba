//! Trace context from request to sink (feature `opentelemetry`): the
//! publish records the request span's `traceparent`, and the relay delivers
//! in a span that continues that trace, around the sink's own spans.
//!
//! The relay's workers are threads of their own, so the test subscriber is
//! the process's global default, installed once. Tests run in parallel and
//! every relay in the process makes spans under it: a sampler keeps only
//! the traces these tests start, and each test reads only its own trace.

use std::sync::OnceLock;

use crossbeam_channel::unbounded;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{
    InMemorySpanExporter, Sampler, SamplingDecision, SamplingResult, SdkTracerProvider,
    ShouldSample, SpanData,
};
use outbox::{NewEvent, StoredEvent};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::common::{approved, OrderApproved};
use crate::relay_support::{setup, PATIENCE};

/// Root spans of these tests have names starting so; the sampler keeps
/// their traces and drops the rest.
const ROOT: &str = "tracing_context.";

/// Samples a root span only when it is one of these tests' (children
/// follow their parent: [`Sampler::ParentBased`]).
#[derive(Clone, Debug)]
struct TheseTests;

impl ShouldSample for TheseTests {
    fn should_sample(
        &self,
        _: Option<&opentelemetry::Context>,
        _: TraceId,
        name: &str,
        _: &SpanKind,
        _: &[KeyValue],
        _: &[Link],
    ) -> SamplingResult {
        SamplingResult {
            decision: match name.starts_with(ROOT) {
                true => SamplingDecision::RecordAndSample,
                false => SamplingDecision::Drop,
            },
            attributes: Vec::new(),
            trace_state: TraceState::default(),
        }
    }
}

/// The exporter of the process's test subscriber, installed on first use.
fn exporter() -> &'static InMemorySpanExporter {
    static INSTALLED: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    let (_, exporter) = INSTALLED.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(TheseTests)))
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("a global subscriber is already set (unset OUTBOX_TEST_LOG)");
        (provider, exporter)
    });
    exporter
}

/// The finished spans of one trace.
fn trace(trace_id: TraceId) -> Vec<SpanData> {
    let spans = exporter().get_finished_spans().unwrap();
    spans
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .collect()
}

/// The one span of `spans` named `name`.
fn one<'s>(spans: &'s [SpanData], name: &str) -> &'s SpanData {
    match spans.iter().filter(|s| s.name == name).collect::<Vec<_>>()[..] {
        [span] => span,
        _ => panic!("expected one {name:?} span in {spans:#?}"),
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    let found = span.attributes.iter().find(|kv| kv.key.as_str() == key);
    found.map(|kv| kv.value.clone())
}

#[test]
fn request_publish_delivery_and_handler_spans_form_one_trace() {
    exporter();
    let bed = setup();
    let (sent, received) = unbounded();
    let relay = bed
        .relay()
        .handle(move |_: OrderApproved, meta: &StoredEvent| {
            let _work = tracing::info_span!("handler.work").entered();
            sent.send(meta.headers.clone())?;
            Ok(())
        })
        .start()
        .unwrap();

    let request = tracing::info_span!("tracing_context.request");
    let id = request
        .in_scope(|| outbox::transaction(&mut bed.conn(), |tx| tx.publish(&approved(7))))
        .unwrap();
    let context = request.context().span().span_context().clone();
    drop(request);
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();

    // The sink got the publisher's context, as stored.
    let headers = received.recv_timeout(PATIENCE).unwrap();
    assert_eq!(
        headers.get("traceparent").map(String::as_str),
        Some(&*format!(
            "00-{}-{}-01",
            context.trace_id(),
            context.span_id()
        ))
    );
    assert!(!headers.contains_key("tracestate"), "{headers:?}");

    let spans = trace(context.trace_id());
    let mut names: Vec<&str> = spans.iter().map(|s| &*s.name).collect();
    names.sort();
    assert_eq!(
        names,
        ["handler.work", "outbox.deliver", "tracing_context.request"]
    );
    let delivery = one(&spans, "outbox.deliver");
    assert_eq!(delivery.parent_span_id, context.span_id());
    assert!(delivery.parent_span_is_remote);
    assert_eq!(attribute(delivery, "outbox.event_id"), Some(id.0.into()));
    assert_eq!(
        attribute(delivery, "outbox.topic"),
        Some("order.approved".into())
    );
    assert_eq!(
        attribute(delivery, "outbox.subscription"),
        Some(outbox::DEFAULT_SUBSCRIPTION.into())
    );
    assert_eq!(attribute(delivery, "outbox.attempt"), Some(1_i64.into()));
    let work = one(&spans, "handler.work");
    assert_eq!(work.parent_span_id, delivery.span_context.span_id());
}

#[test]
fn a_traceparent_set_by_the_caller_is_kept_and_the_delivery_joins_its_trace() {
    exporter();
    let bed = setup();
    let (sent, received) = unbounded();
    let relay = bed
        .relay()
        .route("*", move |event: &StoredEvent| {
            sent.send(event.headers.clone())?;
            Ok(())
        })
        .start()
        .unwrap();

    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let request = tracing::info_span!("tracing_context.caller");
    let event = NewEvent::typed(&approved(8))
        .header("traceparent", caller)
        .header("tracestate", "vendor=kept");
    request
        .in_scope(|| outbox::transaction(&mut bed.conn(), |tx| tx.publish_event(event)))
        .unwrap();
    drop(request);
    bed.signals.delivered(1);
    relay.shutdown(PATIENCE).unwrap();

    let headers = received.recv_timeout(PATIENCE).unwrap();
    assert_eq!(headers["traceparent"], caller);
    assert_eq!(headers["tracestate"], "vendor=kept");
    let caller_trace = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
    let spans = trace(caller_trace);
    let delivery = one(&spans, "outbox.deliver");
    assert_eq!(
        delivery.parent_span_id,
        SpanId::from_hex("b7ad6b7169203331").unwrap()
    );
    assert_eq!(
        delivery.span_context.trace_state().get("vendor"),
        Some("kept")
    );
}

#[test]
fn a_publish_records_the_trace_context_only_inside_a_span() {
    exporter();
    let bed = setup();
    let mut conn = bed.conn();
    let ids =
        outbox::transaction(&mut conn, |tx| tx.publish_all(&[approved(1), approved(2)])).unwrap();
    // Every other publish path records it (all pass through one place).
    let request = tracing::info_span!("tracing_context.paths");
    let traced = request
        .in_scope(|| {
            diesel::Connection::transaction(&mut conn, |conn| {
                outbox::publish_events(conn, [NewEvent::dynamic("audit.login", 42.into())])
            })
        })
        .unwrap();
    let context: SpanContext = request.context().span().span_context().clone();

    let queued = outbox::queued_events(&mut conn, 10).unwrap();
    let headers = |id| &queued.iter().find(|e| e.id == id).unwrap().headers;
    assert!(headers(ids[0]).is_empty() && headers(ids[1]).is_empty());
    assert_eq!(
        headers(traced[0])["traceparent"],
        format!("00-{}-{}-01", context.trace_id(), context.span_id())
    );
}
