//! `outbox relay`: a relay process delivering to one sink, with graceful
//! shutdown on SIGINT/SIGTERM, a drain mode, and Prometheus metrics.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;
use outbox::{DeliveryError, Sink, StoredEvent, TopicPattern};

use crate::args::{Cli, Relay, SinkKind};
use crate::commands::{connect, database_url, Result, Usage};

/// Writes each event as one JSON object per line on stdout, flushed; an
/// event counts as delivered once written.
struct StdoutSink;

impl Sink for StdoutSink {
    fn deliver(&self, event: &StoredEvent) -> std::result::Result<(), DeliveryError> {
        let line = serde_json::json!({
            "id": event.id,
            "topic": event.topic,
            "key": event.key,
            "payload": event.payload,
            "headers": event.headers,
            "created_at": event.created_at,
            "attempt": event.attempts,
        });
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &line)
            .map_err(|e| DeliveryError::transient(format!("stdout: {e}")))?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}

fn build_sink(args: &Relay) -> Result<Arc<dyn Sink>> {
    let missing = |flag: &str| Usage(format!("--sink {:?} needs {flag}", args.sink));
    Ok(match args.sink {
        SinkKind::Stdout => Arc::new(StdoutSink),
        SinkKind::Webhook => {
            let mut builder =
                outbox::WebhookSink::builder(args.url.clone().ok_or_else(|| missing("--url"))?);
            if let Some(secret) = &args.secret {
                builder = builder.secret(secret);
            }
            for (name, value) in &args.headers {
                builder = builder.header(name, value);
            }
            Arc::new(builder.timeout(args.timeout).build()?)
        }
        SinkKind::Nats => Arc::new(
            outbox::NatsSink::builder(
                args.nats_url.clone().ok_or_else(|| missing("--nats-url"))?,
                args.subject_prefix
                    .clone()
                    .ok_or_else(|| missing("--subject-prefix"))?,
            )
            .build()?,
        ),
        SinkKind::Amqp => Arc::new(
            outbox::AmqpSink::builder(
                args.amqp_url.clone().ok_or_else(|| missing("--amqp-url"))?,
                args.exchange.clone().ok_or_else(|| missing("--exchange"))?,
            )
            .build()?,
        ),
        SinkKind::Redis => {
            let mut builder = outbox::RedisSink::builder(
                args.redis_url
                    .clone()
                    .ok_or_else(|| missing("--redis-url"))?,
            );
            if let Some(stream) = &args.stream {
                builder = builder.stream(stream);
            }
            Arc::new(builder.build()?)
        }
    })
}

/// The lease and the retry schedule, checked here so that an impossible
/// value is a usage error naming the flag (the builder would name its own
/// field) and is reported before the database is touched. Unset flags keep
/// the library's defaults, so the two never drift apart.
fn timing(args: &Relay) -> Result<(Duration, outbox::Backoff)> {
    let lease = args
        .lease
        .unwrap_or(outbox::RelayBuilder::DEFAULT_LEASE_DURATION);
    if lease < outbox::RelayBuilder::MIN_LEASE_DURATION {
        return Err(Usage(format!(
            "--lease {} is shorter than the minimum {}",
            humantime::format_duration(lease),
            humantime::format_duration(outbox::RelayBuilder::MIN_LEASE_DURATION)
        ))
        .into());
    }
    let initial = args
        .backoff_initial
        .unwrap_or(outbox::Backoff::DEFAULT_BASE);
    if initial.is_zero() {
        return Err(Usage("--backoff-initial must be greater than zero".into()).into());
    }
    let max = args.backoff_max.unwrap_or(outbox::Backoff::DEFAULT_CAP);
    if max < initial {
        return Err(Usage(format!(
            "--backoff-max {} is shorter than --backoff-initial {}",
            humantime::format_duration(max),
            humantime::format_duration(initial)
        ))
        .into());
    }
    let backoff = outbox::Backoff::new(
        initial,
        max,
        outbox::Backoff::DEFAULT_FACTOR,
        outbox::Backoff::DEFAULT_JITTER,
    );
    Ok((lease, backoff))
}

/// Feeds the `metrics` facade (a no-op unless an exporter is installed).
struct Metrics;

