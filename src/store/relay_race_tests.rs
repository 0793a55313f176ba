//! The races of the subscription log (migration 000005), each replayed in
//! its exact interleaving with transactions and locks the test holds: late
//! commits, a claim or a settle parking behind a head that another settle
//! is deleting (both orders), fencing by the lane's and the rows' tokens, a
//! batch taken over before its settle, a retry holding its key, and
//! `outbox.reclaim` against cursors and readers. No sleeps: a step that
//! must wait is observed waiting in `pg_stat_activity` (the one poll, for
//! other databases' transactions, is explained where it is).

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};

use super::claim::{claim, Place, TopicFilter};
use super::pg;
use super::settle::{settle, Settlement, Verdict};
use super::subscriptions::{reclaim, subscribe};
use crate::event::EventId;

const LEASE: Duration = Duration::from_secs(30);
const DEFAULT: &str = "default";

pub(super) fn everything() -> TopicFilter {
    TopicFilter {
        all: true,
        ..TopicFilter::default()
    }
}

/// One claimed row, as the tests look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Got {
    pub(super) id: i64,
    pub(super) key: Option<String>,
    pub(super) place: Place,
    pub(super) attempts: i32,
}

/// A claimed batch: its token, the lane it holds (if any), its rows.
#[derive(Debug)]
pub(super) struct Batch {
    pub(super) token: i64,
    pub(super) lane: Option<i16>,
    pub(super) rows: Vec<Got>,
}

impl Batch {
    pub(super) fn ids(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// Every row with the same verdict.
    fn all(&self, verdict: Verdict) -> Vec<(i64, Verdict)> {
        self.rows.iter().map(|r| (r.id, verdict.clone())).collect()
    }
}

/// Claims up to `limit` rows of `subscription` for `routed` topics,
/// starting the lane search at `lane`.
pub(super) fn claim_as(
    conn: &mut PgConnection,
    subscription: &str,
    lane: usize,
    relay: &str,
    limit: i64,
    lease: Duration,
    routed: &TopicFilter,
) -> Batch {
    let claimed =
        claim(conn, subscription, lane, relay, limit, lease, routed, None).expect("claim");
    let rows = claimed
        .rows
        .into_iter()
        .map(|row| {
            let place = row.place();
            let (event, _) = row.into_event(subscription);
            Got {
                id: event.id.0,
                key: event.key,
                place,
                attempts: event.attempts,
            }
        })
        .collect();
    Batch {
        token: claimed.token,
        lane: claimed.lane,
        rows,
    }
}

fn claim_one(conn: &mut PgConnection, subscription: &str, relay: &str) -> Batch {
    claim_as(conn, subscription, 0, relay, 50, LEASE, &everything())
}

/// Settles `verdicts` (by id) of `batch`; returns the ids settled, sorted.
pub(super) fn settle_ids(
    conn: &mut PgConnection,
    subscription: &str,
    batch: &Batch,
    verdicts: &[(i64, Verdict)],
) -> Vec<i64> {
    let items: Vec<Settlement> = verdicts
        .iter()
        .map(|(id, verdict)| Settlement {
            id: EventId(*id),
            place: batch
                .rows
                .iter()
                .find(|r| r.id == *id)
                .expect("in batch")
                .place,
            verdict: verdict.clone(),
        })
        .collect();
    let mut settled: Vec<i64> = settle(conn, subscription, batch.token, batch.lane, &items)
        .expect("settle")
        .into_iter()
        .map(|id| id.0)
        .collect();
    settled.sort_unstable();
    settled
}

fn retry(delay: Duration) -> Verdict {
    Verdict::Retry {
        delay,
        error: "sink: try again".into(),
    }
}

#[derive(QueryableByName)]
pub(super) struct Id {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
}

pub(super) fn publish(
    conn: &mut PgConnection,
    topic: &str,
    key: Option<&str>,
    delay_s: i64,
) -> i64 {
    diesel::sql_query(
        "INSERT INTO outbox.events (topic, key, payload, available_at)
         VALUES ($1, $2, '{}', now() + $3 * interval '1 second') RETURNING id",
    )
    .bind::<Text, _>(topic)
    .bind::<Nullable<Text>, _>(key)
    .bind::<BigInt, _>(delay_s)
    .get_result::<Id>(conn)
    .expect("publish")
    .id
}

/// The rows of `outbox.deliveries` of `subscription` in queue order:
/// (id, reason, "due" | "later" | "infinity").
fn parked(conn: &mut PgConnection, subscription: &str) -> Vec<(i64, String, String)> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        reason: String,
        #[diesel(sql_type = Text)]
        due: String,
    }
    diesel::sql_query(
        "SELECT id, reason,
                CASE WHEN available_at = 'infinity' THEN 'infinity'
                     WHEN available_at <= now() THEN 'due' ELSE 'later' END AS due
           FROM outbox.deliveries WHERE subscription = $1 ORDER BY seq",
    )
    .bind::<Text, _>(subscription)
    .load::<Row>(conn)
    .expect("reading outbox.deliveries")
    .into_iter()
    .map(|r| (r.id, r.reason, r.due))
    .collect()
}

fn p(id: i64, reason: &str, due: &str) -> (i64, String, String) {
    (id, reason.to_owned(), due.to_owned())
}

fn execute(conn: &mut PgConnection, sql: &str) {
    conn.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Makes the rows of `outbox.deliveries` with these ids due now.
fn make_due(conn: &mut PgConnection, ids: &[i64]) {
    diesel::sql_query("UPDATE outbox.deliveries SET available_at = now() WHERE id = ANY($1)")
        .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
        .execute(conn)
        .expect("making rows due");
}

/// Runs out the lease of the batch under `token`: its lane and its rows.
pub(super) fn expire(conn: &mut PgConnection, token: i64) {
    diesel::sql_query(
        "UPDATE outbox.cursors SET lease_until = now() - interval '1 second' WHERE token = $1",
    )
    .bind::<BigInt, _>(token)
    .execute(conn)
    .expect("expiring a lane lease");
    diesel::sql_query(
        "UPDATE outbox.deliveries SET available_at = now() - interval '1 second' WHERE token = $1",
    )
    .bind::<BigInt, _>(token)
    .execute(conn)
    .expect("expiring row leases");
}

/// `n` distinct keys that hash to the same lane.
fn keys_in_one_lane(conn: &mut PgConnection, n: i64) -> Vec<String> {
    #[derive(QueryableByName)]
    struct Key {
        #[diesel(sql_type = Text)]
        key: String,
    }
    diesel::sql_query(
        "SELECT key FROM (SELECT 'k' || i AS key, i FROM generate_series(1, 200) i) k
          WHERE (hashtext(key) & 7) = (hashtext('k1') & 7) ORDER BY i LIMIT $1",
    )
    .bind::<BigInt, _>(n)
    .load::<Key>(conn)
    .expect("finding keys of one lane")
    .into_iter()
    .map(|k| k.key)
    .collect()
}

fn backend_pid(conn: &mut PgConnection) -> i32 {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .expect("backend pid")
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
        .expect("reading pg_stat_activity");
        if row.waiting {
            return;
        }
        assert!(Instant::now() < deadline, "session {pid} never waited");
        std::thread::yield_now();
    }
}

