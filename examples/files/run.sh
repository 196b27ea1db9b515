#!/usr/bin/env bash
# The file-loading example, end to end, on a throwaway cluster: 327 files from ten
# organisations (one sends 300), one of them malformed. Files of an organisation load
# in arrival order, organisations take turns, the bad file waits in chunkwise.failures,
# and after it is fixed, chunkwise.retry() loads it and the rest of its organisation.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
DIR=${FILES_DEMO_DIR:-/tmp/pg_chunkwise_files_demo}
PORT=${FILES_DEMO_PORT:-54332}

"$root/.ci/cluster.sh" start "$DIR/cluster" "$PORT"
trap '"$root/.ci/cluster.sh" stop "$DIR/cluster"' EXIT
"$here/generate.sh" "$DIR/incoming"
as() { psql -X -q -v ON_ERROR_STOP=1 -h "$DIR/cluster" -p "$PORT" -U "$1" -d postgres; }

echo "==> a loader role that may read server files, and the schema it owns"
as postgres <<'SQL'
CREATE EXTENSION pg_chunkwise;
CREATE ROLE loader LOGIN;
GRANT pg_read_server_files TO loader;
GRANT CREATE ON DATABASE postgres TO loader;
SQL
as loader <<SQL
\i $here/schema.sql
\copy loads.files (org, path) FROM '$DIR/incoming/manifest.csv' WITH (FORMAT csv)
SELECT org, count(*) AS files FROM loads.files GROUP BY org ORDER BY count(*) DESC, org;
SQL

echo "==> one cycle: plan the files not loaded yet, load them with 2 workers"
as loader <<'SQL'
CALL chunkwise.run_cycle('load_files');
SELECT task, done, dead, blocked_groups FROM chunkwise.task_status;
SELECT key AS file_id, group_key AS org, status, sqlstate, message, blocks_group FROM chunkwise.failures;
\echo 'when did each organisation finish? (acme sent 300 files first, the others 3 each)'
SELECT org, count(*) AS files_loaded, max(loaded_at)::time(3) AS last_loaded,
       (SELECT count(*) FROM loads.files a WHERE a.org = 'acme' AND a.loaded_at <= max(f.loaded_at)) AS acme_files_by_then
  FROM loads.files f WHERE loaded_at IS NOT NULL GROUP BY org ORDER BY max(loaded_at) LIMIT 5;
SQL

echo "==> fix the malformed file, retry it, run another cycle"
sed -i '5s/,twelve/,12.00/' "$DIR/incoming/initech/00002.csv"
as loader <<'SQL'
SELECT chunkwise.retry('load_files') AS retried;
CALL chunkwise.run_cycle('load_files');
SELECT org, count(*) FILTER (WHERE loaded_at IS NOT NULL) AS loaded, count(*) AS files,
       bool_and(loaded_at IS NOT NULL) AS all_loaded
  FROM loads.files GROUP BY org ORDER BY org;
\echo 'every organisation loaded its files in arrival order:'
SELECT bool_and(in_order) AS in_arrival_order FROM (
  SELECT loaded_at >= lag(loaded_at) OVER (PARTITION BY org ORDER BY file_id) IS NOT FALSE AS in_order
    FROM loads.files) s;
SQL
