//! The chaos run: publishers, three subscriptions of the same events, each
//! served by two relay processes into its own failing receiver, and a
//! schedule of kills, backend terminations and a server crash; then, for
//! each subscription, an exact account of what was delivered, what died
//! and what came twice.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};

use crate::audit::{account_for_duplicates, assert_first_deliveries_in_publish_order, Disruption};
use crate::cluster::Cluster;
use crate::publisher::{self, Plan};
use crate::receiver::{Receiver, POISON_REFUSAL};
use crate::relays::{Relays, Settings, APPLICATION_NAME};
use crate::{count, knob, log_dir};

/// The subscriptions: each gets every event.
const SUBSCRIPTIONS: [&str; 3] = ["alpha", "beta", "gamma"];
/// Relay processes per subscription, sharing its lanes.
pub(crate) const RELAYS: usize = 2;
pub(crate) const WORKERS: usize = 2;
pub(crate) const BATCH: u32 = 50;
/// Short, so a killed relay's events come back within the run.
pub(crate) const LEASE: Duration = Duration::from_secs(3);
/// Short, so that a key blocked behind a 503 moves on quickly: with 20%
/// failures each of the 100 events of a key fails about 0.25 times.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[test]
fn chaos_loses_nothing() {
    let _alone = crate::one_at_a_time();
    let started = Instant::now();
    let keys: usize = knob("OUTBOX_CHAOS_KEYS", 200);
    let plan = Plan {
        threads: 4,
        keys,
        per_key: (knob::<u64>("OUTBOX_CHAOS_EVENTS", 6_000) / keys as u64) as u32,
        poison_stride: 0,
        spread: Duration::from_secs(knob("OUTBOX_CHAOS_SPREAD_SECS", 25)),
    };
    let plan = Plan {
        poison_stride: (plan.events() / knob::<u64>("OUTBOX_CHAOS_POISON", 50).max(1)).max(1),
        ..plan
    };
    let fail_ratio = f64::from(knob::<u32>("OUTBOX_CHAOS_FAIL_PERCENT", 20)) / 100.0;
    let min_kills: u32 = knob("OUTBOX_CHAOS_KILLS", 10);
    let kill_every = Duration::from_millis(knob("OUTBOX_CHAOS_KILL_EVERY_MS", 2_000));
    let patience = Duration::from_secs(knob("OUTBOX_CHAOS_PATIENCE_SECS", 180));

    let cluster = Cluster::start();
    {
        let mut conn = publisher::connect(cluster.url());
        outbox::migrate(&mut conn).expect("migrating the private cluster");
        publisher::create_table(&mut conn);
    }
    {
        let mut conn = publisher::connect(cluster.url());
        for name in SUBSCRIPTIONS {
            outbox::register_subscription(&mut conn, name, &["*"]).expect("registering");
        }
        outbox::remove_subscription(&mut conn, outbox::DEFAULT_SUBSCRIPTION)
            .expect("removing the default subscription");
    }
    let receivers: Vec<Receiver> = SUBSCRIPTIONS
        .iter()
        .map(|_| Receiver::start(4, fail_ratio))
        .collect();
    let logs = log_dir("chaos");
    let mut groups: Vec<Relays> = SUBSCRIPTIONS
        .iter()
        .zip(&receivers)
        .map(|(name, receiver)| {
            Relays::start(
                RELAYS,
                Settings {
                    database_url: cluster.url_named(APPLICATION_NAME),
                    subscription: (*name).to_owned(),
                    webhook_url: receiver.url(),
                    workers: WORKERS,
                    batch_size: BATCH,
                    lease: LEASE,
                    backoff_initial: BACKOFF_INITIAL,
                    backoff_max: BACKOFF_MAX,
                },
                logs.clone(),
            )
        })
        .collect();
    let publishing = {
        let url = cluster.url().to_owned();
        std::thread::spawn(move || publisher::publish(&url, plan))
    };

    // The schedule: a tick every half kill interval (the sleep is the
    // schedule, not a wait for the relays); a kill on even ticks, the
    // terminations and the crash on odd ones, so each lands while the
    // relays are busy and never in the same instant as a kill. A relay
    // started at the tick before the crash has had a whole tick to pass its
    // start-up check, which fails fast (by design) on an unreachable
    // database. It runs on this thread, which also spawns every relay (see
    // `Relays::spawn`).
    let mut disruptions: Vec<(Instant, Disruption)> = Vec::new();
    let mut monitor = publisher::connect(cluster.url());
    let (mut kills, mut terminations, mut restarts) = (0u32, 0u32, 0u32);
    let mut kills_of = [0u32; SUBSCRIPTIONS.len()];
    for tick in 1.. {
        std::thread::sleep(kill_every / 2);
        groups.iter_mut().for_each(Relays::assert_alive);
        if tick % 2 == 0 {
            let group = rand::random_range(0..groups.len());
            let slot = rand::random_range(0..groups[group].len());
            let at = Instant::now();
            let killed = groups[group].kill_and_restart(slot);
            disruptions.push((at, Disruption::Kill(killed)));
            kills += 1;
            kills_of[group] += 1;
        } else if tick == 3 || tick == 13 {
            let at = Instant::now();
            let n = terminate_relay_backends(&mut monitor);
            assert!(n > 0, "no relay connection to terminate");
            disruptions.push((at, Disruption::Terminate(n)));
            terminations += 1;
        } else if tick == 7 {
            let at = Instant::now();
            cluster.restart_immediate();
            disruptions.push((at, Disruption::Restart));
            restarts += 1;
            monitor = publisher::connect(cluster.url());
        }
        if kills >= min_kills && terminations == 2 && restarts == 1 && publishing.is_finished() {
            break;
        }
    }
    let chaos_ended = Instant::now();
    let (published, publish_failures, ambiguous) = publishing.join().expect("publishers");

    // Drain: wait for every receiver's deliveries until every non-poison
    // event came through to each, then for nothing to be owed (the last
    // settles), looking again after each further delivery or every 200 ms.
    let expected: HashSet<i64> = published
        .iter()
        .filter(|p| !p.poison)
        .map(|p| p.id)
        .collect();
    let mut missing: Vec<HashSet<i64>> = receivers.iter().map(|_| expected.clone()).collect();
    let deadline = Instant::now() + patience;
    let mut conn = publisher::connect(cluster.url());
    loop {
        let mut select = crossbeam_channel::Select::new();
        for receiver in &receivers {
            select.recv(receiver.delivered());
        }
        match select.select_timeout(Duration::from_millis(200)) {
            Ok(op) => {
                let index = op.index();
                if let Ok(id) = op.recv(receivers[index].delivered()) {
                    missing[index].remove(&id);
                }
            }
            Err(_) => groups.iter_mut().for_each(Relays::assert_alive),
        }
        if missing.iter().all(HashSet::is_empty) && count(&mut conn, "outbox.pending") == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not drained after {patience:?}: {:?} events never delivered (per subscription), {} owed",
            missing.iter().map(HashSet::len).collect::<Vec<_>>(),
            count(&mut conn, "outbox.pending")
        );
    }
    let drained = Instant::now();
    // Once the faults stop, nothing waits for a poll or a margin: the last
    // events follow within a lease (a killed relay's batch) and a few
    // seconds of work.
    let drain_bound = Duration::from_secs(knob("OUTBOX_CHAOS_DRAIN_SECS", LEASE.as_secs() + 5));
    assert!(
        drained - chaos_ended <= drain_bound,
        "drained {:?} after the faults stopped, bound {drain_bound:?}",
        drained - chaos_ended
    );
    drop(groups);

    // No key waited for a rescue: every row waiting behind an earlier event
    // of its key was woken by the settle of that event (relays warn about
    // each rescue).
    let rescues = relay_log_lines(&logs, "removed without a settle");
    assert!(
        rescues.is_empty(),
        "stranded keys were rescued: {rescues:#?}"
    );

    // Atomic publish: the business rows are exactly the confirmed events.
    let mut rows = business_rows(&mut conn);
    rows.sort_unstable();
    let mut confirmed: Vec<(String, i32, i64)> = published
        .iter()
        .map(|p| (p.key.clone(), p.seq as i32, p.id))
        .collect();
    confirmed.sort_unstable();
    assert_eq!(rows, confirmed, "business rows and published events differ");
    assert_eq!(published.len() as u64, plan.events());

    // Per subscription: zero lost, the poison (and only the poison) dead
    // with the refusal, first deliveries in publish order per key, and
    // every duplicate explained by a kill or an outage.
    let poison: HashSet<i64> = published
        .iter()
        .filter(|p| p.poison)
        .map(|p| p.id)
        .collect();
    assert_eq!(count(&mut conn, "outbox.pending"), 0);
    let dead = dead_letters(&mut conn);
    let mut summary = Vec::new();
    for (index, name) in SUBSCRIPTIONS.iter().enumerate() {
        let attempts = receivers[index].attempts();
        let delivered: HashSet<i64> = attempts
            .iter()
            .filter(|a| a.delivered())
            .map(|a| a.id)
            .collect();
        let lost: Vec<_> = expected.difference(&delivered).collect();
        assert!(
            lost.is_empty(),
            "{name}: {} events lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        assert!(
            delivered.is_disjoint(&poison),
            "{name}: a poison event was accepted"
        );
        let dead_ids: HashSet<i64> = dead
            .iter()
            .filter(|d| d.subscription == *name)
            .map(|d| d.id)
            .collect();
        assert_eq!(
            dead_ids, poison,
            "{name}: dead letters are not exactly the poison events"
        );
        assert_first_deliveries_in_publish_order(&published, &attempts);
        let duplicates = account_for_duplicates(
            &attempts,
            &disruptions,
            kills_of[index],
            terminations + restarts,
        );
        let failed = attempts.iter().filter(|a| a.status == 503).count();
        summary.push(format!(
            "{name}: {} attempts ({failed} answered 503), {} events delivered twice or more \
             ({} at a kill; {} extra deliveries)",
            attempts.len(),
            duplicates.events,
            duplicates.at_a_kill,
            duplicates.extra
        ));
    }
    for letter in &dead {
        assert!(
            letter.last_error.starts_with("permanent failure: HTTP 422")
                && letter.last_error.contains(POISON_REFUSAL),
            "dead letter {} of {} says {:?}",
            letter.id,
            letter.subscription,
            letter.last_error
        );
        assert!(letter.attempts >= 1);
    }

    let terminated: i64 = disruptions
        .iter()
        .map(|(_, d)| match d {
            Disruption::Terminate(n) => *n,
            _ => 0,
        })
        .sum();
    eprintln!(
        "chaos: {} events ({} poison) over {keys} keys, {} subscriptions; \
         {kills} kills, {terminations} terminations ({terminated} backends), {restarts} restart; \
         {}; {publish_failures} publish transactions failed and were retried \
         ({ambiguous} had committed); \
         chaos {:.1}s, drained {:.1}s later, {:.1}s in all",
        published.len(),
        poison.len(),
        SUBSCRIPTIONS.len(),
        summary.join("; "),
        (chaos_ended - started).as_secs_f64(),
        (drained - chaos_ended).as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    if std::env::var_os("OUTBOX_CHAOS_KEEP_LOGS").is_some() {
        eprintln!("relay logs kept in {}", logs.display());
    } else {
        let _ = std::fs::remove_dir_all(&logs);
    }
}

