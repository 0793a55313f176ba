//! A PostgreSQL cluster of the test's own, whatever `DATABASE_URL` says:
//! for tests that crash and restart the server, which they must never do to
//! a shared one.
//!
//! Needs the test bed next to it as module `pg` (it finds the PostgreSQL
//! installation and the user to run it as the same way).
//!
//! Like the test bed's cluster, it is run by a `sh` supervisor in its own
//! process group, as the cluster's owner, listening on a unix socket in a
//! directory only that owner can enter. The supervisor also takes commands
//! on its stdin (`restart`), so a restart runs as the owner too; when this
//! process goes away, however it dies, the supervisor reads EOF, stops the
//! cluster and removes its files.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::Mutex;

use super::pg::{cluster_owner, postgres_bindir, start_supervisor};

/// A running private cluster; stopped and removed when dropped.
pub struct Cluster {
    url: String,
    /// The supervisor's stdin (commands) and stdout (one reply per command).
    control: Mutex<Option<(ChildStdin, BufReader<ChildStdout>)>>,
}

/// The supervisor. Sequential, so a death of the test at any point (even
/// mid-initdb) still ends with the cluster stopped and removed; it ignores
/// INT/TERM/HUP so that a Ctrl-C to the test's group does not kill it before
/// it has cleaned up.
const SUPERVISOR: &str = r#"trap '' INT TERM HUP QUIT PIPE
bin=$1 data=$2 root=$3 opts=$4
cleanup() { "$bin/pg_ctl" -D "$data" stop -m immediate >/dev/null 2>&1; rm -rf "$root"; }
if ! "$bin/initdb" -U postgres -A trust -E UTF8 --locale=C --no-sync -D "$data" >"$root/initdb.log" 2>&1; then
  echo "initdb failed: $(tr '\n' ' ' <"$root/initdb.log")"; rm -rf "$root"; exit 1
fi
if ! "$bin/pg_ctl" -w -t 60 -l "$root/server.log" -D "$data" -o "$opts" start >/dev/null 2>&1; then
  echo "pg_ctl start failed: $(tail -n 5 "$root/server.log" | tr '\n' ' ')"; cleanup; exit 1
fi
echo ready
while read -r command; do
  case $command in
    restart)
      if "$bin/pg_ctl" -w -t 60 -l "$root/server.log" -D "$data" -o "$opts" restart -m immediate >/dev/null 2>&1; then
        echo restarted
      else
        echo "restart failed: $(tail -n 5 "$root/server.log" | tr '\n' ' ')"
      fi ;;
    *) echo "unknown command: $command" ;;
  esac
done
cleanup"#;

impl Cluster {
    /// Creates and starts a cluster; panics with the reason if it cannot.
    pub fn start() -> Cluster {
        let bin = postgres_bindir().expect(
            "no PostgreSQL installation found (initdb and pg_ctl; see tests/support/pg.rs)",
        );
        let owner = cluster_owner();
        let root = std::env::temp_dir().join(format!(
            "outbox-private-pg-{}-{}",
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
        // Unix socket only, in a directory only the owner (and root) can
        // enter, so trust authentication trusts nobody else on the machine.
        // fsync and full-page writes are off because only the server
        // process is ever crashed, never the machine: what was written to
        // the OS survives. synchronous_commit stays ON: with it off, an
        // immediate restart loses commits the client was told about, and
        // the tests built on this cluster count exactly those.
        let options = format!(
            "-p 5432 -k {} -c listen_addresses='' -c unix_socket_permissions=0700 \
             -c fsync=off -c full_page_writes=off -c max_connections=200",
            root.display()
        );
        let (stdin, stdout) = start_supervisor(
            SUPERVISOR,
            "outbox-private-pg",
            [bin.as_path(), data.as_path(), root.as_path()],
            &options,
            owner,
            "starting the private cluster",
        );
        let socket_dir = root.display().to_string().replace('/', "%2F");
        Cluster {
            url: format!("postgres://postgres@{socket_dir}:5432/postgres"),
            control: Mutex::new(Some((stdin, stdout))),
        }
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with an `application_name`, so that the connections made
    /// with it can be found (and terminated) in `pg_stat_activity`.
    pub fn url_named(&self, application_name: &str) -> String {
        format!("{}?application_name={application_name}", self.url)
    }

    /// `pg_ctl restart -m immediate`: every backend dies at once without a
    /// checkpoint (as in a crash) and the server recovers from its WAL.
    /// Returns when the server accepts connections again.
    pub fn restart_immediate(&self) {
        let mut control = self.control.lock().unwrap();
        let (stdin, stdout) = control.as_mut().expect("cluster stopped");
        writeln!(stdin, "restart").expect("asking the supervisor to restart");
        let mut reply = String::new();
        stdout
            .read_line(&mut reply)
            .expect("reading the supervisor's reply");
        assert_eq!(reply.trim(), "restarted", "restarting the private cluster");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // EOF on its stdin makes the supervisor stop and remove the
        // cluster; waiting for its stdout to close makes that synchronous,
        // so the next test starts on a quiet machine.
        let control = self
            .control
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((stdin, mut stdout)) = control.take() {
            drop(stdin);
            let _ = std::io::Read::read_to_end(&mut stdout, &mut Vec::new());
        }
    }
}
