//! Subscriptions: registering them, and the upkeep of the log they read.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};

use super::claim::TopicFilter;

/// Registers `name` at the current snapshot, or updates its patterns.
/// Returns whether it was created.
pub(crate) fn subscribe(
    conn: &mut PgConnection,
    name: &str,
    patterns: &[String],
    topics: &TopicFilter,
) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Created {
        #[diesel(sql_type = Bool)]
        created: bool,
    }
    diesel::sql_query("SELECT outbox.subscribe($1, $2, $3, $4, $5) AS created")
        .bind::<Text, _>(name)
        .bind::<Array<Text>, _>(patterns)
        .bind::<Bool, _>(topics.all)
        .bind::<Array<Text>, _>(&topics.exact)
        .bind::<Array<Text>, _>(&topics.like)
        .get_result::<Created>(conn)
        .map(|row| row.created)
}

/// Moves idle cursors to the present and truncates every segment of the
/// log that all subscriptions have passed (`outbox.reclaim`). Returns the
/// segments truncated.
pub(crate) fn reclaim(conn: &mut PgConnection) -> QueryResult<Vec<i32>> {
    #[derive(QueryableByName)]
    struct Segment {
        #[diesel(sql_type = Integer)]
        segment: i32,
    }
    Ok(
        diesel::sql_query("SELECT s AS segment FROM outbox.reclaim() AS s")
            .load::<Segment>(conn)?
            .into_iter()
            .map(|s| s.segment)
            .collect(),
    )
}

/// Makes due the rows of `outbox.deliveries` that wait behind a head that
/// is gone without a settle (deleted by hand): a settle wakes the next row
/// itself, so this finds nothing unless something else removed a head.
/// Returns their ids.
pub(crate) fn wake_stranded(conn: &mut PgConnection) -> QueryResult<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    Ok(diesel::sql_query(
        "UPDATE outbox.deliveries d
            SET available_at = greatest(now(), d.not_before)
          WHERE d.available_at = 'infinity'
            AND NOT EXISTS (SELECT FROM outbox.deliveries x
                             WHERE x.subscription = d.subscription
                               AND x.key = d.key AND x.seq < d.seq)
      RETURNING d.id",
    )
    .load::<Id>(conn)?
    .into_iter()
    .map(|row| row.id)
    .collect())
}

/// One subscription, as operators list it.
#[derive(QueryableByName)]
pub(crate) struct SubscriptionRow {
    #[diesel(sql_type = Text)]
    pub(crate) name: String,
    #[diesel(sql_type = Array<Text>)]
    pub(crate) patterns: Vec<String>,
    #[diesel(sql_type = BigInt)]
    pub(crate) pending: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Double>)]
    pub(crate) oldest_age_seconds: Option<f64>,
    #[diesel(sql_type = BigInt)]
    pub(crate) dead_letters: i64,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub(crate) created_at: chrono::DateTime<chrono::Utc>,
}

/// Every subscription with what it still owes (`outbox.pending`) and its
/// dead letters. Reads the unsettled part of the log: an operator's query.
pub(crate) fn list_subscriptions(conn: &mut PgConnection) -> QueryResult<Vec<SubscriptionRow>> {
    diesel::sql_query(
        "SELECT s.name, s.patterns, s.created_at,
                coalesce(p.pending, 0) AS pending, p.oldest_age_seconds,
                (SELECT count(*) FROM outbox.dead_letters d WHERE d.subscription = s.name)
                    AS dead_letters
           FROM outbox.subscriptions s
           LEFT JOIN (SELECT subscription, count(*) AS pending,
                             extract(epoch FROM now() - min(created_at))::float8
                                 AS oldest_age_seconds
                        FROM outbox.pending GROUP BY subscription) p
                  ON p.subscription = s.name
          ORDER BY s.name",
    )
    .load(conn)
}

/// Removes a subscription with everything it still owes and its dead
/// letters. Returns whether it existed.
pub(crate) fn remove_subscription(conn: &mut PgConnection, name: &str) -> QueryResult<bool> {
    diesel::sql_query("DELETE FROM outbox.subscriptions WHERE name = $1")
        .bind::<Text, _>(name)
        .execute(conn)
        .map(|n| n > 0)
}
