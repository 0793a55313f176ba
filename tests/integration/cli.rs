//! The `outbox` binary, run for real against a real PostgreSQL: every
//! subcommand, usage errors, an unreachable and an unmigrated database, and
//! a webhook relay that fails, then recovers, then stops on SIGTERM.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use diesel::connection::SimpleConnection;

use crate::common::count;
use crate::pg;
use crate::relay_support::PATIENCE;

/// Runs the binary with `args` against `db_url`, quiet logs, no stdin.
pub fn outbox(db_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The captured stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// What `outbox migrate` prints on an empty database: every migration.
pub fn applied_all() -> String {
    let migrations = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
    let count = std::fs::read_dir(migrations).unwrap().count();
    format!("applied {count} migration(s)\n")
}

#[test]
fn migrate_applies_then_reports_up_to_date() {
    let db = pg::empty_db();
    let first = outbox(db.url(), &["migrate"]);
    assert_eq!(
        (first.status.code(), stdout(&first)),
        (Some(0), applied_all())
    );
    let again = outbox(db.url(), &["migrate"]);
    assert_eq!(
        (again.status.code(), stdout(&again).as_str()),
        (Some(0), "schema up to date\n")
    );
}

#[test]
fn publish_prints_the_id_and_status_counts_it() {
    let db = pg::test_db();
    let published = outbox(
        db.url(),
        &[
            "publish",
            "--topic",
            "order.approved",
            "--key",
            "order-7",
            "--header",
            "traceparent=00-abc-01",
            "--payload",
            r#"{"order_id": 7}"#,
        ],
    );
    assert_eq!(
        (published.status.code(), stdout(&published).as_str()),
        (Some(0), "1\n"),
        "{}",
        stderr(&published)
    );
    let mut from_stdin = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "publish",
            "--topic",
            "audit.login",
            "--delay",
            "2h",
            "--payload",
            "-",
        ])
        .env("DATABASE_URL", db.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    from_stdin
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"user": 42}"#)
        .unwrap();
    assert_eq!(stdout(&from_stdin.wait_with_output().unwrap()), "2\n");

    let queued = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(queued[0].key.as_deref(), Some("order-7"));
    assert_eq!(queued[0].headers["traceparent"], "00-abc-01");
    assert_eq!(queued[1].payload, serde_json::json!({ "user": 42 }));
    assert!(queued[1].available_at > chrono::Utc::now() + chrono::Duration::minutes(119));

    let table = stdout(&outbox(db.url(), &["status"]));
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "TOPIC",
            "PENDING",
            "DUE",
            "SCHEDULED",
            "IN_FLIGHT",
            "RETRYING",
            "DEAD",
            "OLDEST_AGE_S"
        ]
    );
    assert_eq!(lines[1][..7], ["audit.login", "1", "0", "1", "0", "0", "0"]);
    assert_eq!(
        lines[2][..7],
        ["order.approved", "1", "1", "0", "0", "0", "0"]
    );
    assert_eq!(lines[3][..7], ["TOTAL", "2", "1", "1", "0", "0", "0"]);

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&outbox(db.url(), &["status", "--json"]))).unwrap();
    assert_eq!(json["pending"], 2);
    assert_eq!(json["due_now"], 1);
    assert_eq!(json["scheduled"], 1);
    assert_eq!(json["topics"][1]["topic"], "order.approved");
    assert_eq!(json["topics"][1]["pending"], 1);
}

