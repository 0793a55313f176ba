//! The command line: names and flags are a contract (docs/cli.md).

use std::sync::LazyLock;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Transactional outbox for PostgreSQL: migrate, publish, relay, inspect.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about)]
pub struct Cli {
    /// PostgreSQL connection: a postgres:// URL or a key=value string
    /// (default: the DATABASE_URL environment variable).
    // Not clap's `env`: clap counts a value from the environment as given
    // and prints `--database-url <DATABASE_URL>` in every usage line.
    #[arg(long, global = true)]
    pub database_url: Option<String>,

    /// Where `database_url` came from, for messages: `--database-url` or
    /// `DATABASE_URL`.
    #[arg(skip)]
    pub database_url_source: &'static str,

    /// Log format on stderr (what is logged: RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line, with `DATABASE_URL` standing in for a missing
    /// `--database-url`.
    pub fn with_environment(mut self) -> Self {
        if self.database_url.is_some() {
            self.database_url_source = "--database-url";
        } else if let Some(url) = std::env::var_os("DATABASE_URL") {
            self.database_url = Some(url.to_string_lossy().into_owned());
            self.database_url_source = "DATABASE_URL";
        }
        self
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the outbox schema (idempotent).
    Migrate,
    /// Publish one event; prints its id.
    Publish(Publish),
    /// Run a relay that delivers events to a sink.
    Relay(Box<Relay>),
    /// Show what is owed: pending, due, scheduled, in flight, retrying,
    /// dead, per topic and per subscription.
    Status {
        #[command(flatten)]
        output: Output,
    },
    /// List and remove subscriptions.
    #[command(subcommand)]
    Subscriptions(Subscriptions),
    /// List, show, replay and purge dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
}

#[derive(Debug, Subcommand)]
pub enum Subscriptions {
    /// List subscriptions: patterns, pending events, lag, dead letters.
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Remove a subscription, dropping what it still owes and its dead
    /// letters.
    Remove {
        /// The subscription's name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// How a command prints what it read: `--json` or `--format json|table`.
#[derive(Debug, Args)]
pub struct Output {
    /// Print JSON (fields documented in docs/cli.md); same as --format json.
    #[arg(long)]
    json: bool,
    /// Print a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table, conflicts_with = "json")]
    format: Format,
}

impl Output {
    pub fn json(&self) -> bool {
        self.json || self.format == Format::Json
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct Publish {
    /// The topic, e.g. order.approved.
    #[arg(long)]
    pub topic: String,
    /// Ordering key: events of one key are delivered in order.
    #[arg(long)]
    pub key: Option<String>,
    /// A header forwarded by sinks (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Deliver no earlier than this from now (500ms, 30s, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Publish only if no event with this key was published within the
    /// window (7 days by default); prints that event's id otherwise.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// The JSON payload, or - to read it from standard input.
    #[arg(long)]
    pub payload: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    Stdout,
    Webhook,
    Nats,
    Amqp,
    Redis,
    Kafka,
    Mqtt,
}

#[derive(Debug, Args)]
pub struct Relay {
    /// Where events go.
    #[arg(long, value_enum)]
    pub sink: SinkKind,
    // The relay's limits are checked here too, so that a bad value is a
    // usage error (exit 2) before the database is touched, not hidden behind
    // a database that is down or unmigrated.
    /// Worker threads.
    #[arg(
        long,
        default_value_t = outbox::RelayBuilder::DEFAULT_WORKERS,
        value_parser = clap::value_parser!(u64)
            .range(1..=outbox::RelayBuilder::MAX_WORKERS as u64)
            .map(|n| n as usize),
    )]
    pub workers: usize,
    /// Events claimed per round.
    #[arg(
        long,
        default_value_t = outbox::RelayBuilder::DEFAULT_BATCH_SIZE,
        value_parser = clap::value_parser!(u32)
            .range(1..=i64::from(outbox::RelayBuilder::MAX_BATCH_SIZE)),
    )]
    pub batch_size: u32,
    /// Fallback poll interval (500ms, 1s …).
    #[arg(long, value_parser = parse_positive_duration, default_value = "1s")]
    pub poll_interval: Duration,
    /// Attempts before an event is dead-lettered.
    #[arg(
        long,
        default_value_t = outbox::RelayBuilder::DEFAULT_MAX_ATTEMPTS,
        value_parser = clap::value_parser!(u32).range(1..),
    )]
    pub max_attempts: u32,
    /// How long a claim holds an event: a killed relay's events come due
    /// again this long after they were claimed (default 30s).
    #[arg(long, value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Delay before the first retry; it doubles per failure, shortened by
    /// up to 20% jitter (default 1s).
    #[arg(long, value_parser = parse_duration)]
    pub backoff_initial: Option<Duration>,
    /// Longest delay between two attempts (default 1h).
    #[arg(long, value_parser = parse_duration)]
    pub backoff_max: Option<Duration>,
    /// Topic patterns to deliver (repeatable; exact, prefix.* or *).
    #[arg(long = "topic", value_name = "PATTERN", default_value = "*")]
    pub topics: Vec<String>,
    /// Serve this named subscription (registered at first start): every
    /// event of its topics, whatever other subscriptions do. Without it the
    /// relay serves the default subscription, shared with other relays.
    #[arg(long, value_name = "NAME")]
    pub subscription: Option<String>,
    /// Deliver everything due, then exit 0 with a summary on stderr.
    #[arg(long)]
    pub drain: bool,
    /// At most N deliveries started in any window (10/s, 600/min, 5/100ms),
    /// across this relay's workers; per relay process.
    #[arg(long, value_name = "N/PER", value_parser = parse_rate)]
    pub rate: Option<(u32, Duration)>,
    /// LISTEN for wake-ups on this URL instead of the database URL: a
    /// direct connection to the server, when the database URL goes through
    /// a transaction-mode pooler (PgBouncer). The relay then also turns off
    /// prepared statements on its pooled connections.
    #[arg(long, value_name = "URL")]
    pub listen_url: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// webhook: the endpoint URL; mqtt: the broker URL
    /// (mqtt://user:password@host:1883, or mqtts://…).
    #[arg(long, required_if_eq_any([("sink", "webhook"), ("sink", "mqtt")]))]
    pub url: Option<String>,
    /// webhook: the Standard Webhooks signing secret (whsec_…).
    #[arg(long, env = "OUTBOX_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// webhook: an extra request header (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// webhook: the request timeout.
    #[arg(long, value_parser = parse_positive_duration, default_value = WEBHOOK_TIMEOUT.as_str())]
    pub timeout: Duration,

    /// nats: the server URL.
    #[arg(long, required_if_eq("sink", "nats"))]
    pub nats_url: Option<String>,
    /// nats: subjects are <prefix>.<topic>.
    #[arg(long, required_if_eq("sink", "nats"))]
    pub subject_prefix: Option<String>,

    /// amqp: the broker URL (amqp://user:password@host:port/vhost).
    #[arg(long, required_if_eq("sink", "amqp"))]
    pub amqp_url: Option<String>,
    /// amqp: the exchange to publish to (routing key = topic).
    #[arg(long, required_if_eq("sink", "amqp"))]
    pub exchange: Option<String>,

    /// redis: the server URL.
    #[arg(long, required_if_eq("sink", "redis"))]
    pub redis_url: Option<String>,
    /// redis: one stream for every topic (default: one per topic).
    #[arg(long)]
    pub stream: Option<String>,

    /// kafka: the bootstrap servers (host:port[,host:port…]).
    #[arg(long, required_if_eq("sink", "kafka"))]
    pub brokers: Option<String>,
    /// kafka: the Kafka topic, `{topic}` standing for the event topic
    /// (default: the event topic itself).
    #[arg(long, value_name = "TEMPLATE")]
    pub kafka_topic: Option<String>,
    /// kafka: the SASL/PLAIN user name (with --kafka-password).
    #[arg(long, requires = "kafka_password")]
    pub kafka_username: Option<String>,
    /// kafka: the SASL/PLAIN password.
    #[arg(long, env = "OUTBOX_KAFKA_PASSWORD", hide_env_values = true)]
    pub kafka_password: Option<String>,

    /// mqtt: 1 (acknowledged by PUBACK) or 2 (by PUBCOMP).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub qos: u8,
    /// mqtt: topics are <prefix>/<topic>, the topic's dots made slashes.
    #[arg(long, default_value = "outbox")]
    pub mqtt_topic_prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List dead letters, newest failure first.
    List {
        /// Only this subscription's.
        #[arg(long)]
        subscription: Option<String>,
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only those that failed within this long (30m, 2h, 7d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        output: Output,
    },
    /// Show one dead letter in full, payload and headers included.
    Show {
        /// The event id.
        id: i64,
        /// Only this subscription's (an event may have died in several).
        #[arg(long)]
        subscription: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Send dead letters back to the subscription that gave up on them,
    /// with the same id.
    Replay {
        #[command(flatten)]
        which: Which,
        /// Only this subscription's.
        #[arg(long)]
        subscription: Option<String>,
        /// Only say how many would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        which: WhichPurge,
        /// Only this subscription's.
        #[arg(long)]
        subscription: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// These event ids.
    pub ids: Vec<i64>,
    /// Every dead letter of this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct WhichPurge {
    /// These event ids.
    pub ids: Vec<i64>,
    /// Every dead letter of this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Those that failed longer ago than this (7d, 12h).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
}

/// `--timeout`'s default as `--help` shows it: the webhook sink's own.
static WEBHOOK_TIMEOUT: LazyLock<String> =
    LazyLock::new(|| humantime::format_duration(outbox::WebhookSink::DEFAULT_TIMEOUT).to_string());

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (use e.g. 500ms, 30s, 2h)"))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        zero if zero.is_zero() => Err("must be greater than zero".to_owned()),
        duration => Ok(duration),
    }
}

