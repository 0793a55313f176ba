//! Secrets (database password, webhook secret, passwords in URLs) never
//! appear in output, logs or errors, at any log level.

use diesel::prelude::*;
use outbox::StoredEvent;

/// A password and a webhook secret that appear nowhere else.
const PASSWORD: &str = "pw-Zq81xKv7";
const SECRET_KEY: &str = "c2VjcmV0LWtleS1Zcjk0bVQ="; // base64("secret-key-Yr94mT")

fn assert_no_secret(text: &str, context: &str) {
    use base64::Engine as _;
    // A webhook URL's user and password travel as HTTP Basic credentials.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("hook-user:{PASSWORD}"));
    for secret in [PASSWORD, SECRET_KEY, "secret-key-Yr94mT", &basic] {
        assert!(
            !text.contains(secret),
            "{context} shows {secret:?}:\n{text}"
        );
    }
}

#[test]
fn connection_errors_never_show_the_password() {
    for url in [
        format!("postgres://postgres:{PASSWORD}@[::1/test"),
        format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/test"),
        format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/test?bogus=1"),
    ] {
        let Err(error) = PgConnection::establish(&url).map_err(outbox::Error::from) else {
            panic!("{url} connected");
        };
        assert!(matches!(error, outbox::Error::Connect(_)), "{error:?}");
        let mut chain = vec![error.to_string(), format!("{error:?}")];
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            chain.push(cause.to_string());
            source = cause.source();
        }
        assert_no_secret(&chain.join("\n"), &url);

        let pool = crate::relay_support::PgPool::builder().build_unchecked(
            diesel::r2d2::ConnectionManager::<PgConnection>::new(url.as_str()),
        );
        if let Err(error) = outbox::Relay::builder(pool)
            .listen(&url)
            .route("*", |_: &StoredEvent| Ok(()))
            .start()
        {
            assert!(matches!(
                error,
                outbox::Error::Config {
                    field: "listen",
                    ..
                }
            ));
            assert_no_secret(&format!("{error} {error:?}"), &url);
        }
    }
}

/// A webhook endpoint that answers every request with 500.
#[cfg(feature = "cli")]
fn failing_endpoint() -> (std::sync::Arc<tiny_http::Server>, u16) {
    let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let serving = server.clone();
    std::thread::spawn(move || {
        for request in serving.incoming_requests() {
            let _ = request.respond(tiny_http::Response::from_string("down").with_status_code(500));
        }
    });
    (server, port)
}

#[cfg(feature = "cli")]
#[test]
fn the_command_line_never_shows_a_password_or_the_webhook_secret() {
    use std::process::{Command, Stdio};

    let db = crate::pg::test_db();
    // Trust authentication accepts (and never asks for) the password.
    let url = db
        .url()
        .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    assert!(url.contains(PASSWORD), "{url}");
    let (server, port) = failing_endpoint();
    let hook = format!("http://hook-user:{PASSWORD}@127.0.0.1:{port}/hook");
    let secret = format!("whsec_{SECRET_KEY}");
    let unreachable = format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/test");
    let malformed = format!("postgres://postgres:{PASSWORD}@[::1/test");
    let relay = |database: &str, log_format: &str| -> Vec<String> {
        [
            "relay",
            "--database-url",
            database,
            "--log-format",
            log_format,
            "--sink",
            "webhook",
            "--url",
            &hook,
            "--secret",
            &secret,
            "--drain",
            "--max-attempts",
            "1",
            "--poll-interval",
            "100ms",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let runs: Vec<(Vec<String>, Option<i32>)> = vec![
        (
            [
                "publish",
                "--database-url",
                &url,
                "--topic",
                "t",
                "--payload",
                "{}",
            ]
            .map(str::to_owned)
            .to_vec(),
            Some(0),
        ),
        (relay(&url, "text"), Some(0)),
        (
            [
                "publish",
                "--database-url",
                &url,
                "--topic",
                "t",
                "--payload",
                "{}",
            ]
            .map(str::to_owned)
            .to_vec(),
            Some(0),
        ),
        (relay(&url, "json"), Some(0)),
        (
            ["status", "--database-url", &url]
                .map(str::to_owned)
                .to_vec(),
            Some(0),
        ),
        (
            ["dead-letters", "list", "--database-url", &url, "--json"]
                .map(str::to_owned)
                .to_vec(),
            Some(0),
        ),
        (
            ["dead-letters", "show", "1", "--database-url", &url]
                .map(str::to_owned)
                .to_vec(),
            Some(0),
        ),
        (
            ["status", "--database-url", &unreachable]
                .map(str::to_owned)
                .to_vec(),
            Some(1),
        ),
        (
            ["status", "--database-url", &malformed]
                .map(str::to_owned)
                .to_vec(),
            Some(1),
        ),
        (relay(&unreachable, "text"), Some(1)),
        (relay(&malformed, "json"), Some(1)),
    ];
    for level in ["trace", "debug", "info"] {
        for (args, code) in &runs {
            let output = Command::new(env!("CARGO_BIN_EXE_outbox"))
                .args(args)
                .env("RUST_LOG", level)
                .env_remove("DATABASE_URL")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(output.status.code(), *code, "{args:?}: {text}");
            assert_no_secret(
                &text,
                &format!("RUST_LOG={level} outbox {}", args[..2].join(" ")),
            );
        }
    }
    // The relays really called the endpoint and dead-lettered: two events
    // for each log level.
    assert_eq!(
        crate::common::count(&mut db.conn(), "outbox.dead_letters"),
        6
    );
    server.unblock();
}
