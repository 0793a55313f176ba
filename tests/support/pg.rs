//! A PostgreSQL database per test, for tests, doctests, examples and benches.
//!
//! The server is `DATABASE_URL` when it is set (it must allow `CREATE
//! DATABASE`); otherwise a throwaway cluster is started from the local
//! PostgreSQL installation (`initdb` + `pg_ctl`), once per process, and
//! stopped when the process exits, however it exits: a watchdog process
//! holds the read end of a pipe whose write end only this process has.
//!
//! Each [`TestDb`] is a fresh database cloned from a migrated template, so
//! tests run in parallel without seeing each other's rows or notifications.
//!
//! A test process killed before its [`TestDb`]s drop leaves databases named
//! `outbox_test_<pid>_<n>` on a `DATABASE_URL` server; the next test process
//! to start drops those whose owner is gone ([`drop_leftovers`]). An owner
//! counts as gone only when both are true:
//! - no session holds the advisory lock `(7370617, pid)`, which every test
//!   process takes on a connection it keeps open until it exits. The server
//!   sees every client, so this protects a live owner on another machine or
//!   in another container (another pid namespace), where `/proc` would say
//!   nothing;
//! - `/proc/<pid>` does not exist on this machine. This protects the
//!   databases of a live test binary built before the lock existed. A pid
//!   reused by an unrelated process only keeps a leftover until it exits;
//!   we never compare process start times, which would add a way to drop a
//!   live owner's databases and no way to keep one.
//!
//! A process that starts with a pid a dead test process had also drops the
//! databases named after that pid, once it holds the lock and before it
//! creates any (otherwise `CREATE DATABASE` would find them there).
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use diesel::prelude::*;

/// A database of its own, dropped (with any connection still open to it)
/// when this value is.
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// The connection URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to this database.
    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url)
            .unwrap_or_else(|e| panic!("connecting to test database {}: {e}", self.name))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&server().admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

/// A fresh database with the outbox schema migrated.
pub fn test_db() -> TestDb {
    database_from(&server().template)
}

/// A fresh, empty database: the outbox schema is not there.
pub fn empty_db() -> TestDb {
    database_from("template0")
}

fn database_from(template: &str) -> TestDb {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let server = server();
    let name = format!(
        "outbox_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = admin_conn(server);
    diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .execute(&mut admin)
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let url = with_database(&server.admin_url, &name);
    TestDb { name, url }
}

struct Server {
    admin_url: String,
    template: String,
    /// Closing this (at process exit) tells the watchdog to stop the cluster.
    _watchdog: Option<Mutex<ChildStdin>>,
    /// Holds this process's owner lock until it exits.
    _owner: Option<Mutex<PgConnection>>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (admin_url, watchdog) = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => (url, None),
            _ => {
                let (url, stdin) = start_cluster();
                (url, Some(Mutex::new(stdin)))
            }
        };
        let mut server = Server {
            admin_url,
            template: String::new(),
            _watchdog: watchdog,
            _owner: None,
        };
        server._owner = Some(Mutex::new(own_databases(&server)));
        drop_leftovers(&mut admin_conn(&server));
        server.template = migrated_template(&server);
        server
    })
}

fn admin_conn(server: &Server) -> PgConnection {
    PgConnection::establish(&server.admin_url).unwrap_or_else(|e| {
        panic!(
            "connecting to the test server ({}): {e}",
            redact(&server.admin_url)
        )
    })
}

/// The advisory lock class whose lock `(OWNER_LOCK, pid)` a live test
/// process holds.
const OWNER_LOCK: i32 = 7370617;