/// `10/s`, `600/min`, `5/100ms`: a count and a window.
fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let (count, per) = text
        .split_once('/')
        .ok_or_else(|| "expected N/PER, e.g. 10/s or 600/min".to_owned())?;
    let count: u32 = match count.trim().parse() {
        Ok(0) | Err(_) => return Err(format!("{count:?} is not a positive whole number")),
        Ok(count) => count,
    };
    let per = per.trim();
    // A bare unit is one of it: "s" is "1s".
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
        parse_positive_duration(per)?
    } else {
        parse_positive_duration(&format!("1{per}"))?
    };
    Ok((count, per))
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err("expected NAME=VALUE".to_owned()),
    }
}

/// `text` with every password the command line carries masked.
pub fn redact_secrets(cli: &Cli, text: &str) -> String {
    let mut urls: Vec<&str> = cli.database_url.iter().map(String::as_str).collect();
    let mut secrets: Vec<&str> = Vec::new();
    if let Command::Relay(relay) = &cli.command {
        urls.extend(relay.amqp_url.as_deref());
        urls.extend(relay.redis_url.as_deref());
        urls.extend(relay.nats_url.as_deref());
        urls.extend(relay.url.as_deref());
        urls.extend(relay.listen_url.as_deref());
        secrets.extend(relay.secret.as_deref());
        secrets.extend(relay.kafka_password.as_deref());
    }
    for url in urls {
        if let Some(password) = password_of(url) {
            secrets.push(password);
        }
    }
    let mut text = text.to_owned();
    for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "***");
    }
    text
}

/// The password in `scheme://user:password@host…`, if any.
pub fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.find('@')?];
    let colon = userinfo.find(':')?;
    Some(&userinfo[colon + 1..])
}
