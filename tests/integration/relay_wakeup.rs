//! Wake-ups on demand: while events come slowly a relay keeps asking for
//! notifications (arms `outbox.relay_wakeup`) and waits for them; under
//! load it stops asking and polls, and asks again once its workers sleep;
//! publishers notify only while it asks.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Bool;

use crate::common::count;
use crate::relay_support::{setup, PATIENCE};

/// Whether a relay asks for notifications right now.
fn armed(conn: &mut PgConnection) -> bool {
    #[derive(QueryableByName)]
    struct Armed {
        #[diesel(sql_type = Bool)]
        armed: bool,
    }
    diesel::sql_query(
        "SELECT EXISTS (SELECT FROM outbox.relay_wakeup WHERE armed_until > now()) AS armed",
    )
    .get_result::<Armed>(conn)
    .unwrap()
    .armed
}

/// Waits (polling every 2 ms) until the flag is `wanted`; panics after
/// `PATIENCE`.
pub fn wait_for_flag(conn: &mut PgConnection, wanted: bool) {
    let deadline = Instant::now() + PATIENCE;
    while armed(conn) != wanted {
        assert!(
            Instant::now() < deadline,
            "wake-up flag never became {wanted}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_relay_fed_slowly_keeps_asking_and_each_notification_wakes_it() {
    let bed = setup();
    let relay = bed
        .relay()
        .workers(2)
        .poll_interval(Duration::from_secs(3600))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let mut conn = bed.conn();
    wait_for_flag(&mut conn, true);

    // The poll is an hour away: only notifications can wake it, and the
    // flag stays armed between events.
    for _ in 0..3 {
        let id = bed.publish(&[("t", None)]);
        assert_eq!(bed.signals.delivered(1), id);
        assert!(armed(&mut conn), "the flag must stay armed at a low rate");
    }
    relay.shutdown(PATIENCE).unwrap();
}

#[test]
fn a_relay_without_a_listener_never_asks_for_notifications() {
    let bed = setup();
    let relay = bed
        .poll_only()
        .poll_interval(Duration::from_millis(20))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let id = bed.publish(&[("t", None)]);
    assert_eq!(bed.signals.delivered(1), id);
    // Long enough for its workers to linger (~127 ms) and sleep.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!armed(&mut bed.conn()));
    relay.shutdown(PATIENCE).unwrap();
    assert_eq!(count(&mut bed.conn(), "outbox.relay_wakeup"), 0);
}

#[test]
fn publishers_do_not_notify_while_the_relay_is_busy() {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 500;
    let bed = setup();
    let relay = bed
        .relay()
        .poll_interval(Duration::from_secs(3600))
        .route("*", |_: &outbox::StoredEvent| Ok(()))
        .start()
        .unwrap();
    let mut listener = bed.conn();
    diesel::sql_query(format!("LISTEN {}", outbox::NOTIFY_CHANNEL))
        .execute(&mut listener)
        .unwrap();
    wait_for_flag(&mut bed.conn(), true);

    let start = Arc::new(Barrier::new(PUBLISHERS));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (url, start) = (bed.db.url().to_owned(), start.clone());
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).unwrap();
                start.wait();
                for n in 0..EACH {
                    outbox::transaction(&mut conn, |tx| {
                        tx.publish_event(outbox::NewEvent::dynamic(
                            "t",
                            serde_json::json!({ "n": n }),
                        ))
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.join().unwrap();
    }
    assert_eq!(
        bed.signals.delivered(PUBLISHERS * EACH).len(),
        PUBLISHERS * EACH
    );
    relay.shutdown(PATIENCE).unwrap();

    diesel::sql_query("SELECT 1")
        .execute(&mut listener)
        .unwrap();
    let notifications = listener.notifications_iter().count();
    // Until the relay has heard (or claimed) 50 events within 100 ms
    // (500/s), it keeps notifications on; then the listener clears the flag
    // on the next one, and the commits in flight until then notify too.
    // (Counting only claims, which trail the commits while each
    // notification wakes one claim, let 120 to 270 through.) After that the
    // relay finds each next event by polling (it pauses at most 64 ms
    // between empty claims while events keep coming), so only a stall of
    // every publisher for more than the relay's ~127 ms linger re-arms it.
    // With a notifying trigger this would be 2,000.
    println!(
        "{notifications} notifications for {} commits",
        PUBLISHERS * EACH
    );
    assert!(
        notifications <= 200,
        "{notifications} notifications for {} commits",
        PUBLISHERS * EACH
    );
}
