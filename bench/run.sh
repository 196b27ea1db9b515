#!/usr/bin/env bash
# All benchmarks, one command: installs what is missing (the extension via .ci/setup.sh,
# psycopg in bench/.venv, graphile-worker in bench/graphile), then runs bench/run.py
# with the given options, e.g.
#   bash bench/run.sh                   # default sizes; results in bench/results/
#   bash bench/run.sh --smoke           # tiny sizes, a few seconds
#   bash bench/run.sh --rows 500000     # a smaller chunked_upsert
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
if [ "${CHUNKWISE_SETUP_DONE:-}" != 1 ]; then
  bash .ci/setup.sh >bench/results/setup.log 2>&1 || { cat bench/results/setup.log; exit 1; }
fi
if ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "install ok installed" \
   && ! python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q "psycopg[binary]==3.2.*"
fi
if [ ! -d bench/graphile/node_modules ]; then
  (cd bench/graphile && npm ci --no-audit --no-fund --silent)
fi
exec bench/.venv/bin/python bench/run.py "$@"
