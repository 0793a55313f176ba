//! Relays events into Redis Streams (one stream per topic) and reads them
//! back.
//!
//! `cargo run --example redis --features redis` (Redis on 127.0.0.1:6379)

#[path = "common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let db = common::pg::test_db();
    let prefix = format!("{}:", db.name());
    let sink = outbox::RedisSink::builder(&url)
        .stream_prefix(&prefix)
        .build()?;
    common::publish_and_relay(&db, sink)?;

    let mut redis = redis::Client::open(url.as_str())?.get_connection()?;
    for topic in ["order.approved", "order.shipped", "audit.login"] {
        let stream = format!("{prefix}{topic}");
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query(&mut redis)?;
        for entry in entries.ids {
            let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
            println!(
                "  {stream} {}: id={} key={:?} payload={}",
                entry.id,
                field("id"),
                field("key"),
                field("payload")
            );
        }
        redis::cmd("DEL").arg(&stream).query::<()>(&mut redis)?;
    }
    Ok(())
}
