//! Publishing and relaying through PgBouncer in transaction pooling mode
//! (Debian's pgbouncer 1.18, which does not carry prepared statements from
//! one server connection to another), with the listener on a direct
//! connection. Each test starts its own PgBouncer in front of its test
//! database; `.ci/run` installs it.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::CacheSize;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use outbox::{DeliveryError, StoredEvent};

use crate::common::pending;
use crate::pg;
use crate::relay_support::{dead_letters, recorder, Recording, Signal, PATIENCE};

/// A PgBouncer in transaction mode in front of one test database, with
/// `pool_size` server connections; stopped when dropped.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    url: String,
}

/// The parts of a `postgres://user@host:port/database` URL PgBouncer
/// needs (the host may be a percent-encoded socket directory).
fn parts(url: &str) -> (String, String, String, String) {
    let rest = url.strip_prefix("postgres://").expect("a postgres:// URL");
    let (user, rest) = rest.split_once('@').expect("a user in the URL");
    let user = user.split(':').next().unwrap_or(user).to_owned();
    let (authority, database) = rest.split_once('/').expect("a database in the URL");
    let database = database.split('?').next().unwrap_or(database).to_owned();
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "5432"));
    let host = host.replace("%2F", "/").replace("%2f", "/");
    (user, host, port.to_owned(), database)
}

impl PgBouncer {
    fn start(db: &pg::TestDb, pool_size: u32) -> PgBouncer {
        let (user, host, port, database) = parts(db.url());
        let listen = free_port();
        let dir =
            std::env::temp_dir().join(format!("outbox-pgbouncer-{}-{listen}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 {database} = host={host} port={port} dbname={database} user={user}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {listen}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 200\n\
                 logfile = {log}\n",
                users = dir.join("users.txt").display(),
                log = dir.join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        let mut command = Command::new("pgbouncer");
        // PgBouncer refuses to run as root: as the cluster's owner then
        // (who may also open its socket directory).
        if let Some((uid, gid)) = pg::cluster_owner() {
            use std::os::unix::fs::chown;
            for file in ["", "users.txt", "pgbouncer.ini"] {
                chown(dir.join(file), Some(uid), Some(gid)).unwrap();
            }
            command.arg("-u").arg(owner_name(uid));
        }
        let child = command
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting pgbouncer (apt-get install pgbouncer)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", listen)).is_err() {
            let log = std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "pgbouncer did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        PgBouncer {
            child,
            dir,
            url: format!("postgres://{user}@127.0.0.1:{listen}/{database}"),
        }
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn owner_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() > 2 && fields[2] == uid.to_string())
        .map(|fields| fields[0].to_owned())
        .expect("the cluster owner's name")
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A connection through the pooler, as an application behind PgBouncer
/// makes it.
fn pooled_conn(bouncer: &PgBouncer) -> PgConnection {
    let mut conn = PgConnection::establish(&bouncer.url).unwrap();
    conn.set_prepared_statement_cache_size(CacheSize::Disabled);
    conn
}

#[test]
fn publish_relay_retries_and_dead_letters_go_through_pgbouncer() {
    let db = pg::test_db();
    // Two server connections for six clients (four workers, the
    // housekeeper, the publisher): every transaction may land on another.
    let bouncer = PgBouncer::start(&db, 2);
    let pool = Pool::builder()
        .max_size(6)
        .connection_customizer(Box::new(outbox::NoStatementCache))
        .build_unchecked(ConnectionManager::<PgConnection>::new(bouncer.url.clone()));
    let (observer, signals) = recorder();
    let recording = Recording::new();
    let sink = recording.sink(|event: &StoredEvent| match event.topic.as_str() {
        "flaky" if event.attempts == 1 => Err(DeliveryError::transient("not yet")),
        "bad" => Err(DeliveryError::permanent("never")),
        _ => Ok(()),
    });
    let relay = outbox::Relay::builder(pool)
        .listen(db.url()) // direct: LISTEN needs a session
        .observer(observer)
        .poll_interval(Duration::from_millis(100))
        .backoff(outbox::Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(50),
            2.0,
            0.0,
        ))
        .route("*", sink)
        .start()
        .unwrap();

    let mut conn = pooled_conn(&bouncer);
    let mut ids = Vec::new();
    for n in 0..30 {
        let topic = match n {
            7 => "flaky",
            13 => "bad",
            _ => "ok",
        };
        ids.push(
            outbox::transaction(&mut conn, |tx| {
                tx.publish_event(
                    outbox::NewEvent::dynamic(topic, serde_json::json!({ "n": n }))
                        .key(format!("k{}", n % 3)),
                )
            })
            .unwrap(),
        );
    }
    let seen = signals.until(|s| {
        s.iter()
            .filter(|s| matches!(s, Signal::Delivered { .. } | Signal::Dead { .. }))
            .count()
            == 30
    });
    relay.shutdown(PATIENCE).unwrap();

    let errors: Vec<&Signal> = seen
        .iter()
        .filter(|s| matches!(s, Signal::Error(_)))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let mut delivered: Vec<outbox::EventId> = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Delivered { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    delivered.sort();
    let expected: Vec<outbox::EventId> = ids
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != 13)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(delivered, expected, "every event once, but the bad one");
    let calls = recording.calls();
    assert_eq!(
        calls.iter().filter(|(id, _)| *id == ids[7]).count(),
        2,
        "the flaky one twice"
    );
    let dead = dead_letters(&mut conn);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, ids[13].get());
    assert_eq!(pending(&mut conn), 0);
}

#[test]
fn idempotent_publishes_go_through_pgbouncer() {
    let db = pg::test_db();
    let bouncer = PgBouncer::start(&db, 1);
    let mut a = pooled_conn(&bouncer);
    let mut b = pooled_conn(&bouncer);
    let event = || outbox::NewEvent::dynamic("t", serde_json::json!({})).idempotency_key("once");
    let first = outbox::transaction(&mut a, |tx| tx.publish_event(event())).unwrap();
    let again = outbox::transaction(&mut b, |tx| tx.publish_event(event())).unwrap();
    assert_eq!(again, first);
}

/// What `NoStatementCache` is for: with diesel's statement cache, two
/// clients sharing one server connection collide on the statement names.
#[test]
fn with_the_statement_cache_two_clients_collide_behind_pgbouncer() {
    let db = pg::test_db();
    let bouncer = PgBouncer::start(&db, 1);
    let mut a = PgConnection::establish(&bouncer.url).unwrap();
    let mut b = PgConnection::establish(&bouncer.url).unwrap();
    let publish = |conn: &mut PgConnection| {
        outbox::transaction(conn, |tx| {
            tx.publish_event(outbox::NewEvent::dynamic("t", serde_json::json!({})))
        })
    };
    publish(&mut a).unwrap();
    let error = publish(&mut b).unwrap_err();
    assert!(error.to_string().contains("already exists"), "{error}");
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_relays_through_pgbouncer_and_listens_directly() {
    use crate::cli::{outbox, stderr};
    let db = pg::test_db();
    let bouncer = PgBouncer::start(&db, 1);
    for n in 0..5 {
        let output = outbox(
            &bouncer.url,
            &[
                "publish",
                "--topic",
                "t",
                "--payload",
                &format!("{{\"n\": {n}}}"),
            ],
        );
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    let output = outbox(
        &bouncer.url,
        &[
            "relay",
            "--sink",
            "stdout",
            "--drain",
            "--workers",
            "4",
            "--listen-url",
            db.url(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 5);
    assert!(
        stderr(&output).contains("drained: delivered 5, retried 0, dead-lettered 0"),
        "{}",
        stderr(&output)
    );
}