/// A late commit is never skipped, for the default subscription and a
/// named one: an event whose transaction stays open while later ones are
/// claimed and settled, over two windows, comes in the next window once it
/// commits.
fn late_commit_is_read_in_the_next_window(key: Option<&str>) {
    let db = pg::test_db();
    let (mut t1, mut relay) = (db.conn(), db.conn());
    subscribe(&mut relay, "audit", &["*".into()], &everything()).unwrap();
    let subs = [DEFAULT, "audit"];

    execute(&mut t1, "BEGIN");
    let a = publish(&mut t1, "t", key, 0);
    let b = publish(&mut relay, "t", key, 0);
    assert!(a < b);
    for sub in subs {
        let batch = claim_one(&mut relay, sub, "r");
        assert_eq!(batch.ids(), [b], "{sub}: only the committed event");
        let settled = settle_ids(&mut relay, sub, &batch, &batch.all(Verdict::Delivered));
        assert_eq!(settled, [b]);
        assert_eq!(claim_one(&mut relay, sub, "r").ids(), Vec::<i64>::new());
    }
    // Another window opens and closes while T1 is still open.
    let c = publish(&mut relay, "t", key, 0);
    for sub in subs {
        let batch = claim_one(&mut relay, sub, "r");
        assert_eq!(batch.ids(), [c], "{sub}: T1 is still open");
        let settled = settle_ids(&mut relay, sub, &batch, &batch.all(Verdict::Delivered));
        assert_eq!(settled, [c]);
    }
    execute(&mut t1, "COMMIT");
    for sub in subs {
        let batch = claim_one(&mut relay, sub, "r");
        assert_eq!(batch.ids(), [a], "{sub}: the late commit");
        assert!(matches!(batch.rows[0].place, Place::Log { .. }));
        let settled = settle_ids(&mut relay, sub, &batch, &batch.all(Verdict::Delivered));
        assert_eq!(settled, [a]);
        assert_eq!(claim_one(&mut relay, sub, "r").ids(), Vec::<i64>::new());
        assert_eq!(parked(&mut relay, sub), []);
    }
}

#[test]
fn a_late_commit_of_a_key_is_delivered_in_the_next_window() {
    late_commit_is_read_in_the_next_window(Some("k"));
}

#[test]
fn a_late_keyless_commit_is_delivered_in_the_next_window() {
    late_commit_is_read_in_the_next_window(None);
}

/// A head `h` of key `k` in `outbox.deliveries`, claimed by relay `r1`
/// (the returned batch), and a later event `r` of `k` in the log, unread.
fn head_in_flight_and_a_follower(conn: &mut PgConnection) -> (Batch, i64) {
    let h = publish(conn, "t", Some("k"), 0);
    let first = claim_one(conn, DEFAULT, "r1");
    let settled = settle_ids(conn, DEFAULT, &first, &first.all(retry(Duration::ZERO)));
    assert_eq!(settled, [h]);
    let held = claim_one(conn, DEFAULT, "r1");
    assert_eq!(held.ids(), [h]);
    assert!(matches!(held.rows[0].place, Place::Deliveries { .. }));
    let r = publish(conn, "t", Some("k"), 0);
    (held, r)
}

/// Claim first: the claim (with nothing else to return, it parks at once)
/// parks R behind H and holds `FOR KEY SHARE` on H; a settle deleting H
/// waits for the claim, and its wake (a later statement) sees R and makes
/// it due: never stranded at 'infinity'.
fn settle_waiting_for_a_parking_claim_wakes_what_it_parked(verdict: Verdict) {
    let db = pg::test_db();
    let (mut claimer, mut settler, mut observer) = (db.conn(), db.conn(), db.conn());
    let (held, r) = head_in_flight_and_a_follower(&mut observer);
    let h = held.rows[0].id;

    execute(&mut claimer, "BEGIN");
    let parking = claim_one(&mut claimer, DEFAULT, "r2");
    assert_eq!(parking.ids(), Vec::<i64>::new(), "R waits behind H");
    assert_eq!(
        parked(&mut claimer, DEFAULT),
        [p(h, "retry", "later"), p(r, "blocked", "infinity")]
    );

    let pid = backend_pid(&mut settler);
    let settling = std::thread::spawn(move || {
        let settled = settle_ids(&mut settler, DEFAULT, &held, &held.all(verdict));
        (settled, settler)
    });
    until_waiting_for_a_lock(&mut observer, pid);
    execute(&mut claimer, "COMMIT");
    let (settled, _settler) = settling.join().unwrap();

    assert_eq!(settled, [h]);
    assert_eq!(parked(&mut observer, DEFAULT), [p(r, "blocked", "due")]);
    let next = claim_one(&mut observer, DEFAULT, "r3");
    assert_eq!(next.ids(), [r]);
    let settled = settle_ids(&mut observer, DEFAULT, &next, &next.all(Verdict::Delivered));
    assert_eq!(settled, [r]);
    assert_eq!(parked(&mut observer, DEFAULT), []);
    assert_eq!(
        claim_one(&mut observer, DEFAULT, "r3").ids(),
        Vec::<i64>::new()
    );
}

#[test]
fn a_delivery_settled_while_a_claim_parks_behind_it_wakes_the_parked_row() {
    settle_waiting_for_a_parking_claim_wakes_what_it_parked(Verdict::Delivered);
}

#[test]
fn a_dead_letter_settled_while_a_claim_parks_behind_it_wakes_the_parked_row() {
    settle_waiting_for_a_parking_claim_wakes_what_it_parked(Verdict::Dead {
        error: "refused".into(),
    });
}