#[derive(QueryableByName)]
struct Database {
    #[diesel(sql_type = diesel::sql_types::Text)]
    datname: String,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// The test databases on the server, with the pid each is named after.
fn test_databases(admin: &mut PgConnection) -> Vec<(u32, String)> {
    diesel::sql_query(
        "SELECT datname FROM pg_database WHERE datname ~ '^outbox_test_[0-9]+_[0-9]+$'",
    )
    .load::<Database>(admin)
    .expect("listing test databases")
    .into_iter()
    .filter_map(|db| {
        let pid = db.datname.split('_').nth(2)?.parse().ok()?;
        Some((pid, db.datname))
    })
    .collect()
}

fn drop_database(admin: &mut PgConnection, name: &str) {
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(admin)
        .unwrap_or_else(|e| panic!("dropping test database {name}: {e}"));
}

/// Takes this process's owner lock on a connection kept for the life of the
/// process, then drops the databases a dead process with our pid left.
fn own_databases(server: &Server) -> PgConnection {
    let pid = std::process::id();
    let mut owner = admin_conn(server);
    // A process with our pid on another machine would hold it for good;
    // a dead one's session ends within moments of its death.
    diesel::sql_query("SET lock_timeout = '30s'")
        .execute(&mut owner)
        .expect("setting lock_timeout");
    diesel::sql_query(format!("SELECT pg_advisory_lock({OWNER_LOCK}, {pid})"))
        .execute(&mut owner)
        .unwrap_or_else(|e| panic!("another live test process uses pid {pid} on this server: {e}"));
    for (_, name) in test_databases(&mut owner)
        .into_iter()
        .filter(|(owner, _)| *owner == pid)
    {
        drop_database(&mut owner, &name);
    }
    owner
}

/// Drops the test databases of other processes that are gone (see the
/// module docs for how an owner counts as gone); returns their names.
pub fn drop_leftovers(admin: &mut PgConnection) -> Vec<String> {
    let me = std::process::id();
    let mut dropped = Vec::new();
    for (pid, name) in test_databases(admin) {
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Held while dropping, so a new process with this pid waits for the
        // drop before it creates databases under the same names.
        let free = diesel::sql_query(format!(
            "SELECT pg_try_advisory_lock({OWNER_LOCK}, {pid}) AS locked"
        ))
        .get_result::<Locked>(admin)
        .expect("trying a test process's owner lock")
        .locked;
        if free {
            drop_database(admin, &name);
            diesel::sql_query(format!("SELECT pg_advisory_unlock({OWNER_LOCK}, {pid})"))
                .execute(admin)
                .expect("releasing a test process's owner lock");
            dropped.push(name);
        }
    }
    dropped
}

/// The template database for this version of the migrations, built once
/// per server: its name carries a hash of the migration files, and it is
/// built under another name and renamed, so a crash never leaves a half
/// migrated template behind.
fn migrated_template(server: &Server) -> String {
    let name = format!("outbox_template_{:016x}", migrations_hash());
    let mut admin = admin_conn(server);
    diesel::sql_query("SELECT pg_advisory_lock(7370616)")
        .execute(&mut admin)
        .expect("locking template creation");
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let exists = diesel::sql_query(format!(
        "SELECT EXISTS (SELECT FROM pg_database WHERE datname = '{name}') AS found"
    ))
    .get_result::<Found>(&mut admin)
    .expect("looking for the template database")
    .found;
    if !exists {
        let building = format!("{name}_building_{}", std::process::id());
        let build = |admin: &mut PgConnection| -> Result<(), Box<dyn std::error::Error>> {
            diesel::sql_query(format!("DROP DATABASE IF EXISTS {building}")).execute(admin)?;
            diesel::sql_query(format!("CREATE DATABASE {building} TEMPLATE template0"))
                .execute(admin)?;
            {
                let mut conn =
                    PgConnection::establish(&with_database(&server.admin_url, &building))?;
                outbox::migrate(&mut conn)?;
            }
            diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {name}"))
                .execute(admin)?;
            Ok(())
        };
        build(&mut admin).unwrap_or_else(|e| panic!("building template database: {e}"));
    }
    let _ = diesel::sql_query("SELECT pg_advisory_unlock(7370616)").execute(&mut admin);
    name
}

fn migrations_hash() -> u64 {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<PathBuf> = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).expect("reading migrations/") {
            let path = entry.expect("reading migrations/").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    // FNV-1a: stable across Rust versions, unlike std's DefaultHasher, so a
    // toolchain upgrade does not build a new template.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        let name = file
            .strip_prefix(&dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for byte in name.bytes().chain(std::fs::read(&file).unwrap()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// `url` with its user replaced by `user` (and no password).
pub fn with_user(url: &str, user: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{}{user}@{host}", &url[..scheme_end])
}

/// A connection to the server's administrative database.
pub fn admin() -> PgConnection {
    admin_conn(server())
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Starts a throwaway cluster; returns its admin URL and the watchdog's
/// stdin, whose closing stops the cluster and removes its files.
fn start_cluster() -> (String, ChildStdin) {
    let bin = postgres_bindir().unwrap_or_else(|| {
        panic!(
            "DATABASE_URL is not set and no PostgreSQL installation was found \
             (looked at $PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin and $PATH for \
             initdb and pg_ctl). Install the PostgreSQL server (e.g. `apt-get install postgresql`) \
             or set DATABASE_URL to a server where this user may CREATE DATABASE."
        )
    });
    let owner = cluster_owner();
    let root = std::env::temp_dir().join(format!(
        "outbox-pg-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    std::fs::create_dir_all(&root).expect("creating the cluster directory");
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&root, Some(uid), Some(gid)).expect("chown cluster directory");
    }
    let data = root.join("data");
    // Unix socket only, in a directory only the cluster's owner (and root)
    // can enter: trust authentication then trusts nobody else on the machine.
    let port = 5432;
    let options = format!(
        "-p {port} -k {} -c listen_addresses='' -c unix_socket_permissions=0700 \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
        root.display()
    );
    // One supervisor does everything: initdb, start, then wait for this
    // process to go away (EOF on stdin), stop, remove. Being sequential,
    // a death of this process at any point (even mid-initdb) still ends
    // with the cluster stopped and removed; being in its own process group
    // and ignoring INT/TERM/HUP, a Ctrl-C or a signal to our group does
    // not kill it before it has cleaned up.
    let script = r#"trap '' INT TERM HUP QUIT PIPE
bin=$1 data=$2 root=$3 opts=$4
cleanup() { "$bin/pg_ctl" -D "$data" stop -m immediate >/dev/null 2>&1; rm -rf "$root"; }
if ! "$bin/initdb" -U postgres -A trust -E UTF8 --locale=C --no-sync -D "$data" >"$root/initdb.log" 2>&1; then
  echo "initdb failed: $(cat "$root/initdb.log")"; rm -rf "$root"; exit 1
fi
if ! "$bin/pg_ctl" -w -t 60 -l "$root/server.log" -D "$data" -o "$opts" start >/dev/null 2>&1; then
  echo "pg_ctl start failed: $(cat "$root/server.log")"; cleanup; exit 1
fi
echo ready
read _ignored
cleanup"#;
    let (stdin, _stdout) = start_supervisor(
        script,
        "outbox-pg-watchdog",
        [bin.as_path(), data.as_path(), root.as_path()],
        &options,
        owner,
        "starting the throwaway cluster",
    );
    let socket_dir = root.display().to_string().replace('/', "%2F");
    (
        format!("postgres://postgres@{socket_dir}:{port}/postgres"),
        stdin,
    )
}

/// Runs `script` under `sh` (arguments: the PostgreSQL bin, data and root
/// directories, then the server `options`) as the supervisor of a cluster:
/// in `root`, in its own process group (a Ctrl-C to ours does not reach
/// it), as the cluster's `owner`, never waited for (it must outlive this
/// process to clean up after it). Its first line must be `ready`; returns
/// its stdin and the rest of its stdout.
pub fn start_supervisor(
    script: &str,
    name: &str,
    [bin, data, root]: [&Path; 3],
    options: &str,
    owner: Option<(u32, u32)>,
    what: &str,
) -> (ChildStdin, std::io::BufReader<std::process::ChildStdout>) {
    let mut supervisor = Command::new("sh");
    supervisor
        .args(["-c", script, name])
        .arg(bin)
        .arg(data)
        .arg(root)
        .arg(options)
        .current_dir(root)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = owner {
        supervisor.uid(uid).gid(gid);
    }
    #[allow(clippy::zombie_processes)]
    let mut child = supervisor
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawning its supervisor: {e}"));
    let stdin = child.stdin.take().expect("supervisor stdin");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("supervisor stdout"));
    let mut status = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut status)
        .unwrap_or_else(|e| panic!("{what}: reading its supervisor's status: {e}"));
    assert!(status.trim() == "ready", "{what}: {status}");
    (stdin, stdout)
}

/// PostgreSQL refuses to run as root: when we are root, the cluster runs as
/// the `postgres` user (or `nobody`).
pub fn cluster_owner() -> Option<(u32, u32)> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok()?;
    if uid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == wanted {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Some((uid, gid));
                }
            }
        }
    }
    panic!(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL"
    );
}

