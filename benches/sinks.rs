//! Relay throughput into each sink's target, beside the target's own
//! client sending the same messages (`support/plain.rs`) in the same run:
//! one at a time, waiting for each acknowledgement (`plain_client`), and for
//! the brokers also pipelined a batch at a time (`plain_pipelined`).
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench sinks --all-features`
//! (Redis, RabbitMQ, NATS JetStream and Mosquitto on their default local ports;
//! Kafka only with `KAFKA_BROKERS`, e.g. a local tansu: docs/sinks.md)

#[path = "../tests/support/kafka_admin.rs"]
mod kafka_admin;
#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "support/plain.rs"]
mod plain;

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use crossbeam_channel::{bounded, Sender};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};

const EVENTS: usize = 2_000;

struct DrainWatch {
    delivered: AtomicUsize,
    done: Sender<()>,
}

impl outbox::Observer for DrainWatch {
    fn on_delivered(&self, _: &outbox::StoredEvent) {
        if self.delivered.fetch_add(1, Ordering::Relaxed) + 1 == EVENTS {
            let _ = self.done.try_send(());
        }
    }
}

fn payload(n: usize) -> serde_json::Value {
    serde_json::json!({ "order_id": n, "email": format!("customer{n}@example.com") })
}

/// A baseline: its benchmark id and what it does with EVENTS messages.
type Baseline<'a> = (&'static str, Box<dyn FnMut(&[serde_json::Value]) + 'a>);

/// Benchmarks each baseline (a plain client sending EVENTS messages) and
/// the relay draining EVENTS events into `sink` (batch 100) with 1 and 4
/// workers.
fn compare(
    c: &mut Criterion,
    name: &str,
    sink: Arc<dyn outbox::Sink>,
    baselines: Vec<Baseline<'_>>,
) {
    let db = pg::test_db();
    let pool = Pool::builder()
        .max_size(6)
        .build(ConnectionManager::<PgConnection>::new(db.url()))
        .unwrap();
    let mut conn = db.conn();
    let mut group = c.benchmark_group(format!("sink/{name}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));
    let messages: Vec<serde_json::Value> = (0..EVENTS).map(payload).collect();
    for (id, mut plain) in baselines {
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    plain(&messages);
                }
                start.elapsed()
            })
        });
    }
    for workers in [1usize, 4] {
        group.bench_function(BenchmarkId::new("relay", workers), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    diesel::sql_query(
                        "INSERT INTO outbox.events (topic, payload)
                         SELECT 'order.approved', jsonb_build_object('order_id', g, 'email', 'customer' || g || '@example.com')
                           FROM generate_series(1, $1) g",
                    )
                    .bind::<diesel::sql_types::Integer, _>(EVENTS as i32)
                    .execute(&mut conn)
                    .unwrap();
                    let (done, drained) = bounded(1);
                    let watch = Arc::new(DrainWatch { delivered: AtomicUsize::new(0), done });
                    let start = Instant::now();
                    let relay = outbox::Relay::builder(pool.clone())
                        .workers(workers)
                        .batch_size(plain::PIPELINE as u32)
                        .route("*", sink.clone())
                        .observer(watch.clone())
                        .start()
                        .unwrap();
                    drained.recv_timeout(Duration::from_secs(300)).unwrap();
                    total += start.elapsed();
                    relay.shutdown(Duration::from_secs(30)).unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn webhook(c: &mut Criterion) {
    use base64::Engine;
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    for _ in 0..4 {
        let server = server.clone();
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                let _ = request.respond(tiny_http::Response::empty(204));
            }
        });
    }
    let sink = outbox::WebhookSink::builder(&url)
        .secret(WEBHOOK_SECRET)
        .build()
        .unwrap();
    let plain = plain::Webhook {
        agent: ureq::Agent::new_with_defaults(),
        url: url.clone(),
        key: base64::engine::general_purpose::STANDARD
            .decode(WEBHOOK_SECRET.trim_start_matches("whsec_"))
            .unwrap(),
    };
    compare(
        c,
        "webhook",
        Arc::new(sink),
        vec![("plain_client", Box::new(|m: &[_]| plain.sequential(m)))],
    );
    server.unblock();
}

fn redis(c: &mut Criterion) {
    let url = "redis://127.0.0.1:6379";
    let sink = outbox::RedisSink::builder(url)
        .stream("outbox-bench:relay")
        .build()
        .unwrap();
    let plain = RefCell::new(plain::Redis {
        conn: redis::Client::open(url).unwrap().get_connection().unwrap(),
        stream: "outbox-bench:plain",
    });
    compare(
        c,
        "redis",
        Arc::new(sink),
        vec![
            (
                "plain_client",
                Box::new(|m: &[_]| plain.borrow_mut().sequential(m)),
            ),
            (
                "plain_pipelined",
                Box::new(|m: &[_]| plain.borrow_mut().pipelined(m)),
            ),
        ],
    );
    redis::cmd("DEL")
        .arg("outbox-bench:plain")
        .arg("outbox-bench:relay")
        .query::<()>(&mut plain.borrow_mut().conn)
        .unwrap();
}

fn nats(c: &mut Criterion) {
    use async_nats::jetstream;
    let url = "nats://127.0.0.1:4222";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let context =
        runtime.block_on(async { jetstream::new(async_nats::connect(url).await.unwrap()) });
    let _ = runtime.block_on(context.delete_stream("OUTBOX_BENCH"));
    runtime
        .block_on(context.create_stream(jetstream::stream::Config {
            name: "OUTBOX_BENCH".into(),
            subjects: vec!["outboxbench.>".into()],
            ..Default::default()
        }))
        .unwrap();
    let sink = outbox::NatsSink::builder(url, "outboxbench")
        .build()
        .unwrap();
    let plain = RefCell::new(plain::Nats {
        runtime,
        context,
        subject: "outboxbench.plain",
        next_id: 0,
    });
    compare(
        c,
        "nats",
        Arc::new(sink),
        vec![
            (
                "plain_client",
                Box::new(|m: &[_]| plain.borrow_mut().sequential(m)),
            ),
            (
                "plain_pipelined",
                Box::new(|m: &[_]| plain.borrow_mut().pipelined(m)),
            ),
        ],
    );
    let plain = plain.into_inner();
    let _ = plain
        .runtime
        .block_on(plain.context.delete_stream("OUTBOX_BENCH"));
}

fn amqp(c: &mut Criterion) {
    use lapin::options::{
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_connection, channel) = runtime.block_on(async {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        channel
            .exchange_declare(
                "outbox-bench".into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        // A queue that keeps only the latest messages, so runs do not pile up.
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            lapin::types::AMQPValue::LongInt(1000),
        );
        channel
            .queue_declare("outbox-bench".into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap();
        channel
            .queue_bind(
                "outbox-bench".into(),
                "outbox-bench".into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (connection, channel)
    });
    let sink = outbox::AmqpSink::builder(url, "outbox-bench")
        .build()
        .unwrap();
    let plain = plain::Amqp {
        runtime,
        channel,
        exchange: "outbox-bench",
    };
    compare(
        c,
        "amqp",
        Arc::new(sink),
        vec![
            ("plain_client", Box::new(|m: &[_]| plain.sequential(m))),
            ("plain_pipelined", Box::new(|m: &[_]| plain.pipelined(m))),
        ],
    );
    let _ = plain.runtime.block_on(
        plain
            .channel
            .queue_delete("outbox-bench".into(), QueueDeleteOptions::default()),
    );
}

/// No subscriber: Mosquitto answers PUBACK 0x10, which both count as
/// delivered (the sink's default).
fn mqtt(c: &mut Criterion) {
    let sink = outbox::MqttSink::builder("mqtt://127.0.0.1:1883", "outboxbench")
        .build()
        .unwrap();
    let plain = RefCell::new(plain::Mqtt::connect(1883, "outboxbench/plain"));
    compare(
        c,
        "mqtt",
        Arc::new(sink),
        vec![(
            "plain_pipelined",
            Box::new(|m: &[_]| plain.borrow_mut().pipelined(m)),
        )],
    );
}

/// A sink that takes a whole batch and does nothing: the relay's own
/// ceiling at batch 100 (claim, settle, bookkeeping), which bounds every
/// sink above (issue 14, item 3).
struct Null;

impl outbox::Sink for Null {
    fn deliver(&self, _: &outbox::StoredEvent) -> Result<(), outbox::DeliveryError> {
        Ok(())
    }

    fn max_batch(&self) -> usize {
        usize::MAX
    }
}

fn null(c: &mut Criterion) {
    compare(c, "null", Arc::new(Null), Vec::new());
}

/// Only against a real Kafka-protocol broker (`KAFKA_BROKERS`): librdkafka's
/// in-process mock cluster, which the tests use, is no throughput figure.
fn kafka(c: &mut Criterion) {
    let Ok(brokers) = std::env::var("KAFKA_BROKERS") else {
        eprintln!("sink/kafka skipped: set KAFKA_BROKERS to a Kafka-protocol broker");
        return;
    };
    kafka_admin::create_topic(&brokers, "outbox-bench", 1);
    kafka_admin::create_topic(&brokers, "outbox-bench-plain", 1);
    let sink = outbox::KafkaSink::builder(&brokers)
        .topic_template("outbox-bench")
        .build()
        .unwrap();
    let plain = RefCell::new(plain::Kafka::connect(&brokers, "outbox-bench-plain"));
    compare(
        c,
        "kafka",
        Arc::new(sink),
        vec![(
            "plain_pipelined",
            Box::new(|m: &[_]| plain.borrow_mut().pipelined(m)),
        )],
    );
}

criterion_group!(benches, null, webhook, redis, nats, amqp, mqtt, kafka);
criterion_main!(benches);
