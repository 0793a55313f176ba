//! The commands that read or change the database directly: migrate,
//! publish, status, dead-letters (subscriptions: `subscriptions.rs`).

use std::error::Error;
use std::fmt;
use std::io::{IsTerminal, Read, Write};

use diesel::{Connection, PgConnection};

use crate::args::{Cli, DeadLetters, Output, Publish, Which, WhichPurge};
use crate::stdout::stdout;
use crate::{conninfo, table};

pub type Result<T = ()> = std::result::Result<T, Box<dyn Error>>;

/// A mistake in how the command was called: exit code 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for Usage {}

/// The database URL, checked to be one libpq can read, so that a mistake
/// is a usage error naming what was expected (libpq's own message for it
/// names neither).
pub fn database_url(cli: &Cli) -> Result<&str> {
    let url = cli
        .database_url
        .as_deref()
        .filter(|url| !url.trim().is_empty())
        .ok_or_else(|| Usage("no database: set DATABASE_URL or pass --database-url".into()))?;
    conninfo::check(url)
        .map_err(|reason| Usage(format!("invalid {}: {reason}", cli.database_url_source)))?;
    Ok(url)
}

/// A connection for one command. Without diesel's statement cache: a
/// command runs a few statements once, and so it works through a
/// transaction-mode pooler (PgBouncer) too.
pub fn connect(cli: &Cli) -> Result<PgConnection> {
    let url = database_url(cli)?;
    let mut conn = PgConnection::establish(url).map_err(outbox::Error::from)?;
    conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
    Ok(conn)
}

pub fn migrate(cli: &Cli) -> Result {
    let applied = outbox::migrate(&mut connect(cli)?)?;
    if applied == 0 {
        writeln!(stdout(), "schema up to date")?;
    } else {
        writeln!(stdout(), "applied {applied} migration(s)")?;
    }
    Ok(())
}

pub fn publish(cli: &Cli, args: &Publish) -> Result {
    let text = if args.payload == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        args.payload.clone()
    };
    let payload: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Usage(format!("--payload is not JSON: {e}")))?;
    let mut event = outbox::NewEvent::dynamic(&args.topic, payload);
    if let Some(key) = &args.key {
        event = event.key(key);
    }
    for (name, value) in &args.headers {
        event = event.header(name, value);
    }
    if let Some(delay) = args.delay {
        event = event.delay(delay);
    }
    if let Some(key) = &args.idempotency_key {
        event = event.idempotency_key(key);
    }
    let mut conn = connect(cli)?;
    let id = outbox::transaction(&mut conn, |tx| tx.publish_event(event))
        .map_err(outbox::Error::from)?;
    writeln!(stdout(), "{id}")?;
    Ok(())
}

pub fn status(cli: &Cli, output: &Output) -> Result {
    let status = outbox::status(&mut connect(cli)?)?;
    let mut out = stdout();
    if output.json() {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
        return Ok(());
    }
    let row = |name: &str, c: &outbox::QueueCounts| {
        vec![
            name.to_owned(),
            c.pending.to_string(),
            c.due_now.to_string(),
            c.scheduled.to_string(),
            c.in_flight.to_string(),
            c.retrying.to_string(),
            c.dead_letters.to_string(),
            c.oldest_pending_age_seconds
                .map_or("-".to_owned(), |s| format!("{s:.0}")),
        ]
    };
    let mut rows: Vec<Vec<String>> = status
        .topics
        .iter()
        .map(|t| row(&t.topic, &t.counts))
        .collect();
    rows.push(row("TOTAL", &status.total));
    table::print(
        &mut out,
        &[
            "TOPIC",
            "PENDING",
            "DUE",
            "SCHEDULED",
            "IN_FLIGHT",
            "RETRYING",
            "DEAD",
            "OLDEST_AGE_S",
        ],
        &rows,
    )?;
    writeln!(out)?;
    crate::subscriptions::print(&mut out, &outbox::subscriptions(&mut connect(cli)?)?)?;
    Ok(())
}

