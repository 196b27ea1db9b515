#!/usr/bin/env bash
# The dashboard against the demo's cluster: runs the datamart demo leaving its cluster up,
# then serves the dashboard on http://127.0.0.1:8080/ (DASHBOARD_LISTEN) until Ctrl-C,
# which also stops the cluster. Run it with `make dashboard-demo`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
DIR=${DEMO_DIR:-/tmp/pg_chunkwise_demo}
PORT=${DEMO_PORT:-54330}
LISTEN=${DASHBOARD_LISTEN:-127.0.0.1:8080}

DEMO_KEEP=1 DEMO_DIR=$DIR DEMO_PORT=$PORT bash "$root/examples/datamart/run.sh"
trap '"$root/.ci/cluster.sh" stop "$DIR"' EXIT

cat <<TXT

==> the dashboard: open http://$LISTEN/ (Ctrl-C stops it and the demo's cluster)
    To watch a run live, in another terminal:
    psql -h $DIR -p $PORT -U postgres -c "UPDATE dwh.dimension_users SET modified = true" \\
         -c "SELECT chunkwise.plan_by_activity('datamart', 'SELECT key, last_activity, actions FROM dwh.modified_users')" \\
         -c "SELECT chunkwise.start('datamart', workers => 2)"
TXT
"$root/target/release/chunkwise-dashboard" --allow-actions --listen "$LISTEN" \
  --database-url "host=$DIR port=$PORT user=postgres dbname=postgres"
