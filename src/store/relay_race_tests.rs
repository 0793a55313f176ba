//! The races of the claim / defer / settle protocol, each replayed in its
//! exact interleaving with transactions and locks the test holds (the psql
//! scenarios of issue 12, with the crate's own statements). No sleeps: a
//! step that must wait is observed waiting in `pg_stat_activity`.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer};

use super::claim::{claim, defer, Claimed, TopicFilter};
use super::pg;
use super::settle::{settle, Verdict};
use crate::event::EventId;

const LEASE: Duration = Duration::from_secs(30);

fn everything() -> TopicFilter {
    TopicFilter {
        all: true,
        ..TopicFilter::default()
    }
}

fn claim_as(conn: &mut PgConnection, relay: &str) -> Claimed {
    claim(conn, relay, 50, LEASE, &everything()).unwrap()
}

fn publish(conn: &mut PgConnection, key: &str, payload: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    diesel::sql_query(
        "INSERT INTO outbox.events (topic, key, payload) VALUES ('t', $1, $2::jsonb) RETURNING id",
    )
    .bind::<diesel::sql_types::Text, _>(key)
    .bind::<diesel::sql_types::Text, _>(payload)
    .get_result::<Id>(conn)
    .unwrap()
    .id
}

/// (deferred, due now, has a claim token) of event `id`.
fn state(conn: &mut PgConnection, id: i64) -> (bool, bool, bool) {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Bool)]
        deferred: bool,
        #[diesel(sql_type = Bool)]
        due: bool,
        #[diesel(sql_type = Bool)]
        claimed: bool,
    }
    let row: Row = diesel::sql_query(
        "SELECT deferred, available_at <= now() AS due, claim_token IS NOT NULL AS claimed
           FROM outbox.events WHERE id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result(conn)
    .unwrap();
    (row.deferred, row.due, row.claimed)
}

fn backend_pid(conn: &mut PgConnection) -> i32 {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .unwrap()
        .pid
}

/// Returns once session `pid` waits for a lock (observed, not assumed).
fn until_waiting_for_a_lock(observer: &mut PgConnection, pid: i32) {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = Bool)]
        waiting: bool,
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row: Waiting = diesel::sql_query(
            "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) AS waiting
               FROM pg_stat_activity WHERE pid = $1",
        )
        .bind::<Integer, _>(pid)
        .get_result(observer)
        .unwrap();
        if row.waiting {
            return;
        }
        assert!(Instant::now() < deadline, "session {pid} never waited");
        std::thread::yield_now();
    }
}

/// Settles one event on `settler` in a thread of its own, waits until that
/// settle is seen waiting for a lock, then commits the transaction open on
/// `holder` (which holds it) and returns what the settle settled.
fn settle_behind(
    mut settler: PgConnection,
    token: i64,
    verdict: (EventId, Verdict),
    holder: &mut PgConnection,
    observer: &mut PgConnection,
) -> Vec<EventId> {
    let pid = backend_pid(&mut settler);
    let settling = std::thread::spawn(move || settle(&mut settler, token, &[verdict]).unwrap());
    until_waiting_for_a_lock(observer, pid);
    holder.batch_execute("COMMIT").unwrap();
    settling.join().unwrap()
}

/// Scenario 1 (and 1b): the settle's DELETE waits for a deferral's
/// `FOR KEY SHARE` on the deleted event, so its snapshot cannot show the
/// deferral. The settle must still wake the successor, in its own
/// transaction: nothing after it (a second look, a sweep) is needed, so a
/// relay dying right after sending it, or losing the reply, strands nothing.
#[test]
fn a_settle_that_waited_for_a_deferral_still_wakes_the_successor() {
    let db = pg::test_db();
    let (mut r1, mut r2, mut observer) = (db.conn(), db.conn(), db.conn());
    let a = publish(&mut observer, "k", "{}");
    let held = claim_as(&mut r1, "r1");
    assert_eq!(held.rows.len(), 1);
    let b = publish(&mut observer, "k", "{}");
    let blocked = claim_as(&mut r2, "r2");
    assert_eq!(blocked.blocked, [b]);

    // R2 defers B and has not committed: it holds KEY SHARE on A.
    r2.batch_execute("BEGIN").unwrap();
    assert_eq!(defer(&mut r2, &[b]).unwrap(), 1);

    // R1 settles A; its DELETE waits for R2.
    let verdict = (EventId(a), Verdict::Delivered);
    let settled = settle_behind(r1, held.token, verdict, &mut r2, &mut observer);

    assert_eq!(settled, [EventId(a)]);
    assert_eq!(
        state(&mut observer, b),
        (false, true, false),
        "B must be due and no longer deferred"
    );
}