/// Settle first: the settle has deleted H (and woken nothing: R is not
/// parked yet) and is still open. The claim, which still sees H, parks R
/// behind it, and its `FOR KEY SHARE` on H waits for the settle; once H is
/// gone for good R is parked behind nothing, due, and the same claim
/// returns it: after H, never stranded.
#[test]
fn a_claim_waiting_for_a_settle_that_deletes_the_head_delivers_the_follower() {
    let db = pg::test_db();
    let (mut claimer, mut settler, mut observer) = (db.conn(), db.conn(), db.conn());
    let (held, r) = head_in_flight_and_a_follower(&mut observer);
    let h = held.rows[0].id;

    execute(&mut settler, "BEGIN");
    let settled = settle_ids(&mut settler, DEFAULT, &held, &held.all(Verdict::Delivered));
    assert_eq!(settled, [h]);

    let pid = backend_pid(&mut claimer);
    let claiming = std::thread::spawn(move || {
        let batch = claim_one(&mut claimer, DEFAULT, "r2");
        (batch, claimer)
    });
    until_waiting_for_a_lock(&mut observer, pid);
    execute(&mut settler, "COMMIT");
    let (batch, mut claimer) = claiming.join().unwrap();

    assert_eq!(batch.ids(), [r]);
    let settled = settle_ids(
        &mut claimer,
        DEFAULT,
        &batch,
        &batch.all(Verdict::Delivered),
    );
    assert_eq!(settled, [r]);
    assert_eq!(parked(&mut observer, DEFAULT), []);
    assert_eq!(
        claim_one(&mut observer, DEFAULT, "r3").ids(),
        Vec::<i64>::new()
    );
}

/// Keys `k` and `a` of one lane. H, the head of k, is in flight from
/// `outbox.deliveries` (relay r1's batch); then R (k) and X (a) are
/// published and relay r2 claims the lane: X is returned, and R is left for
/// r2's settle to park behind H. Returns (r1's batch, r2's batch, R).
fn a_settle_to_park_behind_a_head_in_flight(conn: &mut PgConnection) -> (Batch, Batch, i64) {
    let keys = keys_in_one_lane(conn, 2);
    let (k, a) = (Some(keys[0].as_str()), Some(keys[1].as_str()));
    let h = publish(conn, "t", k, 0);
    let first = claim_one(conn, DEFAULT, "r1");
    settle_ids(conn, DEFAULT, &first, &first.all(retry(Duration::ZERO)));
    let held = claim_one(conn, DEFAULT, "r1");
    assert_eq!(held.ids(), [h]);
    let r = publish(conn, "t", k, 0);
    let x = publish(conn, "t", a, 0);
    let batch = claim_one(conn, DEFAULT, "r2");
    assert_eq!(batch.ids(), [x], "R waits behind H");
    (held, batch, r)
}

/// The parking settle first: it parks R behind H and holds `FOR KEY SHARE`
/// on H; the settle deleting H waits for it, and its wake sees R.
#[test]
fn a_head_deleted_while_a_settle_parks_behind_it_wakes_what_was_parked() {
    let db = pg::test_db();
    let (mut parker, mut settler, mut observer) = (db.conn(), db.conn(), db.conn());
    let (held, batch, r) = a_settle_to_park_behind_a_head_in_flight(&mut observer);
    let h = held.rows[0].id;

    execute(&mut parker, "BEGIN");
    settle_ids(&mut parker, DEFAULT, &batch, &batch.all(Verdict::Delivered));
    let pid = backend_pid(&mut settler);
    let settling = std::thread::spawn(move || {
        let settled = settle_ids(&mut settler, DEFAULT, &held, &held.all(Verdict::Delivered));
        (settled, settler)
    });
    until_waiting_for_a_lock(&mut observer, pid);
    execute(&mut parker, "COMMIT");
    let (settled, _settler) = settling.join().unwrap();

    assert_eq!(settled, [h]);
    assert_eq!(parked(&mut observer, DEFAULT), [p(r, "blocked", "due")]);
    let next = claim_one(&mut observer, DEFAULT, "r3");
    assert_eq!(next.ids(), [r]);
}

/// The deleting settle first, still open: the parking settle's `FOR KEY
/// SHARE` on H waits for it, and once H is gone R is parked behind
/// nothing: due at once.
#[test]
fn a_settle_parking_behind_a_head_being_deleted_parks_the_row_due() {
    let db = pg::test_db();
    let (mut parker, mut settler, mut observer) = (db.conn(), db.conn(), db.conn());
    let (held, batch, r) = a_settle_to_park_behind_a_head_in_flight(&mut observer);
    let (h, x) = (held.rows[0].id, batch.rows[0].id);

    execute(&mut settler, "BEGIN");
    assert_eq!(
        settle_ids(&mut settler, DEFAULT, &held, &held.all(Verdict::Delivered)),
        [h]
    );
    let pid = backend_pid(&mut parker);
    let parking = std::thread::spawn(move || {
        let settled = settle_ids(&mut parker, DEFAULT, &batch, &batch.all(Verdict::Delivered));
        (settled, parker)
    });
    until_waiting_for_a_lock(&mut observer, pid);
    execute(&mut settler, "COMMIT");
    let (settled, _parker) = parking.join().unwrap();

    assert_eq!(settled, [x]);
    assert_eq!(parked(&mut observer, DEFAULT), [p(r, "queued", "due")]);
    let next = claim_one(&mut observer, DEFAULT, "r3");
    assert_eq!(next.ids(), [r]);
}

/// Fencing: relay A's lease ran out and relay B took the lane and the
/// deliveries row over. A's settle settles nothing (whatever its
/// verdicts), B's settles everything.
#[test]
fn a_settle_after_the_lease_was_taken_over_settles_nothing() {
    let db = pg::test_db();
    let (mut a, mut b, mut observer) = (db.conn(), db.conn(), db.conn());
    // A deliveries row of key d, due now.
    let d = publish(&mut observer, "t", Some("d"), 0);
    let first = claim_one(&mut observer, DEFAULT, "x");
    settle_ids(
        &mut observer,
        DEFAULT,
        &first,
        &first.all(retry(Duration::ZERO)),
    );
    let e1 = publish(&mut observer, "t", Some("e"), 0);
    let e2 = publish(&mut observer, "t", Some("e"), 0);

    let by_a = claim_one(&mut a, DEFAULT, "a");
    assert_eq!(by_a.ids(), [e1, e2, d]);
    let lane = by_a.lane.expect("a lane");
    expire(&mut observer, by_a.token);
    let by_b = claim_one(&mut b, DEFAULT, "b");
    assert_eq!(
        by_b.ids(),
        [e1, e2, d],
        "B reads the lane again, and takes d"
    );
    assert_eq!(by_b.lane, Some(lane));
    assert_eq!(
        by_b.rows[2].attempts, 3,
        "d: one failed attempt, two claims"
    );

    let verdicts = [
        (
            e1,
            Verdict::Dead {
                error: "a: refused".into(),
            },
        ),
        (e2, retry(Duration::ZERO)),
        (
            d,
            Verdict::Dead {
                error: "a: refused".into(),
            },
        ),
    ];
    assert_eq!(
        settle_ids(&mut a, DEFAULT, &by_a, &verdicts),
        Vec::<i64>::new()
    );
    assert_eq!(dead_letters(&mut observer), Vec::<i64>::new());
    assert_eq!(parked(&mut observer, DEFAULT), [p(d, "retry", "later")]);

    let settled = settle_ids(&mut b, DEFAULT, &by_b, &by_b.all(Verdict::Delivered));
    let mut all = vec![e1, e2, d];
    all.sort_unstable();
    assert_eq!(settled, all);
    assert_eq!(parked(&mut observer, DEFAULT), []);
    assert_eq!(
        claim_one(&mut observer, DEFAULT, "c").ids(),
        Vec::<i64>::new()
    );
    // Too late as well once B is done.
    assert_eq!(
        settle_ids(&mut a, DEFAULT, &by_a, &by_a.all(Verdict::Delivered)),
        Vec::<i64>::new()
    );
}

