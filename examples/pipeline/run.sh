#!/usr/bin/env bash
# The pipeline example, end to end, on a throwaway cluster: files load, their orders are
# posted to the warehouse, the datamart refreshes the users they touched, and its
# success refreshes a materialized view of the top users, all from one
# CALL chunkwise.run_cycle('load_files') per stage of the schedule. The first cycle
# meets the malformed file (its run fails: on_failure, nothing downstream); once the file
# is fixed and retried, the next cycle runs the whole chain. It checks its own results
# and exits non-zero when they are wrong (tests/integration/examples.rs runs it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
USERS=${USERS:-2000}
DIR=${PIPELINE_DEMO_DIR:-/tmp/pg_chunkwise_pipeline_demo}
PORT=${PIPELINE_DEMO_PORT:-54333}

"$root/.ci/cluster.sh" start "$DIR/cluster" "$PORT"
trap '"$root/.ci/cluster.sh" stop "$DIR/cluster"' EXIT
"$root/examples/files/generate.sh" "$DIR/incoming"
as() { psql -X -q -v ON_ERROR_STOP=1 -h "$DIR/cluster" -p "$PORT" -U "$1" -d postgres "${@:2}"; }

echo "==> a loader role owning the files schema, the warehouse and the pipeline"
as postgres <<'SQL'
CREATE EXTENSION pg_chunkwise;
CREATE ROLE loader LOGIN;
GRANT pg_read_server_files TO loader;
GRANT CREATE ON DATABASE postgres TO loader;
SQL
as loader -v users="$USERS" <<SQL
\i $root/examples/files/schema.sql
\i $root/examples/datamart/schema.sql
\i $root/examples/datamart/data.sql
UPDATE dwh.dimension_users SET modified = false;
\i $here/pipeline.sql
\copy loads.files (org, path) FROM '$DIR/incoming/manifest.csv' WITH (FORMAT csv)
SELECT task, started_by, depends_on, starts, on_success FROM chunkwise.pipeline ORDER BY task;
SQL

# Waits (at most a minute) until the datamart's latest run is settled.
wait_for_datamart() {
  as loader -t -A <<'SQL' >/dev/null
DO $$
BEGIN
  FOR i IN 1..600 LOOP
    EXIT WHEN (SELECT last_run FROM chunkwise.pipeline WHERE task = 'datamart') IN ('succeeded', 'failed');
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;
SQL
}

echo "==> cycle 1: the malformed file dies, so load_files' run fails and nothing follows"
as loader <<'SQL'
CALL chunkwise.run_cycle('load_files');
SELECT task, last_run_id, last_run, cycle_requested FROM chunkwise.pipeline ORDER BY task;
DO $$
BEGIN
  IF (SELECT last_run FROM chunkwise.pipeline WHERE task = 'load_files') <> 'failed'
     OR EXISTS (SELECT FROM chunkwise.runs WHERE task <> 'load_files') THEN
    RAISE EXCEPTION 'a failed load must start nothing downstream';
  END IF;
END $$;
SQL

echo "==> fix the file, retry it; cycle 2 runs the whole chain"
sed -i '5s/,twelve/,12.00/' "$DIR/incoming/initech/00002.csv"
as loader <<'SQL'
SELECT chunkwise.retry('load_files') AS retried;
CALL chunkwise.run_cycle('load_files');
SQL
wait_for_datamart
as loader <<'SQL'
\echo 'the timeline: which stage ran when'
SELECT r.run_id, r.task, r.started_at::time(3) AS started, r.finished_at::time(3) AS finished,
       r.processed, r.dead, r.outcome
  FROM chunkwise.runs r ORDER BY r.run_id;
SELECT task, run_id, processed, refreshed_at::time(3) AS top_users_refreshed FROM dwh.refresh_log;
\echo 'the top users, as the reports see them'
SELECT * FROM dwh.top_users LIMIT 5;
DO $$
BEGIN
  IF (SELECT count(*) FROM loads.files WHERE posted_at IS NULL) <> 0
     OR (SELECT count(*) FROM dwh.dimension_users WHERE modified) <> 0
     OR (SELECT count(*) FROM dwh.refresh_log) <> 1
     OR (SELECT count(*) FROM chunkwise.runs WHERE task = 'post_orders') <> 1
     OR (SELECT count(*) FROM chunkwise.runs WHERE task = 'datamart') <> 1
     OR (SELECT count(*) FROM dwh.top_users) <> 10 THEN
    RAISE EXCEPTION 'the pipeline did not run every stage exactly once';
  END IF;
END $$;
\echo 'every stage ran once, in order'
SQL
