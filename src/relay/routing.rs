//! Routing: which sink receives which topic.

use std::fmt;
use std::sync::Arc;

use super::rate::RateLimit;
use crate::error::{excerpt, Error};
use crate::new_event::validate_topic;
use crate::sink::Sink;
use crate::store::TopicFilter;

/// Which topics a route takes: `order.approved` (exactly that topic),
/// `order.*` (every topic starting with `order.`), or `*` (every topic).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TopicPattern {
    /// Exactly this topic.
    Exact(String),
    /// Every topic starting with this prefix (written `prefix*`).
    Prefix(String),
    /// Every topic.
    All,
}

impl TopicPattern {
    /// Parses a pattern: a topic, a prefix followed by `*`, or `*` alone.
    /// A `*` anywhere else, or an invalid topic, is an [`Error::Config`].
    pub fn parse(pattern: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Config {
            field: "route",
            reason: format!("pattern {:?}: {reason}", excerpt(pattern)),
        };
        if pattern == "*" {
            return Ok(TopicPattern::All);
        }
        let (body, prefix) = match pattern.strip_suffix('*') {
            Some(body) => (body, true),
            None => (pattern, false),
        };
        if body.contains('*') {
            return Err(invalid("`*` is only allowed at the end".into()));
        }
        validate_topic(body).map_err(|e| invalid(e.to_string()))?;
        Ok(if prefix {
            TopicPattern::Prefix(body.to_owned())
        } else {
            TopicPattern::Exact(body.to_owned())
        })
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicPattern::Exact(exact) => topic == exact,
            TopicPattern::Prefix(prefix) => topic.starts_with(prefix.as_str()),
            TopicPattern::All => true,
        }
    }

    /// How specific the pattern is: exact beats any prefix, a longer prefix
    /// beats a shorter one, `*` comes last.
    fn specificity(&self) -> (u8, usize) {
        match self {
            TopicPattern::Exact(_) => (2, 0),
            TopicPattern::Prefix(prefix) => (1, prefix.len()),
            TopicPattern::All => (0, 0),
        }
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicPattern::Exact(topic) => f.write_str(topic),
            TopicPattern::Prefix(prefix) => write!(f, "{prefix}*"),
            TopicPattern::All => f.write_str("*"),
        }
    }
}

/// The routing table of one relay: the most specific pattern wins.
#[derive(Clone, Default)]
pub(crate) struct Routes {
    routes: Vec<(TopicPattern, Route)>,
}

/// Where a pattern's events go, and how fast.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) limit: Option<RateLimit>,
}

impl Route {
    /// Whether events of `self` and `other` may share one sink call: the
    /// same sink under the same limit.
    pub(crate) fn same(&self, other: &Route) -> bool {
        Arc::ptr_eq(&self.sink, &other.sink)
            && match (&self.limit, &other.limit) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Routes {
    /// Adds a route; a second route for the same pattern is a config error.
    pub(crate) fn add(&mut self, pattern: TopicPattern, sink: Arc<dyn Sink>) -> Result<(), Error> {
        if self.routes.iter().any(|(p, _)| *p == pattern) {
            return Err(Error::Config {
                field: "route",
                reason: format!("pattern {pattern} is routed twice"),
            });
        }
        self.routes.push((pattern, Route { sink, limit: None }));
        self.routes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.specificity()));
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Limits the routes of `pattern` (every route when `None`) to `limit`.
    pub(crate) fn limit(&mut self, pattern: Option<&TopicPattern>, limit: &RateLimit) {
        for (p, route) in &mut self.routes {
            if pattern.is_none_or(|pattern| pattern == p) {
                route.limit = Some(limit.clone());
            }
        }
    }

    /// The route of `topic`, if this relay routes it.
    pub(crate) fn route_for(&self, topic: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|(pattern, _)| pattern.matches(topic))
            .map(|(_, route)| route)
    }

    /// The sink for `topic`, if this relay routes it.
    #[cfg(test)]
    pub(crate) fn sink_for(&self, topic: &str) -> Option<&Arc<dyn Sink>> {
        self.route_for(topic).map(|route| &route.sink)
    }

    /// The claim filter: exact topics and `LIKE` prefixes, or everything.
    pub(crate) fn claim_filter(&self) -> TopicFilter {
        let mut filter = TopicFilter::default();
        for (pattern, _) in &self.routes {
            match pattern {
                TopicPattern::All => filter.all = true,
                TopicPattern::Exact(topic) => filter.exact.push(topic.clone()),
                TopicPattern::Prefix(prefix) => {
                    filter.like.push(format!("{}%", like_escape(prefix)))
                }
            }
        }
        filter
    }

    /// The patterns, most specific first (for logs).
    pub(crate) fn patterns(&self) -> Vec<String> {
        self.routes.iter().map(|(p, _)| p.to_string()).collect()
    }
}

