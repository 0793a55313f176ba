//! Relays events to an HTTP endpoint as signed Standard Webhooks, and shows
//! what the receiver got (a small server started by the example).
//!
//! `cargo run --example webhook --features webhook`

#[path = "common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = common::pg::test_db();
    // The receiving end: answers 204 and prints each request.
    let server = tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?;
    let url = format!(
        "http://{}/hooks/orders",
        server.server_addr().to_ip().ok_or("no address")?
    );
    let receiver = std::thread::spawn(move || {
        for mut request in server.incoming_requests().take(3) {
            let header = |name: &str| {
                request
                    .headers()
                    .iter()
                    .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                    .map(|h| h.value.to_string())
                    .unwrap_or_default()
            };
            let (id, signature, trace) = (
                header("webhook-id"),
                header("webhook-signature"),
                header("traceparent"),
            );
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(request.as_reader(), &mut body);
            println!(
                "  POST {} webhook-id={id} signature={signature} traceparent={trace:?}\n    {body}",
                request.url()
            );
            let _ = request.respond(tiny_http::Response::empty(204));
        }
    });

    let sink = outbox::WebhookSink::builder(&url)
        .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .header("authorization", "Bearer example-token")
        .build()?;
    common::publish_and_relay(&db, sink)?;
    receiver.join().map_err(|_| "receiver panicked")?;
    Ok(())
}
