//! Relay processes: the real `outbox relay` binary serving one named
//! subscription, delivering to the recording receiver, each tagged with a
//! `chaos-relay: <subscription>/<slot>.<generation>` header so every
//! attempt says which process made it.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `application_name` of every relay connection: what
/// `pg_terminate_backend` picks them out by.
pub const APPLICATION_NAME: &str = "outbox-chaos-relay";

/// How the relays run; see the flags in docs/cli.md.
pub struct Settings {
    pub database_url: String,
    /// The subscription they serve (every topic).
    pub subscription: String,
    pub webhook_url: String,
    pub workers: usize,
    pub batch_size: u32,
    pub lease: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

pub struct Relays {
    settings: Settings,
    slots: Vec<Child>,
    generations: Vec<u32>,
    logs: PathBuf,
}

impl Relays {
    /// Starts `count` relays; their logs (warnings and up) go to files in
    /// `logs`, shown when one dies on its own.
    pub fn start(count: usize, settings: Settings, logs: PathBuf) -> Relays {
        std::fs::create_dir_all(&logs).unwrap();
        let mut relays = Relays {
            settings,
            slots: Vec::new(),
            generations: vec![0; count],
            logs,
        };
        for slot in 0..count {
            let child = relays.spawn(slot);
            relays.slots.push(child);
        }
        relays
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The label of the process now in `slot`, as its header carries it.
    pub fn label(&self, slot: usize) -> String {
        format!(
            "{}/{slot}.{}",
            self.settings.subscription, self.generations[slot]
        )
    }

    fn log_path(&self, slot: usize) -> PathBuf {
        self.logs
            .join(format!("relay-{}-{slot}.log", self.settings.subscription))
    }

    fn spawn(&self, slot: usize) -> Child {
        let s = &self.settings;
        let human = |d: Duration| humantime::format_duration(d).to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(slot))
            .unwrap();
        let parent = std::process::id();
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
        command
            .args(["relay", "--sink", "webhook", "--url", &s.webhook_url])
            .args(["--subscription", &s.subscription, "--topic", "*"])
            .args(["--header", &format!("chaos-relay={}", self.label(slot))])
            .args(["--workers", &s.workers.to_string()])
            .args(["--batch-size", &s.batch_size.to_string()])
            .args(["--poll-interval", "100ms", "--timeout", "2s"])
            .args(["--lease", &human(s.lease)])
            .args(["--backoff-initial", &human(s.backoff_initial)])
            .args(["--backoff-max", &human(s.backoff_max)])
            .env("DATABASE_URL", &s.database_url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (prctl, getppid, _exit). A relay must not outlive the test, even
        // one killed with SIGKILL: it would retry against a vanished
        // cluster forever. PR_SET_PDEATHSIG fires when the spawning thread
        // ends, which is why the test spawns every relay from its own
        // thread; the getppid check covers a parent that died before prctl.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        command.spawn().expect("starting `outbox relay`")
    }

    /// `kill -9` the relay in `slot` and start a new one in its place;
    /// returns the label of the killed process.
    pub fn kill_and_restart(&mut self, slot: usize) -> String {
        let killed = self.label(slot);
        let child = &mut self.slots[slot];
        child.kill().expect("kill -9");
        child.wait().expect("reaping a killed relay");
        self.generations[slot] += 1;
        self.slots[slot] = self.spawn(slot);
        killed
    }

    /// Panics, with its log, if a relay exited on its own: a relay must
    /// survive a lost connection or a restarted database.
    pub fn assert_alive(&mut self) {
        for slot in 0..self.slots.len() {
            if let Some(status) = self.slots[slot].try_wait().unwrap() {
                let log = std::fs::read_to_string(self.log_path(slot)).unwrap_or_default();
                panic!(
                    "relay {} exited on its own ({status}); its log:\n{log}",
                    self.label(slot)
                );
            }
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for child in &mut self.slots {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
