//! The relay: delivers committed events to their sinks, retries failures
//! with backoff, and dead-letters what cannot be delivered.
//!
//! Threads: one listener (LISTEN on its own connection, only wakes),
//! `workers` workers per subscription served that each claim a batch,
//! deliver it and settle it in one round trip, and one housekeeper
//! (reclaims the log's storage, vacuums the small tables). A worker holds
//! one pooled connection per round and none while idle; the housekeeper,
//! one only while it works.

mod builder;
mod deliver;
mod housekeeping;
mod listener;
mod pq;
mod rate;
mod routing;
#[cfg(feature = "opentelemetry")]
mod spans;
mod subscription;
pub(crate) mod wakeup;
mod worker;

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;

use crate::backoff::Backoff;
use crate::error::Error;
use crate::observe::{Counters, Observer, RelayStats};

pub use builder::RelayBuilder;
pub use rate::RateLimit;
pub use routing::TopicPattern;
pub use subscription::DEFAULT_SUBSCRIPTION;

/// A subscription's routes, patterns and topics, checked (for
/// registering one without a relay).
pub(crate) fn compile_subscription(
    name: &str,
    patterns: &[&str],
) -> Result<(routing::Routes, Vec<String>, crate::store::TopicFilter), Error> {
    subscription::compile(name, patterns, None)
}

/// An r2d2 pool of diesel PostgreSQL connections, as the relay takes it.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// The validated settings of a running relay.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) batch_size: u32,
    pub(crate) poll_interval: Duration,
    pub(crate) lease: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) vacuum: bool,
}

/// What every relay thread shares.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) pool: PgPool,
    pub(crate) config: Config,
    /// The subscriptions this relay serves, each with `workers` workers.
    pub(crate) subscriptions: Vec<subscription::Served>,
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) counters: Counters,
    pub(crate) wakeup: wakeup::Wakeup,
    pub(crate) housekeeping: housekeeping::Housekeeping,
}

/// A running relay. Build one with [`Relay::builder`].
///
/// Stop it with [`Relay::shutdown`]; dropping it shuts it down too, waiting
/// up to [`Relay::DEFAULT_SHUTDOWN_DEADLINE`].
///
/// ```
/// # #[path = "../../tests/support/pg.rs"] mod pg;
/// # let db = pg::test_db();
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderApproved { order_id: i64 }
/// impl outbox::Event for OrderApproved { const TOPIC: &'static str = "order.approved"; }
///
/// let manager = diesel::r2d2::ConnectionManager::new(db.url());
/// // The relay takes up to `workers` connections while delivering.
/// let pool = diesel::r2d2::Pool::builder().max_size(6).build(manager)?;
///
/// let (sent, received) = crossbeam_channel::unbounded();
/// let relay = outbox::Relay::builder(pool.clone())
///     .listen(db.url())
///     .workers(2)
///     .handle(move |event: OrderApproved, meta| {
///         // "Send the email"; an Err here is retried with backoff.
///         sent.send((meta.id, event.order_id))?;
///         Ok(())
///     })
///     .start()?;
///
/// let mut conn = pool.get()?;
/// let id = outbox::transaction(&mut conn, |tx| tx.publish(&OrderApproved { order_id: 7 }))?;
/// assert_eq!(received.recv_timeout(Duration::from_secs(10))?, (id, 7));
/// relay.shutdown(Duration::from_secs(10))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Relay {
    shared: Arc<Shared>,
    stopper: Stopper,
    /// Every thread holds a clone of the sender side and drops it on exit.
    finished: crossbeam_channel::Receiver<()>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.shared.name)
            .field("config", &self.shared.config)
            .field(
                "subscriptions",
                &self
                    .shared
                    .subscriptions
                    .iter()
                    .map(|s| (&s.name, s.routes.patterns()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// How long dropping a relay waits for its threads.
    pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

    /// Starts configuring a relay that takes its connections from `pool`.
    pub fn builder(pool: PgPool) -> RelayBuilder {
        RelayBuilder::new(pool)
    }

    /// This relay's name, recorded as `claimed_by` in `outbox.cursors` and
    /// `outbox.deliveries`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Counters since the relay started.
    pub fn stats(&self) -> RelayStats {
        self.shared.counters.snapshot()
    }

    /// A handle that begins this relay's shutdown from anywhere (a signal
    /// handler, a sink, another thread) without waiting for it.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Stops claiming, lets deliveries in progress finish and settle
    /// (events claimed but not yet attempted go back to the queue), and
    /// joins every thread, waiting at most `deadline`.
    ///
    /// On [`Error::ShutdownTimeout`] the late threads still finish on their
    /// own; nothing is lost either way (what they hold comes due again when
    /// its lease expires).
    pub fn shutdown(mut self, deadline: Duration) -> Result<(), Error> {
        self.stop(deadline)
    }

    fn stop(&mut self, deadline: Duration) -> Result<(), Error> {
        if self.threads.is_empty() {
            return Ok(());
        }
        self.stopper.stop();
        let until = Instant::now() + deadline;
        // Disconnected once every thread has dropped its sender, which it
        // does as its very last step; a timeout means some are still busy.
        let all_exiting = loop {
            match self.finished.recv_deadline(until) {
                Ok(()) => continue,
                Err(RecvTimeoutError::Disconnected) => break true,
                Err(RecvTimeoutError::Timeout) => break false,
            }
        };
        let (done, late): (Vec<_>, Vec<_>) = self
            .threads
            .drain(..)
            .partition(|thread| all_exiting || thread.is_finished());
        for thread in done {
            let name = thread.thread().name().unwrap_or("relay thread").to_owned();
            if thread.join().is_err() {
                tracing::error!(relay = %self.shared.name, thread = %name, "relay thread panicked");
            }
        }
        if late.is_empty() {
            tracing::info!(relay = %self.shared.name, "relay stopped");
            Ok(())
        } else {
            let threads = late
                .iter()
                .map(|t| t.thread().name().unwrap_or("relay thread").to_owned())
                .collect::<Vec<_>>()
                .join(", ");
            Err(Error::ShutdownTimeout { threads })
        }
    }
}

/// Begins a relay's shutdown without waiting for it: the relay stops
/// claiming, finishes the delivery in progress and settles. Cloneable and
/// callable from any thread, any number of times. Join the threads with
/// [`Relay::shutdown`].
#[derive(Clone, Debug)]
pub struct Stopper {
    /// Dropping the sender disconnects every thread's receiver.
    signal: Arc<Mutex<Option<Sender<()>>>>,
}

impl Stopper {
    pub(crate) fn new(signal: Sender<()>) -> Self {
        Stopper {
            signal: Arc::new(Mutex::new(Some(signal))),
        }
    }

    /// Tells every relay thread to stop; returns at once.
    pub fn stop(&self) {
        self.signal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Err(error) = self.stop(Self::DEFAULT_SHUTDOWN_DEADLINE) {
            tracing::error!(relay = %self.shared.name, %error, "relay dropped");
        }
    }
}
