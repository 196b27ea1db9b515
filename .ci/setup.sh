#!/usr/bin/env bash
# Installs everything pg_chunkwise needs on a fresh Debian 12 machine (as root), then
# builds and installs the extension into the system PostgreSQL 15. Idempotent: each
# step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
PGRX_VERSION=0.18.1
PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang postgresql-15-cron sudo)

source .ci/packages.sh
ensure_packages "${PACKAGES[@]}"

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
  say "installing cargo-pgrx $PGRX_VERSION (a few minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# Point pgrx at the system PostgreSQL 15; it must never download its own.
if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  say "cargo pgrx init --pg15=$PG_CONFIG"
  cargo pgrx init --pg15="$PG_CONFIG"
fi

# Citus for the scale-out tests and benchmark: not in Debian's archive, so a build of it
# travels beside the project: ../shared/citus of this checkout, or of the team's
# workspace (/work/main is the usual checkout there), or wherever CITUS_BUILD says.
# Without it those tests skip, saying so.
if [ ! -f "$($PG_CONFIG --sharedir)/extension/citus.control" ]; then
  for build in ${CITUS_BUILD:-} ../shared/citus /work/shared/citus; do
    if [ -x "$build/install.sh" ]; then
      say "installing Citus from $build"
      PG_CONFIG="$PG_CONFIG" "$build/install.sh"
      break
    fi
  done
fi

say "building and installing pg_chunkwise"
cargo pgrx install --release --pg-config "$PG_CONFIG"
# The install scripts of released versions, frozen in sql/ (pgrx writes only the current
# version's and copies the upgrade scripts): CREATE EXTENSION ... VERSION '0.1.0' and the
# upgrade test need them.
bash .ci/install-frozen-scripts.sh "$($PG_CONFIG --sharedir)/extension"
