#!/usr/bin/env bash
# Measurements of docs/design.md §4. Candidates run interleaved (A, B, A, B)
# and only while the 1-minute load average is below 1.3 (shared 2-core box).
# Usage: PGHOST=127.0.0.1 PGUSER=postgres PGDATABASE=outbox_subs ./run.sh publish|drain|claim_cost [reps]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
reps=${2:-3}
q() { psql -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
calm() { while awk '{exit !($1 >= 1.3)}' /proc/loadavg; do sleep 5; done; }
# pgbench prints "tps = N (without initial connection time)"
tps() { awk '/^tps = /{print $3}'; }
export PGOPTIONS='-c synchronous_commit=off'

setup() {
  psql -qX -v ON_ERROR_STOP=1 -f "$here/base.sql" -f "$here/a_copy.sql" -f "$here/b_log.sql" 2>/dev/null
  # today's queue, for the publish comparison: the crate's migrations
  if [ "$(q "SELECT to_regclass('outbox.events') IS NULL")" = t ]; then
    q "CREATE SCHEMA outbox"
    for m in "$here"/../../../migrations/*/up.sql; do psql -qX -v ON_ERROR_STOP=1 -f "$m"; done
  fi
}

publish() {
  setup
  for r in $(seq "$reps"); do
    for c in base current a b0 b1 b5; do
      q "TRUNCATE base.t, outbox.events, copy.events, log.events"
      q "DELETE FROM log.subscriptions"
      f=publish_$c
      case $c in
        b0) f=publish_b ;;
        b1) f=publish_b; q "SELECT log.subscribe(1, 's1')" ;;
        b5) f=publish_b; q "SELECT log.subscribe(g, 's' || g) FROM generate_series(1, 5) g" >/dev/null ;;
      esac
      q "CHECKPOINT"; calm
      t=$(pgbench -n -M prepared -c 1 -T 10 -f "$here/$f.pgb" 2>/dev/null | tps)
      echo "publish rep=$r cand=$c tps=$t load=$(cut -d' ' -f1 /proc/loadavg)"
    done
  done
}

# drain: 300,000 events, batches of 500, 600 batches per client
drain() {
  setup
  local keys
  for keys in ${KEYS_LIST:-0 1000}; do
    q "TRUNCATE log.events"; q "DELETE FROM log.subscriptions"
    q "SELECT log.subscribe(g, 's' || g) FROM generate_series(1, 3) g" >/dev/null
    q "CREATE TABLE IF NOT EXISTS public.fill_snap (lo pg_snapshot, hi pg_snapshot); TRUNCATE public.fill_snap"
    q "INSERT INTO public.fill_snap (lo) VALUES (pg_current_snapshot())"
    q "CALL base.fill('log.events', 300000, $keys)"
    q "UPDATE public.fill_snap SET hi = pg_current_snapshot()"
    q "VACUUM ANALYZE log.events"
    for r in $(seq "$reps"); do
      for c in ${CANDS:-base a1 b1 a3 b3}; do
        case $c in
          base) q "TRUNCATE base.t"; q "CALL base.fill('base.t', 300000, $keys)"; q "VACUUM ANALYZE base.t"
                f=drain_base; n=1; opts= ;;
          a*)   n=${c#a}
                q "TRUNCATE copy.events, copy.deliveries, copy.subscriptions"
                q "INSERT INTO copy.subscriptions SELECT g, 's' || g FROM generate_series(1, $n) g"
                q "CALL base.fill('copy.events', 300000, $keys)"; q "VACUUM ANALYZE copy.events, copy.deliveries"
                f=drain_a; opts="-D subs=$n" ;;
          b*)   n=${c#b}
                q "UPDATE log.cursors SET lo = s.lo, hi = s.hi, pos_tx = '0', pos_id = 0, done = false,
                     owner = NULL, lease_until = NULL, delivered = 0 FROM public.fill_snap s"
                f=drain_b; opts= ;;
        esac
        q "CHECKPOINT"; calm
        out=$(pgbench -n -M prepared -c "$n" -t 600 $opts -f "$here/$f.pgb" 2>&1)
        t=$(echo "$out" | tps)
        case $c in
          base) left=$(q "SELECT count(*) FROM base.t"); done_=$((300000 - left)) ;;
          a*)   done_=$(q "SELECT $n * (300000 - (SELECT count(*) FROM copy.events)) - (SELECT count(*) FROM copy.deliveries)") ;;
          b*)   done_=$(q "SELECT sum(delivered) FROM log.cursors") ;;
        esac
        # elapsed = transactions / tps
        echo "drain keys=$keys rep=$r cand=$c clients=$n tps=$t deliveries=$done_ per_s=$(awk -v d="$done_" -v t="$t" -v n="$n" 'BEGIN{printf "%d", d / (n * 600 / t)}') load=$(cut -d' ' -f1 /proc/loadavg)"
      done
    done
  done
}

# claim cost against the backlog: (b) claims 20 batches of 500 off the
# head of a backlog of N events (log rows not yet read by the cursor)
claim_cost() {
  setup
  q "SELECT log.subscribe(1, 's1')" >/dev/null
  q "CREATE TABLE IF NOT EXISTS public.fill_snap (lo pg_snapshot, hi pg_snapshot); TRUNCATE public.fill_snap"
  q "INSERT INTO public.fill_snap (lo) VALUES (pg_current_snapshot())"
  local have=0 n
  for n in 10000 100000 1000000 ${CLAIM_COST_MAX:-}; do
    q "CALL base.fill('log.events', $((n - have)), ${KEYS:-1000})"; have=$n
    q "UPDATE public.fill_snap SET hi = pg_current_snapshot()"
    q "VACUUM ANALYZE log.events"
    for r in $(seq "$reps"); do
      q "UPDATE log.cursors SET lo = s.lo, hi = s.hi, pos_tx = '0', pos_id = 0, done = false,
           owner = NULL, lease_until = NULL, delivered = 0 FROM public.fill_snap s"
      calm
      lat=$(pgbench -n -M prepared -c 1 -t 20 -f "$here/drain_b.pgb" 2>&1 | awk '/latency average/{print $4}')
      echo "claim_cost backlog=$n rep=$r ms_per_batch=$lat size=$(q "SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) FROM pg_partition_tree('log.events')") load=$(cut -d' ' -f1 /proc/loadavg)"
    done
  done
}

"$1"
