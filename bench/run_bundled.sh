#!/usr/bin/env bash
# Runs the benchmarks from bench/bundle (made by bench/bundle.sh) on a bare x86-64 Linux
# machine, as root: the bundle's PostgreSQL is copied where the postgres OS user can
# read it, that user is made if missing, psycopg comes from the bundle's wheels.
# Arguments are bench/run.py's, e.g.
#   bash bench/run_bundled.sh scaling --scaling-workers 1,2,4,8,16 --datamart-runs 5
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=$PWD/bench/bundle
[ -f "$BUNDLE/bindir" ] || [ ! -f bench/bundle.tar.gz ] || tar -xzf bench/bundle.tar.gz -C bench
[ -f "$BUNDLE/bindir" ] || { echo "no bench/bundle: run bash bench/bundle.sh first" >&2; exit 1; }

id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /bin/bash postgres
# The checkout may sit under a directory postgres cannot enter.
PG=/tmp/pg_chunkwise_bundle
rm -rf "$PG" && mkdir -p "$PG" && cp -a "$BUNDLE/pg" "$BUNDLE/libs" "$PG/" && chmod -R a+rX "$PG"
export PATH="$PG/$(cat "$BUNDLE/bindir"):$PATH"
export LD_LIBRARY_PATH="$PG/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PG_CONFIG="$PG/$(cat "$BUNDLE/bindir")/pg_config"
# pg_config reports the directories it was built with; the scripts need its --bindir only.
[ "$("$PG_CONFIG" --bindir)" = "$(dirname "$PG_CONFIG")" ] || {
  mv "$PG_CONFIG" "$PG_CONFIG.real"
  printf '#!/bin/sh\n[ "$1" = --bindir ] && exec echo %s\nexec %s "$@"\n' \
    "$(dirname "$PG_CONFIG")" "$PG_CONFIG.real" >"$PG_CONFIG"
  chmod +x "$PG_CONFIG"
}

SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 CHUNKWISE_BENCH_COMMIT=$(cat "$BUNDLE/commit")
exec python3 bench/run.py "$@"
