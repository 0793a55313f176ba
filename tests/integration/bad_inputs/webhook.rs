//! Bad webhook targets: TLS that fails, responses far too large, event
//! headers and keys that HTTP cannot carry. Redirects, timeouts, refused
//! connections and client errors are in `sink_webhook`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;

use crate::common::pending;
use crate::relay_support::{dead_letters, retries, setup, RelayBed, Signal, PATIENCE};

/// 100 MB: what a broken or hostile endpoint might answer with.
const HUGE: u64 = 100 << 20;

/// A bare HTTP/1.1 server that answers every request with `status` and a
/// `HUGE` body of `x`, written in 64 kB chunks until done or the client
/// hangs up. `written` counts the body bytes the socket accepted.
struct HugeResponder {
    url: String,
    written: Arc<AtomicU64>,
}

impl HugeResponder {
    fn start(status: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let written = Arc::new(AtomicU64::default());
        let count = written.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let count = count.clone();
                std::thread::spawn(move || answer(stream, status, &count));
            }
        });
        HugeResponder { url, written }
    }
}

fn answer(stream: TcpStream, status: &str, written: &AtomicU64) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut out = stream;
    let head = format!("HTTP/1.1 {status}\r\ncontent-length: {HUGE}\r\n\r\n");
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b'x'; 64 << 10];
    while written.load(Ordering::Relaxed) < HUGE {
        match out.write(&chunk) {
            Ok(n) if n > 0 => written.fetch_add(n as u64, Ordering::Relaxed),
            _ => return,
        };
    }
}

fn relay_to(bed: &RelayBed, url: &str) -> outbox::Relay {
    bed.relay()
        .max_attempts(2)
        .route("*", outbox::WebhookSink::builder(url).build().unwrap())
        .start()
        .unwrap()
}

/// Waits until the relay has settled `n` events, delivered or dead.
fn settled(bed: &RelayBed, n: usize) {
    bed.signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Delivered { .. } | Signal::Dead { .. }))
            .count()
            == n
    });
}

#[test]
fn a_huge_success_response_is_not_read() {
    let bed = setup();
    let server = HugeResponder::start("200 OK");
    let relay = relay_to(&bed, &server.url);
    let started = Instant::now();
    let ids = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), ids);
    let took = started.elapsed();
    relay.shutdown(PATIENCE).unwrap();
    // The sink drops the connection after the status line: the server gets
    // no further than what the socket buffers hold.
    let written = server.written.load(Ordering::Relaxed);
    assert!(written < HUGE / 4, "the server wrote {written} bytes");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_huge_error_response_is_cut_to_its_first_512_bytes() {
    let bed = setup();
    let server = HugeResponder::start("400 Bad Request");
    let relay = relay_to(&bed, &server.url);
    let ids = bed.publish(&[("t", None)]);
    settled(&bed, 1);
    relay.shutdown(PATIENCE).unwrap();
    let written = server.written.load(Ordering::Relaxed);
    assert!(written < HUGE / 4, "the server wrote {written} bytes");
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(
        letters,
        [(
            ids[0].get(),
            "t".to_owned(),
            1,
            format!(
                "permanent failure: HTTP 400 from {}: {}",
                server.url,
                "x".repeat(512)
            )
        )]
    );
}

#[test]
fn https_to_a_plain_http_server_is_a_transient_tls_failure() {
    let bed = setup();
    let server = HugeResponder::start("200 OK");
    let url = server.url.replace("http://", "https://");
    let relay = relay_to(&bed, &url);
    let ids = bed.publish(&[("t", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    // Retried once (max_attempts 2), then dead-lettered as exhausted.
    let retried = retries(&seen);
    assert_eq!(retried.len(), 1, "{seen:?}");
    let tls_error = &retried[0].2;
    assert!(tls_error.starts_with("request failed: "), "{tls_error}");
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(
        letters,
        [(
            ids[0].get(),
            "t".to_owned(),
            2,
            format!("gave up after 2 attempts: {tls_error}")
        )]
    );
}

/// A TLS server on 127.0.0.1 with the self-signed certificate of
/// `tests/fixtures/tls`. Returns its URL and how many requests got through
/// a handshake.
fn self_signed_server() -> (String, Arc<AtomicU64>) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/hook", listener.local_addr().unwrap());
    let through = Arc::new(AtomicU64::default());
    let count = through.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let connection = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(connection, stream);
            // Reading drives the handshake; the client aborts it.
            if tls.read(&mut [0; 1]).is_ok_and(|n| n > 0) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    (url, through)
}

#[test]
fn a_self_signed_certificate_is_a_transient_tls_failure() {
    let bed = setup();
    let (url, through) = self_signed_server();
    let relay = relay_to(&bed, &url);
    let ids = bed.publish(&[("t", None)]);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Dead { .. })));
    relay.shutdown(PATIENCE).unwrap();
    let retried = retries(&seen);
    assert_eq!(retried.len(), 1, "{seen:?}");
    assert_eq!(
        retried[0].2,
        "request failed: io: invalid peer certificate: UnknownIssuer"
    );
    let letters = dead_letters(&mut bed.conn());
    assert_eq!(
        letters,
        [(
            ids[0].get(),
            "t".to_owned(),
            2,
            format!("gave up after 2 attempts: {}", retried[0].2)
        )]
    );
    assert_eq!(through.load(Ordering::Relaxed), 0);
}

#[test]
fn headers_and_keys_http_cannot_carry_are_permanent_failures() {
    let bed = setup();
    let server = HugeResponder::start("204 No Content");
    let relay = relay_to(&bed, &server.url);
    // Plain SQL accepts any JSON object of strings as headers and any key.
    diesel::sql_query(
        "INSERT INTO outbox.events (topic, key, headers, payload) VALUES
         ('t', NULL, '{\"bad header\": \"x\"}', '{}'),
         ('t', NULL, '{\"x-ok\": \"line\\nbreak\"}', '{}'),
         ('t', E'key\\nwith a line break', '{}', '{}')",
    )
    .execute(&mut bed.conn())
    .unwrap();
    settled(&bed, 3);
    relay.shutdown(PATIENCE).unwrap();
    let reasons: Vec<String> = dead_letters(&mut bed.conn())
        .into_iter()
        .map(|(_, _, _, e)| e)
        .collect();
    assert_eq!(
        reasons,
        [
            r#"permanent failure: event header "bad header" is not a valid HTTP header"#,
            r#"permanent failure: event header "x-ok" is not a valid HTTP header"#,
            r#"permanent failure: key "key\nwith a line break" cannot be an HTTP header value"#,
        ]
    );
    assert_eq!(server.written.load(Ordering::Relaxed), 0);
}
