//! Relays events into NATS JetStream (subject `<prefix>.<topic>`) and reads
//! the stream back: one message per event, deduplicated by `Nats-Msg-Id`.
//!
//! `cargo run --example nats --features nats` (NATS with JetStream on 127.0.0.1:4222)

#[path = "common/mod.rs"]
mod common;

use async_nats::jetstream;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let db = common::pg::test_db();
    let prefix = db.name().to_owned();
    let stream_name = prefix.to_uppercase();

    // The stream that captures our subjects (normally created by operators).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let context = runtime.block_on(async {
        Ok::<_, async_nats::ConnectError>(jetstream::new(async_nats::connect(&url).await?))
    })?;
    runtime.block_on(context.create_stream(jetstream::stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    }))?;

    let sink = outbox::NatsSink::builder(&url, &prefix).build()?;
    common::publish_and_relay(&db, sink)?;

    runtime.block_on(async {
        let mut stream = context.get_stream(&stream_name).await?;
        let count = stream.info().await?.state.messages;
        for seq in 1..=count {
            let m = stream.get_raw_message(seq).await?;
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            println!(
                "  #{seq} {} Nats-Msg-Id={id} {}",
                m.subject,
                String::from_utf8_lossy(&m.payload)
            );
        }
        context.delete_stream(&stream_name).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
