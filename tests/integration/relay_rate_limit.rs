//! Rate limits: at most N deliveries started in any window, across every
//! worker of a relay; waiting is neither an attempt nor a failure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{DeliveryError, RateLimit, StoredEvent};

use crate::common::pending;
use crate::relay_support::{count_delivered, dead_letters, retries, setup, Signal, PATIENCE};

/// When each event was handed to the sink, and at which attempt.
type Calls = Arc<Mutex<Vec<(Instant, outbox::EventId, i32)>>>;

/// A sink that records its calls.
fn timed() -> (impl outbox::Sink, Calls) {
    let calls: Calls = Arc::default();
    let record = calls.clone();
    let sink = move |event: &StoredEvent| -> Result<(), DeliveryError> {
        record
            .lock()
            .unwrap()
            .push((Instant::now(), event.id, event.attempts));
        Ok(())
    };
    (sink, calls)
}

/// The most starts within any window of `per`.
fn busiest_window(starts: &[Instant], per: Duration) -> usize {
    let mut starts = starts.to_vec();
    starts.sort();
    (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|t| t.duration_since(starts[i]) < per)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_hundred_events_at_ten_a_second_take_nine_to_eleven_seconds() {
    let bed = setup();
    let (sink, calls) = timed();
    let ids = bed.publish(&[("email.send", None); 100]);
    let started = Instant::now();
    let relay = bed
        .relay()
        .workers(4)
        .route("email.*", sink)
        .rate_limit(RateLimit::per_second(10))
        .start()
        .unwrap();
    let seen = bed.signals.until(|s| count_delivered(s) == 100);
    let took = started.elapsed();
    relay.shutdown(PATIENCE).unwrap();

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 100, "each event handed over once");
    let mut delivered: Vec<_> = calls.iter().map(|(_, id, _)| *id).collect();
    delivered.sort();
    assert_eq!(delivered, ids);
    assert!(
        calls.iter().all(|(_, _, attempt)| *attempt == 1),
        "waiting is not an attempt"
    );
    assert!(retries(&seen).is_empty(), "waiting is not a failure");
    let starts: Vec<Instant> = calls.iter().map(|(at, _, _)| *at).collect();
    let busiest = busiest_window(&starts, Duration::from_secs(1));
    assert!(busiest <= 10, "{busiest} deliveries within one second");
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(11),
        "took {took:?}"
    );
    assert_eq!(pending(&mut bed.conn()), 0);
}

#[test]
fn a_limit_on_one_subscription_leaves_another_at_full_speed() {
    let bed = setup();
    let (slow, slow_calls) = timed();
    let (fast, fast_calls) = timed();
    // Registered before the events are committed, so both get them all.
    for name in ["email", "audit"] {
        outbox::register_subscription(&mut bed.conn(), name, &["t"]).unwrap();
    }
    let relay = bed
        .relay()
        .subscribe("email", &["t"], slow)
        .rate_limit(RateLimit::new(2, Duration::from_secs(60)))
        .subscribe("audit", &["t"], fast)
        .start()
        .unwrap();
    bed.publish(&[("t", None); 5]);
    let seen = bed.signals.until(|s| count_delivered(s) == 7);
    assert_eq!(fast_calls.lock().unwrap().len(), 5);
    assert_eq!(slow_calls.lock().unwrap().len(), 2, "two a minute");
    // Stopped while three wait: released, unattempted, nothing dead.
    relay.shutdown(PATIENCE).unwrap();
    assert!(retries(&seen).is_empty());
    assert_eq!(dead_letters(&mut bed.conn()), []);
    let waiting = outbox::subscription_status(&mut bed.conn(), "email").unwrap();
    assert_eq!(waiting.total.pending, 3, "{waiting:?}");
    assert_eq!(waiting.total.retrying, 0, "{waiting:?}");
    // A new relay (a new limit) delivers them, at their first attempt.
    let (again, again_calls) = timed();
    let relay = bed
        .relay()
        .subscribe("email", &["t"], again)
        .rate_limit(RateLimit::per_second(100))
        .start()
        .unwrap();
    bed.signals.until(|s| count_delivered(s) == 3);
    relay.shutdown(PATIENCE).unwrap();
    let attempts: Vec<i32> = again_calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, attempt)| *attempt)
        .collect();
    assert_eq!(attempts, [1, 1, 1]);
    assert!(seen.iter().all(|s| !matches!(s, Signal::Dead { .. })));
}

#[test]
fn a_rate_limit_needs_a_route_before_it_and_a_positive_limit() {
    let bed = setup();
    let error = bed
        .relay()
        .rate_limit(RateLimit::per_second(10))
        .route("*", |_: &StoredEvent| Ok(()))
        .start()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid relay configuration: rate_limit must follow the route or subscription it limits"
    );
    let error = bed
        .relay()
        .route("*", |_: &StoredEvent| Ok(()))
        .rate_limit(RateLimit::per_second(0))
        .start()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid relay configuration: rate_limit must allow at least one delivery"
    );
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_relay_takes_a_rate() {
    use crate::cli::{outbox, stderr};
    let bed = setup();
    bed.publish(&[("t", None); 10]);
    let started = Instant::now();
    let output = outbox(
        bed.db.url(),
        &["relay", "--sink", "stdout", "--drain", "--rate", "5/s"],
    );
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 10);
    // Five at once, the next five a second later.
    assert!(took >= Duration::from_secs(1), "took {took:?}");
    assert_eq!(pending(&mut bed.conn()), 0);

    for bad in ["0/s", "ten/s", "5", "5/0s", "5/fortnight"] {
        let output = outbox(bed.db.url(), &["relay", "--sink", "stdout", "--rate", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad}: {}", stderr(&output));
        assert!(stderr(&output).contains("--rate"), "{}", stderr(&output));
    }
}
