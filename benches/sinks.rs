//! Relay throughput into each sink's target, beside a plain client
//! publishing the same messages the same way (one at a time, waiting for
//! each acknowledgement) in the same run.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test cargo bench --bench sinks --all-features`
//! (Redis, RabbitMQ and NATS JetStream on their default local ports)

#[path = "../tests/support/pg.rs"]
mod pg;

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

/// Benchmarks `plain` (a plain client publishing EVENTS messages) and the
/// relay draining EVENTS events into `sink` with 1 and 4 workers.
fn compare(
    c: &mut Criterion,
    name: &str,
    sink: Arc<dyn outbox::Sink>,
    mut plain: impl FnMut(&[serde_json::Value]),
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
    group.bench_function("plain_client", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                plain(&messages);
            }
            start.elapsed()
        })
    });
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

fn webhook(c: &mut Criterion) {
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
        .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .build()
        .unwrap();
    let agent = ureq::Agent::new_with_defaults();
    compare(c, "webhook", Arc::new(sink), |messages| {
        for (n, data) in messages.iter().enumerate() {
            let body = serde_json::json!({ "type": "order.approved", "timestamp": "2026-11-28T00:00:00Z", "data": data });
            agent
                .post(&url)
                .header("webhook-id", n.to_string())
                .header("content-type", "application/json")
                .send(serde_json::to_vec(&body).unwrap().as_slice())
                .unwrap();
        }
    });
    server.unblock();
}

fn redis(c: &mut Criterion) {
    let url = "redis://127.0.0.1:6379";
    let sink = outbox::RedisSink::builder(url)
        .stream("outbox-bench:relay")
        .build()
        .unwrap();
    let mut plain = redis::Client::open(url).unwrap().get_connection().unwrap();
    compare(c, "redis", Arc::new(sink), |messages| {
        for (n, data) in messages.iter().enumerate() {
            redis::cmd("XADD")
                .arg("outbox-bench:plain")
                .arg("*")
                .arg("id")
                .arg(n)
                .arg("topic")
                .arg("order.approved")
                .arg("payload")
                .arg(data.to_string())
                .query::<String>(&mut plain)
                .unwrap();
        }
    });
    redis::cmd("DEL")
        .arg("outbox-bench:plain")
        .arg("outbox-bench:relay")
        .query::<()>(&mut plain)
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
    let mut next_id = 0usize;
    compare(c, "nats", Arc::new(sink), |messages| {
        runtime.block_on(async {
            for data in messages {
                next_id += 1;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("plain-{next_id}").as_str());
                context
                    .publish_with_headers(
                        "outboxbench.plain",
                        headers,
                        data.to_string().into_bytes().into(),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
    });
    let _ = runtime.block_on(context.delete_stream("OUTBOX_BENCH"));
}

fn amqp(c: &mut Criterion) {
    use lapin::options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
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
    compare(c, "amqp", Arc::new(sink), |messages| {
        runtime.block_on(async {
            for (n, data) in messages.iter().enumerate() {
                channel
                    .basic_publish(
                        "outbox-bench".into(),
                        "order.approved".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        data.to_string().as_bytes(),
                        lapin::BasicProperties::default()
                            .with_message_id(n.to_string().into())
                            .with_delivery_mode(2),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
    });
    let _ = runtime
        .block_on(channel.queue_delete("outbox-bench".into(), QueueDeleteOptions::default()));
}

criterion_group!(benches, webhook, redis, nats, amqp);
criterion_main!(benches);
