//! Misusing the `outbox` command: impossible settings, negative durations,
//! malformed database URLs, bad payloads, two migrations at once. Usage
//! errors exit 2 before the database is touched; runtime errors exit 1 with
//! one `error:` line.

use std::process::{Command, Output, Stdio};

use crate::cli::{applied_all, outbox, stderr};
use crate::common::count;
use crate::pg;

/// The first line of stderr, which is clap's `error: …` for usage errors.
fn first_line(output: &Output) -> String {
    stderr(output).lines().next().unwrap_or_default().to_owned()
}

/// Nothing listens on port 1: a usage error must be found before that.
const UNREACHABLE: &str = "postgres://postgres@127.0.0.1:1/nowhere";

#[test]
fn impossible_relay_settings_exit_2_before_the_database_is_touched() {
    for (args, message) in [
        (
            vec!["--workers", "0"],
            "error: invalid value '0' for '--workers <WORKERS>': 0 is not in 1..=256",
        ),
        (
            vec!["--batch-size", "0"],
            "error: invalid value '0' for '--batch-size <BATCH_SIZE>': 0 is not in 1..=10000",
        ),
        (
            vec!["--batch-size", "10001"],
            "error: invalid value '10001' for '--batch-size <BATCH_SIZE>': 10001 is not in 1..=10000",
        ),
        (
            vec!["--poll-interval", "0s"],
            "error: invalid value '0s' for '--poll-interval <POLL_INTERVAL>': must be greater than zero",
        ),
        (
            vec!["--max-attempts", "0"],
            "error: invalid value '0' for '--max-attempts <MAX_ATTEMPTS>': 0 is not in 1..=4294967295",
        ),
        (
            vec!["--topic", "a*b"],
            "error: invalid relay configuration: route pattern \"a*b\": `*` is only allowed at the end",
        ),
    ] {
        let output = outbox(UNREACHABLE, &[&["relay", "--sink", "stdout"][..], &args].concat());
        assert_eq!(
            (output.status.code(), first_line(&output).as_str()),
            (Some(2), message),
            "{args:?}"
        );
    }
    let output = outbox(
        UNREACHABLE,
        &[
            "relay",
            "--sink",
            "webhook",
            "--url",
            "http://127.0.0.1:1/",
            "--timeout",
            "0s",
        ],
    );
    assert_eq!(
        (output.status.code(), first_line(&output).as_str()),
        (
            Some(2),
            "error: invalid value '0s' for '--timeout <TIMEOUT>': must be greater than zero"
        )
    );
}

#[test]
fn negative_durations_are_usage_errors() {
    // clap reads a value starting with `-` as flags: `-1s` is the unknown
    // short flag `-1`. Either way the command stops at exit 2.
    for (args, flag) in [
        (
            vec!["relay", "--sink", "stdout", "--poll-interval", "-1s"],
            "-1",
        ),
        (
            vec![
                "publish",
                "--topic",
                "t",
                "--delay",
                "-5m",
                "--payload",
                "{}",
            ],
            "-5",
        ),
        (vec!["dead-letters", "list", "--since", "-1h"], "-1"),
        (
            vec!["dead-letters", "purge", "--older-than", "-7d", "--yes"],
            "-7",
        ),
    ] {
        let output = outbox(UNREACHABLE, &args);
        assert_eq!(
            (output.status.code(), first_line(&output)),
            (
                Some(2),
                format!("error: unexpected argument '{flag}' found")
            ),
            "{args:?}"
        );
    }
}

#[test]
fn malformed_database_urls_are_one_line_connection_errors() {
    for (url, message) in [
        (
            "postgres://postgres@127.0.0.1:5432/test?bogus=1",
            "error: could not connect to the database: invalid URI query parameter: \"bogus\"\n",
        ),
        (
            "postgres://postgres@127.0.0.1:notaport/test",
            "error: could not connect to the database: invalid integer value \"notaport\" for connection option \"port\"\n",
        ),
    ] {
        let output = outbox(url, &["status"]);
        assert_eq!(
            (output.status.code(), stderr(&output).as_str()),
            (Some(1), message),
            "{url}"
        );
    }
}

