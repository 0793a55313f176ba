DROP FUNCTION outbox.expire_idempotency_keys(integer);
DROP TABLE outbox.idempotency_keys;