pub fn dead_letters(cli: &Cli, command: &DeadLetters) -> Result {
    match command {
        DeadLetters::List {
            subscription,
            topic,
            since,
            limit,
            output,
        } => {
            let since = since
                .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() - d))
                .transpose()
                .map_err(|_| Usage("--since is too long".into()))?;
            let list = outbox::dead_letters(
                &mut connect(cli)?,
                subscription.as_deref(),
                topic.as_deref(),
                since,
                *limit,
            )?;
            let mut out = stdout();
            if output.json() {
                let rows: Vec<_> = list
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "subscription": d.subscription, "id": d.id, "topic": d.topic, "key": d.key, "attempts": d.attempts,
                            "failed_at": d.failed_at, "last_error": d.last_error,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    vec![
                        d.subscription.clone(),
                        d.id.to_string(),
                        d.topic.clone(),
                        d.key.clone().unwrap_or_else(|| "-".into()),
                        d.attempts.to_string(),
                        d.failed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        table::cell(&d.last_error, 80),
                    ]
                })
                .collect();
            table::print(
                &mut out,
                &[
                    "SUBSCRIPTION",
                    "ID",
                    "TOPIC",
                    "KEY",
                    "ATTEMPTS",
                    "FAILED_AT",
                    "LAST_ERROR",
                ],
                &rows,
            )?;
            Ok(())
        }
        DeadLetters::Show {
            id,
            subscription,
            output,
        } => {
            let all = outbox::dead_letter(
                &mut connect(cli)?,
                subscription.as_deref(),
                outbox::EventId(*id),
            )?;
            if all.is_empty() {
                return Err(format!("no dead letter with id {id}").into());
            }
            let mut out = stdout();
            if output.json() {
                // One object when one subscription gave up on it (the
                // common case), an array otherwise.
                match all.as_slice() {
                    [dead] => writeln!(out, "{}", serde_json::to_string_pretty(dead)?)?,
                    _ => writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?,
                }
                return Ok(());
            }
            for (n, dead) in all.iter().enumerate() {
                if n > 0 {
                    writeln!(out)?;
                }
                show(&mut out, dead)?;
            }
            Ok(())
        }
        DeadLetters::Replay {
            which,
            subscription,
            dry_run,
        } => {
            let selection = replay_selection(which);
            let subscription = subscription.as_deref();
            let mut conn = connect(cli)?;
            let total = outbox::count_dead_letters(&mut conn, subscription, &selection)?;
            if *dry_run {
                writeln!(stdout(), "would replay {total} dead letter(s)")?;
                return Ok(());
            }
            let terminal = std::io::stderr().is_terminal() && total > 1000;
            let replayed =
                outbox::replay_dead_letters(&mut conn, subscription, &selection, 1000, |done| {
                    if terminal {
                        let _ = write!(std::io::stderr(), "\rreplayed {done}/{total}");
                        let _ = std::io::stderr().flush();
                    }
                })?;
            if terminal {
                let _ = writeln!(std::io::stderr());
            }
            writeln!(stdout(), "replayed {replayed} dead letter(s)")?;
            Ok(())
        }
        DeadLetters::Purge {
            which,
            subscription,
            yes,
        } => {
            let selection = purge_selection(which)?;
            let subscription = subscription.as_deref();
            let mut conn = connect(cli)?;
            let total = outbox::count_dead_letters(&mut conn, subscription, &selection)?;
            if !yes
                && total > 0
                && !confirm(
                    &format!("would purge {total} dead letter(s)"),
                    &format!("Delete {total} dead letter(s) for good?"),
                )?
            {
                writeln!(stdout(), "nothing purged")?;
                return Ok(());
            }
            let purged = outbox::purge_dead_letters(&mut conn, subscription, &selection)?;
            writeln!(stdout(), "purged {purged} dead letter(s)")?;
            Ok(())
        }
    }
}

/// One dead letter in full, for people.
fn show(out: &mut impl Write, dead: &outbox::DeadLetter) -> Result {
    let key = dead.key.as_deref().unwrap_or("-");
    writeln!(out, "subscription: {}", dead.subscription)?;
    writeln!(out, "id:           {}", dead.id)?;
    writeln!(out, "topic:        {}", dead.topic)?;
    writeln!(out, "key:          {key}")?;
    writeln!(out, "created_at:   {}", dead.created_at.to_rfc3339())?;
    writeln!(out, "failed_at:    {}", dead.failed_at.to_rfc3339())?;
    writeln!(out, "attempts:     {}", dead.attempts)?;
    writeln!(out, "last_error:   {}", dead.last_error)?;
    let headers = serde_json::to_string(&dead.headers)?;
    writeln!(out, "headers:      {headers}")?;
    let payload = serde_json::to_string_pretty(&dead.payload)?;
    writeln!(out, "payload:\n{payload}")?;
    Ok(())
}

/// Asks on the terminal whether to go on (`question`); without a terminal,
/// a usage error saying `what` would happen and that `--yes` confirms.
pub fn confirm(what: &str, question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(Usage(format!("{what}: pass --yes to confirm")).into());
    }
    let _ = write!(std::io::stderr(), "{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn ids(ids: &[i64]) -> Vec<outbox::EventId> {
    ids.iter().copied().map(outbox::EventId).collect()
}

fn replay_selection(which: &Which) -> outbox::Selection {
    match (&which.topic, which.all) {
        (Some(topic), _) => outbox::Selection::Topic(topic.clone()),
        (None, true) => outbox::Selection::All,
        (None, false) => outbox::Selection::Ids(ids(&which.ids)),
    }
}

fn purge_selection(which: &WhichPurge) -> Result<outbox::Selection> {
    Ok(match (&which.topic, which.older_than, which.all) {
        (Some(topic), _, _) => outbox::Selection::Topic(topic.clone()),
        (None, Some(age), _) => {
            let age = chrono::Duration::from_std(age)
                .map_err(|_| Usage("--older-than is too long".into()))?;
            outbox::Selection::FailedBefore(chrono::Utc::now() - age)
        }
        (None, None, true) => outbox::Selection::All,
        (None, None, false) => outbox::Selection::Ids(ids(&which.ids)),
    })
}
