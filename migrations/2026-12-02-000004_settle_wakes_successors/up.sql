-- Settling wakes the next deferred event of each settled key in the same
-- transaction, after the settle's own lock waits (docs/design.md §3).
--
-- A relay that defers an event B behind an earlier event A of its key holds
-- FOR KEY SHARE on A until its deferral commits, so a settle deleting A
-- waits for that deferral. The settle's DELETE then proceeds with the
-- snapshot it started with, which cannot show the deferral; a statement
-- that starts after the DELETE has a snapshot that can. So each settle is a
-- function: one statement settles (and returns the id and key of every row
-- it deleted, readable or not), a second one wakes the deferred successors
-- of those keys. One round trip, one transaction: a relay dying after it
-- sent the call cannot leave B deferred, whether the reply reaches it or
-- not.

-- The wake: for each deleted (id, key), the first deferred event of the key
-- after it becomes due now. Only deferred rows are written, so a keyed
-- workload pays no extra write per event.
CREATE FUNCTION outbox.wake_deferred_successors(done_ids bigint[], done_keys text[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    -- PL/pgSQL, not SQL: a PL/pgSQL statement keeps its plan for the
    -- session, a SQL function's is made again on every call.
    IF done_ids IS NULL THEN
        RETURN;
    END IF;
    UPDATE outbox.events e
       SET available_at = now(),
           deferred = false
      FROM unnest(done_ids, done_keys) AS done(id, key)
     WHERE done.key IS NOT NULL
       AND e.id = (SELECT min(next.id) FROM outbox.events next
                    WHERE next.key = done.key AND next.id > done.id
                      AND next.deferred)
       AND e.deferred;
END
$$;
COMMENT ON FUNCTION outbox.wake_deferred_successors(bigint[], text[]) IS
    'Makes the first deferred event after each (id, key) due now. Called by the settle functions after their delete, in the same transaction.';

-- Every event of the batch was delivered: delete them (fenced by the
-- claim's token) and wake their keys' deferred successors. Returns the ids
-- deleted; one missing was taken over by another relay.
CREATE FUNCTION outbox.settle_delivered(token bigint, ids bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
DECLARE
    deleted bigint[];
    done_ids bigint[];
    done_keys text[];
BEGIN
    WITH delivered AS (
        DELETE FROM outbox.events
         WHERE id = ANY(ids) AND claim_token = token
     RETURNING id, key
    )
    SELECT array_agg(id),
           array_agg(id) FILTER (WHERE key IS NOT NULL),
           array_agg(key) FILTER (WHERE key IS NOT NULL)
      INTO deleted, done_ids, done_keys
      FROM delivered;
    -- A new statement, so a new snapshot: it sees every deferral the
    -- DELETE waited for.
    PERFORM outbox.wake_deferred_successors(done_ids, done_keys);
    RETURN QUERY SELECT unnest(deleted);
END
$$;
COMMENT ON FUNCTION outbox.settle_delivered(bigint, bigint[]) IS
    'A relay settles a batch whose events were all delivered: deletes them (claim_token fenced) and wakes deferred successors, atomically.';

-- The general settle: delivered rows are deleted, retries rescheduled,
-- untried rows released, dead ones moved to outbox.dead_letters, all fenced
-- by the claim's token; then the deferred successors of every deleted
-- keyed row (delivered or dead, readable or not) are woken. Returns the ids
-- settled.
CREATE FUNCTION outbox.settle(token bigint, ids bigint[], verdicts text[],
                              delays_us bigint[], errors text[])
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
DECLARE
    settled bigint[];
    done_ids bigint[];
    done_keys text[];
BEGIN
    WITH outcome AS (
        SELECT *
          FROM unnest(ids, verdicts, delays_us, errors) AS o(id, verdict, delay_us, error)
    ), delivered AS (
        DELETE FROM outbox.events e
         USING outcome o
         WHERE e.id = o.id AND o.verdict = 'delivered' AND e.claim_token = token
     RETURNING e.id, e.key
    ), retried AS (
        UPDATE outbox.events e
           SET available_at = now() + o.delay_us * interval '1 microsecond',
               last_error = o.error,
               claim_token = NULL
          FROM outcome o
         WHERE e.id = o.id AND o.verdict = 'retry' AND e.claim_token = token
     RETURNING e.id
    ), released AS (
        UPDATE outbox.events e
           SET available_at = now(),
               attempts = greatest(e.attempts - 1, 0),
               claim_token = NULL
          FROM outcome o
         WHERE e.id = o.id AND o.verdict = 'release' AND e.claim_token = token
     RETURNING e.id
    ), died AS (
        DELETE FROM outbox.events e
         USING outcome o
         WHERE e.id = o.id AND o.verdict = 'dead' AND e.claim_token = token
     RETURNING e.id, e.topic, e.key, e.payload, e.headers, e.created_at,
               e.attempts, o.error
    ), buried AS (
        INSERT INTO outbox.dead_letters
               (id, topic, key, payload, headers, created_at, attempts, last_error)
        SELECT * FROM died
            ON CONFLICT (id) DO UPDATE
           SET topic = excluded.topic, key = excluded.key,
               payload = excluded.payload, headers = excluded.headers,
               created_at = excluded.created_at, attempts = excluded.attempts,
               last_error = excluded.last_error, failed_at = now()
     RETURNING id
    ), settled_ids AS (
        SELECT id FROM delivered
        UNION ALL SELECT id FROM retried
        UNION ALL SELECT id FROM released
        UNION ALL SELECT id FROM buried
    ), done AS (
        SELECT id, key FROM delivered WHERE key IS NOT NULL
        UNION ALL
        SELECT id, key FROM died WHERE key IS NOT NULL
    )
    SELECT s.ids, d.ids, d.keys
      FROM (SELECT array_agg(id) FROM settled_ids) AS s(ids),
           (SELECT array_agg(id), array_agg(key) FROM done) AS d(ids, keys)
      INTO settled, done_ids, done_keys;
    PERFORM outbox.wake_deferred_successors(done_ids, done_keys);
    RETURN QUERY SELECT unnest(settled);
END
$$;
COMMENT ON FUNCTION outbox.settle(bigint, bigint[], text[], bigint[], text[]) IS
    'A relay settles a batch: deletes the delivered, reschedules retries, releases untried events, dead-letters the rest (claim_token fenced), then wakes deferred successors of the deleted keyed events, atomically.';

-- At most one event of a key in flight, even when a dead letter of the key
-- is replayed (with its old, lower id) while a later event of the key is
-- being delivered: a claim does not take a keyed event while another event
-- of its key is held under an unexpired lease. Claimed rows are a handful,
-- so this index is tiny and the check one probe.
-- (available_at is in the index so that the planner prefers it to a scan
-- of events_available_at_idx over every future-dated row.)
CREATE INDEX events_held_key_idx ON outbox.events (key, available_at)
    WHERE claim_token IS NOT NULL AND key IS NOT NULL;
COMMENT ON INDEX outbox.events_held_key_idx IS
    'Keyed events that carry a claim token (in flight, or a dead relay''s until re-claimed): a claim checks that no other event of a key is in flight.';
