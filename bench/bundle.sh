#!/usr/bin/env bash
# Packs what the benchmarks need into bench/bundle/ and bench/bundle.tar.gz (both
# git-ignored), so that they can run
# on a bare x86-64 Linux machine that has python3 but no PostgreSQL, no compiler and no
# network (a lent many-core machine): PostgreSQL 15 with pg_chunkwise installed, the
# shared libraries it links beyond glibc, and psycopg's wheels for that machine's Python.
#   bash bench/bundle.sh [PYTHON_VERSION]    # default 3.12: the target's python3 -V
# Then, on the target, from a copy of this checkout with bench/bundle.tar.gz (or the
# unpacked bench/bundle) in it:
#   bash bench/run_bundled.sh scaling --scaling-workers 1,2,4,8,16 --datamart-runs 5
# PostgreSQL finds its lib and share directories relative to its own binaries, so the
# bundle's tree works wherever it is copied to.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${1:-3.12}
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
if [ "${CHUNKWISE_SETUP_DONE:-}" != 1 ]; then
  bash .ci/setup.sh >/dev/null
fi

BUNDLE=bench/bundle
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/pg" "$BUNDLE/libs" "$BUNDLE/wheels"
BINDIR=$($PG_CONFIG --bindir) PKGLIBDIR=$($PG_CONFIG --pkglibdir) SHAREDIR=$($PG_CONFIG --sharedir)

# The tree keeps the relative places of bin, lib and share that the binaries were built
# with (Debian: lib/postgresql/15/{bin,lib} and share/postgresql/15).
prefix=$(dirname "$(dirname "$(dirname "$(dirname "$BINDIR")")")")
place() { local rel=${1#"$prefix"/}; mkdir -p "$BUNDLE/pg/$rel"; echo "$BUNDLE/pg/$rel"; }
bin=$(place "$BINDIR") lib=$(place "$PKGLIBDIR") share=$(place "$SHAREDIR")
cp -a "$BINDIR"/{postgres,initdb,pg_ctl,psql,pgbench,pg_config} "$bin/"
# Server modules without the JIT (its bitcode is half the size) and without Citus.
find "$PKGLIBDIR" -maxdepth 1 -name '*.so' ! -name 'llvmjit*' ! -name 'citus*' -exec cp -a {} "$lib/" \;
cp -a "$SHAREDIR"/. "$share/"
echo "${bin#"$BUNDLE"/}" >"$BUNDLE/bindir"
git rev-parse --short HEAD >"$BUNDLE/commit"

# Shared libraries beyond glibc's own, for the binaries and the server modules.
{ ldd "$bin"/* "$lib"/*.so 2>/dev/null || true; } \
  | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u \
  | grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*)\.so' \
  | xargs -r cp -L -t "$BUNDLE/libs/"

# psycopg for the target's Python (pure wheel, its binary part, and what it imports).
bench/.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" \
  "psycopg==3.2.13" "psycopg-binary==3.2.13" "typing-extensions>=4.6"
# One compressed file travels better (ICU's data is most of the size).
tar -czf bench/bundle.tar.gz -C bench bundle
du -sh "$BUNDLE" bench/bundle.tar.gz