#[test]
fn usage_errors_exit_2_and_runtime_errors_exit_1_with_one_line() {
    let db = pg::test_db();
    for args in [
        vec!["publish", "--payload", "{}"],
        vec!["publish", "--topic", "t", "--payload", "not json"],
        vec![
            "publish",
            "--topic",
            "t",
            "--delay",
            "soon",
            "--payload",
            "{}",
        ],
        vec!["relay", "--sink", "carrier-pigeon"],
        vec!["relay", "--sink", "webhook"],
        vec!["dead-letters", "replay"],
        vec!["relay", "--sink", "stdout", "--workers", "0"],
        vec!["relay", "--sink", "webhook", "--url", "not a url"],
        vec!["no-such-command"],
    ] {
        let output = outbox(db.url(), &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let bad_topic = outbox(db.url(), &["publish", "--topic", "", "--payload", "{}"]);
    assert_eq!(
        (bad_topic.status.code(), stderr(&bad_topic).as_str()),
        (Some(1), "error: invalid topic \"\": empty\n")
    );
    assert_eq!(count(&mut db.conn(), "outbox.pending"), 0);
}

#[test]
fn impossible_lease_or_backoff_flags_exit_2_naming_the_flag() {
    let db = pg::test_db();
    for (args, message) in [
        (
            vec!["--lease", "10ms"],
            "error: --lease 10ms is shorter than the minimum 100ms\n",
        ),
        (
            vec!["--backoff-initial", "0s"],
            "error: --backoff-initial must be greater than zero\n",
        ),
        (
            vec!["--backoff-initial", "2s", "--backoff-max", "1s"],
            "error: --backoff-max 1s is shorter than --backoff-initial 2s\n",
        ),
        // Only the maximum given: checked against the default initial delay.
        (
            vec!["--backoff-max", "500ms"],
            "error: --backoff-max 500ms is shorter than --backoff-initial 1s\n",
        ),
    ] {
        let mut all = vec!["relay", "--sink", "stdout"];
        all.extend(&args);
        let output = outbox(db.url(), &all);
        assert_eq!(
            (output.status.code(), stderr(&output).as_str()),
            (Some(2), message),
            "{args:?}"
        );
    }
}

#[test]
fn lease_and_backoff_flags_set_the_claim_and_the_retry_schedule() {
    let db = pg::test_db();
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    // Requests come to the test, which looks at the queue before answering.
    let (requests_tx, requests) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let _ = requests_tx.send((request, std::time::Instant::now()));
        }
    });
    outbox(
        db.url(),
        &["publish", "--topic", "invoice.paid", "--payload", "{}"],
    );
    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--sink",
            "webhook",
            "--url",
            &url,
            "--poll-interval",
            "20ms",
            "--lease",
            "7s",
            "--backoff-initial",
            "2s",
            "--backoff-max",
            "3s",
        ])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut conn = db.conn();
    // Seconds until the event is due again, and whether a relay holds it.
    let mut due_in = || -> (f64, bool) {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Double)]
            left: f64,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            held: bool,
        }
        let row: Row = diesel::RunQueryDsl::get_result(
            diesel::sql_query(
                // Held: the lane's lease while the event is read from the
                // log, the row's own lease once it is a retry.
                "SELECT extract(epoch FROM at - now())::float8 AS left, held
                   FROM (SELECT available_at AS at, token IS NOT NULL AS held
                           FROM outbox.deliveries
                         UNION ALL
                         SELECT lease_until, true FROM outbox.cursors WHERE token IS NOT NULL) x
                  ORDER BY held DESC
                  LIMIT 1",
            ),
            &mut conn,
        )
        .unwrap();
        (row.left, row.held)
    };
    // Attempt 2 waits 2 s and attempt 3 min(3 s, 4 s), each shortened by
    // up to 20% jitter: upper bounds that hold however slow the machine,
    // and lower bounds that allow for the time since the failure. The
    // defaults (30 s lease, 1 s then 2 s) would fail them.
    for (shortest, longest) in [(1.6, 2.0), (2.4, 3.0)] {
        let (request, seen) = requests.recv_timeout(PATIENCE).unwrap();
        let (lease_left, held) = due_in();
        assert!(held, "not claimed while being delivered");
        assert!(
            lease_left > 5.0 && lease_left <= 7.0,
            "lease ends in {lease_left}s"
        );
        let _ = request.respond(tiny_http::Response::empty(503));
        // Settled (no longer held) after the failure; a further attempt
        // before that would mean no backoff at all.
        let deadline = std::time::Instant::now() + PATIENCE;
        let retry_in = loop {
            assert!(std::time::Instant::now() < deadline, "never settled");
            let (left, held) = due_in();
            if !held {
                break left;
            }
            assert!(
                requests.recv_timeout(Duration::from_millis(10)).is_err(),
                "retried before the failure was settled"
            );
        };
        let since = seen.elapsed().as_secs_f64();
        assert!(
            retry_in <= longest && retry_in + since >= shortest,
            "retry due in {retry_in}s, {since}s after the attempt; expected {shortest}..={longest}s"
        );
    }
    let _ = relay.kill();
    let _ = relay.wait();
}