/// Escapes `LIKE` metacharacters (the default escape character is `\`).
fn like_escape(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::DeliveryError;
    use crate::StoredEvent;

    fn sink(name: &str) -> Arc<dyn Sink> {
        let name = name.to_owned();
        Arc::new(move |_: &StoredEvent| Err::<(), _>(DeliveryError::permanent(name.clone())))
    }

    fn name_of(routes: &Routes, topic: &str) -> Option<String> {
        let event = StoredEvent {
            id: crate::EventId(1),
            topic: topic.into(),
            key: None,
            payload: serde_json::Value::Null,
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            available_at: chrono::Utc::now(),
            attempts: 1,
            last_error: None,
            subscription: String::new(),
        };
        routes
            .sink_for(topic)
            .map(|s| s.deliver(&event).unwrap_err().message().to_owned())
    }

    /// Routes `pattern` to a sink that answers with `name`.
    fn route(routes: &mut Routes, pattern: &str, name: &str) {
        let pattern = TopicPattern::parse(pattern).expect("a valid pattern in this test");
        routes
            .add(pattern, sink(name))
            .expect("a new pattern in this test");
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let mut routes = Routes::default();
        route(&mut routes, "*", "all");
        route(&mut routes, "order.*", "orders");
        route(&mut routes, "order.ap*", "ap");
        route(&mut routes, "order.approved", "exact");
        assert_eq!(name_of(&routes, "order.approved").as_deref(), Some("exact"));
        assert_eq!(name_of(&routes, "order.apple").as_deref(), Some("ap"));
        assert_eq!(name_of(&routes, "order.shipped").as_deref(), Some("orders"));
        assert_eq!(name_of(&routes, "billing.x").as_deref(), Some("all"));
    }

    #[test]
    fn unrouted_topics_have_no_sink() {
        let mut routes = Routes::default();
        route(&mut routes, "order.*", "orders");
        assert!(routes.sink_for("billing.paid").is_none());
        assert!(routes.sink_for("order").is_none());
    }

    #[test]
    fn bad_patterns_are_config_errors() {
        for bad in ["", "a*b", "**", "order.\n*"] {
            assert!(
                matches!(
                    TopicPattern::parse(bad),
                    Err(Error::Config { field: "route", .. })
                ),
                "{bad:?}"
            );
        }
    }

    /// PostgreSQL's `LIKE` with the default escape character, as a
    /// reference: `%` any run, `_` any one character, `\x` a literal `x`.
    fn like(text: &[char], pattern: &[char]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some(('%', rest)) => (0..=text.len()).any(|skip| like(&text[skip..], rest)),
            Some(('_', rest)) => !text.is_empty() && like(&text[1..], rest),
            Some(('\\', rest)) => match (rest.split_first(), text.split_first()) {
                (Some((literal, rest)), Some((first, text))) => {
                    literal == first && like(text, rest)
                }
                _ => false,
            },
            Some((literal, rest)) => text.first() == Some(literal) && like(&text[1..], rest),
        }
    }

    /// The claim filter as the claim statement applies it:
    /// `$all OR topic = ANY($exact) OR topic LIKE ANY($like)`.
    fn filter_takes(filter: &TopicFilter, topic: &str) -> bool {
        let topic: Vec<char> = topic.chars().collect();
        filter.all
            || filter
                .exact
                .iter()
                .any(|e| e.chars().eq(topic.iter().copied()))
            || filter
                .like
                .iter()
                .any(|p| like(&topic, &p.chars().collect::<Vec<_>>()))
    }

    /// Topics over a small alphabet rich in `LIKE` metacharacters, so that
    /// prefixes and topics often overlap.
    const TOPIC: &str = r"[ab.%_\\]{1,6}";

    /// A pattern as written: `*`, a topic, or a topic followed by `*`.
    fn pattern() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            1 => Just("*".to_owned()),
            3 => TOPIC,
            3 => TOPIC.prop_map(|t| format!("{t}*")),
        ]
    }

    /// The pattern language by its definition, for comparison.
    fn reference_matches(pattern: &str, topic: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => topic.starts_with(prefix),
            None => topic == pattern,
        }
    }

    /// What should win for `topic`: an exact match, else the longest
    /// matching prefix, else `*`.
    fn reference_winner<'a>(patterns: &[&'a str], topic: &str) -> Option<&'a str> {
        let matching = patterns
            .iter()
            .copied()
            .filter(|p| reference_matches(p, topic));
        matching.max_by_key(|p| match p.strip_suffix('*') {
            None => (2, 0),
            Some(prefix) if !prefix.is_empty() => (1, prefix.len()),
            Some(_) => (0, 0),
        })
    }

    proptest::proptest! {
        #[test]
        fn a_pattern_matches_exactly_what_its_definition_says(
            pattern in pattern(),
            topic in TOPIC,
        ) {
            let parsed = TopicPattern::parse(&pattern).unwrap();
            proptest::prop_assert_eq!(parsed.to_string(), pattern.clone());
            proptest::prop_assert_eq!(
                parsed.matches(&topic),
                reference_matches(&pattern, &topic)
            );
        }

        #[test]
        fn the_most_specific_matching_pattern_wins(
            patterns in proptest::collection::btree_set(pattern(), 1..8),
            topics in proptest::collection::vec(TOPIC, 1..16),
        ) {
            let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
            let mut routes = Routes::default();
            for pattern in &patterns {
                // Each sink answers with its own pattern.
                route(&mut routes, pattern, pattern);
            }
            for topic in &topics {
                let winner = name_of(&routes, topic);
                proptest::prop_assert_eq!(
                    winner.as_deref(),
                    reference_winner(&patterns, topic),
                    "topic {:?}", topic
                );
            }
        }

        #[test]
        fn the_claim_filter_takes_exactly_the_routed_topics(
            patterns in proptest::collection::btree_set(pattern(), 1..8),
            topics in proptest::collection::vec(TOPIC, 1..16),
        ) {
            let mut routes = Routes::default();
            for pattern in &patterns {
                route(&mut routes, pattern, "x");
            }
            let filter = routes.claim_filter();
            for topic in &topics {
                proptest::prop_assert_eq!(
                    filter_takes(&filter, topic),
                    routes.sink_for(topic).is_some(),
                    "topic {:?}, filter {:?}", topic, filter
                );
            }
        }
    }

    #[test]
    fn like_metacharacters_in_prefixes_are_escaped() {
        let mut routes = Routes::default();
        route(&mut routes, "a_b%*", "x");
        assert_eq!(routes.claim_filter().like, [r"a\_b\%%"]);
    }
}
