-- Deferred events become due at once; claims recheck their keys.
UPDATE outbox.events SET available_at = now() WHERE deferred;
ALTER TABLE outbox.events DROP COLUMN deferred;
