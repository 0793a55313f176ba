-- Subscriptions: every subscriber gets every event (docs/design.md §4).
--
-- outbox.events stops being a queue and becomes a log: publishers still
-- INSERT into it, and nobody updates or deletes a row of it. Each named
-- subscription reads it through its own cursors, in commit order, so an
-- event costs one row whatever the number of subscribers. Rows are written
-- per subscription only for what a cursor cannot hold: a retry, a delayed
-- event, the events of a key queued behind one of those, and (for the
-- default subscription) topics the reading relay does not route. Those live
-- in outbox.deliveries, which is a small queue like the old outbox.events.
--
-- The log is split into 8 partitions by transaction id (2^14 xids each,
-- used round-robin); a partition is TRUNCATEd once every cursor has passed
-- it and no running transaction can still write to it (outbox.reclaim).
--
-- A cursor is a pair of snapshots, as in SkyTools' PgQ: everything visible
-- in `lo` is settled; the window being read is what is visible in `hi` and
-- not in `lo`, walked in (tx, id) order. A transaction that commits late is
-- invisible in `hi` and so lands in a later window: never skipped, whatever
-- its ids.
--
-- Existing data moves over: the queued, retrying and delayed events become
-- rows of outbox.deliveries for the subscription `default` (what relays
-- without a named subscription read), with their attempts, errors and due
-- times; dead letters are the default subscription's.

-- 1. Subscriptions ---------------------------------------------------------

CREATE TABLE outbox.subscriptions (
    name text PRIMARY KEY
        CONSTRAINT subscriptions_name_valid
        CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'),
    -- As declared (route syntax: `order.approved`, `order.*`, `*`).
    patterns text[] NOT NULL,
    -- The same, compiled for SQL: every topic, exact names, LIKE prefixes.
    all_topics boolean NOT NULL,
    exact_topics text[] NOT NULL DEFAULT '{}',
    like_topics text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox.subscriptions IS
    'Named subscriptions: each receives every event of its topics committed after it was registered, with its own retries, order and dead letters. Written by relays and the CLI; see docs/schema.md.';
COMMENT ON COLUMN outbox.subscriptions.patterns IS 'Topic patterns as declared: `order.approved`, `order.*`, `*`.';
COMMENT ON COLUMN outbox.subscriptions.all_topics IS 'The patterns include `*`.';
COMMENT ON COLUMN outbox.subscriptions.exact_topics IS 'The exact topics among the patterns.';
COMMENT ON COLUMN outbox.subscriptions.like_topics IS 'The prefix patterns as LIKE patterns (`order.%`).';
COMMENT ON COLUMN outbox.subscriptions.created_at IS 'When it was registered: it receives the events committed after this.';

-- One cursor per (subscription, lane). A lane is the events whose key
-- hashes to it (keyless events spread by id): one relay worker reads a lane
-- at a time, under a lease, so a key's events are read in order; the 8
-- lanes of a subscription are read in parallel.
CREATE TABLE outbox.cursors (
    subscription text NOT NULL REFERENCES outbox.subscriptions ON DELETE CASCADE,
    lane smallint NOT NULL CONSTRAINT cursors_lane_valid CHECK (lane BETWEEN 0 AND 7),
    -- The cluster these snapshots belong to: transaction ids start again
    -- after a dump and restore into another cluster, and a claim refuses to
    -- read with snapshots of another one (outbox.rebase).
    system_identifier bigint NOT NULL,
    lo pg_snapshot NOT NULL,
    hi pg_snapshot NOT NULL,
    -- Settled within the window up to this (tx, id).
    pos_tx xid8 NOT NULL DEFAULT '0',
    pos_id bigint NOT NULL DEFAULT 0,
    -- The whole window is settled: the next claim opens the next one.
    done boolean NOT NULL DEFAULT true,
    -- The batch in flight: where it ends, how many rows of the log it read,
    -- whether it used the window up, and whether rows of it wait to be
    -- parked in outbox.deliveries by its settle.
    batch_tx xid8,
    batch_id bigint,
    batch_n integer,
    batch_done boolean,
    batch_parked boolean,
    claimed_by text,
    token bigint,
    lease_until timestamptz,
    PRIMARY KEY (subscription, lane)
);
COMMENT ON TABLE outbox.cursors IS
    'Where each lane of each subscription is in outbox.events: a pair of snapshots (settled: visible in lo, and in hi up to pos), and the lease of the relay reading it. Written by relays only.';

COMMENT ON COLUMN outbox.subscriptions.name IS 'The subscription''s name: 1 to 63 letters, digits, `_`, `.` or `-`.';
COMMENT ON COLUMN outbox.cursors.subscription IS 'The subscription this cursor reads for.';
COMMENT ON COLUMN outbox.cursors.lane IS 'Which lane of outbox.events (0 to 7) it reads.';
COMMENT ON COLUMN outbox.cursors.system_identifier IS 'The cluster whose transaction ids lo and hi refer to; claims refuse another.';
COMMENT ON COLUMN outbox.cursors.lo IS 'Everything visible in this snapshot is settled.';
COMMENT ON COLUMN outbox.cursors.hi IS 'The window being read: visible in hi, not in lo.';
COMMENT ON COLUMN outbox.cursors.pos_tx IS 'The window is settled up to (pos_tx, pos_id), in (tx, id) order.';
COMMENT ON COLUMN outbox.cursors.pos_id IS 'See pos_tx.';
COMMENT ON COLUMN outbox.cursors.done IS 'The whole window is settled; the next claim opens the next one.';
COMMENT ON COLUMN outbox.cursors.batch_tx IS 'The batch in flight ends at (batch_tx, batch_id); NULL when none is.';
COMMENT ON COLUMN outbox.cursors.batch_id IS 'See batch_tx.';
COMMENT ON COLUMN outbox.cursors.batch_n IS 'How many rows of the log the batch in flight read.';
COMMENT ON COLUMN outbox.cursors.batch_done IS 'The batch in flight used the window up.';
COMMENT ON COLUMN outbox.cursors.batch_parked IS 'Rows of the batch in flight wait to be parked in outbox.deliveries by its settle.';
COMMENT ON COLUMN outbox.cursors.claimed_by IS 'The relay holding the lane (for operators).';
COMMENT ON COLUMN outbox.cursors.token IS 'Fencing token of the batch in flight (from outbox.claim_tokens).';
COMMENT ON COLUMN outbox.cursors.lease_until IS 'The lane is free again after this, whether or not its holder settled.';

-- 2. Deliveries the cursors cannot hold -------------------------------------

CREATE TABLE outbox.deliveries (
    subscription text NOT NULL REFERENCES outbox.subscriptions ON DELETE CASCADE,
    -- Queue order: the order rows were read from the log (commit order,
    -- a late commit after what its key already had), then moved in (old
    -- queue, replays). Only a key's lowest seq (its head) may be claimed,
    -- and only while no other row of the key is in flight.
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id bigint NOT NULL,
    -- The publishing transaction (0 for events that are not in the log:
    -- moved over from the old queue, or replayed).
    tx xid8 NOT NULL DEFAULT '0',
    topic text COLLATE "C" NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    -- Due time; while a relay holds the row, the end of its lease;
    -- 'infinity' while it waits for the head of its key (settling the head
    -- makes the next row due).
    available_at timestamptz NOT NULL,
    -- The publisher's available_at: a row woken from 'infinity' is not due
    -- before it.
    not_before timestamptz NOT NULL DEFAULT '-infinity',
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    reason text NOT NULL
        CONSTRAINT deliveries_reason_valid
        CHECK (reason IN ('retry', 'delayed', 'blocked', 'queued', 'replayed')),
    claimed_by text,
    token bigint,
    PRIMARY KEY (subscription, seq),
    UNIQUE (subscription, tx, id)
);
COMMENT ON TABLE outbox.deliveries IS
    'Per-subscription copies of events its cursor cannot hold: retries, delayed events, events waiting behind those of their key, unrouted and replayed events. Written by relays and replay only.';
COMMENT ON COLUMN outbox.deliveries.reason IS
    'Why the row exists: retry (a delivery failed), delayed (published with a future available_at), blocked (waits for an earlier event of its key), queued (released unattempted, unrouted by the relay that read it, or moved from the old queue), replayed (a dead letter sent again).';

COMMENT ON COLUMN outbox.deliveries.subscription IS 'The subscription that owes the event.';
COMMENT ON COLUMN outbox.deliveries.seq IS 'Queue order: a key''s rows go in seq order (the order they were read from the log), and only its lowest may be claimed.';
COMMENT ON COLUMN outbox.deliveries.id IS 'The event id (as in outbox.events).';
COMMENT ON COLUMN outbox.deliveries.tx IS 'The publishing transaction; 0 for replayed or migrated events.';
COMMENT ON COLUMN outbox.deliveries.topic IS 'The event topic.';
COMMENT ON COLUMN outbox.deliveries.key IS 'The event ordering key, or NULL.';
COMMENT ON COLUMN outbox.deliveries.payload IS 'The event body, as published.';
COMMENT ON COLUMN outbox.deliveries.headers IS 'The event headers, as published.';
COMMENT ON COLUMN outbox.deliveries.created_at IS 'When the event was published.';
COMMENT ON COLUMN outbox.deliveries.available_at IS 'When it is due; the lease end while a relay holds it; infinity while it waits for an earlier event of its key.';
COMMENT ON COLUMN outbox.deliveries.not_before IS 'The publisher''s available_at: a row woken from infinity is not due before it.';
COMMENT ON COLUMN outbox.deliveries.attempts IS 'Delivery attempts so far, for this subscription.';
COMMENT ON COLUMN outbox.deliveries.last_error IS 'Why the latest attempt failed.';
COMMENT ON COLUMN outbox.deliveries.claimed_by IS 'The relay that claimed it last (for operators).';
COMMENT ON COLUMN outbox.deliveries.token IS 'Fencing token of the claim holding it.';

CREATE INDEX deliveries_due_idx ON outbox.deliveries (subscription, available_at);
CREATE INDEX deliveries_key_idx ON outbox.deliveries (subscription, key, seq) WHERE key IS NOT NULL;
CREATE INDEX deliveries_token_idx ON outbox.deliveries (token) WHERE token IS NOT NULL;

-- A small queue table: vacuum after a fixed number of dead rows (see the
-- first migration for why).
ALTER TABLE outbox.deliveries SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 1000
);