#[test]
fn an_unreachable_database_is_one_line_without_the_password() {
    let output = outbox(
        "postgres://postgres:hunter2@127.0.0.1:1/nowhere",
        &["status"],
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: could not connect to the database"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let no_url = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(no_url.status.code(), Some(2));
    assert_eq!(
        stderr(&no_url),
        "error: no database: set DATABASE_URL or pass --database-url\n"
    );
}

#[test]
fn an_unmigrated_database_says_to_migrate() {
    let db = pg::empty_db();
    for (args, relation) in [
        (vec!["status"], "outbox.pending"),
        (
            vec!["relay", "--sink", "stdout", "--drain"],
            "outbox.dead_letters",
        ),
    ] {
        let output = outbox(db.url(), &args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&output),
            format!("error: database error: relation \"{relation}\" does not exist (run `outbox migrate` first)\n"),
            "{args:?}"
        );
    }
}

#[test]
fn a_draining_stdout_relay_prints_each_event_once_and_a_summary() {
    let db = pg::test_db();
    outbox(
        db.url(),
        &[
            "publish",
            "--topic",
            "order.approved",
            "--key",
            "order-7",
            "--payload",
            r#"{"n": 1}"#,
        ],
    );
    outbox(
        db.url(),
        &[
            "publish",
            "--topic",
            "billing.paid",
            "--payload",
            r#"{"n": 2}"#,
        ],
    );
    let output = outbox(
        db.url(),
        &[
            "relay",
            "--sink",
            "stdout",
            "--drain",
            "--poll-interval",
            "100ms",
            "--topic",
            "order.*",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert_eq!(
        (
            line["id"].as_i64(),
            line["topic"].as_str(),
            line["key"].as_str()
        ),
        (Some(1), Some("order.approved"), Some("order-7"))
    );
    assert_eq!(
        (line["payload"].clone(), line["attempt"].as_i64()),
        (serde_json::json!({ "n": 1 }), Some(1))
    );
    assert!(line["created_at"].is_string() && line["headers"].is_object());
    assert!(
        stderr(&output).ends_with(
            "drained: delivered 1, retried 0, dead-lettered 0; 0 still pending (not due yet)\n"
        ),
        "{}",
        stderr(&output)
    );
    // billing.* is not routed: still queued, untouched.
    let queued = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(
        queued
            .iter()
            .map(|e| (e.topic.as_str(), e.attempts))
            .collect::<Vec<_>>(),
        [("billing.paid", 0)]
    );
}

#[test]
fn dead_letters_list_show_replay_and_purge() {
    let db = pg::test_db();
    db.conn()
        .batch_execute(
            "INSERT INTO outbox.dead_letters (subscription, id, topic, key, payload, headers, created_at, attempts, last_error, failed_at) VALUES
               ('default', 11, 'email.send', 'c-1', '{\"to\": \"a@b.c\"}', '{\"traceparent\": \"00-abc-01\"}', now() - interval '3 hours', 25, 'gave up after 25 attempts: HTTP 503', now() - interval '2 hours'),
               ('default', 12, 'email.send', NULL, '{\"to\": \"x@y.z\"}', '{}', now() - interval '1 hour', 1, 'permanent failure: HTTP 422', now() - interval '1 hour'),
               ('default', 13, 'billing.paid', NULL, '{}', '{}', now() - interval '10 days', 3, 'gave up after 3 attempts: timeout', now() - interval '9 days')",
        )
        .unwrap();

    let table = stdout(&outbox(
        db.url(),
        &["dead-letters", "list", "--topic", "email.send"],
    ));
    let ids: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(ids, ["12", "11"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&outbox(
        db.url(),
        &["dead-letters", "list", "--since", "3h", "--json"],
    )))
    .unwrap();
    assert_eq!(
        json.as_array()
            .unwrap()
            .iter()
            .map(|d| (d["id"].as_i64().unwrap(), d["attempts"].as_i64().unwrap()))
            .collect::<Vec<_>>(),
        [(12, 1), (11, 25)]
    );
    assert_eq!(json[1]["last_error"], "gave up after 25 attempts: HTTP 503");
    assert_eq!(json[1]["key"], "c-1");

    let shown: serde_json::Value = serde_json::from_str(&stdout(&outbox(
        db.url(),
        &["dead-letters", "show", "11", "--json"],
    )))
    .unwrap();
    assert_eq!(shown["payload"], serde_json::json!({ "to": "a@b.c" }));
    assert_eq!(shown["headers"]["traceparent"], "00-abc-01");
    let missing = outbox(db.url(), &["dead-letters", "show", "99"]);
    assert_eq!(
        (missing.status.code(), stderr(&missing).as_str()),
        (Some(1), "error: no dead letter with id 99\n")
    );

    let dry = outbox(
        db.url(),
        &[
            "dead-letters",
            "replay",
            "--topic",
            "email.send",
            "--dry-run",
        ],
    );
    assert_eq!(stdout(&dry), "would replay 2 dead letter(s)\n");
    assert_eq!(count(&mut db.conn(), "outbox.pending"), 0);
    let replayed = outbox(db.url(), &["dead-letters", "replay", "11"]);
    assert_eq!(stdout(&replayed), "replayed 1 dead letter(s)\n");
    let queued = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(
        queued
            .iter()
            .map(|e| (e.id.get(), e.attempts))
            .collect::<Vec<_>>(),
        [(11, 0)]
    );

    let unconfirmed = outbox(db.url(), &["dead-letters", "purge", "--older-than", "7d"]);
    assert_eq!(unconfirmed.status.code(), Some(2));
    assert_eq!(
        stderr(&unconfirmed),
        "error: would purge 1 dead letter(s): pass --yes to confirm\n"
    );
    let purged = outbox(
        db.url(),
        &["dead-letters", "purge", "--older-than", "7d", "--yes"],
    );
    assert_eq!(stdout(&purged), "purged 1 dead letter(s)\n");
    let all = outbox(db.url(), &["dead-letters", "purge", "--all", "--yes"]);
    assert_eq!(stdout(&all), "purged 1 dead letter(s)\n");
    assert_eq!(count(&mut db.conn(), "outbox.dead_letters"), 0);
}

#[test]
fn a_webhook_relay_retries_a_failing_endpoint_until_it_recovers_and_stops_on_sigterm() {
    let db = pg::test_db();
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let (seen_tx, seen) = crossbeam_channel::unbounded::<(String, u16)>();
    std::thread::spawn(move || {
        for (n, request) in server.incoming_requests().enumerate() {
            let status = if n == 0 { 503 } else { 204 };
            let id = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("webhook-id"))
                .map(|h| h.value.to_string())
                .unwrap_or_default();
            let _ = request.respond(tiny_http::Response::empty(status));
            let _ = seen_tx.send((id, status));
        }
    });
    outbox(
        db.url(),
        &[
            "publish",
            "--topic",
            "invoice.paid",
            "--payload",
            r#"{"invoice": 1}"#,
        ],
    );
    let relay = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--sink",
            "webhook",
            "--url",
            &url,
            "--secret",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "--poll-interval",
            "100ms",
        ])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(seen.recv_timeout(PATIENCE).unwrap(), ("1".to_owned(), 503));
    // The default backoff retries after about a second.
    assert_eq!(seen.recv_timeout(PATIENCE).unwrap(), ("1".to_owned(), 204));
    // Settled once the delivery is recorded; then stop it like a supervisor would.
    let deadline = std::time::Instant::now() + PATIENCE;
    while count(&mut db.conn(), "outbox.pending") > 0 {
        assert!(std::time::Instant::now() < deadline);
        let _ = seen.recv_timeout(Duration::from_millis(50));
    }
    let pid = relay.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let output = relay.wait_with_output().unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(err.contains("signal received; shutting down"), "{err}");
    assert!(
        !err.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the webhook secret leaked: {err}"
    );
    assert_eq!(count(&mut db.conn(), "outbox.dead_letters"), 0);
}