/// The same race when the settle dead-letters an unreadable event (a row
/// the relay could not even parse): the keys come from the DELETE itself.
#[test]
fn dead_lettering_an_unreadable_event_wakes_its_successor_too() {
    let db = pg::test_db();
    let (mut r1, mut r2, mut observer) = (db.conn(), db.conn(), db.conn());
    // Valid jsonb that serde_json refuses to read.
    let a = publish(&mut observer, "k", "[1e400]");
    let mut held = claim_as(&mut r1, "r1");
    assert!(held.rows.remove(0).into_event().1.is_some());
    let b = publish(&mut observer, "k", "{}");
    assert_eq!(claim_as(&mut r2, "r2").blocked, [b]);
    r2.batch_execute("BEGIN").unwrap();
    assert_eq!(defer(&mut r2, &[b]).unwrap(), 1);

    let dead = Verdict::Dead {
        error: "unreadable event".into(),
    };
    let settled = settle_behind(r1, held.token, (EventId(a), dead), &mut r2, &mut observer);

    assert_eq!(settled, [EventId(a)]);
    assert_eq!(state(&mut observer, b), (false, true, false));
}

/// Scenario 2: a claim in progress holds B (`FOR UPDATE` in its window).
/// A defer of B must not wait for it: the deferring relay has a batch
/// waiting for delivery whose lease is running. It skips B instead.
#[test]
fn a_defer_never_waits_for_a_claim_that_holds_its_event() {
    let db = pg::test_db();
    let (mut r1, mut r2, mut r3) = (db.conn(), db.conn(), db.conn());
    publish(&mut r1, "k", "{}");
    claim_as(&mut r1, "r1");
    let b = publish(&mut r1, "k", "{}");
    assert_eq!(claim_as(&mut r2, "r2").blocked, [b]);

    r3.batch_execute("BEGIN").unwrap();
    diesel::sql_query("SELECT id FROM outbox.events WHERE id = $1 FOR UPDATE")
        .bind::<BigInt, _>(b)
        .execute(&mut r3)
        .unwrap();
    // Waiting would hit the timeout and fail the defer.
    r2.batch_execute("SET lock_timeout = '5s'").unwrap();
    assert_eq!(defer(&mut r2, &[b]).unwrap(), 0);
    r3.batch_execute("ROLLBACK").unwrap();
    assert_eq!(state(&mut r1, b), (false, true, false));
}

/// A defer is fenced: an event another relay claimed after this relay saw
/// it blocked is left as that relay holds it.
#[test]
fn a_defer_leaves_alone_an_event_another_relay_claimed_since() {
    let db = pg::test_db();
    let (mut r1, mut r2, mut r3) = (db.conn(), db.conn(), db.conn());
    let a = publish(&mut r1, "k", "{}");
    let held = claim_as(&mut r1, "r1");
    let b = publish(&mut r1, "k", "{}");
    assert_eq!(claim_as(&mut r2, "r2").blocked, [b]);
    // Before R2 defers B, A is delivered and R3 claims B.
    settle(&mut r1, held.token, &[(EventId(a), Verdict::Delivered)]).unwrap();
    let taken = claim_as(&mut r3, "r3");
    assert_eq!(taken.rows.len(), 1);

    assert_eq!(defer(&mut r2, &[b]).unwrap(), 0);
    assert_eq!(
        state(&mut r1, b),
        (false, false, true),
        "B is R3's, in flight"
    );
    let settled = settle(&mut r3, taken.token, &[(EventId(b), Verdict::Delivered)]).unwrap();
    assert_eq!(settled, [EventId(b)]);
}