/// Deliveries rows are fenced one by one: of A's two rows, only the one
/// relay B took over after A's lease ran out is lost to A.
#[test]
fn a_settle_settles_the_deliveries_rows_it_still_holds_and_only_those() {
    let db = pg::test_db();
    let (mut a, mut b, mut observer) = (db.conn(), db.conn(), db.conn());
    let d1 = publish(&mut observer, "t", Some("d1"), 0);
    let d2 = publish(&mut observer, "t", Some("d2"), 0);
    for _ in 0..2 {
        let first = claim_one(&mut observer, DEFAULT, "x");
        settle_ids(
            &mut observer,
            DEFAULT,
            &first,
            &first.all(retry(Duration::ZERO)),
        );
    }
    assert_eq!(
        parked(&mut observer, DEFAULT)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect::<Vec<_>>(),
        [d1, d2]
    );
    let by_a = claim_one(&mut a, DEFAULT, "a");
    assert_eq!(by_a.ids(), [d1, d2]);
    assert_eq!(by_a.lane, None);
    diesel::sql_query(
        "UPDATE outbox.deliveries SET available_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind::<BigInt, _>(d1)
    .execute(&mut observer)
    .unwrap();
    let by_b = claim_one(&mut b, DEFAULT, "b");
    assert_eq!(by_b.ids(), [d1]);

    let dead = Verdict::Dead {
        error: "a: refused".into(),
    };
    assert_eq!(settle_ids(&mut a, DEFAULT, &by_a, &by_a.all(dead)), [d2]);
    assert_eq!(dead_letters(&mut observer), [d2]);
    assert_eq!(parked(&mut observer, DEFAULT), [p(d1, "retry", "later")]);
    assert_eq!(
        settle_ids(&mut b, DEFAULT, &by_b, &by_b.all(Verdict::Delivered)),
        [d1]
    );
    assert_eq!(parked(&mut observer, DEFAULT), []);
}

fn dead_letters(conn: &mut PgConnection) -> Vec<i64> {
    diesel::sql_query("SELECT id FROM outbox.dead_letters ORDER BY id")
        .load::<Id>(conn)
        .expect("reading dead letters")
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// Keys `k`, `a`, `b` of one lane; `h`, the head of `k`, waits in
/// `outbox.deliveries` (a retry due in an hour). Relay A then claims the
/// lane's window [p1 (k), r1 (a), p2 (b, delayed an hour)]: it returns r1
/// only; p1 (behind h) and p2 (delayed) are to be parked by its settle.
/// Returns (A's batch, h, p1, r1, p2).
fn a_batch_with_rows_to_park(conn: &mut PgConnection) -> (Batch, i64, i64, i64, i64) {
    let keys = keys_in_one_lane(conn, 3);
    let (k, a, b) = (
        Some(keys[0].as_str()),
        Some(keys[1].as_str()),
        Some(keys[2].as_str()),
    );
    let h = publish(conn, "t", k, 0);
    let first = claim_one(conn, DEFAULT, "x");
    settle_ids(
        conn,
        DEFAULT,
        &first,
        &first.all(retry(Duration::from_secs(3600))),
    );
    let p1 = publish(conn, "t", k, 0);
    let r1 = publish(conn, "t", a, 0);
    let p2 = publish(conn, "t", b, 3600);
    let by_a = claim_one(conn, DEFAULT, "a");
    assert_eq!(by_a.ids(), [r1]);
    assert_eq!(parked(conn, DEFAULT), [p(h, "retry", "later")]);
    (by_a, h, p1, r1, p2)
}

/// The first holder died before its settle: the relay that takes the lane
/// over reads the same window, returns what A returned, and its settle
/// parks each waiting row once; then everything comes out once, in key
/// order, and nothing again from the log.
#[test]
fn a_batch_taken_over_parks_its_waiting_rows_once_and_returns_nothing_twice() {
    let db = pg::test_db();
    let (mut relay, mut observer) = (db.conn(), db.conn());
    let (by_a, h, p1, r1, p2) = a_batch_with_rows_to_park(&mut observer);

    expire(&mut observer, by_a.token);
    let by_b = claim_one(&mut relay, DEFAULT, "b");
    assert_eq!(by_b.ids(), [r1]);
    assert_eq!(by_b.lane, by_a.lane);
    assert_eq!(
        settle_ids(&mut relay, DEFAULT, &by_b, &by_b.all(Verdict::Delivered)),
        [r1]
    );
    assert_eq!(
        parked(&mut observer, DEFAULT),
        [
            p(h, "retry", "later"),
            p(p1, "blocked", "infinity"),
            p(p2, "delayed", "later")
        ]
    );
    // Too late: A's settle parks nothing a second time.
    assert_eq!(
        settle_ids(&mut observer, DEFAULT, &by_a, &by_a.all(Verdict::Delivered)),
        Vec::<i64>::new()
    );

    let mut delivered = vec![r1];
    make_due(&mut observer, &[h, p2]);
    for _ in 0..3 {
        let batch = claim_one(&mut relay, DEFAULT, "b");
        assert!(batch
            .rows
            .iter()
            .all(|r| matches!(r.place, Place::Deliveries { .. })));
        settle_ids(&mut relay, DEFAULT, &batch, &batch.all(Verdict::Delivered));
        delivered.extend(batch.ids());
    }
    assert_eq!(delivered, [r1, h, p2, p1]);
    assert_eq!(parked(&mut observer, DEFAULT), []);
    assert_eq!(claim_one(&mut relay, DEFAULT, "b").ids(), Vec::<i64>::new());
}

/// While A (which will die) holds the lane, h is delivered: the takeover
/// judges A's waiting rows again, so p1, no longer behind anything, comes
/// straight from the log, once, and p2 (delayed) is parked once.
#[test]
fn rows_a_dead_batch_left_waiting_are_judged_again_by_the_takeover() {
    let db = pg::test_db();
    let (mut relay, mut observer) = (db.conn(), db.conn());
    let (by_a, h, p1, r1, p2) = a_batch_with_rows_to_park(&mut observer);

    make_due(&mut observer, &[h]);
    let batch = claim_one(&mut relay, DEFAULT, "c");
    assert_eq!(batch.ids(), [h]);
    settle_ids(&mut relay, DEFAULT, &batch, &batch.all(Verdict::Delivered));
    assert_eq!(parked(&mut observer, DEFAULT), []);

    expire(&mut observer, by_a.token);
    let by_b = claim_one(&mut relay, DEFAULT, "b");
    assert_eq!(by_b.ids(), [p1, r1]);
    let dead = Verdict::Dead {
        error: "refused".into(),
    };
    let verdicts = [(p1, Verdict::Delivered), (r1, dead)];
    assert_eq!(settle_ids(&mut relay, DEFAULT, &by_b, &verdicts), [p1, r1]);
    assert_eq!(parked(&mut observer, DEFAULT), [p(p2, "delayed", "later")]);
    assert_eq!(dead_letters(&mut observer), [r1]);
    make_due(&mut observer, &[p2]);
    deliver_the_last(&mut relay, "b", &[p2]);
}

/// Claims exactly `ids` for `relay`, delivers them, and checks that the
/// default subscription is then empty.
fn deliver_the_last(conn: &mut PgConnection, relay: &str, ids: &[i64]) {
    let last = claim_one(conn, DEFAULT, relay);
    assert_eq!(last.ids(), ids);
    settle_ids(conn, DEFAULT, &last, &last.all(Verdict::Delivered));
    assert_eq!(parked(conn, DEFAULT), []);
    assert_eq!(claim_one(conn, DEFAULT, relay).ids(), Vec::<i64>::new());
}

/// A retry holds its key: the key's later events wait (blocked, at
/// 'infinity') while another key of the same lane goes on through the
/// cursor; once the retry is delivered they come out one at a time, in
/// order.
#[test]
fn a_retry_holds_its_key_while_other_keys_of_the_lane_pass() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let keys = keys_in_one_lane(&mut conn, 2);
    let (a, b) = (Some(keys[0].as_str()), Some(keys[1].as_str()));
    let a1 = publish(&mut conn, "t", a, 0);
    let first = claim_one(&mut conn, DEFAULT, "r");
    settle_ids(
        &mut conn,
        DEFAULT,
        &first,
        &first.all(retry(Duration::from_secs(3600))),
    );
    let a2 = publish(&mut conn, "t", a, 0);
    let b1 = publish(&mut conn, "t", b, 0);
    let a3 = publish(&mut conn, "t", a, 0);
    let b2 = publish(&mut conn, "t", b, 0);

    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [b1, b2]);
    assert_eq!(
        settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered)),
        [b1, b2]
    );
    assert_eq!(
        parked(&mut conn, DEFAULT),
        [
            p(a1, "retry", "later"),
            p(a2, "blocked", "infinity"),
            p(a3, "blocked", "infinity")
        ]
    );
    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), Vec::<i64>::new());

    make_due(&mut conn, &[a1]);
    for expected in [a1, a2, a3] {
        let batch = claim_one(&mut conn, DEFAULT, "r");
        assert_eq!(batch.ids(), [expected], "one at a time, in order");
        settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered));
    }
    assert_eq!(parked(&mut conn, DEFAULT), []);
    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), Vec::<i64>::new());
}