#[test]
fn the_relay_serves_prometheus_metrics() {
    let db = pg::test_db();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    outbox(
        db.url(),
        &["publish", "--topic", "order.approved", "--payload", "{}"],
    );
    let relay = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--sink",
            "stdout",
            "--poll-interval",
            "100ms",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = ureq::Agent::new_with_defaults();
    let deadline = std::time::Instant::now() + PATIENCE;
    // Scrape until the delivery and the gauges show (the exporter starts
    // with the relay; the gauges are refreshed every poll interval).
    let body = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed the delivery"
        );
        if let Ok(mut response) = agent
            .get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
        {
            let body = response.body_mut().read_to_string().unwrap();
            if body.contains("outbox_delivered_total")
                && body.contains(r#"outbox_pending{subscription="default"} 0"#)
            {
                break body;
            }
        }
        std::thread::sleep(Duration::from_millis(50)); // scrape interval
    };
    let pid = relay.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let _ = relay.wait_with_output();
    assert!(
        body.contains(r#"outbox_delivered_total{subscription="default",topic="order.approved"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"outbox_oldest_pending_age_seconds{subscription="default"} 0"#),
        "{body}"
    );
    assert!(body.contains("outbox_delivery_latency_seconds"), "{body}");
    assert!(body.contains("outbox_stranded_rescued_total 0"), "{body}");
}

