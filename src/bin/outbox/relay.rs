//! `outbox relay`: a relay process delivering to one sink, with graceful
//! shutdown on SIGINT/SIGTERM, a drain mode, and Prometheus metrics.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;
use outbox::{DeliveryError, Sink, StoredEvent, TopicPattern};

use crate::args::{Cli, Relay, SinkKind};
use crate::commands::{connect, database_url, Result, Usage};
use crate::stdout::stdout;

/// How often `--drain` looks whether anything routed is still due or in
/// flight, whatever `--poll-interval` says (stretched on a large backlog:
/// see [`run`]).
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// Writes each event as one JSON object per line on stdout, flushed; an
/// event counts as delivered once written. A failed write fails the
/// delivery (transient: the event stays queued) and stops the relay: a
/// full disk or a reader that went away will not come back by retrying.
struct StdoutSink {
    broken: Sender<std::io::Error>,
}

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
        let mut text = serde_json::to_vec(&line)
            .map_err(|e| DeliveryError::transient(format!("stdout: {e}")))?;
        text.push(b'\n');
        let mut out = stdout();
        out.write_all(&text)
            .and_then(|()| out.flush())
            .map_err(|e| {
                let error = DeliveryError::transient(&e);
                let _ = self.broken.try_send(e);
                error
            })
    }
}

