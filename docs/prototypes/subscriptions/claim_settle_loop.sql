-- Times the shipped claim and settle (migration 000005) from inside the
-- server: 40 rounds of outbox.claim + outbox.settle (all delivered) of
-- batches of p_batch events of one subscription, in one transaction.
-- No client round trips, so this is the SQL's own cost.
--
--   createdb drain && for f in migrations/*/up.sql; do
--     psql -d drain -c 'create schema if not exists outbox' -f $f; done
--   psql -d drain -c "insert into outbox.events (topic, payload)
--     select 'bench', jsonb_build_object('n', i, 'pad', repeat('x', 200))
--       from generate_series(1, 100000) i" -c 'vacuum analyze outbox.events'
--   psql -d drain -f docs/prototypes/subscriptions/claim_settle_loop.sql \
--        -c "select public.claim_settle_loop(500)"
CREATE OR REPLACE FUNCTION public.claim_settle_loop(p_batch int, p_sub text DEFAULT 'default')
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    tok bigint; ln smallint; ids bigint[]; txs bigint[]; seqs bigint[]; k int;
    t0 timestamptz; tc interval := '0'; ts interval := '0'; n int := 0;
BEGIN
    FOR i IN 0..39 LOOP
        t0 := clock_timestamp();
        SELECT min(c.token), min(c.lane), array_agg(c.id), array_agg(c.tx), array_agg(c.seq)
          INTO tok, ln, ids, txs, seqs
          FROM outbox.claim(p_sub, i, 'bench', p_batch, 30000000, true, '{}', '{}') c
         WHERE c.id > 0;
        tc := tc + (clock_timestamp() - t0);
        k := cardinality(ids);
        EXIT WHEN k IS NULL;
        n := n + k;
        t0 := clock_timestamp();
        PERFORM outbox.settle(p_sub, tok, ln, seqs, txs, ids,
                              array_fill('delivered'::text, ARRAY[k]),
                              array_fill(0::bigint, ARRAY[k]), array_fill(NULL::text, ARRAY[k]));
        ts := ts + (clock_timestamp() - t0);
    END LOOP;
    RETURN format('events %s claim %s settle %s', n, tc, ts);
END $$;
