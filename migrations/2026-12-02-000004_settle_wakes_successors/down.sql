DROP INDEX outbox.events_held_key_idx;
DROP FUNCTION outbox.settle(bigint, bigint[], text[], bigint[], text[]);
DROP FUNCTION outbox.settle_delivered(bigint, bigint[]);
DROP FUNCTION outbox.wake_deferred_successors(bigint[], text[]);