/// A predecessor locked by someone's own long transaction: the defer
/// cannot lock it, so it sets the event aside for a moment (not flagged
/// deferred) and the next claims do not read it again at once: no spin.
#[test]
fn a_defer_that_cannot_lock_the_predecessor_sets_the_event_aside() {
    let db = pg::test_db();
    let (mut relay, mut operator) = (db.conn(), db.conn());
    let a = publish(&mut relay, "k", "{}");
    let b = publish(&mut relay, "k", "{}");
    operator.batch_execute("BEGIN").unwrap();
    diesel::sql_query("SELECT id FROM outbox.events WHERE id = $1 FOR UPDATE")
        .bind::<BigInt, _>(a)
        .execute(&mut operator)
        .unwrap();

    let first = claim_as(&mut relay, "r");
    assert!(first.rows.is_empty(), "A is locked, B is blocked");
    assert_eq!(first.blocked, [b]);
    assert_eq!(defer(&mut relay, &[b]).unwrap(), 1);
    assert_eq!(state(&mut relay, b), (false, false, false), "set aside");
    let again = claim_as(&mut relay, "r");
    assert!(again.rows.is_empty() && again.blocked.is_empty());
    operator.batch_execute("ROLLBACK").unwrap();
}

/// A defer never defers behind nothing: an event whose earlier events are
/// gone by the time of the defer stays due.
#[test]
fn a_defer_after_the_predecessor_is_gone_leaves_the_event_due() {
    let db = pg::test_db();
    let (mut r1, mut r2) = (db.conn(), db.conn());
    let a = publish(&mut r1, "k", "{}");
    let held = claim_as(&mut r1, "r1");
    let b = publish(&mut r1, "k", "{}");
    assert_eq!(claim_as(&mut r2, "r2").blocked, [b]);
    settle(&mut r1, held.token, &[(EventId(a), Verdict::Delivered)]).unwrap();
    assert_eq!(defer(&mut r2, &[b]).unwrap(), 0);
    assert_eq!(state(&mut r2, b), (false, true, false));
}

/// A dead letter of a key replayed (same, lower id) while a later event of
/// the key is in flight: it must wait, so that at most one event of a key
/// is in flight, then follow once that event is settled.
#[test]
fn a_replayed_dead_letter_waits_while_a_later_event_of_its_key_is_in_flight() {
    let db = pg::test_db();
    let (mut r1, mut r2) = (db.conn(), db.conn());
    let a = publish(&mut r1, "k", "{}");
    let first = claim_as(&mut r1, "r1");
    let dead = Verdict::Dead {
        error: "refused".into(),
    };
    settle(&mut r1, first.token, &[(EventId(a), dead)]).unwrap();
    let b = publish(&mut r1, "k", "{}");
    let held = claim_as(&mut r1, "r1");
    assert_eq!(held.rows.len(), 1, "B in flight");

    let replayed = crate::replay_dead_letters(
        &mut r2,
        &crate::Selection::Ids(vec![EventId(a)]),
        10,
        |_| {},
    )
    .unwrap();
    assert_eq!(replayed, 1);
    let second = claim_as(&mut r2, "r2");
    assert!(second.rows.is_empty(), "A must wait while B is in flight");
    assert_eq!(second.blocked, [a]);
    assert_eq!(defer(&mut r2, &[a]).unwrap(), 1, "set aside");
    assert_eq!(state(&mut r2, a), (false, false, false));

    settle(&mut r1, held.token, &[(EventId(b), Verdict::Delivered)]).unwrap();
    diesel::sql_query("UPDATE outbox.events SET available_at = now() WHERE id = $1")
        .bind::<BigInt, _>(a)
        .execute(&mut r2)
        .unwrap();
    let third = claim_as(&mut r2, "r2");
    assert_eq!(third.rows.len(), 1, "A follows once B is settled");
    assert!(third.blocked.is_empty());
}