/// The lines of every relay log that contain `needle`.
fn relay_log_lines(logs: &std::path::Path, needle: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(logs).expect("reading the relay logs") {
        let text = std::fs::read_to_string(entry.expect("a relay log").path()).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter(|l| l.contains(needle))
                .map(str::to_owned),
        );
    }
    lines
}

/// `pg_terminate_backend` of every relay connection; how many there were.
fn terminate_relay_backends(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n
           FROM pg_stat_activity
          WHERE application_name = $1",
    )
    .bind::<Text, _>(APPLICATION_NAME)
    .get_result::<N>(conn)
    .expect("terminating the relay backends")
    .n
}

fn business_rows(conn: &mut PgConnection) -> Vec<(String, i32, i64)> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = Integer)]
        seq: i32,
        #[diesel(sql_type = BigInt)]
        event_id: i64,
    }
    diesel::sql_query("SELECT key, seq, event_id FROM chaos_published")
        .load::<Row>(conn)
        .expect("reading chaos_published")
        .into_iter()
        .map(|r| (r.key, r.seq, r.event_id))
        .collect()
}

#[derive(QueryableByName)]
struct DeadLetter {
    #[diesel(sql_type = Text)]
    subscription: String,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Text)]
    last_error: String,
}

fn dead_letters(conn: &mut PgConnection) -> Vec<DeadLetter> {
    diesel::sql_query("SELECT subscription, id, attempts, last_error FROM outbox.dead_letters")
        .load(conn)
        .expect("reading the dead letters")
}