/// What every connection string that is not PostgreSQL's is told.
const EXPECTED: &str = "expected a postgres:// or postgresql:// URL or a key=value connection string (host=… dbname=…)";

#[test]
fn connection_strings_postgres_cannot_read_are_usage_errors_before_connecting() {
    // From the environment, then from the flag (with an unreachable
    // DATABASE_URL behind it), for a command that connects at once and
    // for the relay.
    for (url, reason) in [
        ("not a url", String::new()),
        ("localhost:5432", String::new()),
        ("host=127.0.0.1 port", String::new()),
        ("host='127.0.0.1", String::new()),
        (
            "mysql://root:hunter2@127.0.0.1:3306/app",
            ", not a mysql:// URL".to_owned(),
        ),
        (
            "POSTGRES://127.0.0.1/app",
            ", not a POSTGRES:// URL".to_owned(),
        ),
    ] {
        for (args, source) in [
            (vec!["status"], "DATABASE_URL"),
            (vec!["--database-url", url, "status"], "--database-url"),
            (
                vec!["relay", "--sink", "stdout", "--database-url", url],
                "--database-url",
            ),
        ] {
            let env = if source == "DATABASE_URL" {
                url
            } else {
                UNREACHABLE
            };
            let output = outbox(env, &args);
            assert_eq!(
                (output.status.code(), stderr(&output)),
                (
                    Some(2),
                    format!("error: invalid {source}: {EXPECTED}{reason}\n")
                ),
                "{url:?} {args:?}"
            );
        }
    }
    // Both forms libpq reads pass the check and fail only at connecting.
    for url in [
        "host=127.0.0.1 port=1 dbname='no where' user=postgres",
        "postgresql://postgres@127.0.0.1:1/nowhere",
    ] {
        let output = outbox(url, &["status"]);
        assert_eq!(output.status.code(), Some(1), "{url}");
        assert!(
            stderr(&output).starts_with("error: could not connect to the database: "),
            "{url}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn bad_payloads_and_topics_write_nothing() {
    let db = pg::test_db();
    let deep = "[".repeat(200) + &"]".repeat(200);
    let long_topic = "t".repeat(10_000);
    for (args, code, message) in [
        (
            vec!["publish", "--topic", "t", "--payload", r#"{"a": "\u0000"}"#],
            1,
            "error: event payload contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store\n".to_owned(),
        ),
        (
            vec!["publish", "--topic", "t", "--payload", &deep],
            2,
            "error: --payload is not JSON: recursion limit exceeded at line 1 column 128\n".to_owned(),
        ),
        (
            vec!["publish", "--topic", &long_topic, "--payload", "{}"],
            1,
            format!("error: invalid topic \"{}…\": longer than 255 bytes\n", "t".repeat(64)),
        ),
        (
            vec!["publish", "--topic", "a\u{7}b", "--payload", "{}"],
            1,
            "error: invalid topic \"a\\u{7}b\": contains a control character\n".to_owned(),
        ),
        (
            vec!["publish", "--topic", "t", "--header", "=x", "--payload", "{}"],
            2,
            "error: invalid value '=x' for '--header <NAME=VALUE>': expected NAME=VALUE\n\nFor more information, try '--help'.\n".to_owned(),
        ),
    ] {
        let output = outbox(db.url(), &args);
        assert_eq!(
            (output.status.code(), stderr(&output)),
            (Some(code), message),
            "{args:?}"
        );
    }
    assert_eq!(count(&mut db.conn(), "outbox.events"), 0);
}

#[test]
fn two_migrations_at_once_apply_the_schema_exactly_once() {
    let db = pg::empty_db();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .arg("migrate")
            .env("DATABASE_URL", db.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let mut outputs: Vec<(Option<i32>, String)> = [first, second]
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        })
        .collect();
    outputs.sort();
    assert_eq!(
        outputs,
        [
            (Some(0), applied_all()),
            (Some(0), "schema up to date\n".to_owned()),
        ]
    );
    assert_eq!(count(&mut db.conn(), "outbox.events"), 0);
}