/// Within a batch: the relay holds the events of a key after one that
/// failed; the settle copies them behind it, in order, and they follow it.
#[test]
fn events_held_behind_a_retry_in_the_same_batch_follow_it_in_order() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let a1 = publish(&mut conn, "t", Some("a"), 0);
    let a2 = publish(&mut conn, "t", Some("a"), 0);
    let a3 = publish(&mut conn, "t", Some("a"), 0);
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [a1, a2, a3]);
    let verdicts = [
        (a1, retry(Duration::from_secs(3600))),
        (a2, Verdict::Held),
        (a3, Verdict::Held),
    ];
    assert_eq!(
        settle_ids(&mut conn, DEFAULT, &batch, &verdicts),
        [a1, a2, a3]
    );
    assert_eq!(
        parked(&mut conn, DEFAULT),
        [
            p(a1, "retry", "later"),
            p(a2, "blocked", "infinity"),
            p(a3, "blocked", "infinity")
        ]
    );
    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), Vec::<i64>::new());
    make_due(&mut conn, &[a1]);
    for expected in [a1, a2, a3] {
        let batch = claim_one(&mut conn, DEFAULT, "r");
        assert_eq!(batch.ids(), [expected]);
        settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered));
    }
    assert_eq!(parked(&mut conn, DEFAULT), []);
}

#[derive(QueryableByName)]
struct Xid {
    #[diesel(sql_type = BigInt)]
    xid: i64,
}

/// Burns transaction ids (one subtransaction that writes per id) until the
/// next one is in a later 2^14-xid range than `xid`.
fn burn_xids_past_the_range_of(conn: &mut PgConnection, xid: i64) {
    let end = ((xid >> 14) + 1) << 14;
    let now = diesel::sql_query("SELECT pg_current_xact_id()::text::bigint AS xid")
        .get_result::<Xid>(conn)
        .expect("reading the xid counter")
        .xid;
    let n = (end - now).max(0) + 1;
    execute(conn, "CREATE TEMP TABLE IF NOT EXISTS burn (i int)");
    execute(
        conn,
        &format!(
            "DO $$ BEGIN FOR i IN 1..{n} LOOP
                 BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN OTHERS THEN RAISE; END;
             END LOOP; END $$"
        ),
    );
    let after = diesel::sql_query("SELECT pg_current_xact_id()::text::bigint AS xid")
        .get_result::<Xid>(conn)
        .expect("reading the xid counter")
        .xid;
    assert!(after >= end, "burnt up to {after}, not past {end}");
}