pub fn postgres_bindir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        candidates.push(dir.into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort_by_key(|p| {
            std::cmp::Reverse(
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0),
            )
        });
        candidates.extend(versions);
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.into_iter().find(|dir| has_tools(dir))
}

#[cfg(test)]
mod leftovers {
    use super::*;

    /// A database named as if test process `pid` had left it; dropped by
    /// the returned value in case `drop_leftovers` keeps it.
    fn leftover(admin: &mut PgConnection, pid: u32) -> TestDb {
        let name = format!("outbox_test_{pid}_0");
        diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE template0"))
            .execute(admin)
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        let url = with_database(&server().admin_url, &name);
        TestDb { name, url }
    }

    fn exists(admin: &mut PgConnection, db: &TestDb) -> bool {
        test_databases(admin)
            .iter()
            .any(|(_, name)| name == db.name())
    }

    /// The pid of a process that has exited and been reaped.
    fn exited_pid() -> u32 {
        let mut child = Command::new("true").spawn().expect("running `true`");
        child.wait().expect("waiting for `true`");
        child.id()
    }

    fn owner_lock(conn: &mut PgConnection, function: &str, pid: u32) {
        diesel::sql_query(format!("SELECT {function}({OWNER_LOCK}, {pid})"))
            .execute(conn)
            .unwrap_or_else(|e| panic!("{function} for pid {pid}: {e}"));
    }