-- 3. The default subscription, and what the old queue held -------------------

INSERT INTO outbox.subscriptions (name, patterns, all_topics)
VALUES ('default', '{*}', true);

INSERT INTO outbox.deliveries (subscription, id, topic, key, payload, headers, created_at,
                               not_before, available_at, attempts, last_error, reason)
SELECT 'default', e.id, e.topic, e.key, e.payload, e.headers, e.created_at,
       CASE WHEN e.attempts = 0 AND NOT e.deferred THEN e.available_at ELSE '-infinity' END,
       CASE
           -- in flight with a relay that cannot settle it any more: due now
           WHEN e.claim_token IS NOT NULL THEN now()
           -- waiting for an earlier event of its key
           WHEN e.deferred OR EXISTS (SELECT FROM outbox.events x
                                       WHERE x.key = e.key AND x.id < e.id)
                THEN 'infinity'
           ELSE e.available_at
       END,
       e.attempts, e.last_error,
       CASE
           WHEN e.deferred OR EXISTS (SELECT FROM outbox.events x
                                       WHERE x.key = e.key AND x.id < e.id) THEN 'blocked'
           WHEN e.attempts > 0 AND e.last_error IS NOT NULL THEN 'retry'
           WHEN e.available_at > now() AND e.claim_token IS NULL THEN 'delayed'
           ELSE 'queued'
       END
  FROM outbox.events e
 ORDER BY e.id;
-- A blocked row whose head is not blocked itself: fine, the head rule holds
-- it; but a key whose rows are all 'infinity' would wait for ever. The
-- lowest row of each key is never blocked by the CASE above.

ALTER TABLE outbox.dead_letters ADD COLUMN subscription text NOT NULL DEFAULT 'default'
    REFERENCES outbox.subscriptions ON DELETE CASCADE;
ALTER TABLE outbox.dead_letters ALTER COLUMN subscription DROP DEFAULT;
ALTER TABLE outbox.dead_letters DROP CONSTRAINT dead_letters_pkey;
ALTER TABLE outbox.dead_letters ADD PRIMARY KEY (subscription, id);
COMMENT ON COLUMN outbox.dead_letters.subscription IS
    'The subscription that gave up on the event; replay sends it to that subscription only.';
CREATE INDEX dead_letters_id_idx ON outbox.dead_letters (id);

-- Ids go on from where the old queue and the dead letters are.
-- (The old sequence goes with the old table; ids of delivered events are
-- never handed out again, since receivers deduplicate by id.)
CREATE TABLE outbox.migration_next_id AS
SELECT greatest((SELECT max(id) FROM outbox.events),
                (SELECT max(id) FROM outbox.dead_letters),
                -- last_value is the start value until one is handed out
                (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                   FROM outbox.events_id_seq), 0) AS last_id;

DROP TABLE outbox.events CASCADE;
DROP FUNCTION outbox.settle(bigint, bigint[], text[], bigint[], text[]);
DROP FUNCTION outbox.settle_delivered(bigint, bigint[]);
DROP FUNCTION outbox.wake_deferred_successors(bigint[], text[]);

-- 4. The log ---------------------------------------------------------------

CREATE TABLE outbox.events (
    -- BY DEFAULT: a publisher may choose ids, though nothing here needs it.
    -- Not a primary key: a partitioned table's unique index must contain
    -- the partition key. Ids come from the identity and stay unique.
    id bigint GENERATED BY DEFAULT AS IDENTITY,
    topic text COLLATE "C" NOT NULL
        CONSTRAINT events_topic_valid
        CHECK (topic <> '' AND octet_length(topic) <= 255 AND topic !~ '[[:cntrl:]]'),
    key text,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT events_headers_string_map
        CHECK (jsonb_typeof(headers) = 'object'
               AND NOT jsonb_path_exists(headers, 'strict $.* ? (@.type() != "string")')),
    created_at timestamptz NOT NULL DEFAULT now(),
    available_at timestamptz NOT NULL DEFAULT now(),
    -- The publishing transaction: commit order for the cursors.
    tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- Which cursor of each subscription reads the event.
    lane smallint GENERATED ALWAYS AS ((hashtext(coalesce(key, id::text)) & 7)::smallint) STORED
) PARTITION BY LIST (((tx::text::bigint >> 14) & 7));

DO $$
BEGIN
    FOR s IN 0..7 LOOP
        EXECUTE format('CREATE TABLE outbox.events_%s PARTITION OF outbox.events FOR VALUES IN (%s)', s, s);
        EXECUTE format('COMMENT ON TABLE outbox.events_%s IS %L', s,
                       'A segment of outbox.events (transactions whose id >> 14 & 7 = ' || s
                       || '); TRUNCATEd by outbox.reclaim once every subscription has passed it.');
    END LOOP;
END
$$;

SELECT setval(pg_get_serial_sequence('outbox.events', 'id'), greatest(last_id, 1), last_id > 0)
  FROM outbox.migration_next_id;
DROP TABLE outbox.migration_next_id;

COMMENT ON TABLE outbox.events IS
    'The log of published events. Publish with INSERT (topic, payload[, key, headers, available_at]); rows are never updated, and are removed in bulk once every subscription has settled them. See docs/schema.md.';
COMMENT ON COLUMN outbox.events.id IS
    'Stable event id, assigned at insert. Every delivery carries it so receivers can deduplicate. Not commit order: ids of concurrent transactions commit out of order.';
COMMENT ON COLUMN outbox.events.topic IS
    'What happened, e.g. order.approved. Subscriptions select on it. 1 to 255 bytes, no control characters.';
COMMENT ON COLUMN outbox.events.key IS
    'Ordering key (an aggregate or customer id). Each subscription delivers the events of a key one at a time, in commit order; NULL means no ordering constraint.';
COMMENT ON COLUMN outbox.events.payload IS
    'The event body as JSON. Delivered verbatim. jsonb cannot hold the NUL character (\u0000).';
COMMENT ON COLUMN outbox.events.headers IS
    'A JSON object of string values (trace context, content type, ...) that sinks forward alongside the payload.';
COMMENT ON COLUMN outbox.events.created_at IS
    'When the event was written (transaction start time of the publisher).';
COMMENT ON COLUMN outbox.events.available_at IS
    'Not delivered before this time: set it in the future to delay delivery.';
COMMENT ON COLUMN outbox.events.tx IS
    'The publishing transaction (pg_current_xact_id()). Publishers never set it.';
COMMENT ON COLUMN outbox.events.lane IS
    'Which of the 8 cursors of each subscription reads the event: a hash of the key (of the id when keyless). Computed.';

