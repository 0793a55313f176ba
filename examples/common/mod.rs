//! What the sink examples share: a database, three events, a relay into the
//! example's sink, and waiting until all three are delivered.

use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;

#[path = "../../tests/support/pg.rs"]
pub mod pg;

/// Counts deliveries into a channel.
struct Done(crossbeam_channel::Sender<outbox::EventId>);

impl outbox::Observer for Done {
    fn on_delivered(&self, event: &outbox::StoredEvent) {
        let _ = self.0.send(event.id);
    }
    fn on_retry(
        &self,
        event: &outbox::StoredEvent,
        error: &outbox::DeliveryError,
        delay: Duration,
    ) {
        println!(
            "  event {} failed ({error}); retrying in {delay:?}",
            event.id
        );
    }
}

/// Publishes three events (two of one order, one audit event) and relays
/// them into `sink`; returns their ids once all are delivered.
pub fn publish_and_relay(
    db: &pg::TestDb,
    sink: impl outbox::Sink,
) -> Result<Vec<outbox::EventId>, Box<dyn std::error::Error>> {
    let mut conn = db.conn();
    let ids = outbox::transaction(&mut conn, |tx| {
        tx.publish_events([
            outbox::NewEvent::dynamic(
                "order.approved",
                serde_json::json!({ "order_id": 7, "email": "ada@example.com" }),
            )
            .key("order-7")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            outbox::NewEvent::dynamic(
                "order.shipped",
                serde_json::json!({ "order_id": 7, "carrier": "ups" }),
            )
            .key("order-7"),
            outbox::NewEvent::dynamic("audit.login", serde_json::json!({ "user": 42 })),
        ])
    })?;
    println!("published events {ids:?}");
    let pool = Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<PgConnection>::new(db.url()))?;
    let (done, delivered) = crossbeam_channel::unbounded();
    let relay = outbox::Relay::builder(pool)
        .listen(db.url())
        .workers(2)
        .route("*", sink)
        .observer(Done(done))
        .start()?;
    for _ in &ids {
        delivered.recv_timeout(Duration::from_secs(30))?;
    }
    relay.shutdown(Duration::from_secs(10))?;
    println!("relayed all {} events", ids.len());
    Ok(ids)
}
