-- The example application's own table: its diesel migrations live beside
-- the outbox's, each with its own bookkeeping.
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    total_cents bigint NOT NULL
);
