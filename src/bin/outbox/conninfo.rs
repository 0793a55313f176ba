//! Telling a PostgreSQL connection string from a mistake before libpq sees
//! it. libpq reads anything that does not start with `postgres://` or
//! `postgresql://` as `key=value` pairs, so `mysql://…` or a bare host name
//! would fail with `missing "=" after … in connection info string`, which
//! says nothing about what was expected.

use std::iter::Peekable;
use std::str::Chars;

/// What every refused connection string is told.
const EXPECTED: &str =
    "expected a postgres:// or postgresql:// URL or a key=value connection string (host=… dbname=…)";

/// Why libpq could not read `text` as a connection string, if it could not:
/// a URL of another scheme, or text that is neither a URL nor `key=value`
/// pairs. The reason never quotes `text` (it may hold a password), only a
/// foreign URL's scheme.
pub fn check(text: &str) -> Result<(), String> {
    if let Some(scheme) = url_scheme(text) {
        // libpq compares the prefix case-sensitively.
        return match scheme {
            "postgres" | "postgresql" => Ok(()),
            other => Err(format!("{EXPECTED}, not a {other}:// URL")),
        };
    }
    if key_value_pairs(text) {
        Ok(())
    } else {
        Err(EXPECTED.to_owned())
    }
}

/// The scheme of `scheme://…` (RFC 3986: a letter, then letters, digits,
/// `+`, `-` or `.`).
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// Whether `text` is `key = value` pairs as libpq's `conninfo_parse` reads
/// them: values bare or single-quoted, `\` escaping the next character.
/// Which keys exist is libpq's to say (its message for an unknown one is
/// clear).
fn key_value_pairs(text: &str) -> bool {
    fn skip_spaces(chars: &mut Peekable<Chars>) {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    }
    let mut chars = text.chars().peekable();
    loop {
        skip_spaces(&mut chars);
        if chars.peek().is_none() {
            return true;
        }
        // The key runs to `=` or whitespace, and `=` must follow.
        while chars.next_if(|c| *c != '=' && !c.is_whitespace()).is_some() {}
        skip_spaces(&mut chars);
        if chars.next() != Some('=') {
            return false;
        }
        skip_spaces(&mut chars);
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return false, // unterminated quote
                    Some('\'') => break,
                    Some('\\') => {
                        chars.next();
                    }
                    Some(_) => {}
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    chars.next();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn postgres_urls_and_key_value_pairs_pass() {
        for text in [
            "postgres://u:p@h:5432/db?sslmode=require",
            "postgresql:///db",
            "host=h dbname=db",
            r"host = h  password='it\'s x' dbname=db",
            r"password=a\ b host=h",
            "service=x",
        ] {
            assert_eq!(check(text), Ok(()), "{text}");
        }
    }

    #[test]
    fn other_schemes_and_bare_words_are_refused_without_the_password() {
        for (text, scheme) in [
            ("mysql://root:hunter2@h/db", Some("mysql")),
            ("POSTGRES://h/db", Some("POSTGRES")),
            ("not a url", None),
            ("localhost", None),
            ("host=h port", None),
            ("host='h", None),
            ("password=hunter2 'x'", None),
        ] {
            let reason = check(text).unwrap_err();
            assert!(!reason.contains("hunter2"), "{reason}");
            assert_eq!(
                reason.ends_with(&format!(", not a {}:// URL", scheme.unwrap_or("-"))),
                scheme.is_some(),
                "{text}: {reason}"
            );
        }
    }
}