/// Waits until no transaction of the cluster older than `xid` is running.
/// `outbox.reclaim`'s horizon is the oldest running transaction of the
/// whole server, so other databases' transactions (other tests, other
/// work on a shared server) hold it back too, and this test is about the
/// cursors'. There is no lock to wait on for another session's
/// transaction, so this polls, every 50 ms, up to a generous deadline, and
/// names the blocker when it gives up.
fn until_no_transaction_older_than(conn: &mut PgConnection, xid: i64) {
    #[derive(QueryableByName)]
    struct Horizon {
        #[diesel(sql_type = BigInt)]
        xid: i64,
        #[diesel(sql_type = Nullable<Text>)]
        blocker: Option<String>,
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let horizon = diesel::sql_query(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xid,
                    (SELECT format('pid %s in %s: %s', pid, datname, left(query, 60))
                       FROM pg_stat_activity
                      WHERE backend_xid::text::bigint < $1
                      ORDER BY backend_xid::text::bigint LIMIT 1) AS blocker",
        )
        .bind::<BigInt, _>(xid)
        .get_result::<Horizon>(conn)
        .expect("reading the snapshot");
        if horizon.xid >= xid {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a transaction older than {xid} never ended: {:?}",
            horizon.blocker
        );
        execute(conn, "SELECT pg_sleep(0.05)");
    }
}

fn event_count(conn: &mut PgConnection, id: i64) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query("SELECT count(*) AS n FROM outbox.events WHERE id = $1")
        .bind::<BigInt, _>(id)
        .get_result::<N>(conn)
        .expect("counting events")
        .n
}

/// `outbox.reclaim` keeps a segment while a cursor (a lagging
/// subscription) still needs it, truncates it once every cursor has
/// passed, and never waits for a reader's lock.
#[test]
fn reclaim_truncates_a_segment_only_once_every_cursor_has_passed_it() {
    let db = pg::test_db();
    let (mut conn, mut reader) = (db.conn(), db.conn());
    subscribe(&mut conn, "lagging", &["*".into()], &everything()).unwrap();
    let e = publish(&mut conn, "t", Some("k"), 0);
    let tx = diesel::sql_query("SELECT tx::text::bigint AS xid FROM outbox.events WHERE id = $1")
        .bind::<BigInt, _>(e)
        .get_result::<Xid>(&mut conn)
        .expect("reading the event's tx")
        .xid;
    let segment = ((tx >> 14) & 7) as i32;
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(
        settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered)),
        [e]
    );

    burn_xids_past_the_range_of(&mut conn, tx);
    let range_end = ((tx >> 14) + 1) << 14;
    until_no_transaction_older_than(&mut conn, range_end);
    // Only `lagging`'s cursor still needs the segment.
    assert_eq!(reclaim(&mut conn).unwrap(), Vec::<i32>::new());
    assert_eq!(event_count(&mut conn, e), 1);
    let late = claim_one(&mut conn, "lagging", "r");
    assert_eq!(late.ids(), [e]);
    assert_eq!(
        settle_ids(&mut conn, "lagging", &late, &late.all(Verdict::Delivered)),
        [e]
    );

    // Every cursor has passed it; a reader holds the segment: not now, and
    // without waiting (a wait would hit the statement timeout).
    execute(&mut reader, "BEGIN; SELECT count(*) FROM outbox.events");
    execute(&mut conn, "SET statement_timeout = '10s'");
    until_no_transaction_older_than(&mut conn, range_end);
    assert_eq!(reclaim(&mut conn).unwrap(), Vec::<i32>::new());
    assert_eq!(event_count(&mut conn, e), 1);
    execute(&mut reader, "COMMIT");

    until_no_transaction_older_than(&mut conn, range_end);
    assert_eq!(reclaim(&mut conn).unwrap(), [segment]);
    assert_eq!(event_count(&mut conn, e), 0);
    for sub in [DEFAULT, "lagging"] {
        assert_eq!(claim_one(&mut conn, sub, "r").ids(), Vec::<i64>::new());
    }
}

/// A claim returns a1 and leaves a2, a later event of the same key (here
/// delayed), for its settle to park. The relay retries a1: a1 must still
/// come first, and a2 wakes behind it no earlier than its own due time.
#[test]
fn a_retry_stays_ahead_of_a_later_delayed_event_of_its_key() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let a1 = publish(&mut conn, "t", Some("a"), 0);
    let a2 = publish(&mut conn, "t", Some("a"), 3600);
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [a1]);
    assert_eq!(
        settle_ids(
            &mut conn,
            DEFAULT,
            &batch,
            &batch.all(retry(Duration::ZERO))
        ),
        [a1]
    );
    assert_eq!(
        parked(&mut conn, DEFAULT),
        [p(a1, "retry", "due"), p(a2, "blocked", "infinity")]
    );

    let again = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(again.ids(), [a1], "the retry is due and a2 follows it");
    settle_ids(&mut conn, DEFAULT, &again, &again.all(Verdict::Delivered));
    // Woken, but not before its publisher's available_at.
    assert_eq!(parked(&mut conn, DEFAULT), [p(a2, "blocked", "later")]);
    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), Vec::<i64>::new());
    make_due(&mut conn, &[a2]);
    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), [a2]);
}

/// A relay that does not route `user.signup` claims a1 (`order.created`,
/// key a) and leaves a2 (`user.signup`, key a) unrouted. A relay that
/// routes everything must not get a2 while a1 is in flight, and gets it
/// once a1 is settled.
#[test]
fn an_unrouted_event_waits_for_the_earlier_event_of_its_key_in_flight() {
    let db = pg::test_db();
    let (mut partial, mut full) = (db.conn(), db.conn());
    let a1 = publish(&mut partial, "order.created", Some("a"), 0);
    let a2 = publish(&mut partial, "user.signup", Some("a"), 0);
    let orders_only = TopicFilter {
        exact: vec!["order.created".into()],
        ..TopicFilter::default()
    };
    let batch = claim_as(&mut partial, DEFAULT, 0, "orders", 50, LEASE, &orders_only);
    assert_eq!(batch.ids(), [a1]);

    assert_eq!(
        claim_one(&mut full, DEFAULT, "all").ids(),
        Vec::<i64>::new(),
        "a2 waits while a1 is in flight"
    );
    settle_ids(
        &mut partial,
        DEFAULT,
        &batch,
        &batch.all(Verdict::Delivered),
    );
    assert_eq!(claim_one(&mut full, DEFAULT, "all").ids(), [a2]);
}