-- The cursors' reads: a lane's window is an index range in (tx, id) order.
CREATE INDEX events_lane_tx_idx ON outbox.events (lane, tx, id);
COMMENT ON INDEX outbox.events_lane_tx_idx IS
    'Cursor order: a lane''s window is a range of (tx, id), so a claim reads O(batch) entries.';

CREATE TRIGGER events_notify
    AFTER INSERT ON outbox.events
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox.notify_events_inserted();
COMMENT ON TRIGGER events_notify ON outbox.events IS
    'Wakes relays on channel outbox_events. Poll-only mode: ALTER TABLE outbox.events DISABLE TRIGGER events_notify.';

-- The default subscription starts here: the old queue's events are already
-- in outbox.deliveries, and the log is empty.
INSERT INTO outbox.cursors (subscription, lane, system_identifier, lo, hi)
SELECT 'default', l, (SELECT system_identifier FROM pg_control_system()),
       pg_current_snapshot(), pg_current_snapshot()
  FROM generate_series(0, 7) l;

-- 5. Registering and removing ---------------------------------------------

-- Registers a subscription (or updates its patterns). A new one receives
-- every event committed after this transaction's snapshot. Returns true
-- when it was created.
CREATE FUNCTION outbox.subscribe(p_name text, p_patterns text[], p_all boolean,
                                 p_exact text[], p_like text[])
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO outbox.subscriptions (name, patterns, all_topics, exact_topics, like_topics)
    VALUES (p_name, p_patterns, p_all, p_exact, p_like)
        ON CONFLICT (name) DO NOTHING;
    IF NOT FOUND THEN
        UPDATE outbox.subscriptions
           SET patterns = p_patterns, all_topics = p_all,
               exact_topics = p_exact, like_topics = p_like
         WHERE name = p_name
           AND (patterns, all_topics, exact_topics, like_topics)
               IS DISTINCT FROM (p_patterns, p_all, p_exact, p_like);
        RETURN false;
    END IF;
    INSERT INTO outbox.cursors (subscription, lane, system_identifier, lo, hi)
    SELECT p_name, l, (SELECT system_identifier FROM pg_control_system()),
           pg_current_snapshot(), pg_current_snapshot()
      FROM generate_series(0, 7) l;
    RETURN true;
END
$$;
COMMENT ON FUNCTION outbox.subscribe(text, text[], boolean, text[], text[]) IS
    'Registers a subscription at the current snapshot, or updates its patterns. Returns true when created.';

-- 6. Claiming --------------------------------------------------------------

-- Whether a row of the log is still owed to a cursor: not settled by it.
-- (Used by status queries; the claim reads windows directly.)
CREATE FUNCTION outbox.owed(c outbox.cursors, e_tx xid8, e_id bigint)
RETURNS boolean
LANGUAGE sql STABLE
RETURN NOT pg_visible_in_snapshot(e_tx, c.lo)
       AND NOT (pg_visible_in_snapshot(e_tx, c.hi) AND (c.done OR (e_tx, e_id) <= (c.pos_tx, c.pos_id)))
       AND e_tx < pg_snapshot_xmax(pg_current_snapshot())
       AND pg_visible_in_snapshot(e_tx, pg_current_snapshot());
COMMENT ON FUNCTION outbox.owed(outbox.cursors, xid8, bigint) IS
    'Whether the committed log row (tx, id) is not yet settled by the cursor.';

-- The rows of lane p_lane after (p_from_tx, p_from_id), below p_below,
-- committed in snapshot p_hi, in (tx, id) order, at most p_limit. One
-- ordered index range per segment, each stopping at p_limit: written per
-- partition because over the partitioned parent the planner may append
-- every segment's rows and sort them all (it did: a claim of 500 read and
-- sorted the whole 8,000-row window, 22 ms instead of 2).
DO $$
DECLARE
    branches text;
