-- Removes everything up.sql created except the schema itself, which also holds
-- diesel's bookkeeping table for these migrations.
DROP TABLE outbox.dead_letters;
DROP TABLE outbox.events;
DROP FUNCTION outbox.notify_events_inserted();
DROP SEQUENCE outbox.claim_tokens;
