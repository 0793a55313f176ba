//! `outbox subscriptions list|remove`.

use std::io::Write;

use crate::args::{Cli, Subscriptions};
use crate::commands::{confirm, connect, Result};
use crate::stdout::stdout;
use crate::table;

pub fn run(cli: &Cli, command: &Subscriptions) -> Result {
    match command {
        Subscriptions::List { output } => {
            let list = outbox::subscriptions(&mut connect(cli)?)?;
            let mut out = stdout();
            if output.json() {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
                return Ok(());
            }
            print(&mut out, &list)
        }
        Subscriptions::Remove { name, yes } => {
            let mut conn = connect(cli)?;
            let Some(found) = outbox::subscriptions(&mut conn)?
                .into_iter()
                .find(|s| s.name == *name)
            else {
                return Err(format!("no subscription named {name:?}").into());
            };
            let what = format!(
                "would remove subscription {name:?} with {} pending event(s) and {} dead letter(s)",
                found.pending, found.dead_letters
            );
            if !yes
                && !confirm(
                    &what,
                    &format!(
                        "Remove subscription {name:?}, dropping {} pending event(s) and {} dead letter(s)?",
                        found.pending, found.dead_letters
                    ),
                )?
            {
                writeln!(stdout(), "nothing removed")?;
                return Ok(());
            }
            if outbox::remove_subscription(&mut conn, name)? {
                writeln!(stdout(), "removed subscription {name}")?;
            } else {
                writeln!(stdout(), "no subscription named {name:?} any more")?;
            }
            Ok(())
        }
    }
}

/// The subscriptions as a table: name, patterns, pending, lag, dead.
pub fn print(out: &mut impl Write, list: &[outbox::SubscriptionStatus]) -> Result {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.patterns.join(","),
                s.pending.to_string(),
                s.oldest_pending_age_seconds
                    .map_or("-".to_owned(), |age| format!("{age:.0}")),
                s.dead_letters.to_string(),
            ]
        })
        .collect();
    table::print(
        out,
        &["SUBSCRIPTION", "TOPICS", "PENDING", "OLDEST_AGE_S", "DEAD"],
        &rows,
    )?;
    Ok(())
}