#[test]
fn the_relay_names_the_session_whose_old_snapshot_pins_dead_rows() {
    use std::io::BufRead;
    let db = pg::test_db();
    let publish = |conn: &mut diesel::PgConnection, n: i32| {
        conn.batch_execute(&format!(
            "INSERT INTO outbox.events (topic, payload)
             SELECT 'pinned', jsonb_build_object('n', g) FROM generate_series(1, {n}) g"
        ))
        .unwrap();
    };
    // A session that keeps a snapshot: VACUUM may remove nothing deleted
    // after it was taken.
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM outbox.relay_wakeup;")
        .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let pid = diesel::RunQueryDsl::get_result::<Pid>(
        diesel::sql_query("SELECT pg_backend_pid() AS pid"),
        &mut holder,
    )
    .unwrap()
    .pid;

    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["relay", "--sink", "stdout"])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, warnings) = std::sync::mpsc::channel();
    let stderr = relay.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    // 12,000 rows of outbox.deliveries come and go (as retries do) while
    // the snapshot is pinned; the relay vacuums within a second or two of
    // settling 1,200 events and then looks why rows were left.
    db.conn()
        .batch_execute(
            "INSERT INTO outbox.deliveries (subscription, id, topic, payload, headers, created_at, available_at, reason)
             SELECT 'default', g, 'pinned', '{}', '{}', now(), 'infinity', 'blocked'
               FROM generate_series(1, 12000) g;
             DELETE FROM outbox.deliveries;",
        )
        .unwrap();
    publish(&mut db.conn(), 1_200);
    let deadline = std::time::Instant::now() + PATIENCE;
    let warning = loop {
        let line = warnings
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("no warning about the old snapshot");
        if line.contains("old snapshot") {
            break line;
        }
    };
    // The warning comes once 1,000 are settled: the rest follow.
    let deadline = std::time::Instant::now() + PATIENCE;
    while count(&mut db.conn(), "outbox.pending") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "never delivered the rest"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = relay.kill();
    let _ = relay.wait();
    holder.batch_execute("COMMIT").unwrap();
    assert!(warning.contains(&format!("pid={pid}")), "{warning}");
    assert!(warning.contains("pg_terminate_backend"), "{warning}");
}

