-- Claims that stay cheap behind a long queue of one key (docs/design.md).
--
-- A keyed event waits while an earlier event of its key is still queued.
-- Left where it is, such an event sits in the due part of
-- events_available_at_idx, and every claim has to step over it again: with
-- a few keys and many workers every claim walked the whole backlog (0.3 to
-- 1.7 s per claim at 32k queued events over 200 keys). So a relay that
-- meets one moves it out of the way: available_at goes past the earlier
-- event's lease or retry time and `deferred` records that a relay did it.
-- When the earlier event is delivered or dead-lettered, the relay makes the
-- next event of the key due again at once (only if it was deferred: a
-- publisher's own delay is never shortened).
ALTER TABLE outbox.events
    ADD COLUMN deferred boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN outbox.events.deferred IS
    'True while a relay has moved available_at forward because an earlier event of the same key is still queued; the relay makes the event due again when that one is settled. Publishers leave it false.';

-- Settling a keyed event looks for the next deferred event of its key; the
-- deferred events are few, so this index is small and the lookup cheap
-- (a probe of events_key_idx costs a random page of a large index).
CREATE INDEX events_deferred_idx ON outbox.events (key, id) WHERE deferred;
COMMENT ON INDEX outbox.events_deferred_idx IS
    'Deferred events by key: settling an event finds the next deferred event of its key with one probe of a small index.';
