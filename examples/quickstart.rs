//! The outbox in one story: an approved order and its event commit
//! together, a failed order leaves neither behind, and a relay delivers the
//! event to two subscribers: the email service (which fails once, retries,
//! and dead-letters a poison event) and analytics (which gets every event
//! at once, whatever the email service does).
//!
//! Runs against `DATABASE_URL` when it is set, otherwise against a throwaway
//! PostgreSQL cluster started from the local installation.

#[path = "../tests/support/pg.rs"]
mod pg;

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::{Deserialize, Serialize};

/// The event the email service must hear about.
#[derive(Debug, Serialize, Deserialize)]
struct OrderApproved {
    order_id: i64,
    email: String,
}

impl outbox::Event for OrderApproved {
    const TOPIC: &'static str = "order.approved";

    fn key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id))
    }
}

/// The application's own error type: `outbox::transaction` only asks that it
/// converts from `diesel::result::Error`.
#[derive(Debug)]
enum ApproveError {
    Database(outbox::Error),
    NoEmailAddress,
}

impl From<diesel::result::Error> for ApproveError {
    fn from(error: diesel::result::Error) -> Self {
        ApproveError::Database(error.into())
    }
}

impl std::fmt::Display for ApproveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApproveError::Database(e) => write!(f, "{e}"),
            ApproveError::NoEmailAddress => f.write_str("the order has no email address"),
        }
    }
}

impl std::error::Error for ApproveError {}

/// Approves an order: the order row and the event, in one transaction.
fn approve(
    conn: &mut PgConnection,
    order_id: i64,
    email: &str,
) -> Result<outbox::EventId, ApproveError> {
    outbox::transaction(conn, |tx| {
        diesel::sql_query("INSERT INTO orders (id, email, status) VALUES ($1, $2, 'approved')")
            .bind::<BigInt, _>(order_id)
            .bind::<Text, _>(email)
            .execute(tx.conn())?;
        let id = tx.publish(&OrderApproved {
            order_id,
            email: email.to_owned(),
        })?;
        if email.is_empty() {
            // Business rule checked after the writes: the whole transaction,
            // event included, rolls back.
            return Err(ApproveError::NoEmailAddress);
        }
        Ok(id)
    })
}

/// The "email provider": down for the first attempt of every email, and it
/// rejects addresses at example.invalid for good.
fn send_email(
    event: OrderApproved,
    meta: &outbox::StoredEvent,
) -> Result<(), outbox::DeliveryError> {
    if event.email.ends_with("@example.invalid") {
        return Err(outbox::DeliveryError::permanent(format!(
            "550 no such mailbox: {}",
            event.email
        )));
    }
    if meta.attempts == 1 {
        return Err(outbox::DeliveryError::transient("503 provider unavailable"));
    }
    println!(
        "  email sent to {} for order {} (event {}, attempt {})",
        event.email, event.order_id, meta.id, meta.attempts
    );
    Ok(())
}

/// The analytics subscriber: records every order event, never fails.
fn record_analytics(event: &outbox::StoredEvent) -> Result<(), outbox::DeliveryError> {
    println!(
        "  analytics recorded {} (event {}, attempt {})",
        event.topic, event.id, event.attempts
    );
    Ok(())
}

/// Prints what the relay does, and tells `main` when an event is settled.
struct Narrator(crossbeam_channel::Sender<()>);

