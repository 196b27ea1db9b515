#!/usr/bin/env bash
# The datamart demo, end to end, on a throwaway cluster: builds a small warehouse, plans
# the modified users by activity and refreshes their datamart rows with 2 workers.
# Run it with `make demo` (which installs what is missing first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
USERS=${USERS:-20000}
DIR=${DEMO_DIR:-/tmp/pg_chunkwise_demo}
PORT=${DEMO_PORT:-54330}

"$root/.ci/cluster.sh" start "$DIR" "$PORT"
# DEMO_KEEP=1 leaves the cluster running (examples/dashboard watches it).
[ -n "${DEMO_KEEP:-}" ] || trap '"$root/.ci/cluster.sh" stop "$DIR"' EXIT
psql=(psql -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)

echo "==> building a warehouse of $USERS users"
"${psql[@]}" -v users="$USERS" <<SQL
CREATE EXTENSION pg_chunkwise;
\i $here/schema.sql
\i $here/data.sql
-- As autovacuum would have by the time a refresh runs: with the visibility map set, the
-- activity ranking's index-only scans of fact_actions skip the heap.
VACUUM ANALYZE dwh.dimension_users, dwh.fact_actions;
SELECT count(*) AS users, (SELECT count(*) FROM dwh.fact_actions) AS facts FROM dwh.dimension_users;
SQL

echo "==> defining the task and planning by activity"
"${psql[@]}" <<'SQL'
SELECT chunkwise.create_task('datamart',
         call    => 'dwh.update_datamart_user',
         after   => 'UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = $1',
         workers => 2);
SELECT chunkwise.plan_by_activity('datamart', 'SELECT key, last_activity, actions FROM dwh.modified_users') AS planned;
SQL

echo "==> running with 2 workers"
"${psql[@]}" <<'SQL'
SET chunkwise.progress_interval = '2s';
\timing on
SELECT run_id, processed, failed, dead, round(seconds::numeric, 1) AS seconds,
       round((processed / seconds)::numeric) AS items_per_second
  FROM chunkwise.run('datamart');
\timing off
SQL

echo "==> the first users refreshed: the most recently active and most active first"
"${psql[@]}" <<'SQL'
SELECT i.key AS user_id, i.priority / 1000000000000 AS tier, d.actions_total, d.actions_7d, d.actions_30d,
       round(d.days_since_seen, 1) AS days_since_seen, d.refreshed_at::time(3) AS refreshed_at
  FROM chunkwise.items i JOIN dwh.datamart_users d ON d.user_id = i.key
 ORDER BY i.finished_at
 LIMIT 12;

SELECT priority / 1000000000000 AS tier, count(*) AS users,
       min(finished_at)::time(3) AS first_done, max(finished_at)::time(3) AS last_done
  FROM chunkwise.items GROUP BY 1 ORDER BY 1;

SELECT (SELECT count(*) FROM dwh.dimension_users WHERE modified) AS still_modified,
       (SELECT count(*) FROM dwh.datamart_users) AS datamart_rows;
SELECT * FROM chunkwise.task_status;
SQL
