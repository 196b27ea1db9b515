#!/usr/bin/env bash
# The Debian package, as a DBA uses it: `make package`, `apt-get install ./<deb>`, a task
# run from the packaged files in a fresh cluster (and an update from 0.1.0), then
# `apt-get remove` and a check that its files are gone. The build is reinstalled at the
# end, as .ci/setup.sh installs it, for whatever runs next.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
dir=/tmp/pg_chunkwise_package_test
port=54_350
port=${port//_/}
passed=0
check() { # check DESCRIPTION EXPECTED ACTUAL
  if [ "$2" != "$3" ]; then
    echo "package test: $1: expected '$2', got '$3'" >&2
    echo "package: $passed passed, 1 failed"
    exit 1
  fi
  passed=$((passed + 1))
}
psql_at() { psql -h "$dir" -p "$port" -U postgres -X -At -v ON_ERROR_STOP=1 "$@"; }

deb=$(bash .ci/package.sh)
echo "built $deb ($(du -k "$deb" | cut -f1) KiB):"
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print "  " $6 " (" $3 " bytes)"}'
package=$(dpkg-deb -f "$deb" Package)
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$deb" >/dev/null
check "package installed" "install ok installed" "$(dpkg-query -W -f='${Status}' "$package")"
mapfile -t files < <(dpkg -L "$package" | while read -r f; do [ -f "$f" ] && echo "$f"; done)
check "files installed" "$(dpkg-deb -c "$deb" | grep -c '^-')" "${#files[@]}"

bash .ci/cluster.sh start "$dir" "$port" "max_worker_processes = 16" >/dev/null
trap 'bash .ci/cluster.sh stop "$dir"' EXIT
psql_at -d postgres -c "CREATE DATABASE packaged" -c "CREATE DATABASE updated" >/dev/null
psql_at -d packaged >/dev/null <<'SQL'
CREATE EXTENSION pg_chunkwise;
CREATE TABLE counters (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
INSERT INTO counters (k) SELECT generate_series(1, 50);
CREATE PROCEDURE bump(k bigint) LANGUAGE sql AS 'UPDATE counters SET n = n + 1 WHERE counters.k = bump.k';
SELECT chunkwise.create_task('bump', call => 'bump');
SELECT chunkwise.plan('bump', 'SELECT k AS key FROM counters');
SQL
check "a run from the packaged files" 50 "$(psql_at -d packaged -c "SELECT processed FROM chunkwise.run('bump', 2)")"
check "each effect once" 50 "$(psql_at -d packaged -c "SELECT count(*) FROM counters WHERE n = 1")"
psql_at -d updated -c "CREATE EXTENSION pg_chunkwise VERSION '0.1.0'" -c "ALTER EXTENSION pg_chunkwise UPDATE" >/dev/null
check "an update from 0.1.0" "$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)" \
  "$(psql_at -d updated -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_chunkwise'")"
bash .ci/cluster.sh stop "$dir"
trap - EXIT

DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "$package" >/dev/null
left=0
for f in "${files[@]}"; do [ -e "$f" ] && left=$((left + 1)); done
check "files removed with the package" 0 "$left"
check "package gone" "" "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -o 'install ok installed' || true)"

# Back to the build from source for what runs next.
bash .ci/setup.sh >target/package-reinstall.log 2>&1 || { tail -20 target/package-reinstall.log; exit 1; }
echo "package: $passed passed, 0 failed"
