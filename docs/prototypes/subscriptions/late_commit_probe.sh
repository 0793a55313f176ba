#!/usr/bin/env bash
# The late-commit trap (docs/design.md §4): transaction A takes the lower
# id, transaction B a higher one and commits first; a relay claims and acks
# in between; then A commits. A cursor "id > last seen id" would skip A's
# event for ever. The snapshot cursor of candidate (b) delivers it in the
# next window. Also shows a retrying head not blocking other keys.
# Usage: PGHOST=127.0.0.1 PGUSER=postgres PGDATABASE=outbox_subs ./late_commit_probe.sh
set -euo pipefail
here=$(dirname "$0")
psql -q -v ON_ERROR_STOP=1 -f "$here/b_log.sql" 2>/dev/null
psql -qAt -c "SELECT log.subscribe(1, 'probe')"
q() { psql -qAt -F ' ' -c "$1"; }

echo "== late commit"
# A: takes an id, waits 3 s, commits
psql -qAt -c "BEGIN; INSERT INTO log.events (topic, key, payload) VALUES ('t', NULL, '{\"who\": \"A\"}') RETURNING 'A took id', id, tx; SELECT pg_sleep(3); COMMIT;" &
sleep 1
q "INSERT INTO log.events (topic, key, payload) VALUES ('t', NULL, '{\"who\": \"B\"}') RETURNING 'B took id', id, tx"
echo "-- relay claims while A is open:"
q "SELECT 'claimed', id, payload->>'who' FROM log.claim(1, 0, 'r', 500, '30 s')"
q "SELECT 'acked', log.ack(1, 0, 'r')"
q "SELECT 'naive cursor would now be at id', max(id) FROM log.events WHERE payload->>'who' = 'B'"
wait
echo "-- A committed; relay claims again:"
q "SELECT 'claimed', id, payload->>'who' FROM log.claim(1, 0, 'r', 500, '30 s')"
q "SELECT 'acked', log.ack(1, 0, 'r')"
q "SELECT 'naive cursor: events with id > B''s id', count(*) FROM log.events WHERE id > (SELECT id FROM log.events WHERE payload->>'who' = 'B')"

echo "== a retrying head does not block other keys of its lane"
q "INSERT INTO log.events (topic, key, payload) VALUES ('t', 'k1', '{\"n\": 1}'), ('t', 'k2', '{\"n\": 2}'), ('t', 'k1', '{\"n\": 3}'), ('t', 'k2', '{\"n\": 4}')"
echo "-- claim: the relay fails k1/n=1 (retry in 1 s) and holds back k1/n=3 behind it"
q "SELECT 'claimed', id, key, payload->>'n' FROM log.claim(1, 0, 'r', 500, '30 s')"
q "SELECT 'acked', log.ack(1, 0, 'r',
     ARRAY(SELECT tx FROM log.events WHERE payload->>'n' = '1'), ARRAY(SELECT id FROM log.events WHERE payload->>'n' = '1'),
     '{1000000}', '{boom}',
     ARRAY(SELECT tx FROM log.events WHERE payload->>'n' = '3'), ARRAY(SELECT id FROM log.events WHERE payload->>'n' = '3'))"
q "SELECT 'retries', seq, key, payload->>'n', reason FROM log.retries ORDER BY seq"
q "INSERT INTO log.events (topic, key, payload) VALUES ('t', 'k1', '{\"n\": 5}'), ('t', 'k2', '{\"n\": 6}')"
echo "-- claim before the retry is due: k2 flows, k1/n=5 is parked behind the head"
q "SELECT 'claimed', id, key, payload->>'n', source FROM log.claim(1, 0, 'r', 500, '30 s')"
q "SELECT 'acked', log.ack(1, 0, 'r')"
q "SELECT 'retries', seq, key, payload->>'n', reason FROM log.retries ORDER BY seq"
sleep 1.1
echo "-- after 1 s: the head is retried, delivered; then its followers in order"
for i in 1 2 3; do
  q "SELECT 'claimed', id, key, payload->>'n', source FROM log.claim(1, 0, 'r', 500, '30 s')"
  q "SELECT 'acked', log.ack(1, 0, 'r')"
done
q "SELECT 'retries left', count(*) FROM log.retries"
