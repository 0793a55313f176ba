//! Relays events into a RabbitMQ topic exchange with publisher confirms and
//! reads them back from a bound queue.
//!
//! `cargo run --example amqp --features amqp` (RabbitMQ guest/guest on 127.0.0.1:5672)

#[path = "common/mod.rs"]
mod common;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let db = common::pg::test_db();
    let name = db.name().to_owned();

    // An exchange and a queue bound to every routing key (normally set up by operators).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (_connection, channel) = runtime.block_on(async {
        let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((connection, channel))
    })?;

    let sink = outbox::AmqpSink::builder(&url, &name).build()?;
    common::publish_and_relay(&db, sink)?;

    runtime.block_on(async {
        while let Some(message) = channel
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let d = message.delivery;
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default();
            println!(
                "  routing key {} message_id={id} {}",
                d.routing_key,
                String::from_utf8_lossy(&d.data)
            );
        }
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await?;
        channel
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
        Ok::<_, lapin::Error>(())
    })?;
    Ok(())
}
