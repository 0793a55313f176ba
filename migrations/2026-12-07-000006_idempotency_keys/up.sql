-- Idempotent publish: an event is written under an idempotency key only if
-- no event was written under that key within its window. The log
-- (outbox.events) is partitioned, so it cannot hold a unique index of its
-- own: the keys live in this small table, and a publisher claims a key and
-- writes its event in one statement (docs/schema.md):
--
--   WITH k AS (INSERT INTO outbox.idempotency_keys (key) VALUES ('order-7-approved')
--              ON CONFLICT (key) DO NOTHING RETURNING event_id)
--   INSERT INTO outbox.events (id, topic, payload)
--   SELECT event_id, 'order.approved', '{"order": 7}' FROM k RETURNING id;
--
-- Two publishers of one key queue on the key's unique index: the second
-- waits for the first to commit (then writes nothing) or roll back (then
-- writes its own event).

CREATE TABLE outbox.idempotency_keys (
    key text COLLATE "C" PRIMARY KEY
        CONSTRAINT idempotency_keys_key_valid
        CHECK (key <> '' AND octet_length(key) <= 255),
    -- The event written under the key: drawn from the log's own id
    -- sequence, so the publisher inserts the event with this id.
    event_id bigint NOT NULL,
    -- The window: once it ends, the key may be published again. The
    -- default is the documented window; change it with ALTER TABLE … SET
    -- DEFAULT (docs/schema.md).
    expires_at timestamptz NOT NULL DEFAULT now() + interval '7 days'
);
DO $$
BEGIN
    EXECUTE format('ALTER TABLE outbox.idempotency_keys ALTER COLUMN event_id SET DEFAULT nextval(%L)',
                   pg_get_serial_sequence('outbox.events', 'id'));
END
$$;
CREATE INDEX idempotency_keys_expires_at_idx ON outbox.idempotency_keys (expires_at);
COMMENT ON TABLE outbox.idempotency_keys IS
    'One row per idempotency key published within its window, with the id of the event written under it. Expired rows are deleted by relays. See docs/schema.md.';
COMMENT ON COLUMN outbox.idempotency_keys.key IS
    'The publisher''s idempotency key, e.g. order-7-approved. 1 to 255 bytes.';
COMMENT ON COLUMN outbox.idempotency_keys.event_id IS
    'The id of the event written under the key (default: the next id of outbox.events).';
COMMENT ON COLUMN outbox.idempotency_keys.expires_at IS
    'Until when a publish with this key writes nothing. Default now() + 7 days.';

-- What a relay's housekeeper runs: expired keys, oldest first, at most
-- `max_rows` per call (it calls again while calls come back full).
CREATE FUNCTION outbox.expire_idempotency_keys(max_rows integer DEFAULT 10000)
    RETURNS integer
    LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM outbox.idempotency_keys
         WHERE key IN (SELECT key FROM outbox.idempotency_keys
                        WHERE expires_at <= now()
                        ORDER BY expires_at
                        LIMIT max_rows
                          FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;
