#!/usr/bin/env bash
# The way datamart refreshes run today, as the benchmark's baseline: a file of user ids
# in priority order, THREADS shell workers, each taking the next id under flock and
# running one psql per user (BEGIN; CALL ...; UPDATE ... modified = false; COMMIT).
#   bench/shell_runner.sh IDS_FILE THREADS PSQL_CONNECTION_ARGS...
set -euo pipefail
ids=$1 threads=$2
shift 2
counter=$(mktemp)
echo 0 > "$counter"
trap 'rm -f "$counter"' EXIT

next_line() { # prints the next line number, under the counter's lock
  flock "$counter" sh -c 'n=$(($(cat "$1") + 1)); echo "$n" > "$1"; echo "$n"' _ "$counter"
}

worker() {
  while :; do
    n=$(next_line)
    id=$(sed -n "${n}{p;q}" "$ids")
    [ -n "$id" ] || return 0
    psql "$@" -X -q -v ON_ERROR_STOP=1 -c "BEGIN; CALL dwh.update_datamart_user($id);
      UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = $id; COMMIT;" >/dev/null
  done
}

for _ in $(seq "$threads"); do worker "$@" & done
wait