fn build_sink(args: &Relay, broken: &Sender<std::io::Error>) -> Result<Arc<dyn Sink>> {
    let missing = |flag: &str| Usage(format!("--sink {:?} needs {flag}", args.sink));
    Ok(match args.sink {
        SinkKind::Stdout => Arc::new(StdoutSink {
            broken: broken.clone(),
        }),
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
        SinkKind::Kafka => {
            let mut builder = outbox::KafkaSink::builder(
                args.brokers.clone().ok_or_else(|| missing("--brokers"))?,
            );
            if let Some(template) = &args.kafka_topic {
                builder = builder.topic_template(template);
            }
            if let Some(username) = &args.kafka_username {
                let password = args
                    .kafka_password
                    .clone()
                    .ok_or_else(|| missing("--kafka-password"))?;
                builder = builder.sasl_plain(username, password);
            }
            Arc::new(builder.build()?)
        }
        SinkKind::Mqtt => Arc::new(
            outbox::MqttSink::builder(
                args.url.clone().ok_or_else(|| missing("--url"))?,
                &args.mqtt_topic_prefix,
            )
            .qos(args.qos)
            .build()?,
        ),
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

/// The labels of a delivery's series.
fn labels(event: &StoredEvent) -> [(&'static str, String); 2] {
    [
        ("subscription", event.subscription.clone()),
        ("topic", event.topic.clone()),
    ]
}

impl outbox::Observer for Metrics {
    fn on_delivered(&self, event: &StoredEvent) {
        metrics::counter!("outbox_delivered_total", &labels(event)).increment(1);
        let latency = (chrono::Utc::now() - event.created_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("outbox_delivery_latency_seconds", &labels(event))
            .record(latency.as_secs_f64());
    }
    fn on_retry(&self, event: &StoredEvent, _: &DeliveryError, _: Duration) {
        metrics::counter!("outbox_retried_total", &labels(event)).increment(1);
    }
    fn on_dead_lettered(&self, event: &StoredEvent, _: &str) {
        metrics::counter!("outbox_dead_lettered_total", &labels(event)).increment(1);
    }
    fn on_error(&self, _: &outbox::Error) {
        metrics::counter!("outbox_relay_errors_total").increment(1);
    }
    fn on_stranded_rescued(&self, events: &[outbox::EventId]) {
        metrics::counter!("outbox_stranded_rescued_total").increment(events.len() as u64);
    }
}

pub fn run(cli: &Cli, args: &Relay) -> Result {
    let url = database_url(cli)?.to_owned();
    let patterns = args
        .topics
        .iter()
        .map(|p| TopicPattern::parse(p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // Kept open until the end, whichever the sink: `watch` waits on it.
    let (broken_tx, broken) = crossbeam_channel::bounded(1);
    let sink = build_sink(args, &broken_tx)?;
    let (lease, backoff) = timing(args)?;
    // Fail fast, with one line, on a database that is unreachable or not
    // migrated, instead of starting workers that would retry forever.
    let mut conn = connect(cli)?;
    let subscription = args
        .subscription
        .clone()
        .unwrap_or_else(|| outbox::DEFAULT_SUBSCRIPTION.to_owned());
    // With metrics, the topics known now get their series at zero (this
    // reads what is owed, which grows with the backlog); without, one
    // cheap read shows the schema is there and migrated.
    let initial = if args.metrics_addr.is_some() {
        outbox::status(&mut conn)?
    } else {
        outbox::dead_letters(&mut conn, None, None, None, 1)?;
        outbox::Status::default()
    };
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("serving metrics on {addr}: {e}"))?;
    }
    let mut pool = Pool::builder()
        .max_size(args.workers as u32 + 2)
        .min_idle(Some(1));
    // A separate LISTEN URL means the database URL goes through a
    // transaction-mode pooler: no prepared statements on its connections.
    if args.listen_url.is_some() {
        pool = pool.connection_customizer(Box::new(outbox::NoStatementCache));
    }
    let pool = pool.build_unchecked(ConnectionManager::<PgConnection>::new(url.clone()));
    let mut builder = outbox::Relay::builder(pool)
        .listen(args.listen_url.clone().unwrap_or(url))
        .workers(args.workers)
        .batch_size(args.batch_size)
        .poll_interval(args.poll_interval)
        .max_attempts(args.max_attempts)
        .lease_duration(lease)
        .backoff(backoff)
        .observer(Metrics);
    // One budget for the whole sink: every route gets a clone.
    let limit = args.rate.map(|(n, per)| outbox::RateLimit::new(n, per));
    if args.subscription.is_some() {
        let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
        builder = builder.subscribe(&subscription, &topics, sink);
        if let Some(limit) = &limit {
            builder = builder.rate_limit(limit.clone());
        }
    } else {
        for pattern in &args.topics {
            builder = builder.route(pattern, sink.clone());
            if let Some(limit) = &limit {
                builder = builder.rate_limit(limit.clone());
            }
        }
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
    metrics::counter!("outbox_stranded_rescued_total").increment(0);
    for topic in &initial.topics {
        let labels = [
            ("subscription", subscription.clone()),
            ("topic", topic.topic.clone()),
        ];
        for name in [
            "outbox_delivered_total",
            "outbox_retried_total",
            "outbox_dead_lettered_total",
        ] {
            metrics::counter!(name, &labels).increment(0);
        }
    }
    if args.metrics_addr.is_some() {
        record_gauges(&outbox::subscriptions(&mut conn)?);
    }
    let outcome = watch(cli, args, &subscription, &patterns, conn, &stop, &broken);
    let stats = relay.stats();
    relay.shutdown(Duration::from_secs(30))?;
    // A write that failed while the queue was last read is reported even
    // if the drain had finished by then.
    let left = outcome?;
    if let Ok(error) = broken.try_recv() {
        return Err(error.into());
    }
    if let Some(left) = left {
        let next = match left.next_in {
            Some(seconds) => format!(
                ", the next due in {}",
                humantime::format_duration(Duration::from_secs(seconds.max(0.0).ceil() as u64))
            ),
            None => String::new(),
        };
        let _ = writeln!(
            std::io::stderr(),
            "drained: delivered {}, retried {}, dead-lettered {}; {} still pending (not due yet{next})",
            stats.delivered,
            stats.retried,
            stats.dead_lettered,
            left.pending,
        );
    }
    Ok(())
}

/// What a drain leaves behind: routed events not due yet, and how soon the
/// first of them comes due.
#[derive(Clone, Copy, Debug, Default)]
struct Scheduled {
    pending: i64,
    next_in: Option<f64>,
}

/// Reads the queue while the relay runs: the gauges every poll interval,
/// and with `--drain` every [`DRAIN_CHECK`] until nothing routed is due or
/// in flight. Returns at a signal (`None`), at the drain's end (the routed
/// events left, all scheduled for later) or when stdout broke (the error).
///
/// An event due when the drain starts counts as due until a worker claims
/// it, and as in flight until it is settled, all in one snapshot: the drain
/// cannot end before the relay has had its chance at everything due.
fn watch(
    cli: &Cli,
    args: &Relay,
    subscription: &str,
    patterns: &[TopicPattern],
    mut conn: PgConnection,
    stop: &Receiver<()>,
    broken: &Receiver<std::io::Error>,
) -> Result<Option<Scheduled>> {
    let routed = |status: &outbox::Status| -> (i64, Scheduled) {
        status
            .topics
            .iter()
            .filter(|t| patterns.iter().any(|p| p.matches(&t.topic)))
            .fold((0, Scheduled::default()), |(busy, left), t| {
                let c = &t.counts;
                let next_in = match (left.next_in, c.next_scheduled_in_seconds) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let left = Scheduled {
                    pending: left.pending + c.pending,
                    next_in,
                };
                (busy + c.due_now + c.in_flight, left)
            })
    };
    let mut took = Duration::ZERO;
    loop {
        // The status query reads the whole queue: on a large backlog the
        // drain looks less often, so that it never takes over a fifth of
        // the database's time for itself.
        let wait = if args.drain {
            DRAIN_CHECK.max(took * 4)
        } else {
            args.poll_interval
        };
        crossbeam_channel::select! {
            recv(stop) -> _ => {
                tracing::info!("signal received; shutting down");
                return Ok(None);
            }
            recv(broken) -> error => {
                if let Ok(error) = error {
                    return Err(error.into());
                }
            }
            default(wait) => {}
        }
        let asked = Instant::now();
        if args.metrics_addr.is_some() {
            match outbox::subscriptions(&mut conn) {
                Ok(list) => record_gauges(&list),
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), "reading the subscriptions failed");
                    if let Ok(fresh) = connect(cli) {
                        conn = fresh;
                    }
                    continue;
                }
            }
        }
        if !args.drain {
            took = asked.elapsed();
            continue;
        }
        let status = match outbox::subscription_status(&mut conn, subscription) {
            Ok(status) => status,
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "reading the queue status failed");
                if let Ok(fresh) = connect(cli) {
                    conn = fresh;
                }
                continue;
            }
        };
        took = asked.elapsed();
        if let (0, left) = routed(&status) {
            return Ok(Some(left));
        }
    }
}

/// Every subscription's backlog, lag and dead letters: a subscription that
/// no relay serves shows up here too, as a growing lag.
fn record_gauges(list: &[outbox::SubscriptionStatus]) {
    for sub in list {
        let label = [("subscription", sub.name.clone())];
        metrics::gauge!("outbox_pending", &label).set(sub.pending as f64);
        metrics::gauge!("outbox_oldest_pending_age_seconds", &label)
            .set(sub.oldest_pending_age_seconds.unwrap_or(0.0));
        metrics::gauge!("outbox_dead_letters", &label).set(sub.dead_letters as f64);
    }
}