/// The rows of `outbox.deliveries` waiting at 'infinity' with no earlier
/// row, in (tx, id) order, of their key: nothing will ever wake them.
fn stranded(conn: &mut PgConnection) -> Vec<i64> {
    diesel::sql_query(
        "SELECT d.id FROM outbox.deliveries d
          WHERE d.available_at = 'infinity'
            AND (d.key IS NULL OR NOT EXISTS (
                 SELECT FROM outbox.deliveries x
                  WHERE x.subscription = d.subscription AND x.key = d.key
                    AND x.seq < d.seq))
          ORDER BY d.id",
    )
    .load::<Id>(conn)
    .expect("reading stranded rows")
    .into_iter()
    .map(|r| r.id)
    .collect()
}

/// A late commit of a key whose later event (by xid) is already waiting
/// in `outbox.deliveries` (a retry): the late event sorts before it, by
/// (tx, id), so it must not wait at 'infinity' behind it, or the key never
/// moves again (the retry is no longer its head).
#[test]
fn a_late_commit_behind_a_retry_of_its_key_is_not_stranded() {
    let db = pg::test_db();
    let (mut t1, mut conn) = (db.conn(), db.conn());
    execute(&mut t1, "BEGIN");
    let a = publish(&mut t1, "t", Some("k"), 0);
    let b = publish(&mut conn, "t", Some("k"), 0);
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [b]);
    settle_ids(
        &mut conn,
        DEFAULT,
        &batch,
        &batch.all(retry(Duration::from_secs(3600))),
    );
    execute(&mut t1, "COMMIT");

    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), Vec::<i64>::new());
    assert_eq!(stranded(&mut conn), Vec::<i64>::new());
    make_due(&mut conn, &[b]);
    let mut delivered = Vec::new();
    for _ in 0..2 {
        let batch = claim_one(&mut conn, DEFAULT, "r");
        settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered));
        delivered.extend(batch.ids());
    }
    delivered.sort_unstable();
    assert_eq!(delivered, [a, b]);
}

/// `outbox.reclaim` while a publisher's transaction is still open: it moves
/// idle lanes to the present and may not truncate the segment the open
/// transaction writes to, even once xids have moved past it; the event is
/// read once it commits.
#[test]
fn reclaim_neither_skips_nor_truncates_an_open_transactions_event() {
    let db = pg::test_db();
    let (mut t1, mut conn) = (db.conn(), db.conn());
    execute(&mut t1, "BEGIN");
    let a = publish(&mut t1, "t", Some("k"), 0);
    let tx = diesel::sql_query("SELECT pg_current_xact_id()::text::bigint AS xid")
        .get_result::<Xid>(&mut t1)
        .expect("reading T1's xid")
        .xid;
    burn_xids_past_the_range_of(&mut conn, tx);
    assert_eq!(reclaim(&mut conn).unwrap(), Vec::<i32>::new());
    assert_eq!(claim_one(&mut conn, DEFAULT, "r").ids(), Vec::<i64>::new());
    execute(&mut t1, "COMMIT");

    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [a]);
    assert_eq!(
        settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered)),
        [a]
    );
}

/// A claim of the default subscription from `lane` on, as it comes back
/// from the database (its next due time and snapshot included).
fn claim_raw(conn: &mut PgConnection, lane: usize) -> super::claim::Claimed {
    claim(conn, DEFAULT, lane, "r", 50, LEASE, &everything(), None).expect("claim")
}

/// The lane of `key` (`outbox.events.lane`).
fn lane_of(conn: &mut PgConnection, key: &str) -> usize {
    #[derive(QueryableByName)]
    struct Lane {
        #[diesel(sql_type = Integer)]
        lane: i32,
    }
    let lane = diesel::sql_query("SELECT hashtext($1) & 7 AS lane")
        .bind::<Text, _>(key)
        .get_result::<Lane>(conn)
        .expect("computing a lane")
        .lane;
    usize::try_from(lane).expect("lanes are 0 to 7")
}

/// A claim whose snapshot is older than a claim and settle of the same lane
/// that commit while it looks (chaos found this): it locks the lane's
/// newest version, whose window ends after its own snapshot. Opening the
/// next window from there to its old snapshot would move the cursor back,
/// and the events committed in between would be delivered again.
///
/// The claim is stopped, snapshot taken, while it reads the log (the test
/// holds a segment no publish of this test writes to); meanwhile an event
/// commits and the lane's cursor moves past it, as another relay's claim
/// and settle leave it.
#[test]
fn a_claim_with_an_older_snapshot_never_moves_a_cursor_back() {
    let db = pg::test_db();
    let (mut holder, mut conn, mut observer) = (db.conn(), db.conn(), db.conn());
    let lane = lane_of(&mut conn, "k");
    let first = publish(&mut conn, "t", Some("k"), 0);

    #[derive(QueryableByName)]
    struct Segment {
        #[diesel(sql_type = Integer)]
        segment: i32,
    }
    // Four ranges of 2^14 xids away from every xid this test assigns.
    let idle = diesel::sql_query(
        "SELECT (((pg_snapshot_xmax(pg_current_snapshot())::text::bigint >> 14) + 4) & 7)::int
                AS segment",
    )
    .get_result::<Segment>(&mut conn)
    .expect("choosing a segment")
    .segment;
    execute(&mut holder, "BEGIN");
    execute(
        &mut holder,
        &format!("LOCK TABLE outbox.events_{idle} IN ACCESS EXCLUSIVE MODE"),
    );

    let url = db.url().to_owned();
    let looking = std::thread::spawn(move || {
        let mut late = PgConnection::establish(&url).expect("connecting");
        let pid = backend_pid(&mut late);
        (
            pid,
            claim_as(&mut late, DEFAULT, lane, "late", 50, LEASE, &everything()),
        )
    });
    // Its pid is only known once it returns; any session of the database
    // other than ours waiting for a lock is the late claim.
    let late_pid = loop {
        #[derive(QueryableByName)]
        struct Waiting {
            #[diesel(sql_type = Nullable<Integer>)]
            pid: Option<i32>,
        }
        let waiting = diesel::sql_query(
            "SELECT min(pid) AS pid FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .get_result::<Waiting>(&mut observer)
        .expect("reading pg_stat_activity");
        if let Some(pid) = waiting.pid {
            break pid;
        }
        std::thread::yield_now();
    };

    // While it waits: a second event commits, and another relay reads and
    // settles both (its window ends at a snapshot newer than the claim's).
    let second = publish(&mut conn, "t", Some("k"), 0);
    diesel::sql_query(
        "UPDATE outbox.cursors
            SET lo = hi, hi = pg_current_snapshot(), pos_tx = '0', pos_id = 0, done = true
          WHERE subscription = $1 AND lane = $2",
    )
    .bind::<Text, _>(DEFAULT)
    .bind::<Integer, _>(i32::try_from(lane).expect("lane"))
    .execute(&mut conn)
    .expect("settling the lane as another relay would");
    execute(&mut holder, "COMMIT");

    let (pid, late) = looking.join().expect("the late claim");
    assert_eq!(pid, late_pid);
    assert_eq!(late.ids(), Vec::<i64>::new(), "both were settled already");
    let again = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(
        again.ids(),
        Vec::<i64>::new(),
        "{first} and {second} were settled; nothing is read twice"
    );
    assert_eq!(parked(&mut conn, DEFAULT), []);
}

/// A claim that finds a lane with news locked (by `outbox.reclaim`, or by a
/// claim whose snapshot may be older than the news) asks to look again in
/// a moment: the worker woken for that news is the only one that knows of
/// it, and would otherwise sleep until the poll (an hour in the wake-up
/// tests, which found this).
#[test]
fn a_claim_that_finds_a_lane_locked_asks_to_look_again_soon() {
    let db = pg::test_db();
    let (mut holder, mut conn) = (db.conn(), db.conn());
    let lane = lane_of(&mut conn, "k");
    execute(&mut holder, "BEGIN");
    diesel::sql_query(
        "SELECT 1 FROM outbox.cursors WHERE subscription = $1 AND lane = $2 FOR UPDATE",
    )
    .bind::<Text, _>(DEFAULT)
    .bind::<Integer, _>(i32::try_from(lane).expect("lane"))
    .execute(&mut holder)
    .expect("holding the lane as outbox.reclaim does");
    let id = publish(&mut conn, "t", Some("k"), 0);

    let claimed = claim_raw(&mut conn, lane);
    assert!(claimed.rows.is_empty());
    let again = claimed.next_due_in.expect("a time to look again");
    assert!(again <= Duration::from_millis(1), "{again:?}");

    execute(&mut holder, "COMMIT");
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [id]);
    let nothing = claim_raw(&mut conn, lane);
    assert_eq!(nothing.next_due_in, None, "nothing locked, nothing due");
}