#[test]
fn usage_lines_do_not_show_the_database_url_as_required() {
    for database_url in [Some("postgres://postgres@127.0.0.1:1/nowhere"), None] {
        for (args, usage) in [
            (
                vec!["relay", "--sink", "webhook"],
                "Usage: outbox relay --sink <SINK> --url <URL>\n",
            ),
            (
                vec!["dead-letters", "replay"],
                "Usage: outbox dead-letters replay <IDS|--topic <TOPIC>|--all>\n",
            ),
        ] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
            command.args(&args).env_remove("DATABASE_URL");
            if let Some(url) = database_url {
                command.env("DATABASE_URL", url);
            }
            let output = command.output().unwrap();
            let err = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{err}");
            assert!(err.contains(usage), "{database_url:?} {args:?}: {err}");
        }
    }
    // The help still says where the URL comes from.
    let help = stdout(&outbox("", &["status", "--help"]));
    assert!(help.contains("--database-url <DATABASE_URL>"), "{help}");
    assert!(help.contains("DATABASE_URL environment variable"), "{help}");
}

#[test]
fn format_json_or_table_is_accepted_wherever_json_is() {
    let db = pg::test_db();
    db.conn()
        .batch_execute(
            "INSERT INTO outbox.dead_letters (subscription, id, topic, payload, headers, created_at, attempts, last_error, failed_at) VALUES
               ('default', 11, 'email.send', '{}', '{}', '2026-11-28T10:00:00Z', 3, 'permanent failure: HTTP 422', '2026-11-28T11:00:00Z')",
        )
        .unwrap();
    for command in [
        vec!["status"],
        vec!["dead-letters", "list"],
        vec!["dead-letters", "show", "11"],
    ] {
        let run = |extra: &[&str]| {
            let output = outbox(db.url(), &[&command[..], extra].concat());
            assert_eq!(
                output.status.code(),
                Some(0),
                "{command:?} {extra:?}: {}",
                stderr(&output)
            );
            stdout(&output)
        };
        let json = run(&["--json"]);
        assert!(
            serde_json::from_str::<serde_json::Value>(&json).is_ok(),
            "{json}"
        );
        assert_eq!(run(&["--format", "json"]), json, "{command:?}");
        assert_eq!(run(&["--format", "table"]), run(&[]), "{command:?}");
        let both = outbox(
            db.url(),
            &[&command[..], &["--json", "--format", "table"]].concat(),
        );
        assert_eq!(both.status.code(), Some(2), "{command:?}");
        let bad = outbox(db.url(), &[&command[..], &["--format", "yaml"]].concat());
        assert_eq!(bad.status.code(), Some(2), "{command:?}");
        assert!(
            stderr(&bad).contains("[possible values: table, json]"),
            "{}",
            stderr(&bad)
        );
    }
}

#[test]
fn the_webhook_timeout_default_shows_in_help() {
    let help = stdout(&outbox("", &["relay", "--help"]));
    let timeout = help
        .split("--timeout <TIMEOUT>")
        .nth(1)
        .and_then(|rest| rest.split("\n      --").next())
        .unwrap_or_else(|| panic!("no --timeout in {help}"));
    assert!(timeout.contains("[default: 10s]"), "{timeout}");
}

