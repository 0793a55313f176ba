//! Relays in separate processes share one database: each event is
//! delivered once when nothing fails, and all are delivered when a relay
//! process is killed with SIGKILL mid-run.
//!
//! The relay processes are this test binary run again in "child" mode
//! (`relay_child_process` below with `OUTBOX_TEST_CHILD_DB` set). A child
//! prints `delivered <id>` on stdout for each delivery and runs until its
//! stdin closes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use outbox::EventId;

use crate::common::{count, pending};
use crate::relay_support::{setup, PATIENCE};

const CHILD_ENV: &str = "OUTBOX_TEST_CHILD_DB";

/// Child mode: a relay process. A no-op in a normal test run.
#[test]
fn relay_child_process() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let pool = diesel::r2d2::Pool::builder()
        .max_size(4)
        .build_unchecked(diesel::r2d2::ConnectionManager::new(url.clone()));
    let relay = outbox::Relay::builder(pool)
        .listen(url)
        .workers(2)
        .batch_size(50)
        .lease_duration(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(100))
        .route("*", |event: &outbox::StoredEvent| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "delivered {}", event.id)?;
            out.flush()?;
            Ok(())
        })
        .start()
        .unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    relay.shutdown(PATIENCE).unwrap();
}

struct ChildRelay {
    child: Child,
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

/// Starts a relay process whose deliveries arrive on `deliveries` as
/// (child index, event id).
fn spawn_relay(
    url: &str,
    index: usize,
    deliveries: &crossbeam_channel::Sender<(usize, EventId)>,
) -> ChildRelay {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "relay_processes::relay_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let deliveries = deliveries.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The test harness may print its own words before the first line.
            if let Some(at) = line.find("delivered ") {
                let id = line[at + "delivered ".len()..].trim().parse().unwrap();
                let _ = deliveries.send((index, EventId(id)));
            }
        }
    });
    ChildRelay { child }
}

/// Collects deliveries until every id in `ids` was delivered at least once.
fn collect_until_all(
    deliveries: &Receiver<(usize, EventId)>,
    ids: &[EventId],
) -> Vec<(usize, EventId)> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen: Vec<(usize, EventId)> = Vec::new();
    let mut missing: std::collections::HashSet<EventId> = ids.iter().copied().collect();
    while !missing.is_empty() {
        match deliveries.recv_deadline(deadline) {
            Ok((index, id)) => {
                missing.remove(&id);
                seen.push((index, id));
            }
            Err(_) => panic!(
                "{} events never delivered, e.g. {:?}",
                missing.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            ),
        }
    }
    seen
}

fn publish_bulk(bed: &crate::relay_support::RelayBed, n: usize) -> Vec<EventId> {
    let mut conn = bed.conn();
    outbox::transaction(&mut conn, |tx| {
        tx.publish_events((0..n).map(|i| outbox::NewEvent::dynamic("bulk", serde_json::json!(i))))
    })
    .unwrap()
}

#[test]
fn separate_relay_processes_deliver_each_event_exactly_once() {
    let bed = setup();
    let (tx, rx) = unbounded();
    let children: Vec<ChildRelay> = (0..3).map(|i| spawn_relay(bed.db.url(), i, &tx)).collect();
    let ids = publish_bulk(&bed, 2_000);
    let seen = collect_until_all(&rx, &ids);
    drop(children); // graceful: stdin closes, each relay shuts down and settles
    let extra: Vec<_> = rx.try_iter().collect();
    let mut per_id: HashMap<EventId, usize> = HashMap::new();
    for (_, id) in seen.iter().chain(&extra) {
        *per_id.entry(*id).or_default() += 1;
    }
    let duplicates: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "delivered twice with nothing failing: {duplicates:?}"
    );
    let workers: std::collections::HashSet<usize> = seen.iter().map(|(i, _)| *i).collect();
    assert!(
        workers.len() >= 2,
        "one process did all the work: {workers:?}"
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn killing_a_relay_process_loses_nothing() {
    let bed = setup();
    let (tx, rx) = unbounded();
    let mut children: Vec<ChildRelay> = (0..2).map(|i| spawn_relay(bed.db.url(), i, &tx)).collect();
    let ids = publish_bulk(&bed, 3_000);
    // Kill relay 0 with SIGKILL as soon as it has delivered something.
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let (index, id) = rx
            .recv_deadline(deadline)
            .expect("no delivery from relay 0");
        seen.push((index, id));
        if index == 0 {
            break;
        }
    }
    children[0].child.kill().unwrap();
    children[0].child.wait().unwrap();
    let remaining: Vec<EventId> = ids
        .iter()
        .filter(|id| !seen.iter().any(|(_, s)| s == *id))
        .copied()
        .collect();
    seen.extend(collect_until_all(&rx, &remaining));
    // The killed relay printed deliveries it never settled: those events are
    // still queued, and come due again when its lease (2 s) expires. Wait
    // until the survivor has delivered and settled them (the duplicates),
    // looking at the queue after each delivery and at least every 100 ms.
    let unsettled: Vec<EventId> = outbox::queued_events(&mut bed.conn(), 10_000)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let deadline = Instant::now() + PATIENCE;
    let mut conn = bed.conn();
    while pending(&mut conn) > 0 {
        assert!(
            Instant::now() < deadline,
            "events still queued: {unsettled:?}"
        );
        if let Ok(delivery) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(delivery);
        }
    }
    drop(children);
    seen.extend(rx.try_iter());

    let mut per_id: HashMap<EventId, usize> = HashMap::new();
    for (_, id) in &seen {
        *per_id.entry(*id).or_default() += 1;
    }
    let mut delivered: Vec<EventId> = per_id.keys().copied().collect();
    delivered.sort();
    assert_eq!(delivered, ids, "every event delivered at least once");
    // Duplicates are exactly the events the killed relay had delivered but
    // not settled: at most one batch per worker (2 × 50).
    let duplicates = per_id.values().filter(|n| **n > 1).count();
    assert!(duplicates <= 100, "{duplicates} duplicates");
    assert!(unsettled.iter().all(|id| per_id[id] >= 1));
    eprintln!(
        "killing a relay process: {} events, {duplicates} delivered twice",
        ids.len()
    );
    assert_eq!(pending(&mut bed.conn()), 0);
    assert_eq!(count(&mut bed.conn(), "outbox.dead_letters"), 0);
}