    #[test]
    fn leftovers_are_dropped_once_their_process_is_gone_here_and_on_the_server() {
        let mut admin = admin();
        // Gone: no process, no owner lock.
        let dead = leftover(&mut admin, exited_pid());
        // Alive here: a running process (not a test binary, and without the
        // owner lock, like a test binary built before the lock existed).
        let mut cat = Command::new("cat")
            .stdin(Stdio::piped())
            .spawn()
            .expect("running `cat`");
        let running = leftover(&mut admin, cat.id());
        // Alive elsewhere: no such process here, but a session holds its
        // owner lock, as a test process on another machine would.
        let remote_pid = exited_pid();
        let mut remote = super::admin();
        owner_lock(&mut remote, "pg_advisory_lock", remote_pid);
        let elsewhere = leftover(&mut admin, remote_pid);

        let dropped = drop_leftovers(&mut admin);
        assert!(!exists(&mut admin, &dead), "{} is still there", dead.name());
        assert!(
            exists(&mut admin, &running),
            "{} was dropped",
            running.name()
        );
        assert!(
            exists(&mut admin, &elsewhere),
            "{} was dropped",
            elsewhere.name()
        );
        assert!(!dropped
            .iter()
            .any(|n| n == running.name() || n == elsewhere.name()));

        // Once both owners are gone, the next cleanup drops theirs too.
        drop(cat.stdin.take());
        cat.wait().expect("waiting for `cat`");
        owner_lock(&mut remote, "pg_advisory_unlock", remote_pid);
        drop_leftovers(&mut admin);
        assert!(
            !exists(&mut admin, &running),
            "{} is still there",
            running.name()
        );
        assert!(
            !exists(&mut admin, &elsewhere),
            "{} is still there",
            elsewhere.name()
        );
    }
}
