//! The crate's one error type.

/// Everything that can go wrong in `outbox`.
///
/// Errors from inside [`transaction`](crate::transaction) reach your closure as
/// [`diesel::result::Error`] (so that your own error type only needs
/// `From<diesel::result::Error>`); converting that back with
/// `outbox::Error::from` recovers the typed variant below.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic is empty, longer than [`MAX_TOPIC_LEN`](crate::MAX_TOPIC_LEN)
    /// bytes, or contains a control character. Fix the topic; nothing was
    /// written.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The offending topic, cut to its first 64 characters.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An ordering key contains a NUL character, which PostgreSQL `text`
    /// cannot store. Nothing was written.
    #[error("invalid event key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An idempotency key is empty, longer than 255 bytes, or contains a
    /// NUL character. Nothing was written.
    #[error("invalid idempotency key: {reason}")]
    InvalidIdempotencyKey {
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A header name is empty, or a name or value contains a NUL character.
    /// Nothing was written.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name, cut to its first 64 characters.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The payload could not be serialized to JSON (a map with non-string
    /// keys, a failing `Serialize` impl …). Nothing was written.
    #[error("event payload could not be serialized to JSON")]
    Serialize(#[source] serde_json::Error),

    /// The payload contains the NUL character (`\u0000`) in a string, which
    /// PostgreSQL `jsonb` rejects. Strip or encode it before publishing.
    /// Nothing was written.
    #[error(
        "event payload contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store"
    )]
    NulInPayload,

    /// The payload nests arrays and objects deeper than
    /// [`MAX_PAYLOAD_DEPTH`](crate::MAX_PAYLOAD_DEPTH) levels. PostgreSQL
    /// would store it, but the relay (serde_json) cannot read it back, so it
    /// could only be dead-lettered. Flatten it. Nothing was written.
    #[error("event payload nests deeper than {limit} levels, which the relay cannot read")]
    PayloadTooDeep {
        /// The deepest nesting allowed.
        limit: usize,
    },

    /// [`publish`](crate::publish) (or one of its batch forms) was given a
    /// connection that is not inside a transaction, where the event would
    /// commit on its own, apart from the writes it announces. Publish inside
    /// `conn.transaction(|conn| …)` or use [`transaction`](crate::transaction).
    /// Nothing was written.
    #[error("outbox::publish needs a connection inside a transaction (conn.transaction(|conn| …) or outbox::transaction): alone, the event would commit apart from the writes it announces")]
    NotInTransaction,

    /// A stored payload does not deserialize into the requested type.
    #[error("event {id} payload does not match the expected type")]
    Decode {
        /// The event whose payload did not match.
        id: crate::EventId,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },

    /// Applying the embedded migrations failed. The migration that failed
    /// was rolled back; see the source for the cause.
    #[error("outbox migrations failed")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// Connecting to the database failed: it is unreachable, refuses the
    /// credentials, or the URL is malformed. A password quoted in the cause
    /// (libpq quotes the whole URL when it cannot parse it) is masked.
    #[error("could not connect to the database")]
    Connect(#[source] diesel::ConnectionError),

    /// No connection could be taken from the pool in time (the database is
    /// down, or the pool is exhausted).
    #[error("could not get a database connection from the pool")]
    Pool(#[from] diesel::r2d2::PoolError),

    /// A relay setting is impossible (zero workers, a cap below the base
    /// delay, a malformed topic pattern …). Nothing was started.
    #[error("invalid relay configuration: {field} {reason}")]
    Config {
        /// The builder setting at fault, e.g. `workers` or `backoff.cap`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// [`Relay::shutdown`](crate::Relay::shutdown) reached its deadline
    /// before every thread finished. The remaining threads finish their
    /// current delivery and exit on their own; events they hold come due
    /// again when their lease expires.
    #[error("relay threads still running after the shutdown deadline: {threads}")]
    ShutdownTimeout {
        /// Names of the threads that had not finished.
        threads: String,
    },

    /// The NOTIFY listener lost or could not open its connection. The relay
    /// keeps delivering by polling and reconnects the listener with backoff.
    #[error("notification listener failed: {0}")]
    Listener(String),

    /// A query failed: the database is unreachable, the connection broke, the
    /// schema is not migrated, or a constraint rejected a row.
    #[error("database error")]
    Database(#[source] diesel::result::Error),
}

impl From<diesel::result::Error> for Error {
    /// Unwraps an `outbox::Error` that travelled through diesel's
    /// [`SerializationError`](diesel::result::Error::SerializationError)
    /// variant (as errors raised inside [`transaction`](crate::transaction)
    /// do), and wraps any other diesel error as [`Error::Database`].
    fn from(error: diesel::result::Error) -> Self {
        match error {
            diesel::result::Error::SerializationError(inner) if inner.is::<Error>() => {
                match inner.downcast::<Error>() {
                    Ok(ours) => *ours,
                    // Unreachable after `is`, but never panic on it.
                    Err(other) => Error::Database(diesel::result::Error::SerializationError(other)),
                }
            }
            other => Error::Database(other),
        }
    }
}

impl From<diesel::ConnectionError> for Error {
    /// Wraps the error, masking any password in libpq's message: for a URL
    /// it cannot parse (`postgres://user:pw@[::1/db`), libpq repeats the
    /// whole URL, and errors end up in logs.
    fn from(error: diesel::ConnectionError) -> Self {
        use diesel::ConnectionError as E;
        Error::Connect(match error {
            E::BadConnection(message) => E::BadConnection(redact_passwords(&message)),
            E::InvalidConnectionUrl(message) => E::InvalidConnectionUrl(redact_passwords(&message)),
            other => other,
        })
    }
}

impl From<Error> for diesel::result::Error {
    /// Carries an `outbox::Error` through APIs that speak diesel's error
    /// type; `outbox::Error::from` unwraps it again.
    fn from(error: Error) -> Self {
        match error {
            Error::Database(inner) => inner,
            ours => diesel::result::Error::SerializationError(Box::new(ours)),
        }
    }
}

/// Cuts user input for inclusion in an error message.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// `text` with the password of every `scheme://user:password@…` in it
/// replaced by `***`. Errors that quote a URL (libpq quotes one it cannot
/// parse) go through this before they reach a message. It errs on the side
/// of masking: everything between the first `:` after `://` and the last
/// `@` of the same word goes.
pub(crate) fn redact_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (before, after) = rest.split_at(start + 3);
        out.push_str(before);
        // The URL ends at whitespace or a quote (libpq quotes it in "…").
        let end = after
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(after.len());
        let url = &after[..end];
        match url
            .rfind('@')
            .and_then(|at| Some((url[..at].find(':')?, at)))
        {
            Some((colon, at)) => {
                out.push_str(&url[..=colon]);
                out.push_str("***");
                out.push_str(&url[at..]);
            }
            None => out.push_str(url),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_quoted_urls_are_masked() {
        assert_eq!(
            redact_passwords(
                r#"end of string reached when looking for matching "]" in IPv6 host address in URI: "postgres://app:s3cr:et@[::1/db""#
            ),
            r#"end of string reached when looking for matching "]" in IPv6 host address in URI: "postgres://app:***@[::1/db""#
        );
        assert_eq!(
            redact_passwords("a postgres://u:p@h/db and amqp://x:y@z/ here"),
            "a postgres://u:***@h/db and amqp://x:***@z/ here"
        );
        for untouched in [
            "postgres://u@h/db",
            "postgres://h:5432/db",
            "no url at all",
            "http://h/a@b",
        ] {
            assert_eq!(redact_passwords(untouched), untouched);
        }
    }
}