BEGIN
    SELECT string_agg(format(
               '(SELECT e.* FROM outbox.events_%s e
                  WHERE e.lane = p_lane AND (e.tx, e.id) > (p_from_tx, p_from_id)
                    AND e.tx < p_below AND pg_visible_in_snapshot(e.tx, p_hi)
                  ORDER BY e.tx, e.id LIMIT p_limit)', s), ' UNION ALL ')
      INTO branches
      FROM generate_series(0, 7) s;
    EXECUTE format(
        'CREATE FUNCTION outbox.lane_rows(p_lane smallint, p_from_tx xid8, p_from_id bigint,
                                         p_below xid8, p_hi pg_snapshot, p_limit integer)
         RETURNS SETOF outbox.events
         LANGUAGE sql STABLE
         AS $f$ SELECT * FROM (%s) w ORDER BY w.tx, w.id LIMIT p_limit $f$', branches);
END
$$;
COMMENT ON FUNCTION outbox.lane_rows(smallint, xid8, bigint, xid8, pg_snapshot, integer) IS
    'The next rows of a lane in (tx, id) order within a snapshot, read segment by segment.';

-- The next rows of a cursor's window, at most p_limit, in (tx, id) order:
-- first the rows of the transactions that were running at lo and committed
-- by hi (one ordered range each), then the range from lo's xmax (or the
-- position) to hi's xmax.
CREATE FUNCTION outbox.window_rows(c outbox.cursors, p_limit integer)
RETURNS outbox.events[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    win outbox.events[] := '{}';
    x xid8;
BEGIN
    FOR x IN SELECT v FROM pg_snapshot_xip(c.lo) v ORDER BY v LOOP
        EXIT WHEN cardinality(win) >= p_limit;
        CONTINUE WHEN x < c.pos_tx OR NOT pg_visible_in_snapshot(x, c.hi);
        win := win || ARRAY(
            SELECT r FROM outbox.lane_rows(c.lane, x, CASE WHEN x = c.pos_tx THEN c.pos_id ELSE -1 END,
                                           (x::text::bigint + 1)::text::xid8, c.hi,
                                           p_limit - cardinality(win)) r);
    END LOOP;
    IF cardinality(win) < p_limit THEN
        win := win || ARRAY(
            SELECT r FROM outbox.lane_rows(
                       c.lane,
                       greatest(c.pos_tx, pg_snapshot_xmax(c.lo)),
                       CASE WHEN c.pos_tx >= pg_snapshot_xmax(c.lo) THEN c.pos_id ELSE -1 END,
                       pg_snapshot_xmax(c.hi), c.hi, p_limit - cardinality(win)) r);
    END IF;
    RETURN win;
END
$$;
COMMENT ON FUNCTION outbox.window_rows(outbox.cursors, integer) IS
    'The next rows of a cursor''s window, in commit order.';

-- Whether a lane has committed rows its cursor has not read (read-only:
-- an idle relay looks without writing). A window in progress always has.
CREATE FUNCTION outbox.lane_has_news(c outbox.cursors, now_snap pg_snapshot)
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    x xid8;
BEGIN
    IF NOT c.done THEN
        RETURN true;
    END IF;
    FOR x IN SELECT v FROM pg_snapshot_xip(c.hi) v LOOP
        IF pg_visible_in_snapshot(x, now_snap) AND EXISTS (
               SELECT FROM outbox.lane_rows(c.lane, x, -1, (x::text::bigint + 1)::text::xid8,
                                            now_snap, 1)) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN EXISTS (SELECT FROM outbox.lane_rows(c.lane, pg_snapshot_xmax(c.hi), -1,
                                                pg_snapshot_xmax(now_snap), now_snap, 1));
END
$$;
COMMENT ON FUNCTION outbox.lane_has_news(outbox.cursors, pg_snapshot) IS
    'Whether a lane has committed rows beyond its cursor.';

-- Copies rows of the log into a subscription's outbox.deliveries, in
-- (tx, id) order: rows whose delivery failed ('retry', due after its
-- delay), was held behind a failure ('held') or put back ('release'), and
-- rows that must wait ('parked': delayed, unrouted, or behind an earlier
-- event of their key). A key's first row is due (at its retry time or its
-- publisher's available_at) unless the key already has rows there; every
-- other row of the key waits at 'infinity' until the one ahead of it is
-- settled. The head of each key that has rows is locked FOR KEY SHARE
-- first, so a settle deleting it waits for this transaction and its wake
-- (a later statement) sees the rows queued behind it.
CREATE FUNCTION outbox.queue_rows(p_subscription text, p_lane integer, txs xid8[], ids bigint[],
                                  verdicts text[], delays_us bigint[], errors text[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    WITH item AS (
        SELECT * FROM unnest(txs, ids, verdicts, delays_us, errors)
                      AS x(tx, id, verdict, delay_us, error)
    ), rows AS (
        SELECT e.*, i.verdict, i.delay_us, i.error,
               row_number() OVER (PARTITION BY e.key ORDER BY e.tx, e.id) AS nth
          FROM item i
          -- One probe of one segment's events_lane_tx_idx per row: the
          -- segment named (so pruned at run time) and LIMIT 1 (so not
          -- flattened into a join the planner makes a hash of the whole
          -- lane: O(log) per call behind a long backlog).
         CROSS JOIN LATERAL (
               SELECT x.* FROM outbox.events x
                WHERE ((x.tx::text::bigint >> 14) & 7) = ((i.tx::text::bigint >> 14) & 7)
                  AND x.lane = p_lane AND x.tx = i.tx AND x.id = i.id
                LIMIT 1) e
    ), queued_keys AS (
        -- In key order, as every settle locks its rows: two transactions
        -- locking heads of the same keys wait for each other in one order,
        -- never in a cycle.
        SELECT k.key
          FROM (SELECT DISTINCT r.key FROM rows r WHERE r.key IS NOT NULL ORDER BY r.key) k
         CROSS JOIN LATERAL (
               SELECT 1 FROM outbox.deliveries d
                WHERE d.subscription = p_subscription AND d.key = k.key
                ORDER BY d.seq
                LIMIT 1
                  FOR KEY SHARE) head
    )
    INSERT INTO outbox.deliveries
           (subscription, id, tx, topic, key, payload, headers, created_at, available_at,
            not_before, attempts, last_error, reason)
    SELECT p_subscription, r.id, r.tx, r.topic, r.key, r.payload, r.headers, r.created_at,
           CASE WHEN r.key IS NOT NULL
                     AND (r.nth > 1 OR r.key IN (SELECT q.key FROM queued_keys q))
                    THEN 'infinity'
                WHEN r.verdict = 'retry'
                    THEN now() + r.delay_us * interval '1 microsecond'
                ELSE greatest(now(), r.available_at) END,
           r.available_at,
           CASE WHEN r.verdict = 'retry' THEN 1 ELSE 0 END,
           r.error,
           CASE WHEN r.verdict = 'retry' THEN 'retry'
                WHEN r.key IS NOT NULL
                     AND (r.nth > 1 OR r.key IN (SELECT q.key FROM queued_keys q))
                    THEN 'blocked'
                WHEN r.available_at > now() THEN 'delayed'
                ELSE 'queued' END
      FROM rows r
     ORDER BY r.tx, r.id
        ON CONFLICT (subscription, tx, id) DO NOTHING;
END
$$;
COMMENT ON FUNCTION outbox.queue_rows(text, integer, xid8[], bigint[], text[], bigint[], text[]) IS
    'Copies rows of the log into a subscription''s outbox.deliveries in commit order, each key''s first row due and the others waiting behind it.';

-- The claim: up to p_limit events for one relay worker, under one token.
--
-- * The window part: the first lane from p_lane on (round-robin) that is
--   not leased and has committed rows beyond its position is leased, and
--   its next rows are read in (tx, id) order. Rows of other topics are
--   passed over. Rows that must wait are copied to outbox.deliveries
--   instead of returned: delayed ones, ones of topics this relay does not
--   route (p_all / p_exact / p_like; the subscription's own patterns are
--   all routed for a named subscription), and every row of a key that has
--   rows there already or a parked row earlier in the batch. The head row
--   of such a key is locked FOR KEY SHARE, so a settle deleting it waits
--   for this claim, and its wake (a later statement) sees what was parked.
--   If nothing is left to deliver the position moves on at once;
--   otherwise the batch's end is recorded and outbox.settle moves it.
-- * The deliveries part: due head rows of keys (and keyless rows) of this
--   subscription and topics, FOR NO KEY UPDATE SKIP LOCKED, leased with
--   the same token.
-- * Last, one row that is not an event (id 0): when the batch is not
--   full, in how many microseconds the next deliveries row comes due (or
--   1 ms when a lane that had news was locked by someone else: see
--   contended below); and the claim's snapshot, for the relay's watch
--   after arming the wake-up flag (see the end).
-- * p_arm_us, if given, renews the wake-up flag (outbox.relay_wakeup) for
--   that long: a sleeping relay's poll keeps it armed in the same call.
CREATE FUNCTION outbox.claim(p_subscription text, p_lane integer, p_relay text,
                             p_limit integer, p_lease_us bigint,
                             p_all boolean, p_exact text[], p_like text[],
                             p_arm_us bigint DEFAULT NULL)
RETURNS TABLE (token bigint, lane smallint, seq bigint, tx bigint, id bigint, topic text,
               key text, payload text, headers text, created_at timestamptz,
               available_at timestamptz, attempts integer, last_error text,
               next_due_in_us bigint)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    sub outbox.subscriptions;
    c outbox.cursors;
    tok bigint := nextval('outbox.claim_tokens');
    lease interval := p_lease_us * interval '1 microsecond';
    now_snap pg_snapshot := pg_current_snapshot();
    sysid bigint := (SELECT system_identifier FROM pg_control_system());
    got integer := 0;
    read_n integer;
    last_tx xid8;
    last_id bigint;
    keep bigint[];
    park_tx xid8[];
    park_id bigint[];
    parked boolean;
    win outbox.events[];
    opened boolean;
    irregular boolean;
    l integer;
    contended boolean := false;
    rearmed boolean := false;
    news integer[];
    due_us bigint;
BEGIN
    SELECT * INTO sub FROM outbox.subscriptions s WHERE s.name = p_subscription;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox: subscription "%" is not registered', p_subscription
            USING ERRCODE = 'undefined_object';
    END IF;

    -- The claim's commit need not wait for its WAL to reach the disk: all
    -- it writes is a lease (and rows it parks together with the cursor
    -- that moved past them), which a crash may only undo, as a whole, so
    -- that the events are read and delivered again; and the settle, which
    -- commits synchronously, makes it durable with itself. The wait was
    -- most of the time from a commit to its delivery at low rates.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Before anything is read with them: snapshots of another cluster
    -- would make new events look long settled (or far in the future).
    IF EXISTS (SELECT FROM outbox.cursors k
                WHERE k.subscription = p_subscription AND k.system_identifier <> sysid) THEN
        RAISE EXCEPTION 'outbox: the cursors of subscription "%" were written by another PostgreSQL cluster (restored from a dump?); see docs/operations.md, "Restoring into another cluster"', p_subscription
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- The lanes that may have news, in one statement (one probe of each
    -- segment's index per lane, where a look lane by lane with
    -- outbox.lane_has_news opened every segment again for each lane: an
    -- idle claim took 1.1 ms, now 0.45). A lane whose window is used up
    -- has news only in rows of transactions from its end's xmin on; the
    -- rows it finds there may be ones already read, which the exact look
    -- below tells apart.
    news := ARRAY(
        SELECT k.lane FROM outbox.cursors k
         WHERE k.subscription = p_subscription
           AND (NOT k.done OR EXISTS (
                    SELECT FROM outbox.events e
                     WHERE e.lane = k.lane AND e.tx >= pg_snapshot_xmin(k.hi)
                       AND e.tx < pg_snapshot_xmax(now_snap)
                       AND pg_visible_in_snapshot(e.tx, now_snap))));
    <<lanes>>
    FOR i IN 0..7 LOOP
        l := (greatest(p_lane, 0) + i) % 8;
        CONTINUE WHEN NOT l = ANY (news);
        -- A look without a lock first: an idle relay writes nothing.
        SELECT * INTO c FROM outbox.cursors k WHERE k.subscription = p_subscription AND k.lane = l;
        CONTINUE WHEN c.lease_until > now();
        CONTINUE WHEN NOT outbox.lane_has_news(c, now_snap);
        SELECT * INTO c FROM outbox.cursors k
         WHERE k.subscription = p_subscription AND k.lane = l
           AND (k.lease_until IS NULL OR k.lease_until <= now())
           FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            -- Locked by a claim, a settle or outbox.reclaim (or leased
            -- since the look). A claim holding it may not see what woke
            -- this one (its snapshot can be older), and reclaim delivers
            -- nothing: look again in a moment, or the news waits for the
            -- poll.
            contended := true;
            CONTINUE;
        END IF;
        -- The locked row is the latest version, which a claim and settle
        -- may have committed after now_snap was taken: its hi can be newer
        -- than now_snap. A window opened from it to now_snap would end
        -- before it starts, and saving that hi would move the cursor back
        -- (the events committed between the two were read again: chaos
        -- found duplicates). A snapshot taken now is newer than any
        -- version this lock can return.
        now_snap := pg_current_snapshot();
        -- Read windows until something is to be delivered, the log is used
        -- up, or a few windows of other topics have been passed over.
        FOR round IN 1..8 LOOP
            opened := c.done;
            IF c.done THEN
                c.lo := c.hi;
                c.hi := now_snap;
                c.pos_tx := '0';
                c.pos_id := 0;
                c.done := false;
            END IF;
            win := outbox.window_rows(c, p_limit);
            read_n := cardinality(win);

            IF read_n = 0 THEN
                -- The window is used up; a fresh one that is empty means
                -- the lane is (the probe raced with nothing: same snapshot).
                c.done := true;
                EXIT WHEN opened;
                CONTINUE;
            END IF;
            last_tx := (win[read_n]).tx;
            last_id := (win[read_n]).id;

            -- The common case, in one pass: nothing of the batch must wait
            -- (no keyed rows of this subscription in outbox.deliveries, none
            -- delayed, unrouted or of other topics).
            SELECT bool_or(NOT (sub.all_topics OR w.topic = ANY (sub.exact_topics)
                                OR w.topic LIKE ANY (sub.like_topics))
                           OR w.available_at > now()
                           OR NOT (p_all OR w.topic = ANY (p_exact) OR w.topic LIKE ANY (p_like)))
              INTO irregular
              FROM unnest(win) w;
            parked := false;
            IF NOT irregular AND NOT EXISTS (
                   SELECT FROM outbox.deliveries d
                    WHERE d.subscription = p_subscription AND d.key IS NOT NULL) THEN
                RETURN QUERY
                SELECT tok, l::smallint, NULL::bigint, w.tx::text::bigint, w.id, w.topic::text,
                       w.key, w.payload::text, w.headers::text, w.created_at, now() + lease, 1,
                       NULL::text, NULL::bigint
                  FROM unnest(win) w;
            ELSE
                -- Rows of other topics are passed over. Of the rest, the
                -- rows that must wait (delayed, unrouted, or behind an
                -- earlier event of their key that waits) are not returned:
                -- the settle parks them in outbox.deliveries together with
                -- the batch's outcomes, so a relay that dies parks nothing
                -- twice, and a parked row goes behind an earlier row of its
                -- key that failed in this batch.
                WITH mine AS (
                    SELECT w.*
                      FROM unnest(win) WITH ORDINALITY
                           AS w(id, topic, key, payload, headers, created_at, available_at,
                                tx, lane, ord)
                     WHERE sub.all_topics OR w.topic = ANY (sub.exact_topics)
                        OR w.topic LIKE ANY (sub.like_topics)
                ), waiting_keys AS (
                    -- The batch's keys with rows in outbox.deliveries: one
                    -- probe of deliveries_key_idx per key. (An EXISTS per
                    -- row is planned as a hash of every keyed row of the
                    -- subscription: a claim behind a backlog of 20,000
                    -- parked events read 20,000 rows, twice.)
                    SELECT k.key
                      FROM (SELECT DISTINCT m.key FROM mine m WHERE m.key IS NOT NULL) k
                     CROSS JOIN LATERAL (
                           SELECT 1 FROM outbox.deliveries d
                            WHERE d.subscription = p_subscription AND d.key = k.key
                            LIMIT 1) found
                ), judged AS (
                    SELECT m.ord, m.tx, m.id, m.key,
                           m.available_at > now()
                           OR NOT (p_all OR m.topic = ANY (p_exact) OR m.topic LIKE ANY (p_like))
                           OR (m.key IS NOT NULL
                               AND m.key IN (SELECT w.key FROM waiting_keys w))
                               AS waits
                      FROM mine m
                ), placed AS (
                    SELECT j.ord, j.tx, j.id,
                           j.waits OR (j.key IS NOT NULL AND bool_or(j.waits)
                               OVER (PARTITION BY j.key ORDER BY j.tx, j.id)) AS park
                      FROM judged j
                )
                SELECT coalesce(array_agg(p.ord) FILTER (WHERE NOT p.park), '{}'),
                       coalesce(array_agg(p.tx ORDER BY p.tx, p.id) FILTER (WHERE p.park), '{}'),
                       coalesce(array_agg(p.id ORDER BY p.tx, p.id) FILTER (WHERE p.park), '{}')
                  INTO keep, park_tx, park_id
                  FROM placed p;
                IF cardinality(keep) = 0 THEN
                    -- Nothing to deliver: park now, and the cursor moves on
                    -- in the same transaction.
                    PERFORM outbox.queue_rows(p_subscription, l, park_tx, park_id,
                                              array_fill('parked'::text, ARRAY[cardinality(park_id)]),
                                              array_fill(0::bigint, ARRAY[cardinality(park_id)]),
                                              array_fill(NULL::text, ARRAY[cardinality(park_id)]));
                END IF;
                parked := cardinality(park_id) > 0;
                RETURN QUERY
                SELECT tok, l::smallint, NULL::bigint, w.tx::text::bigint, w.id, w.topic::text,
                       w.key, w.payload::text, w.headers::text, w.created_at, now() + lease, 1,
                       NULL::text, NULL::bigint
                  FROM unnest(win) WITH ORDINALITY
                       AS w(id, topic, key, payload, headers, created_at, available_at, tx, lane, ord)
                 WHERE w.ord = ANY (keep)
                 ORDER BY w.ord;
            END IF;
            GET DIAGNOSTICS got = ROW_COUNT;

            IF got > 0 THEN
                UPDATE outbox.cursors k
                   SET lo = c.lo, hi = c.hi, pos_tx = c.pos_tx, pos_id = c.pos_id, done = c.done,
                       batch_tx = last_tx, batch_id = last_id, batch_n = read_n,
                       batch_done = read_n < p_limit, batch_parked = parked,
                       claimed_by = p_relay, token = tok, lease_until = now() + lease
                 WHERE k.subscription = p_subscription AND k.lane = l;
                EXIT lanes;
            END IF;
            -- Nothing of the batch to deliver: settled as read.
            c.pos_tx := last_tx;
            c.pos_id := last_id;
            c.done := read_n < p_limit;
        END LOOP;
        -- Passed over, parked or used up without a delivery: record where
        -- the cursor is. (Only a lane the probe found work in gets here.)
        UPDATE outbox.cursors k
           SET lo = c.lo, hi = c.hi, pos_tx = c.pos_tx, pos_id = c.pos_id, done = c.done,
               batch_tx = NULL, batch_id = NULL, batch_n = NULL, batch_done = NULL,
               batch_parked = NULL, claimed_by = NULL, token = NULL, lease_until = NULL
         WHERE k.subscription = p_subscription AND k.lane = l;
    END LOOP;

    IF got < p_limit THEN
        RETURN QUERY
        WITH heads AS (
            SELECT d.seq
              FROM outbox.deliveries d
             WHERE d.subscription = p_subscription
               AND d.available_at <= now()
               AND (p_all OR d.topic = ANY (p_exact) OR d.topic LIKE ANY (p_like))
               AND (d.key IS NULL OR NOT EXISTS (
                        SELECT FROM outbox.deliveries x
                         WHERE x.subscription = d.subscription AND x.key = d.key
                           AND (x.seq < d.seq
                                OR (x.token IS NOT NULL AND x.available_at > now()))))
             ORDER BY d.available_at, d.seq
             LIMIT p_limit - got
               FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE outbox.deliveries d
           SET attempts = d.attempts + 1,
               available_at = now() + lease,
               claimed_by = p_relay,
               token = tok
          FROM heads h
         WHERE d.subscription = p_subscription AND d.seq = h.seq
        RETURNING tok, NULL::smallint, d.seq, d.tx::text::bigint, d.id, d.topic::text, d.key,
                  d.payload::text, d.headers::text, d.created_at, d.available_at, d.attempts,
                  d.last_error, NULL::bigint;
        GET DIAGNOSTICS read_n = ROW_COUNT;
        got := got + read_n;
    END IF;

    IF got < p_limit THEN
        due_us := (SELECT ceil(extract(epoch FROM d.available_at - now()) * 1e6)::bigint
                     FROM outbox.deliveries d
                    WHERE d.subscription = p_subscription
                      AND d.available_at > now() AND d.available_at < 'infinity'
                      AND (p_all OR d.topic = ANY (p_exact) OR d.topic LIKE ANY (p_like))
                    ORDER BY d.available_at
                    LIMIT 1);
        IF contended THEN
            due_us := least(due_us, 1000);  -- least() ignores NULL
        END IF;
    END IF;

    -- A sleeping relay renews the wake-up flag it armed with its poll, so
    -- that idle it sends one statement per poll interval. If the flag was
    -- off (another relay's listener cleared it), this arms it anew: the
    -- relay must then watch for publishers that read it off (below).
    IF p_arm_us IS NOT NULL THEN
        rearmed := NOT EXISTS (SELECT FROM outbox.relay_wakeup w WHERE w.armed_until > now());
        INSERT INTO outbox.relay_wakeup AS w (armed_until)
        VALUES (now() + p_arm_us * interval '1 microsecond')
            ON CONFLICT (only_row) DO UPDATE
           SET armed_until = greatest(w.armed_until, excluded.armed_until);
    END IF;

    -- Last, one row that is not an event (id 0): when the next row of
    -- outbox.deliveries comes due, whether this claim armed the flag anew
    -- (attempts 1), and the claim's snapshot (tx: its xmin, seq: its
    -- xmax). A publisher that read the flag just before a relay armed it
    -- sends no NOTIFY, and if it commits after the relay's next claim took
    -- its snapshot that claim cannot see it either; every such publisher
    -- has an xid below the xmax of a snapshot taken after the arming, so
    -- the relay looks again until a claim's xmin has passed that.
    RETURN QUERY
    SELECT 0::bigint, NULL::smallint, pg_snapshot_xmax(now_snap)::text::bigint,
           pg_snapshot_xmin(now_snap)::text::bigint, 0::bigint, ''::text,
           NULL::text, ''::text, ''::text, now(), now(), CASE WHEN rearmed THEN 1 ELSE 0 END,
           NULL::text, due_us;
END
$$;
COMMENT ON FUNCTION outbox.claim(text, integer, text, integer, bigint, boolean, text[], text[], bigint) IS
    'A relay worker claims a batch of a subscription: the next rows of one leased lane of the log, and due rows of outbox.deliveries, under one fencing token.';

-- 7. Settling --------------------------------------------------------------

-- Makes the next row of each key due, for keys whose head was just deleted
-- from outbox.deliveries (delivered or dead). Called in a statement after
-- the delete, so it sees every row a claim parked behind the head while
-- the delete waited for that claim's FOR KEY SHARE lock.
CREATE FUNCTION outbox.wake_next_of_keys(p_subscription text, done_keys text[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF done_keys IS NULL THEN
        RETURN;
    END IF;
    UPDATE outbox.deliveries d
       SET available_at = greatest(now(), d.not_before)
      FROM (SELECT DISTINCT k FROM unnest(done_keys) k) done(key)
     WHERE d.subscription = p_subscription
       AND d.seq = (SELECT min(x.seq) FROM outbox.deliveries x
                     WHERE x.subscription = p_subscription AND x.key = done.key)
       AND d.available_at = 'infinity';
END
$$;
COMMENT ON FUNCTION outbox.wake_next_of_keys(text, text[]) IS
    'Makes the new head of each key due when it was waiting behind the one just settled.';

-- Takes a settle's row locks in one order, by key: its own rows of
-- outbox.deliveries FOR UPDATE (it deletes or reschedules them) and the
-- heads of the keys it will park rows behind FOR KEY SHARE (see
-- outbox.queue_rows). Every claim and settle locks heads in key order, so
-- two of them wait for each other in one order, never in a cycle (they
-- did: a settle locking its own head of key a after a head of key b,
-- another one the other way round).
CREATE FUNCTION outbox.lock_in_key_order(p_subscription text, p_token bigint, own bigint[],
                                         park_keys text[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    k text;
BEGIN
    IF cardinality(park_keys) = 0 THEN
        PERFORM FROM outbox.deliveries d
          WHERE d.subscription = p_subscription AND d.seq = ANY (own) AND d.token = p_token
          ORDER BY d.key, d.seq
            FOR UPDATE;
        RETURN;
    END IF;
    FOR k IN SELECT u.key
               FROM (SELECT d.key FROM outbox.deliveries d
                      WHERE d.subscription = p_subscription AND d.seq = ANY (own)
                        AND d.token = p_token AND d.key IS NOT NULL
                     UNION
                     SELECT unnest(park_keys)) u
              ORDER BY u.key
    LOOP
        PERFORM FROM outbox.deliveries d
          WHERE d.subscription = p_subscription AND d.key = k
            AND d.seq = ANY (own) AND d.token = p_token
            FOR UPDATE;
        IF k = ANY (park_keys) THEN
            PERFORM FROM (SELECT 1 FROM outbox.deliveries d
                           WHERE d.subscription = p_subscription AND d.key = k
                           ORDER BY d.seq
                           LIMIT 1
                             FOR KEY SHARE) head;
        END IF;
    END LOOP;
    PERFORM FROM outbox.deliveries d
      WHERE d.subscription = p_subscription AND d.seq = ANY (own) AND d.token = p_token
        AND d.key IS NULL
        FOR UPDATE;
END
$$;
COMMENT ON FUNCTION outbox.lock_in_key_order(text, bigint, bigint[], text[]) IS
    'Takes a settle''s row locks in key order (own rows FOR UPDATE, heads to park behind FOR KEY SHARE), so settles and claims never deadlock.';

-- The settle of one claimed batch, in one transaction. Each item is a log
-- row (seq NULL; tx, id) or a deliveries row (seq), with its verdict:
-- delivered, retry (delay, error), dead (error), release (put back
-- unattempted), held (not attempted: an earlier event of its key in the
-- batch failed).
-- * Log rows, fenced by the lane's token: retries and held or released
--   rows are copied to outbox.deliveries, in order, dead ones to
--   outbox.dead_letters; the cursor moves past the batch and the lane's
--   lease ends. If the token is gone (another relay took the lane over),
--   none of them is settled: the other relay reads them again.
-- * Deliveries rows, each fenced by the token: deleted, rescheduled, put
--   back or moved to the dead letters; the next rows of the keys deleted
--   are woken.
-- Returns the ids settled.
CREATE FUNCTION outbox.settle(p_subscription text, p_token bigint, p_lane integer,
                              seqs bigint[], txs bigint[], ids bigint[], verdicts text[],
                              delays_us bigint[], errors text[])
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
DECLARE
    c outbox.cursors;
    sub outbox.subscriptions;
    settled bigint[] := '{}';
    done_keys text[];
    q_tx xid8[];
    q_id bigint[];
    q_verdict text[];
    q_delay bigint[];
    q_error text[];
    locked boolean := false;
    cut_tx xid8;
    cut_id bigint;
    cut boolean;
BEGIN
    -- The common case: a batch of the log with nothing to park, all
    -- delivered.
    IF p_lane IS NOT NULL AND NOT EXISTS (
           SELECT FROM unnest(seqs, verdicts) AS x(seq, verdict)
            WHERE x.seq IS NOT NULL OR x.verdict <> 'delivered') THEN
        UPDATE outbox.cursors k
           SET pos_tx = k.batch_tx, pos_id = k.batch_id, done = k.batch_done,
               batch_tx = NULL, batch_id = NULL, batch_n = NULL, batch_done = NULL,
               batch_parked = NULL, claimed_by = NULL, token = NULL, lease_until = NULL
         WHERE k.subscription = p_subscription AND k.lane = p_lane AND k.token = p_token
           AND NOT k.batch_parked;
        IF FOUND THEN
            RETURN QUERY SELECT unnest(ids);
            RETURN;
        END IF;
    END IF;
    IF p_lane IS NOT NULL THEN
        SELECT * INTO c FROM outbox.cursors k
         WHERE k.subscription = p_subscription AND k.lane = p_lane AND k.token = p_token
           FOR UPDATE;
        IF FOUND THEN
            SELECT * INTO sub FROM outbox.subscriptions s WHERE s.name = p_subscription;
            -- A relay that stops puts back the batch's tail it did not
            -- attempt. That tail stays in the log: the cursor stops after
            -- the last row attempted (or where it was, if none was), and
            -- the next claim reads the tail again. Copied to
            -- outbox.deliveries instead, each of its keys would block every
            -- later event of the key behind it, and the subscription would
            -- drain those keys row by row through that table (a restart in
            -- front of a keyed backlog of 1M made settles take seconds).
            SELECT x.tx::text::xid8, x.id INTO cut_tx, cut_id
              FROM unnest(seqs, txs, ids, verdicts) AS x(seq, tx, id, verdict)
             WHERE x.seq IS NULL AND x.verdict <> 'release'
             ORDER BY x.tx DESC, x.id DESC
             LIMIT 1;
            IF NOT FOUND THEN
                cut_tx := c.pos_tx;
                cut_id := c.pos_id;
            END IF;
            cut := EXISTS (SELECT FROM unnest(seqs, txs, ids, verdicts) AS x(seq, tx, id, verdict)
                            WHERE x.seq IS NULL AND x.verdict = 'release'
                              AND (x.tx::text::xid8, x.id) > (cut_tx, cut_id));
            -- What goes to outbox.deliveries, in one call so that a key's
            -- rows keep their order: the batch's retries, held and released
            -- rows, and the rows the claim did not return (the same window
            -- read again: the cursor has not moved) that are this
            -- subscription's.
            WITH item AS (
                SELECT x.tx::text::xid8 AS tx, x.id, x.verdict, x.delay_us, x.error
                  FROM unnest(seqs, txs, ids, verdicts, delays_us, errors)
                       AS x(seq, tx, id, verdict, delay_us, error)
                 WHERE x.seq IS NULL
                   AND (NOT cut OR (x.tx::text::xid8, x.id) <= (cut_tx, cut_id))
            ), parked AS (
                SELECT w.tx, w.id, 'parked'::text AS verdict, 0::bigint AS delay_us,
                       NULL::text AS error
                  FROM unnest(CASE WHEN c.batch_parked THEN outbox.window_rows(c, c.batch_n)
                                   ELSE '{}'::outbox.events[] END) w
                 WHERE (sub.all_topics OR w.topic = ANY (sub.exact_topics)
                        OR w.topic LIKE ANY (sub.like_topics))
                   AND (NOT cut OR (w.tx, w.id) <= (cut_tx, cut_id))
                   AND NOT EXISTS (SELECT FROM item i WHERE i.tx = w.tx AND i.id = w.id)
            ), queued AS (
                SELECT * FROM item WHERE verdict IN ('retry', 'held', 'release')
                UNION ALL
                SELECT * FROM parked
            )
            SELECT coalesce(array_agg(q.tx), '{}'), coalesce(array_agg(q.id), '{}'),
                   coalesce(array_agg(q.verdict), '{}'), coalesce(array_agg(q.delay_us), '{}'),
                   coalesce(array_agg(q.error), '{}')
              INTO q_tx, q_id, q_verdict, q_delay, q_error
              FROM queued q;
            PERFORM outbox.lock_in_key_order(
                p_subscription, p_token, seqs,
                ARRAY(SELECT DISTINCT e.key
                        FROM unnest(q_tx, q_id) AS q(tx, id)
                        JOIN outbox.events e ON e.lane = p_lane AND e.tx = q.tx AND e.id = q.id
                       WHERE e.key IS NOT NULL));
            locked := true;
            PERFORM outbox.queue_rows(p_subscription, p_lane, q_tx, q_id, q_verdict, q_delay,
                                      q_error);
            INSERT INTO outbox.dead_letters
                   (subscription, id, topic, key, payload, headers, created_at, attempts,
                    last_error)
            SELECT p_subscription, e.id, e.topic, e.key, e.payload, e.headers, e.created_at, 1,
                   x.error
              FROM unnest(seqs, txs, ids, verdicts, errors) AS x(seq, tx, id, verdict, error)
              JOIN outbox.events e
                ON e.lane = p_lane AND e.tx = x.tx::text::xid8 AND e.id = x.id
             WHERE x.seq IS NULL AND x.verdict = 'dead'
                ON CONFLICT (subscription, id) DO UPDATE
               SET topic = excluded.topic, key = excluded.key, payload = excluded.payload,
                   headers = excluded.headers, created_at = excluded.created_at,
                   attempts = excluded.attempts, last_error = excluded.last_error,
                   failed_at = now();
            SELECT coalesce(array_agg(x.id), '{}') INTO settled
              FROM unnest(seqs, ids) AS x(seq, id)
             WHERE x.seq IS NULL;
            UPDATE outbox.cursors k
               SET pos_tx = CASE WHEN cut THEN cut_tx ELSE c.batch_tx END,
                   pos_id = CASE WHEN cut THEN cut_id ELSE c.batch_id END,
                   done = NOT cut AND c.batch_done,
                   batch_tx = NULL, batch_id = NULL, batch_n = NULL, batch_done = NULL,
                   batch_parked = NULL, claimed_by = NULL, token = NULL, lease_until = NULL
             WHERE k.subscription = p_subscription AND k.lane = p_lane;
        END IF;
    END IF;

    -- The batch's rows of outbox.deliveries, locked first in key order:
    -- a claim or settle parking rows behind these heads locks them (FOR KEY
    -- SHARE) in the same order, so the two never deadlock.
    IF NOT locked THEN
        PERFORM outbox.lock_in_key_order(p_subscription, p_token, seqs, '{}');
    END IF;
    WITH item AS (
        SELECT x.seq, x.verdict, x.delay_us, x.error
          FROM unnest(seqs, verdicts, delays_us, errors) AS x(seq, verdict, delay_us, error)
         WHERE x.seq IS NOT NULL
    ), delivered AS (
        DELETE FROM outbox.deliveries d
         USING item i
         WHERE d.subscription = p_subscription AND d.seq = i.seq AND d.token = p_token
           AND i.verdict = 'delivered'
     RETURNING d.id, d.key
    ), retried AS (
        UPDATE outbox.deliveries d
           SET available_at = now() + i.delay_us * interval '1 microsecond',
               last_error = i.error, reason = 'retry', token = NULL
          FROM item i
         WHERE d.subscription = p_subscription AND d.seq = i.seq AND d.token = p_token
           AND i.verdict = 'retry'
     RETURNING d.id
    ), released AS (
        UPDATE outbox.deliveries d
           SET available_at = CASE WHEN i.verdict = 'held' THEN 'infinity' ELSE now() END,
               attempts = greatest(d.attempts - 1, 0), token = NULL
          FROM item i
         WHERE d.subscription = p_subscription AND d.seq = i.seq AND d.token = p_token
           AND i.verdict IN ('release', 'held')
     RETURNING d.id
    ), died AS (
        DELETE FROM outbox.deliveries d
         USING item i
         WHERE d.subscription = p_subscription AND d.seq = i.seq AND d.token = p_token
           AND i.verdict = 'dead'
     RETURNING d.id, d.topic, d.key, d.payload, d.headers, d.created_at, d.attempts, i.error
    ), buried AS (
        INSERT INTO outbox.dead_letters
               (subscription, id, topic, key, payload, headers, created_at, attempts, last_error)
        SELECT p_subscription, died.* FROM died
            ON CONFLICT (subscription, id) DO UPDATE
           SET topic = excluded.topic, key = excluded.key, payload = excluded.payload,
               headers = excluded.headers, created_at = excluded.created_at,
               attempts = excluded.attempts, last_error = excluded.last_error,
               failed_at = now()
     RETURNING id
    )
    SELECT settled || coalesce((SELECT array_agg(s.id) FROM (
                SELECT id FROM delivered UNION ALL SELECT id FROM retried
                UNION ALL SELECT id FROM released UNION ALL SELECT id FROM buried) s), '{}'),
           (SELECT array_agg(k.key) FROM (
                SELECT key FROM delivered UNION ALL SELECT key FROM died) k
             WHERE k.key IS NOT NULL)
      INTO settled, done_keys;
    -- A new statement, so a new snapshot: it sees every row a claim parked
    -- behind a deleted head while the delete waited for its lock.
    PERFORM outbox.wake_next_of_keys(p_subscription, done_keys);
    RETURN QUERY SELECT unnest(settled);
END
$$;
COMMENT ON FUNCTION outbox.settle(text, bigint, integer, bigint[], bigint[], bigint[], text[], bigint[], text[]) IS
    'A relay settles a claimed batch: moves the lane''s cursor past it (copying retries, held and released rows to outbox.deliveries and dead ones to outbox.dead_letters) and settles the deliveries rows, all fenced by the claim''s token, then wakes the next rows of the keys settled.';

-- Renews the lease of a batch: the lane (if the token still holds it) and
-- the deliveries rows that still carry the token. Returns the ids still
-- held: the log rows given when the lane is held, and the deliveries rows'.
CREATE FUNCTION outbox.extend_lease(p_subscription text, p_token bigint, p_lane integer,
                                    p_lease_us bigint, log_ids bigint[], seqs bigint[])
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_lane IS NOT NULL THEN
        UPDATE outbox.cursors k
           SET lease_until = now() + p_lease_us * interval '1 microsecond'
         WHERE k.subscription = p_subscription AND k.lane = p_lane AND k.token = p_token;
        IF FOUND THEN
            RETURN QUERY SELECT unnest(log_ids);
        END IF;
    END IF;
    RETURN QUERY
    UPDATE outbox.deliveries d
       SET available_at = now() + p_lease_us * interval '1 microsecond'
     WHERE d.subscription = p_subscription AND d.seq = ANY (seqs) AND d.token = p_token
    RETURNING d.id;
END
$$;
COMMENT ON FUNCTION outbox.extend_lease(text, bigint, integer, bigint, bigint[], bigint[]) IS
    'Renews the lease of a claimed batch; returns the ids still held.';

-- 8. Storage in bulk -------------------------------------------------------

-- Segment s holds the xid ranges r (r = xid >> 14) with r & 7 = s. Once
-- the newest such range is below every cursor's lo (its xmin) and below
-- the oldest running transaction, every row of s is settled by every
-- subscription and nobody can still write there: TRUNCATE it. Lanes with
-- nothing to read are moved to the present first, so an idle lane does
-- not hold storage back. Never waits for a lock: a segment that is being
-- read is left for the next call. Returns the segments truncated.
CREATE FUNCTION outbox.reclaim()
RETURNS SETOF integer
LANGUAGE plpgsql
AS $$
DECLARE
    snap pg_snapshot := pg_current_snapshot();
    horizon bigint;
    cur_range bigint := pg_snapshot_xmax(snap)::text::bigint >> 14;
    newest bigint;
    cur_now bigint;
    filled boolean;
BEGIN
    -- Cursors of another cluster (a restore): their snapshots say nothing
    -- about this one's transaction ids, so nothing is safe to truncate
    -- until outbox.rebase() has run.
    IF EXISTS (SELECT FROM outbox.cursors c
                WHERE c.system_identifier <> (SELECT system_identifier FROM pg_control_system())) THEN
        RAISE EXCEPTION 'outbox: cursors written by another PostgreSQL cluster (restored from a dump?); run SELECT outbox.rebase() first, see docs/operations.md'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Idle lanes: nothing committed beyond their window.
    UPDATE outbox.cursors k
       SET lo = snap, hi = snap, pos_tx = '0', pos_id = 0, done = true
      FROM (SELECT c.subscription, c.lane FROM outbox.cursors c
             WHERE c.done AND c.token IS NULL
               AND pg_snapshot_xmax(c.hi) < pg_snapshot_xmax(snap)
               AND NOT outbox.lane_has_news(c, snap)
               FOR UPDATE SKIP LOCKED) idle
     WHERE k.subscription = idle.subscription AND k.lane = idle.lane
       -- Only ever forward, and only a lane nobody holds, whatever a claim
       -- or settle committed since this function's snapshot was taken.
       AND k.done AND k.token IS NULL
       AND pg_snapshot_xmax(k.hi) < pg_snapshot_xmax(snap);

    horizon := least((SELECT min(pg_snapshot_xmin(c.lo)::text::bigint) FROM outbox.cursors c),
                     pg_snapshot_xmin(snap)::text::bigint);
    IF horizon IS NULL THEN
        horizon := pg_snapshot_xmin(snap)::text::bigint;
    END IF;
    FOR s IN 0..7 LOOP
        newest := cur_range - ((cur_range - s) & 7);
        CONTINUE WHEN newest >= cur_range OR ((newest + 1) << 14) > horizon;
        -- Empty already (the common case once it was truncated): no lock.
        EXECUTE format('SELECT EXISTS (SELECT FROM outbox.events_%s)', s) INTO filled;
        CONTINUE WHEN NOT filled;
        BEGIN
            EXECUTE format('LOCK TABLE outbox.events_%s IN ACCESS EXCLUSIVE MODE NOWAIT', s);
            -- A transaction that began after snap may have an id of the
            -- next range, which is this segment's when cur_range was the
            -- last of the 8 before it wrapped: its rows (committed before
            -- the lock) are not below the horizon. Look again now that
            -- nobody can write here.
            cur_now := pg_snapshot_xmax(pg_current_snapshot())::text::bigint >> 14;
            CONTINUE WHEN cur_now - ((cur_now - s) & 7) <> newest;
            EXECUTE format('TRUNCATE outbox.events_%s', s);
            RETURN NEXT s;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- being read: next time
        END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION outbox.reclaim() IS
    'Moves idle cursors to the present and TRUNCATEs every segment of outbox.events that all subscriptions have passed. Never waits for a lock.';

-- After a restore into another cluster, transaction ids start again and
-- the cursors' snapshots mean nothing (new events would look long settled).
-- outbox.rebase() takes the safe way, at least once: every event still in
-- the log is queued again for every subscription in outbox.deliveries
-- (receivers deduplicate by id), the log is emptied, and every cursor
-- starts again at the current snapshot. Publishers wait while it runs.
CREATE FUNCTION outbox.rebase()
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    n bigint;
BEGIN
    LOCK TABLE outbox.events IN EXCLUSIVE MODE;
    INSERT INTO outbox.deliveries (subscription, id, topic, key, payload, headers, created_at,
                                   available_at, reason)
    SELECT s.name, e.id, e.topic, e.key, e.payload, e.headers, e.created_at,
           e.available_at, 'queued'
      FROM outbox.subscriptions s
     CROSS JOIN outbox.events e
     WHERE s.all_topics OR e.topic = ANY (s.exact_topics) OR e.topic LIKE ANY (s.like_topics)
     ORDER BY s.name, e.tx, e.id
        ON CONFLICT (subscription, tx, id) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    TRUNCATE outbox.events;
    UPDATE outbox.cursors
       SET system_identifier = (SELECT system_identifier FROM pg_control_system()),
           lo = pg_current_snapshot(), hi = pg_current_snapshot(), done = true,
           pos_tx = '0', pos_id = 0, batch_tx = NULL, batch_id = NULL, batch_n = NULL,
           batch_done = NULL, batch_parked = NULL, claimed_by = NULL, token = NULL,
           lease_until = NULL;
    RETURN n;
END
$$;
COMMENT ON FUNCTION outbox.rebase() IS
    'After a restore into another cluster: queues every event still in the log again for every subscription and restarts the cursors. Duplicates, never loss.';

-- 9. What each subscription still owes -------------------------------------

-- One row per (subscription, event) not yet delivered or dead-lettered:
-- the rows of outbox.deliveries, and the committed log rows the cursors
-- have not settled. For operators and tests; it reads every lane's
-- unsettled part of the log, so it is not for hot paths.
CREATE VIEW outbox.pending AS
SELECT d.subscription, d.id, d.topic, d.key, d.payload, d.headers, d.created_at,
       d.available_at, d.attempts, d.last_error, d.reason AS state,
       d.token IS NOT NULL AND d.available_at > now() AS in_flight
  FROM outbox.deliveries d
UNION ALL
SELECT c.subscription, e.id, e.topic, e.key, e.payload, e.headers, e.created_at,
       e.available_at, 0, NULL, 'unread',
       c.token IS NOT NULL AND c.lease_until > now()
           AND pg_visible_in_snapshot(e.tx, c.hi) AND (e.tx, e.id) <= (c.batch_tx, c.batch_id)
  FROM outbox.cursors c
  JOIN outbox.subscriptions s ON s.name = c.subscription
  JOIN outbox.events e ON e.lane = c.lane AND e.tx >= pg_snapshot_xmin(c.lo)
 WHERE outbox.owed(c, e.tx, e.id)
   AND (s.all_topics OR e.topic = ANY (s.exact_topics) OR e.topic LIKE ANY (s.like_topics))
   AND NOT EXISTS (SELECT FROM outbox.deliveries d
                    WHERE d.subscription = c.subscription AND d.tx = e.tx AND d.id = e.id);
COMMENT ON VIEW outbox.pending IS
    'Every (subscription, event) not yet delivered or dead-lettered: rows of outbox.deliveries (state = their reason) and unread log rows (state = unread).';
