//! [`RelayBuilder`]: the relay's settings, their defaults and their limits.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;
use serde::de::DeserializeOwned;

use super::rate::RateLimit;
use super::routing::{Routes, TopicPattern};
use super::subscription::Served;
use super::worker::Worker;
use super::{listener, Config, PgPool, Relay, Shared};
use crate::backoff::Backoff;
use crate::error::Error;
use crate::event::{Event, StoredEvent};
use crate::observe::{NoopObserver, Observer};
use crate::sink::{DeliveryError, Handler, Sink};

/// Configures and starts a [`Relay`]. Every setting has a default; `start`
/// checks them all and names the first impossible one in
/// [`Error::Config`].
pub struct RelayBuilder {
    pool: PgPool,
    listen_url: Option<String>,
    routes: Routes,
    route_error: Option<Error>,
    subscriptions: Vec<Served>,
    /// What `.rate_limit` applies to: the route or subscription added last.
    last_added: Option<LastAdded>,
    name: Option<String>,
    workers: usize,
    batch_size: u32,
    poll_interval: Duration,
    lease: Duration,
    max_attempts: u32,
    backoff: Backoff,
    vacuum: bool,
    observer: Arc<dyn Observer>,
}

impl RelayBuilder {
    /// Default number of worker threads.
    pub const DEFAULT_WORKERS: usize = 4;
    /// Default number of events claimed per round.
    pub const DEFAULT_BATCH_SIZE: u32 = 100;
    /// Default interval of the fallback poll.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// Default lease on claimed events.
    pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(30);
    /// Default number of attempts before an event is dead-lettered: the
    /// fewest whose 41 delays, with the default [`Backoff`], add up to at
    /// least 24 h however much jitter shortens them (24.1–30.1 h: 12
    /// doubling delays from 1 s to 2,048 s, then 29 at the 1 h cap). An
    /// outage of up to a day dead-letters nothing.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 42;

    /// Most worker threads one relay may run.
    pub const MAX_WORKERS: usize = 256;
    /// Largest batch one claim may take.
    pub const MAX_BATCH_SIZE: u32 = 10_000;
    /// Shortest lease: a claim must outlive at least one round trip.
    pub const MIN_LEASE_DURATION: Duration = Duration::from_millis(100);

    pub(super) fn new(pool: PgPool) -> Self {
        RelayBuilder {
            pool,
            listen_url: None,
            routes: Routes::default(),
            route_error: None,
            subscriptions: Vec::new(),
            last_added: None,
            name: None,
            workers: Self::DEFAULT_WORKERS,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            lease: Self::DEFAULT_LEASE_DURATION,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            backoff: Backoff::default(),
            vacuum: true,
            observer: Arc::new(NoopObserver),
        }
    }

    /// Wakes the relay through `LISTEN outbox_events` on a dedicated
    /// connection to `database_url` (normally the pool's URL), so a
    /// committed event is picked up within milliseconds. Without it the
    /// relay only polls, every `poll_interval`. Defaults to no listener
    /// (and a warning at start).
    ///
    /// The URL is not taken from the pool: diesel's `ConnectionManager`
    /// keeps the URL it was built with private (diesel 2.3 has no accessor),
    /// and the listener needs a long-lived session connection of its own,
    /// which may have to bypass a connection pooler (PgBouncer in transaction
    /// mode drops `LISTEN` registrations) that the pool goes through. Pass
    /// the pool's URL unless such a pooler sits in between.
    pub fn listen(mut self, database_url: impl Into<String>) -> Self {
        self.listen_url = Some(database_url.into());
        self
    }

    /// Delivers topics matching `pattern` (`order.approved`, `order.*` or
    /// `*`) of the [default subscription](super::DEFAULT_SUBSCRIPTION) to
    /// `sink`; the most specific pattern wins. A relay claims only the
    /// topics it routes: events of other topics stay queued for a relay
    /// that routes them. Relays serving the default subscription share its
    /// events: each event goes to one of them. Use [`Self::subscribe`] for
    /// a consumer that must get every event whatever other consumers do.
    /// Defaults to no routes (`start` requires a route or a subscription).
    pub fn route(mut self, pattern: &str, sink: impl Sink) -> Self {
        let added = TopicPattern::parse(pattern)
            .and_then(|p| self.routes.add(p.clone(), Arc::new(sink)).map(|()| p));
        match added {
            Ok(pattern) => self.last_added = Some(LastAdded::Route(pattern)),
            Err(error) => {
                self.last_added = None;
                self.route_error.get_or_insert(error);
            }
        }
        self
    }

