//! Publishers: threads writing events the way an application does, through
//! `outbox::transaction`, each next to a business row in the same
//! transaction (`chaos_published`), which is how a publisher that lost its
//! connection mid-commit learns whether the event exists.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text};
use outbox::NewEvent;

pub const TOPIC: &str = "chaos.event";

/// An event the database confirmed (its business row exists).
#[derive(Clone, Debug)]
pub struct Published {
    pub id: i64,
    pub key: String,
    pub seq: u32,
    pub poison: bool,
}

/// What to publish, and how fast.
#[derive(Clone, Copy)]
pub struct Plan {
    pub threads: usize,
    pub keys: usize,
    pub per_key: u32,
    /// Every `poison_stride`th event (in the global order seq × keys + key)
    /// is poison.
    pub poison_stride: u64,
    /// Spread the events over about this long, so the chaos happens while
    /// events are still arriving; slower if the machine cannot keep up.
    pub spread: Duration,
}

impl Plan {
    pub fn events(&self) -> u64 {
        self.keys as u64 * u64::from(self.per_key)
    }

    fn poison(&self, key: usize, seq: u32) -> bool {
        (u64::from(seq) * self.keys as u64 + key as u64) % self.poison_stride == 0
    }
}

pub fn create_table(conn: &mut PgConnection) {
    diesel::sql_query(
        "CREATE TABLE chaos_published (
             key text NOT NULL,
             seq integer NOT NULL,
             event_id bigint NOT NULL,
             poison boolean NOT NULL,
             PRIMARY KEY (key, seq))",
    )
    .execute(conn)
    .expect("creating chaos_published");
}

/// Publishes the plan from `plan.threads` threads. Key `k` belongs to
/// thread `k % threads` alone, which publishes its events one transaction
/// at a time, so within a key publish order is commit order is id order.
/// (Two transactions of one key committing concurrently could commit out
/// of id order, and the crate documents per-key order only for events
/// written in sequence; that is not what this run tests.) Returns every
/// published event, how many transactions failed (and were retried), and
/// how many of those failures were ambiguous (the connection died around
/// the commit, and the business row said it had committed).
pub fn publish(url: &str, plan: Plan) -> (Vec<Published>, u32, u32) {
    let threads: Vec<_> = (0..plan.threads)
        .map(|thread| {
            let url = url.to_owned();
            std::thread::spawn(move || publish_thread(&url, plan, thread))
        })
        .collect();
    let (mut all, mut failed, mut ambiguous) = (Vec::new(), 0, 0);
    for thread in threads {
        let (published, failures, unsure) = thread.join().expect("a publisher panicked");
        all.extend(published);
        failed += failures;
        ambiguous += unsure;
    }
    (all, failed, ambiguous)
}

fn publish_thread(url: &str, plan: Plan, thread: usize) -> (Vec<Published>, u32, u32) {
    let keys: Vec<usize> = (thread..plan.keys).step_by(plan.threads).collect();
    let total = keys.len() as u32 * plan.per_key;
    let pace = plan.spread.checked_div(total.max(1)).unwrap_or_default();
    let started = Instant::now();
    let mut conn = connect(url);
    let mut published = Vec::with_capacity(total as usize);
    let (mut failed, mut ambiguous) = (0, 0);
    for seq in 0..plan.per_key {
        for &key in &keys {
            let due = started + pace * published.len() as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let key_name = format!("key-{key:03}");
            let poison = plan.poison(key, seq);
            let mut failures = 0;
            let id = loop {
                let error = match publish_one(&mut conn, &key_name, seq, poison) {
                    Ok(id) => break id,
                    Err(error) => error,
                };
                failures += 1;
                failed += 1;
                assert!(failures < 100, "publishing keeps failing: {error}");
                // The server restarted or dropped us: did the commit
                // happen? The business row says, atomically.
                conn = connect(url);
                match committed_id(&mut conn, &key_name, seq) {
                    Ok(Some(id)) => {
                        ambiguous += 1;
                        break id;
                    }
                    Ok(None) => {}
                    // Lost again before it could look: publish again on a
                    // fresh connection. Safe: if the first try did commit,
                    // its business row's primary key makes this one fail
                    // (and roll back its event), and the next look finds it.
                    Err(_) => conn = connect(url),
                }
            };
            published.push(Published {
                id,
                key: key_name,
                seq,
                poison,
            });
        }
    }
    (published, failed, ambiguous)
}

fn publish_one(
    conn: &mut PgConnection,
    key: &str,
    seq: u32,
    poison: bool,
) -> Result<i64, diesel::result::Error> {
    outbox::transaction(conn, |tx| {
        let id = tx.publish_event(
            NewEvent::dynamic(
                TOPIC,
                serde_json::json!({ "key": key, "seq": seq, "poison": poison }),
            )
            .key(key),
        )?;
        diesel::sql_query(
            "INSERT INTO chaos_published (key, seq, event_id, poison) VALUES ($1, $2, $3, $4)",
        )
        .bind::<Text, _>(key)
        .bind::<Integer, _>(seq as i32)
        .bind::<BigInt, _>(id.0)
        .bind::<Bool, _>(poison)
        .execute(tx.conn())?;
        Ok(id.0)
    })
}

fn committed_id(conn: &mut PgConnection, key: &str, seq: u32) -> QueryResult<Option<i64>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        event_id: i64,
    }
    diesel::sql_query("SELECT event_id FROM chaos_published WHERE key = $1 AND seq = $2")
        .bind::<Text, _>(key)
        .bind::<Integer, _>(seq as i32)
        .get_result::<Row>(conn)
        .optional()
        .map(|row| row.map(|r| r.event_id))
}

/// A connection, retried while the server restarts (up to a minute).
pub fn connect(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match PgConnection::establish(url) {
            Ok(conn) => return conn,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("connecting to the private cluster: {e}"),
        }
    }
}
