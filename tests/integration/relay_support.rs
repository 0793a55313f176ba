//! What the relay tests share: a recording observer to wait on (no sleeps),
//! a recording sink, and a relay builder with quick test settings.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;
use outbox::{DeliveryError, EventId, StoredEvent};

use crate::pg;

/// One generous timeout for everything a test waits for.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// What the relay reported, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Signal {
    Claimed(Vec<EventId>),
    Delivered {
        id: EventId,
        attempt: i32,
    },
    Retry {
        id: EventId,
        attempt: i32,
        delay: Duration,
        error: String,
    },
    Dead {
        id: EventId,
        error: String,
    },
    Released(Vec<EventId>),
    LeaseLost(Vec<EventId>),
    StrandedRescued(Vec<EventId>),
    Reconnected(&'static str),
    Error(String),
}

/// An observer that forwards every hook into a channel.
#[derive(Clone)]
pub struct Recorder(Sender<Signal>);

impl outbox::Observer for Recorder {
    fn on_claimed(&self, events: &[StoredEvent]) {
        let _ = self
            .0
            .send(Signal::Claimed(events.iter().map(|e| e.id).collect()));
    }
    fn on_delivered(&self, event: &StoredEvent) {
        let _ = self.0.send(Signal::Delivered {
            id: event.id,
            attempt: event.attempts,
        });
    }
    fn on_retry(&self, event: &StoredEvent, error: &DeliveryError, delay: Duration) {
        let _ = self.0.send(Signal::Retry {
            id: event.id,
            attempt: event.attempts,
            delay,
            error: error.message().to_owned(),
        });
    }
    fn on_dead_lettered(&self, event: &StoredEvent, error: &str) {
        let _ = self.0.send(Signal::Dead {
            id: event.id,
            error: error.to_owned(),
        });
    }
    fn on_released(&self, events: &[EventId]) {
        let _ = self.0.send(Signal::Released(events.to_vec()));
    }
    fn on_lease_lost(&self, events: &[EventId]) {
        let _ = self.0.send(Signal::LeaseLost(events.to_vec()));
    }
    fn on_stranded_rescued(&self, events: &[EventId]) {
        let _ = self.0.send(Signal::StrandedRescued(events.to_vec()));
    }
    fn on_error(&self, error: &outbox::Error) {
        let _ = self.0.send(Signal::Error(error.to_string()));
    }
    fn on_reconnect(&self, what: &'static str) {
        let _ = self.0.send(Signal::Reconnected(what));
    }
}

/// The signals of one relay (or several sharing the recorder).
pub struct Signals(pub Receiver<Signal>);

impl Signals {
    /// Collects signals until `done` says the collected list is complete;
    /// panics with everything seen if that takes longer than [`PATIENCE`].
    pub fn until(&self, mut done: impl FnMut(&[Signal]) -> bool) -> Vec<Signal> {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while !done(&seen) {
            match self.0.recv_deadline(deadline) {
                Ok(signal) => seen.push(signal),
                Err(_) => panic!("timed out waiting; signals so far: {seen:#?}"),
            }
        }
        seen
    }

    /// Waits for `n` deliveries; returns the delivered ids in order.
    pub fn delivered(&self, n: usize) -> Vec<EventId> {
        let seen = self.until(|s| count_delivered(s) >= n);
        seen.iter()
            .filter_map(|s| match s {
                Signal::Delivered { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }
}

/// Waits for `n` deliveries; returns the size of every batch claimed until
/// then and the ids delivered, in delivery order.
pub fn claimed_and_delivered(bed: &RelayBed, n: usize) -> (Vec<usize>, Vec<EventId>) {
    let seen = bed.signals.until(|s| count_delivered(s) >= n);
    let claimed = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Claimed(ids) => Some(ids.len()),
            _ => None,
        })
        .collect();
    let delivered = seen
        .iter()
        .filter_map(|s| match s {
            Signal::Delivered { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    (claimed, delivered)
}

/// Every retry signal as (attempt, delay, error), in order.
pub fn retries(signals: &[Signal]) -> Vec<(i32, Duration, String)> {
    signals
        .iter()
        .filter_map(|s| match s {
            Signal::Retry {
                attempt,
                delay,
                error,
                ..
            } => Some((*attempt, *delay, error.clone())),
            _ => None,
        })
        .collect()
}

/// The outage scenario every sink test runs: the relay's sink points at
/// 127.0.0.1:`port`, where nothing listens yet. Publishes one event, waits
/// for two failed attempts whose errors start with `error_prefix`, then
/// opens a proxy from `port` to the real `upstream` and waits for the
/// delivery. Returns the event id and the errors of the failed attempts;
/// the relay is shut down.
#[cfg(any(
    feature = "redis",
    feature = "nats",
    feature = "amqp",
    feature = "mqtt"
))]
pub fn outage_then_recovery(
    bed: &RelayBed,
    relay: outbox::Relay,
    port: u16,
    upstream: &str,
    error_prefix: &str,
) -> (EventId, Vec<String>) {
    let ids = bed.publish(&[("t", None)]);
    let seen = bed.signals.until(|s| retries(s).len() == 2);
    let errors: Vec<String> = retries(&seen).into_iter().map(|(_, _, e)| e).collect();
    for error in &errors {
        assert!(error.starts_with(error_prefix), "{error}");
    }
    let _proxy = crate::tcp_proxy::TcpProxy::start(port, upstream);
    let seen = bed
        .signals
        .until(|s| s.iter().any(|s| matches!(s, Signal::Delivered { .. })));
    relay.shutdown(PATIENCE).unwrap();
    match seen.last() {
        Some(Signal::Delivered { id, attempt }) => {
            assert_eq!(*id, ids[0]);
            assert!(*attempt >= 3, "delivered at attempt {attempt}");
        }
        other => panic!("expected a delivery, got {other:?}"),
    }
    (ids[0], errors)
}

pub fn count_delivered(signals: &[Signal]) -> usize {
    signals
        .iter()
        .filter(|s| matches!(s, Signal::Delivered { .. }))
        .count()
}

/// A sink that records every call (id, attempt) and answers with `behave`.
#[derive(Clone)]
pub struct Recording {
    calls: Arc<Mutex<Vec<(EventId, i32)>>>,
}

impl Recording {
    pub fn new() -> Self {
        Recording {
            calls: Arc::default(),
        }
    }