/// A relay that stops puts back the tail of its batch that it did not
/// attempt. The tail stays in the log (the cursor stops after the last row
/// attempted) instead of going to `outbox.deliveries`, where each of its
/// keys would block every later event of the key; a row put back before an
/// attempted one still goes there, and its key's later rows wait for it.
#[test]
fn the_unattempted_tail_of_a_stopped_batch_stays_in_the_log() {
    let db = pg::test_db();
    let mut conn = db.conn();
    let keys = keys_in_one_lane(&mut conn, 3);
    let ids: Vec<i64> = keys
        .iter()
        .chain(&keys)
        .map(|key| publish(&mut conn, "t", Some(key), 0))
        .collect();

    // Only the first row attempted: the rest stays unread.
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), ids);
    let mut verdicts = batch.all(Verdict::Release);
    verdicts[0].1 = Verdict::Delivered;
    assert_eq!(settle_ids(&mut conn, DEFAULT, &batch, &verdicts), ids);
    assert_eq!(parked(&mut conn, DEFAULT), []);

    // The next claim reads the tail again, from the log. Now the second
    // row is put back and the third delivered: the second goes to
    // outbox.deliveries, the rest of the tail stays unread.
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), ids[1..]);
    assert!(batch
        .rows
        .iter()
        .all(|r| matches!(r.place, Place::Log { .. })));
    let mut verdicts = batch.all(Verdict::Release);
    verdicts[1].1 = Verdict::Delivered;
    settle_ids(&mut conn, DEFAULT, &batch, &verdicts);
    assert_eq!(parked(&mut conn, DEFAULT), [p(ids[1], "queued", "due")]);

    // Then: the put-back row first (the only row of its key that may go),
    // and the tail but the row of the second key, which waits behind it.
    let batch = claim_one(&mut conn, DEFAULT, "r");
    assert_eq!(batch.ids(), [ids[3], ids[5], ids[1]]);
    settle_ids(&mut conn, DEFAULT, &batch, &batch.all(Verdict::Delivered));
    assert_eq!(parked(&mut conn, DEFAULT), [p(ids[4], "blocked", "due")]);
    deliver_the_last(&mut conn, "r", &[ids[4]]);
}

/// A publisher that read the wake-up flag just before a relay armed it
/// sends no NOTIFY, and commits after the relay's next claim took its
/// snapshot, so that claim cannot see its event either (the relay then
/// slept until its poll: the wake-up tests found it under load). The claim
/// reports its snapshot; the publisher's transaction is below its xmax and
/// still running, so the worker keeps looking, and finds the event once it
/// commits.
#[test]
fn a_publisher_that_read_the_flag_before_it_was_armed_is_still_found() {
    use crate::relay::wakeup::Idleness;
    let db = pg::test_db();
    let (mut publisher, mut relay, mut listener) = (db.conn(), db.conn(), db.conn());
    execute(&mut listener, &format!("LISTEN {}", crate::NOTIFY_CHANNEL));

    execute(&mut publisher, "BEGIN");
    let id = publish(&mut publisher, "t", None, 0); // reads the flag: off
    let xid = diesel::sql_query("SELECT pg_current_xact_id()::text::bigint AS xid")
        .get_result::<Xid>(&mut publisher)
        .expect("the publisher's xid")
        .xid;
    super::wakeup::arm(&mut relay, Duration::from_secs(60)).expect("arming");
    let mut idleness = Idleness::new();
    idleness.armed();
    assert!(idleness.watching().is_some(), "the claim after the arming");
    let first = claim_raw(&mut relay, 0);
    assert!(first.rows.is_empty(), "not committed yet");
    // The publisher's transaction is running and below the claim's xmax,
    // so the watch holds (the snapshot is the whole server's: other
    // databases' transactions can hold it too, never end it early).
    let (xmin, xmax) = first.snapshot;
    assert!(xmin <= xid && xid < xmax, "{xid} in {:?}", first.snapshot);
    idleness.claimed(first.snapshot);
    assert!(idleness.watching().is_some());

    execute(&mut publisher, "COMMIT");
    execute(&mut listener, "SELECT 1");
    assert_eq!(
        listener.notifications_iter().count(),
        0,
        "it sent no NOTIFY"
    );
    let second = claim_raw(&mut relay, 0);
    assert_eq!(
        second
            .rows
            .iter()
            .map(|r| r.event_id().0)
            .collect::<Vec<_>>(),
        [id]
    );
}
