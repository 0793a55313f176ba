//! The hand-written SQL baselines the relay is compared with.

use diesel::prelude::*;

/// A drained row: the id and the payload a real drain would hand on.
#[derive(QueryableByName)]
pub struct Row {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub id: i64,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    #[allow(dead_code)] // decoded like a relay would, then dropped
    pub payload: serde_json::Value,
}

/// The safe baseline: what any at-least-once drain must do, by hand. Claim
/// a batch under a lease (so a crash loses nothing), then delete it: two
/// statements per batch, like the relay's claim and settle.
pub fn raw_claim_delete(conn: &mut PgConnection, batch: i64, at_most: usize) -> usize {
    let mut total = 0;
    loop {
        let rows: Vec<Row> = diesel::sql_query(
            "WITH batch AS (
                 SELECT id FROM outbox.events
                  WHERE available_at <= now()
                  ORDER BY available_at, id
                  LIMIT $1
                    FOR UPDATE SKIP LOCKED)
             UPDATE outbox.events e
                SET available_at = now() + interval '30 seconds', attempts = e.attempts + 1
               FROM batch
              WHERE e.id = batch.id
             RETURNING e.id, e.payload",
        )
        .bind::<diesel::sql_types::BigInt, _>(batch)
        .load(conn)
        .unwrap();
        if rows.is_empty() {
            return total;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        diesel::sql_query("DELETE FROM outbox.events WHERE id = ANY($1)")
            .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&ids)
            .execute(conn)
            .unwrap();
        total += rows.len();
        if total >= at_most {
            return total;
        }
    }
}