impl outbox::Observer for Narrator {
    fn on_retry(
        &self,
        event: &outbox::StoredEvent,
        error: &outbox::DeliveryError,
        delay: Duration,
    ) {
        println!(
            "  [{}] event {} attempt {} failed ({error}); retrying in {} ms",
            event.subscription,
            event.id,
            event.attempts,
            delay.as_millis()
        );
    }
    fn on_delivered(&self, _: &outbox::StoredEvent) {
        let _ = self.0.send(());
    }
    fn on_dead_lettered(&self, event: &outbox::StoredEvent, error: &str) {
        println!(
            "  [{}] event {} moved to the dead letters: {error}",
            event.subscription, event.id
        );
        let _ = self.0.send(());
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = pg::test_db();
    let mut conn = db.conn();
    outbox::migrate(&mut conn)?;
    diesel::sql_query(
        "CREATE TABLE orders (id bigint PRIMARY KEY, email text NOT NULL, status text NOT NULL)",
    )
    .execute(&mut conn)?;
    // Two subscribers of the order events, registered before anything is
    // published (a relay serving them would register them when it starts;
    // events committed before that would not be theirs). This app uses
    // named subscriptions only, so it removes the `default` one that the
    // migration creates for `.route`/`.handle` relays: otherwise it would
    // keep every event for a relay that never comes.
    outbox::register_subscription(&mut conn, "email", &["order.approved"])?;
    outbox::register_subscription(&mut conn, "analytics", &["order.*"])?;
    outbox::remove_subscription(&mut conn, outbox::DEFAULT_SUBSCRIPTION)?;

    let id = approve(&mut conn, 7, "ada@example.com")?;
    println!("order 7 approved; event {id} queued for the email service and analytics");

    match approve(&mut conn, 8, "") {
        Ok(_) => unreachable!("order 8 has no email address"),
        Err(e) => println!("order 8 failed ({e}); its transaction rolled back"),
    }
    let poison = approve(&mut conn, 9, "nobody@example.invalid")?;
    println!("order 9 approved; event {poison} queued (its address will bounce)");
    println!(
        "no event {}: order 8's event took that id before its transaction rolled back \
         (ids come from a sequence, which never rolls back: expect gaps)",
        id.get() + 1
    );
    assert_eq!(poison.get(), id.get() + 2, "one id lost to the rollback");

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let orders = diesel::sql_query("SELECT count(*) AS n FROM orders")
        .get_result::<Count>(&mut conn)?
        .n;
    let queued = outbox::queued_events(&mut conn, 100)?;
    let mut events: Vec<outbox::EventId> = queued.iter().map(|e| e.id).collect();
    events.dedup();
    println!(
        "orders in the table: {orders}; events in the outbox: {}, owed to {} subscriber(s) each",
        events.len(),
        queued.len() / events.len().max(1)
    );
    for event in &queued {
        println!(
            "  event {} for {}: topic={} key={:?} payload={}",
            event.id,
            event.subscription,
            event.topic,
            event.key.as_deref().unwrap_or("-"),
            event.payload
        );
    }
    assert_eq!(
        (orders, events.len(), queued.len()),
        (2, 2, 4),
        "exactly the committed orders, their events, and one delivery per subscriber"
    );

    println!("starting the relay");
    let pool = diesel::r2d2::Pool::builder()
        // 4 workers for each of the 2 subscriptions, and the
        // housekeeper.
        .max_size(9)
        .build(diesel::r2d2::ConnectionManager::<PgConnection>::new(
            db.url(),
        ))?;
    let (settled, settled_rx) = crossbeam_channel::unbounded();
    let relay = outbox::Relay::builder(pool)
        .listen(db.url())
        .subscribe_handler("email", send_email)
        .subscribe("analytics", &["order.*"], record_analytics)
        .backoff(outbox::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
            2.0,
            0.2,
        ))
        .observer(Narrator(settled))
        .start()?;
    for _ in 0..queued.len() {
        settled_rx.recv_timeout(Duration::from_secs(30))?;
    }
    relay.shutdown(Duration::from_secs(10))?;

    println!(
        "after the relay: {} events in the outbox",
        outbox::queued_events(&mut conn, 100)?.len()
    );
    #[derive(QueryableByName)]
    struct DeadLetter {
        #[diesel(sql_type = Text)]
        subscription: String,
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempts: i32,
        #[diesel(sql_type = Text)]
        last_error: String,
    }
    for dead in diesel::sql_query(
        "SELECT subscription, id, attempts, last_error FROM outbox.dead_letters ORDER BY id",
    )
    .load::<DeadLetter>(&mut conn)?
    {
        println!(
            "  dead letter of {}: event {} after {} attempt(s): {}",
            dead.subscription, dead.id, dead.attempts, dead.last_error
        );
    }
    Ok(())
}