/// Runs the binary against `db_url` with its standard output on
/// `/dev/full`, where every write fails with ENOSPC.
#[cfg(target_os = "linux")]
fn outbox_to_a_full_disk(db_url: &str, args: &[&str]) -> Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_standard_output_is_one_error_line_for_every_command() {
    const FULL: &str =
        "error: cannot write to standard output: No space left on device (os error 28)\n";
    let db = pg::test_db();
    db.conn()
        .batch_execute(
            "INSERT INTO outbox.dead_letters (subscription, id, topic, payload, headers, created_at, attempts, last_error, failed_at) VALUES
               ('default', 11, 'email.send', '{}', '{}', now(), 3, 'permanent failure: HTTP 422', now()),
               ('default', 12, 'email.send', '{}', '{}', now(), 3, 'permanent failure: HTTP 422', now())",
        )
        .unwrap();
    for args in [
        vec!["migrate"],
        vec!["publish", "--topic", "order.approved", "--payload", "{}"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["dead-letters", "list"],
        vec!["dead-letters", "list", "--json"],
        vec!["dead-letters", "show", "11"],
        vec!["dead-letters", "show", "11", "--json"],
        vec!["dead-letters", "replay", "--all", "--dry-run"],
        vec!["dead-letters", "replay", "11"],
        vec!["dead-letters", "purge", "12", "--yes"],
        vec!["relay", "--sink", "stdout", "--drain"],
        vec!["--help"],
        vec!["help", "status"],
        vec!["--version"],
    ] {
        let output = outbox_to_a_full_disk(db.url(), &args);
        assert_eq!(
            (output.status.code(), stderr(&output).as_str()),
            (Some(1), FULL),
            "{args:?}"
        );
    }
    // The relay stopped at the first failed write; both events (the one
    // published and the one replayed) are still queued, none was lost.
    let queued = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(
        queued.iter().map(|e| e.id.get()).collect::<Vec<_>>(),
        [1, 11]
    );
}

#[test]
fn a_drain_exits_once_nothing_routed_is_due_or_in_flight_however_long_the_poll_interval() {
    let db = pg::test_db();
    for n in 1..=3 {
        outbox(
            db.url(),
            &[
                "publish",
                "--topic",
                "order.approved",
                "--payload",
                &format!(r#"{{"n": {n}}}"#),
            ],
        );
    }
    for topic in ["order.later", "billing.paid"] {
        outbox(
            db.url(),
            &[
                "publish",
                "--topic",
                topic,
                "--delay",
                "2h",
                "--payload",
                "{}",
            ],
        );
    }
    let relay = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--sink",
            "stdout",
            "--drain",
            "--poll-interval",
            "1m30s",
            "--topic",
            "order.*",
        ])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = relay.id();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done_tx.send(relay.wait_with_output().unwrap());
    });
    // Before the fix the drain waited a whole poll interval (90 s).
    let output = done.recv_timeout(PATIENCE).unwrap_or_else(|_| {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("the drain did not exit within {PATIENCE:?}")
    });
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let mut delivered: Vec<i64> = stdout(&output)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    delivered.sort_unstable();
    assert_eq!(delivered, [1, 2, 3]);
    // The summary says what is left and when the next of it comes due.
    let err = stderr(&output);
    let summary = "drained: delivered 3, retried 0, dead-lettered 0; 1 still pending (not due yet, the next due in ";
    let next = err
        .lines()
        .last()
        .and_then(|l| l.strip_prefix(summary))
        .and_then(|l| l.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{err}"));
    let next = humantime::parse_duration(next).unwrap();
    assert!(
        next > Duration::from_secs(7100) && next <= Duration::from_secs(7200),
        "{next:?}"
    );
    let queued = outbox::queued_events(&mut db.conn(), 10).unwrap();
    assert_eq!(
        queued.iter().map(|e| e.id.get()).collect::<Vec<_>>(),
        [4, 5]
    );
}