    /// Holds the route or subscription added just before (by
    /// [`route`](Self::route), [`handle`](Self::handle),
    /// [`subscribe`](Self::subscribe) or
    /// [`subscribe_handler`](Self::subscribe_handler)) to `limit`: at most
    /// so many deliveries started in any window, across all workers of
    /// this relay (see [`RateLimit`] for what waiting means and how several
    /// relay processes compose). Give clones of one limit to several
    /// routes to share one budget. With nothing added before it, `start`
    /// fails with [`Error::Config`].
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let manager = diesel::r2d2::ConnectionManager::new("postgres://localhost/app");
    /// # let pool = diesel::r2d2::Pool::builder().build_unchecked(manager);
    /// // The email provider allows 10 requests a second.
    /// let relay = outbox::Relay::builder(pool)
    ///     .subscribe("email", &["order.approved"], |event: &outbox::StoredEvent| {
    ///         println!("email for {}", event.id);
    ///         Ok(())
    ///     })
    ///     .rate_limit(outbox::RateLimit::per_second(10))
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        if let Some(problem) = limit.problem() {
            self.route_error.get_or_insert(Error::Config {
                field: "rate_limit",
                reason: problem.to_owned(),
            });
            return self;
        }
        match &self.last_added {
            Some(LastAdded::Route(pattern)) => self.routes.limit(Some(pattern), &limit),
            Some(LastAdded::Subscription(index)) => {
                self.subscriptions[*index].routes.limit(None, &limit)
            }
            None => {
                self.route_error.get_or_insert(Error::Config {
                    field: "rate_limit",
                    reason: "must follow the route or subscription it limits".into(),
                });
            }
        }
        self
    }

    /// Delivers events of type `E` (topic `E::TOPIC`) to a typed handler
    /// that receives the decoded event and the stored event (id, attempt,
    /// headers). A payload that no longer decodes into `E` is a permanent
    /// failure carrying serde's message.
    pub fn handle<E, F>(self, handler: F) -> Self
    where
        E: Event + DeserializeOwned + 'static,
        F: Fn(E, &StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
    {
        self.route(E::TOPIC, Handler::<E, F>::new(handler))
    }

    /// Serves the subscription `name`: every event of a topic matching one
    /// of `patterns` (`order.approved`, `order.*`, `*`) committed after the
    /// subscription was first registered goes to `sink`, whatever other
    /// subscriptions do, with its own retries, per-key order and dead
    /// letters. The subscription is registered in the database the first
    /// time a relay serving it connects, and keeps its events from then on
    /// while no relay runs (`outbox subscriptions remove` ends it). Relays
    /// serving the same subscription share its events; each subscription
    /// gets its own `workers` threads, so a slow sink never holds up
    /// another subscription.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let manager = diesel::r2d2::ConnectionManager::new("postgres://localhost/app");
    /// # let pool = diesel::r2d2::Pool::builder().build_unchecked(manager);
    /// let relay = outbox::Relay::builder(pool)
    ///     .subscribe("email", &["order.approved"], |event: &outbox::StoredEvent| {
    ///         println!("email for {}", event.id);
    ///         Ok(())
    ///     })
    ///     .subscribe("audit", &["order.*", "user.*"], |event: &outbox::StoredEvent| {
    ///         println!("audit {} {}", event.topic, event.id);
    ///         Ok(())
    ///     })
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe(mut self, name: &str, patterns: &[&str], sink: impl Sink) -> Self {
        self.add_subscription(Served::named(name, patterns, Arc::new(sink)));
        self
    }

    /// Serves the subscription `name` with a typed handler of `E` (topic
    /// `E::TOPIC`), as [`Self::handle`] does for the default subscription.
    pub fn subscribe_handler<E, F>(mut self, name: &str, handler: F) -> Self
    where
        E: Event + DeserializeOwned + 'static,
        F: Fn(E, &StoredEvent) -> Result<(), DeliveryError> + Send + Sync + 'static,
    {
        self.add_subscription(Served::named(
            name,
            &[E::TOPIC],
            Arc::new(Handler::<E, F>::new(handler)),
        ));
        self
    }

    fn add_subscription(&mut self, served: Result<Served, Error>) {
        match served {
            Ok(served)
                if served.name == super::DEFAULT_SUBSCRIPTION
                    || self.subscriptions.iter().any(|s| s.name == served.name) =>
            {
                self.route_error.get_or_insert(Error::Config {
                    field: "subscribe",
                    reason: format!(
                        "subscription {:?} is declared twice (or is the default subscription, which .route and .handle fill)",
                        served.name
                    ),
                });
            }
            Ok(served) => {
                self.last_added = Some(LastAdded::Subscription(self.subscriptions.len()));
                self.subscriptions.push(served);
                return;
            }
            Err(error) => {
                self.route_error.get_or_insert(error);
            }
        }
        // Nothing added: a `.rate_limit` next must not land elsewhere.
        self.last_added = None;
    }

    /// The name recorded in `claimed_by` and in logs. Defaults to
    /// `relay-<pid>-<random>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Worker threads, each delivering one batch at a time (1 to
    /// [`Self::MAX_WORKERS`]). Each holds one pooled connection while it
    /// works through a batch and none while idle: size the pool for
    /// `workers` plus the application's own use. Defaults to
    /// [`Self::DEFAULT_WORKERS`] (4).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Events claimed per round (1 to [`Self::MAX_BATCH_SIZE`]). Larger batches
    /// cost fewer round trips; a batch must be delivered within the lease.
    /// Defaults to [`Self::DEFAULT_BATCH_SIZE`] (100).
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How often an idle worker looks for due events without being woken:
    /// the fallback for missed notifications, and what finds retries and
    /// delayed events when they come due. Must be > 0. Defaults to
    /// [`Self::DEFAULT_POLL_INTERVAL`] (1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a claim holds an event. If the relay dies, the event comes
    /// due again this long after it was claimed; a worker renews the lease
    /// of its batch before sink calls that might outlast it, but cannot
    /// interrupt a call, so keep every call under half the lease.
    /// At least [`Self::MIN_LEASE_DURATION`]. Defaults to
    /// [`Self::DEFAULT_LEASE_DURATION`] (30 s).
    pub fn lease_duration(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Attempts before a failing event is dead-lettered (at least 1).
    /// Defaults to [`Self::DEFAULT_MAX_ATTEMPTS`] (42: with the default backoff,
    /// 24.1–30.1 h of retrying). With a shorter backoff cap, raise it to
    /// keep outlasting the outages you plan for.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The retry schedule. Defaults to [`Backoff::default`] (1 s doubling
    /// to a 1 h cap, 20% jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Whether the relay vacuums its hot tables (`outbox.cursors`, rewritten
    /// twice per batch, and the `outbox.deliveries` queue) itself while it
    /// delivers: after every 1,000 settled events, at most once a second,
    /// and with `SKIP_LOCKED` so it never waits for autovacuum or another
    /// relay, since autovacuum looks at a database only once per
    /// `autovacuum_naptime` (1 min by default). It needs the role to own
    /// the tables (or the database); otherwise the relay says so once and
    /// leaves them to autovacuum. The log, `outbox.events`, needs no vacuum:
    /// it is truncated in bulk. Defaults to on.
    pub fn vacuum(mut self, enabled: bool) -> Self {
        self.vacuum = enabled;
        self
    }

    /// Hooks for metrics, logs and tests. Defaults to [`NoopObserver`].
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Arc::new(observer);
        self
    }

    /// Checks the settings and starts the threads. Does not touch the
    /// database: a relay started while the database is down delivers once
    /// it is back.
    pub fn start(self) -> Result<Relay, Error> {
        let config = self.check()?;
        let name = self.name.unwrap_or_else(default_name);
        if name.is_empty() || name.contains('\0') {
            return config_error("name", "must be non-empty and free of NUL characters");
        }
        if let Some(url) = &self.listen_url {
            super::pq::PqListener::check_url(url).map_err(|reason| Error::Config {
                field: "listen",
                // libpq quotes the whole URL, password included.
                reason: format!(
                    "is not a PostgreSQL connection URL: {}",
                    crate::error::redact_passwords(&reason)
                ),
            })?;
        } else {
            tracing::warn!(relay = %name, poll_interval = ?self.poll_interval, "no listener configured: events wait up to a poll interval; call RelayBuilder::listen(url) with the pool's URL to pick them up within milliseconds");
        }
        let listening = self.listen_url.is_some();
        let mut subscriptions = self.subscriptions;
        if !self.routes.is_empty() {
            subscriptions.insert(0, Served::default_with(self.routes));
        }
        let workers = config.workers * subscriptions.len();
        let vacuum = config.vacuum;
        let poll_interval = config.poll_interval;
        let shared = Arc::new(Shared {
            name,
            pool: self.pool,
            config,
            subscriptions,
            observer: self.observer,
            counters: Default::default(),
            wakeup: super::wakeup::Wakeup::new(listening, workers, poll_interval),
            housekeeping: super::housekeeping::Housekeeping::new(vacuum),
        });
        let (shutdown_tx, shutdown_rx) = bounded::<()>(0);
        let (finished_tx, finished_rx) = bounded::<()>(0);
        let mut threads = Vec::new();
        let spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
            let finished = finished_tx.clone();
            std::thread::Builder::new().name(name).spawn(move || {
                let _finished = finished;
                body();
            })
        };
        let io_error = |e: std::io::Error| Error::Config {
            field: "workers",
            reason: format!("could not spawn a thread: {e}"),
        };
        if let Some(url) = self.listen_url {
            let wake = shared
                .subscriptions
                .iter()
                .map(|s| s.wake_tx.clone())
                .collect();
            let (shared, shutdown) = (shared.clone(), shutdown_rx.clone());
            threads.push(
                spawn(
                    "outbox-listener".into(),
                    Box::new(move || listener::run(shared, url, wake, shutdown)),
                )
                .map_err(io_error)?,
            );
        }
        {
            let (shared, shutdown) = (shared.clone(), shutdown_rx.clone());
            threads.push(
                spawn(
                    "outbox-housekeeper".into(),
                    Box::new(move || super::housekeeping::run(shared, shutdown)),
                )
                .map_err(io_error)?,
            );
        }
        for (subscription, served) in shared.subscriptions.iter().enumerate() {
            for index in 0..shared.config.workers {
                let worker = Worker {
                    shared: shared.clone(),
                    subscription,
                    first_lane: index,
                    shutdown: shutdown_rx.clone(),
                };
                threads.push(
                    spawn(
                        format!("outbox-{}-{index}", served.name),
                        Box::new(move || worker.run()),
                    )
                    .map_err(io_error)?,
                );
            }
        }
        tracing::info!(
            relay = %shared.name,
            subscriptions = ?shared
                .subscriptions
                .iter()
                .map(|s| format!("{}: {}", s.name, s.routes.patterns().join(", ")))
                .collect::<Vec<_>>(),
            workers = shared.config.workers,
            batch_size = shared.config.batch_size,
            "relay started"
        );
        Ok(Relay {
            shared,
            stopper: super::Stopper::new(shutdown_tx),
            finished: finished_rx,
            threads,
        })
    }

    fn check(&self) -> Result<Config, Error> {
        if let Some(error) = &self.route_error {
            return Err(match error {
                Error::Config { field, reason } => Error::Config {
                    field,
                    reason: reason.clone(),
                },
                other => Error::Config {
                    field: "route",
                    reason: other.to_string(),
                },
            });
        }
        if self.routes.is_empty() && self.subscriptions.is_empty() {
            return config_error(
                "route",
                "is missing: add .route(pattern, sink), .handle(handler) or .subscribe(name, patterns, sink)",
            );
        }
        if !(1..=Self::MAX_WORKERS).contains(&self.workers) {
            return config_error(
                "workers",
                format!(
                    "{} is not between 1 and {}",
                    self.workers,
                    Self::MAX_WORKERS
                ),
            );
        }
        if !(1..=Self::MAX_BATCH_SIZE).contains(&self.batch_size) {
            return config_error(
                "batch_size",
                format!(
                    "{} is not between 1 and {}",
                    self.batch_size,
                    Self::MAX_BATCH_SIZE
                ),
            );
        }
        if self.poll_interval.is_zero() {
            return config_error("poll_interval", "must be greater than zero");
        }
        if self.lease < Self::MIN_LEASE_DURATION {
            return config_error(
                "lease_duration",
                format!(
                    "{:?} is shorter than {:?}",
                    self.lease,
                    Self::MIN_LEASE_DURATION
                ),
            );
        }
        if self.max_attempts == 0 {
            return config_error("max_attempts", "must be at least 1");
        }
        self.backoff
            .check()
            .map_err(|(field, reason)| Error::Config { field, reason })?;
        Ok(Config {
            workers: self.workers,
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            lease: self.lease,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            vacuum: self.vacuum,
        })
    }
}

fn config_error<T>(field: &'static str, reason: impl Into<String>) -> Result<T, Error> {
    Err(Error::Config {
        field,
        reason: reason.into(),
    })
}

fn default_name() -> String {
    format!("relay-{}-{:04x}", std::process::id(), rand::random::<u16>())
}

/// The route or subscription a [`RelayBuilder::rate_limit`] applies to.
enum LastAdded {
    Route(TopicPattern),
    /// Its index in `subscriptions`.
    Subscription(usize),
}
