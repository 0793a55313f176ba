//! `outbox`: migrate the schema, publish, run a relay, and look after the
//! dead letters, from the command line. Every command calls the library's
//! public API; see docs/cli.md for the contract (names, flags, JSON output,
//! exit codes).

mod args;
mod commands;
mod conninfo;
mod relay;
mod stdout;
mod subscriptions;
mod table;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli.with_environment(),
        Err(usage) => return clap_exit(&usage),
    };
    init_logging(cli.log_format);
    let result = match &cli.command {
        Command::Migrate => commands::migrate(&cli),
        Command::Publish(publish) => commands::publish(&cli, publish),
        Command::Status { output } => commands::status(&cli, output),
        Command::Subscriptions(command) => subscriptions::run(&cli, command),
        Command::DeadLetters(dead) => commands::dead_letters(&cli, dead),
        Command::Relay(relay) => relay::run(&cli, relay),
    }
    .and_then(|()| Ok(stdout::stdout().flush()?));
    let code = match result {
        Ok(()) => 0,
        Err(error) => {
            // One clear line; never a password.
            let mut message = args::redact_secrets(&cli, &error_chain(&*error));
            if message.contains("outbox") && message.contains("does not exist") {
                message.push_str(" (run `outbox migrate` first)");
            }
            let _ = writeln!(std::io::stderr(), "error: {message}");
            let bad_setting = matches!(
                error.downcast_ref::<outbox::Error>(),
                Some(outbox::Error::Config { .. })
            );
            if error.is::<commands::Usage>() || bad_setting {
                2
            } else {
                1
            }
        }
    };
    if let Command::Relay(_) = cli.command {
        exit_skipping_exit_handlers(code);
    }
    ExitCode::from(code)
}

/// Ends the relay command without running C exit handlers. The relay may
/// leave threads it cannot join inside libpq: r2d2 opens pool connections
/// on threads of its own that nothing joins, and a relay thread that missed
/// the shutdown deadline finishes on its own. OpenSSL's exit handler
/// (`OPENSSL_cleanup`, which libpq's TLS registers) frees what such a
/// thread's handshake is using, and the process died of SIGSEGV (about one
/// exit in a few hundred, right after the relay started) instead of exiting
/// with `code`.
fn exit_skipping_exit_handlers(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once and touches no memory of
    // ours; what was written is flushed above, and nothing else needs
    // cleaning up (the database sees the connections close).
    unsafe { libc::_exit(i32::from(code)) }
}

/// What clap's `exit()` does (usage errors exit 2, help and version 0),
/// except that help or version text that cannot be written to standard
/// output is the same failure as any command's.
fn clap_exit(error: &clap::Error) -> ExitCode {
    match error.print() {
        Err(failure) if !error.use_stderr() => {
            let failure = stdout::failed(failure);
            let _ = writeln!(std::io::stderr(), "error: {failure}");
            ExitCode::from(1)
        }
        _ => ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2)),
    }
}

/// `RUST_LOG` chooses what is logged (default: info, with the broker
/// clients quieter: lapin logs whole returned messages, payloads included,
/// at warn), `--log-format` how: human-readable or one JSON object per line.
/// Whatever `RUST_LOG` says, ureq's wire dump stays off: at trace it prints
/// every request byte for byte, `Authorization` headers (a webhook URL's
/// password, API tokens from `--header`) included.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=error,async_nats=warn"))
        .add_directive(
            "ureq_proto::util=off"
                .parse()
                .unwrap_or_else(|_| unreachable!("a valid directive")),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// stderr that never fails: a log collector that went away (a closed pipe)
/// must not bring the relay down.
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