impl outbox::Observer for Metrics {
    fn on_delivered(&self, event: &StoredEvent) {
        metrics::counter!("outbox_delivered_total", "topic" => event.topic.clone()).increment(1);
        let latency = (chrono::Utc::now() - event.created_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("outbox_delivery_latency_seconds", "topic" => event.topic.clone())
            .record(latency.as_secs_f64());
    }
    fn on_retry(&self, event: &StoredEvent, _: &DeliveryError, _: Duration) {
        metrics::counter!("outbox_retried_total", "topic" => event.topic.clone()).increment(1);
    }
    fn on_dead_lettered(&self, event: &StoredEvent, _: &str) {
        metrics::counter!("outbox_dead_lettered_total", "topic" => event.topic.clone())
            .increment(1);
    }
    fn on_error(&self, _: &outbox::Error) {
        metrics::counter!("outbox_relay_errors_total").increment(1);
    }
}

pub fn run(cli: &Cli, args: &Relay) -> Result {
    let url = database_url(cli)?.to_owned();
    let patterns = args
        .topics
        .iter()
        .map(|p| TopicPattern::parse(p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let sink = build_sink(args)?;
    let (lease, backoff) = timing(args)?;
    // Fail fast, with one line, on a database that is unreachable or not
    // migrated, instead of starting workers that would retry forever.
    let mut conn = connect(cli)?;
    let initial = outbox::status(&mut conn)?;
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("serving metrics on {addr}: {e}"))?;
    }
    let pool = Pool::builder()
        .max_size(args.workers as u32 + 2)
        .min_idle(Some(1))
        .build_unchecked(ConnectionManager::<PgConnection>::new(url.clone()));
    let mut builder = outbox::Relay::builder(pool)
        .listen(url)
        .workers(args.workers)
        .batch_size(args.batch_size)
        .poll_interval(args.poll_interval)
        .max_attempts(args.max_attempts)
        .lease_duration(lease)
        .backoff(backoff)
        .observer(Metrics);
    for pattern in &args.topics {
        builder = builder.route(pattern, sink.clone());
    }
    let relay = builder.start()?;

    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })
    .map_err(|e| format!("installing the signal handler: {e}"))?;

    // Every series exists from the first scrape, so alerts on increase()
    // see the first dead letter too.
    metrics::counter!("outbox_relay_errors_total").increment(0);
    for topic in &initial.topics {
        for name in [
            "outbox_delivered_total",
            "outbox_retried_total",
            "outbox_dead_lettered_total",
        ] {
            metrics::counter!(name, "topic" => topic.topic.clone()).increment(0);
        }
    }
    record_gauges(&initial);
    let started = Instant::now();
    let mut last = initial;
    loop {
        if crossbeam_channel::select! {
            recv(stop) -> _ => true,
            default(args.poll_interval) => false,
        } {
            tracing::info!("signal received; shutting down");
            break;
        }
        let status = match outbox::status(&mut conn) {
            Ok(status) => status,
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "reading the queue status failed");
                if let Ok(fresh) = connect(cli) {
                    conn = fresh;
                }
                continue;
            }
        };
        record_gauges(&status);
        if args.drain {
            let routed = status
                .topics
                .iter()
                .filter(|t| patterns.iter().any(|p| p.matches(&t.topic)));
            let left: i64 = routed.map(|t| t.counts.due_now + t.counts.in_flight).sum();
            if left == 0 && started.elapsed() > args.poll_interval {
                last = status;
                break;
            }
        }
        last = status;
    }
    let stats = relay.stats();
    relay.shutdown(Duration::from_secs(30))?;
    if args.drain {
        let waiting: i64 = last
            .topics
            .iter()
            .filter(|t| patterns.iter().any(|p| p.matches(&t.topic)))
            .map(|t| t.counts.pending)
            .sum();
        let _ = writeln!(
            std::io::stderr(),
            "drained: delivered {}, retried {}, dead-lettered {}; {waiting} still pending (not due yet)",
            stats.delivered,
            stats.retried,
            stats.dead_lettered
        );
    }
    Ok(())
}

fn record_gauges(status: &outbox::Status) {
    metrics::gauge!("outbox_pending").set(status.total.pending as f64);
    metrics::gauge!("outbox_oldest_pending_age_seconds")
        .set(status.total.oldest_pending_age_seconds.unwrap_or(0.0));
    metrics::gauge!("outbox_dead_letters").set(status.total.dead_letters as f64);
}