    /// The sink: records the call, then answers with `behave`.
    pub fn sink(
        &self,
        behave: impl Fn(&StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
    ) -> impl outbox::Sink {
        let calls = self.calls.clone();
        move |event: &StoredEvent| {
            calls.lock().unwrap().push((event.id, event.attempts));
            behave(event)
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<(EventId, i32)> {
        self.calls.lock().unwrap().clone()
    }
}

/// A real sink, wrapped to record how many events the relay handed to
/// each of its `deliver_batch` calls.
#[cfg(any(
    feature = "redis",
    feature = "nats",
    feature = "amqp",
    feature = "mqtt"
))]
pub struct BatchSizes<S> {
    inner: S,
    sizes: Arc<Mutex<Vec<usize>>>,
}

#[cfg(any(
    feature = "redis",
    feature = "nats",
    feature = "amqp",
    feature = "mqtt"
))]
impl<S: outbox::Sink> BatchSizes<S> {
    /// `inner`, and the list its batch sizes go into.
    pub fn new(inner: S) -> (Self, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::<Mutex<Vec<usize>>>::default();
        let sink = BatchSizes {
            inner,
            sizes: sizes.clone(),
        };
        (sink, sizes)
    }
}

#[cfg(any(
    feature = "redis",
    feature = "nats",
    feature = "amqp",
    feature = "mqtt"
))]
impl<S: outbox::Sink> outbox::Sink for BatchSizes<S> {
    fn deliver(&self, event: &StoredEvent) -> Result<(), DeliveryError> {
        self.sizes.lock().unwrap().push(1);
        self.inner.deliver(event)
    }

    fn deliver_batch(&self, events: &[&StoredEvent]) -> Vec<Result<(), DeliveryError>> {
        self.sizes.lock().unwrap().push(events.len());
        self.inner.deliver_batch(events)
    }

    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
}

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// A test database, its pool and a recorder.
pub struct RelayBed {
    pub db: pg::TestDb,
    pub pool: PgPool,
    pub signals: Signals,
    recorder: Recorder,
}

pub fn setup() -> RelayBed {
    // OUTBOX_TEST_LOG=1: the relay's logs (all levels) in each failing
    // test's output.
    if std::env::var_os("OUTBOX_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("outbox=trace")
            .with_test_writer()
            .with_thread_names(true)
            .try_init();
    }
    let db = pg::test_db();
    let pool = pool(&db);
    let (recorder, signals) = recorder();
    RelayBed {
        db,
        pool,
        signals,
        recorder,
    }
}

/// A pool on `db` that connects lazily.
pub fn pool(db: &pg::TestDb) -> PgPool {
    Pool::builder()
        .max_size(8)
        .min_idle(Some(0))
        .build_unchecked(ConnectionManager::new(db.url()))
}

/// A recorder and the signals it forwards, for a relay of its own.
pub fn recorder() -> (Recorder, Signals) {
    let (tx, rx) = unbounded();
    (Recorder(tx), Signals(rx))
}

impl RelayBed {
    /// A relay with quick test settings: NOTIFY wake-ups, a 100 ms poll,
    /// retries after 20-50 ms, this bed's recorder.
    pub fn relay(&self) -> outbox::RelayBuilder {
        outbox::Relay::builder(self.pool.clone())
            .listen(self.db.url())
            .observer(self.recorder.clone())
            .poll_interval(Duration::from_millis(100))
            .backoff(outbox::Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(400),
                2.0,
                0.0,
            ))
    }

    /// The same without a listener: found by the poll only.
    pub fn poll_only(&self) -> outbox::RelayBuilder {
        outbox::Relay::builder(self.pool.clone())
            .observer(self.recorder.clone())
            .poll_interval(Duration::from_millis(100))
    }

    pub fn conn(&self) -> PgConnection {
        self.db.conn()
    }

    /// Publishes dynamic events (topic, key, payload {"n": i}), one
    /// transaction each; returns their ids.
    pub fn publish(&self, events: &[(&str, Option<&str>)]) -> Vec<EventId> {
        let mut conn = self.conn();
        events
            .iter()
            .enumerate()
            .map(|(n, (topic, key))| {
                outbox::transaction(&mut conn, |tx| {
                    let mut event =
                        outbox::NewEvent::dynamic(*topic, serde_json::json!({ "n": n }));
                    if let Some(key) = key {
                        event = event.key(*key);
                    }
                    tx.publish_event(event)
                })
                .unwrap()
            })
            .collect()
    }
}

/// The dead letters, oldest id first: (id, topic, attempts, last_error).
pub fn dead_letters(conn: &mut PgConnection) -> Vec<(i64, String, i32, String)> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        topic: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempts: i32,
        #[diesel(sql_type = diesel::sql_types::Text)]
        last_error: String,
    }
    diesel::sql_query("SELECT id, topic, attempts, last_error FROM outbox.dead_letters ORDER BY id")
        .load::<Row>(conn)
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.topic, r.attempts, r.last_error))
        .collect()
}
