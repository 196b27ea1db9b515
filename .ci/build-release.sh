#!/usr/bin/env bash
# Builds a released version of pg_chunkwise from git history, without installing it:
#   .ci/build-release.sh COMMIT OUTDIR
# leaves that version's pg_chunkwise.so and its generated install script in OUTDIR.
# The upgrade test loads the old library through dynamic_library_path. The build is
# cached in target/release-COMMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$1 out=$2
root=$(pwd)
tree=$root/target/release-$commit/source
package=$root/target/release-$commit/release/pg_chunkwise-pg15
if [ ! -f "$package/usr/lib/postgresql/15/lib/pg_chunkwise.so" ]; then
  if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "commit $commit is not in this clone's history (a shallow clone?): cannot build the old release" >&2
    exit 1
  fi
  rm -rf "$tree"
  mkdir -p "$(dirname "$tree")"
  git archive --format=tar --prefix=source/ "$commit" | tar -x -C "$(dirname "$tree")"
  (cd "$tree" && CARGO_TARGET_DIR="$root/target/release-$commit" \
     cargo pgrx package --pg-config "${PG_CONFIG:-/usr/bin/pg_config}" >"$root/target/release-$commit/build.log" 2>&1) \
    || { tail -30 "$root/target/release-$commit/build.log" >&2; exit 1; }
fi
mkdir -p "$out"
cp "$package/usr/lib/postgresql/15/lib/pg_chunkwise.so" "$out/"
cp "$package"/usr/share/postgresql/15/extension/pg_chunkwise--*.sql "$out/"
