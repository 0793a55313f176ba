//! An application's start-up: its own diesel migrations beside the outbox's,
//! then one relay that emails through a typed handler and sends billing
//! events to a signed webhook.
//!
//! The README and docs/sinks.md show the code between the `ANCHOR` comments
//! verbatim, so what they show compiles. Runs against `DATABASE_URL` when it
//! is set, otherwise against a throwaway PostgreSQL cluster; the billing
//! service is a small server the example starts.
//!
//! `cargo run --example app --features webhook`

#[path = "../tests/support/pg.rs"]
mod pg;

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct OrderApproved {
    order_id: i64,
    email: String,
}

impl outbox::Event for OrderApproved {
    const TOPIC: &'static str = "order.approved";
}

#[derive(Serialize, Deserialize)]
struct InvoiceDue {
    order_id: i64,
    total_cents: i64,
}

impl outbox::Event for InvoiceDue {
    const TOPIC: &'static str = "billing.invoice_due";
}

/// Stands in for an email client: "sends" by reporting to `main`.
struct Mailer(crossbeam_channel::Sender<String>);

impl Mailer {
    fn send(
        &self,
        to: &str,
        event: outbox::EventId,
    ) -> Result<(), crossbeam_channel::SendError<String>> {
        self.0.send(format!("email to {to} (event {event})"))
    }
}

// ANCHOR: migrations
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

// Your own migrations: `embed_migrations!("migrations")` in your crate
// (this example keeps its own under examples/app/).
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("examples/app/migrations");

/// At start-up, in every process: both are idempotent and keep separate
/// bookkeeping. The outbox goes first, so your migrations may refer to it.
fn migrate(conn: &mut PgConnection) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    outbox::migrate(conn)?;
    // diesel's harness fails with a `Box<dyn Error + Send + Sync>`, which `?`
    // passes on as is when the function returns that type (`main` too). Into
    // a `Box<dyn Error>` it does not convert by `?` ("`dyn StdError + Send +
    // Sync: Sized` is not satisfied"): write `.map_err(|e| e as Box<dyn
    // std::error::Error>)?` there, or keep the box in your own error enum.
    conn.run_pending_migrations(MIGRATIONS)?;
    Ok(())
}
// ANCHOR_END: migrations

// Without the `webhook` feature there is no `WebhookSink`: `main` below says
// how to run the example instead.
// ANCHOR: relay
/// Emails go through a typed handler; billing events go to the billing
/// service as signed webhooks.
fn start_relay(
    database_url: &str,
    billing_url: &str,
    billing_secret: &str,
    mailer: Mailer,
) -> Result<outbox::Relay, Box<dyn std::error::Error + Send + Sync>> {
    let manager = diesel::r2d2::ConnectionManager::<PgConnection>::new(database_url);
    let pool = diesel::r2d2::Pool::builder().build(manager)?;
    let billing = outbox::WebhookSink::builder(billing_url)
        .secret(billing_secret) // whsec_…: receivers verify the signature
        .header("authorization", "Bearer token-from-the-billing-team")
        .timeout(Duration::from_secs(10)) // keep under half the lease (30 s)
        .build()?; // a malformed URL, secret or header fails here
    let relay = outbox::Relay::builder(pool)
        .listen(database_url) // wake on NOTIFY: ~1 ms from commit to sink
        .handle(move |e: OrderApproved, meta| {
            mailer.send(&e.email, meta.id)?; // any error: retried with backoff
            Ok(())
        })
        .route("billing.*", billing) // any `Sink` for a topic pattern
        .start()?;
    Ok(relay)
}
// ANCHOR_END: relay

/// The billing service: answers 204 to one webhook and reports what it got.
fn billing_service(
    got: crossbeam_channel::Sender<String>,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let server = tiny_http::Server::http("127.0.0.1:0")?;
    let address = server.server_addr().to_ip().ok_or("no address")?;
    std::thread::spawn(move || {
        if let Ok(mut request) = server.recv() {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(request.as_reader(), &mut body);
            let signed = request
                .headers()
                .iter()
                .any(|h| h.field.equiv("webhook-signature"));
            let _ = request.respond(tiny_http::Response::empty(204));
            let _ = got.send(format!("webhook (signed: {signed}): {body}"));
        }
    });
    Ok(format!("http://{address}/hooks/outbox"))
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // A database with neither the outbox's schema nor the application's.
    let db = pg::empty_db();
    let mut conn = db.conn();
    migrate(&mut conn)?;
    println!("migrated: the outbox's schema and the application's `orders`");

    let (report, reports) = crossbeam_channel::unbounded();
    let billing_url = billing_service(report.clone())?;
    let relay = start_relay(
        db.url(),
        &billing_url,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        Mailer(report),
    )?;

    outbox::transaction(&mut conn, |tx| {
        diesel::sql_query("INSERT INTO orders (id, email, total_cents) VALUES ($1, $2, $3)")
            .bind::<BigInt, _>(7)
            .bind::<Text, _>("ada@example.com")
            .bind::<BigInt, _>(4_200)
            .execute(tx.conn())?;
        tx.publish(&OrderApproved {
            order_id: 7,
            email: "ada@example.com".into(),
        })?;
        tx.publish(&InvoiceDue {
            order_id: 7,
            total_cents: 4_200,
        })?;
        Ok::<_, outbox::Error>(())
    })?;
    println!("order 7 committed with its two events");

    let mut got: Vec<String> = (0..2)
        .map(|_| reports.recv_timeout(Duration::from_secs(30)))
        .collect::<Result<_, _>>()?;
    got.sort();
    for line in &got {
        println!("  {line}");
    }
    relay.shutdown(Duration::from_secs(10))?;
    Ok(())
}
