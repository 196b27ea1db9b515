#!/usr/bin/env bash
# `make package`: builds target/postgresql-15-pg-chunkwise_<version>-1_amd64.deb from
# `cargo pgrx package` output, the frozen install scripts of released versions and the
# upgrade scripts, with packaging/control and packaging/copyright. Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
version=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
name=postgresql-$major-pg-chunkwise
root=target/deb/$name
deb=target/${name}_${version}-1_amd64.deb

cargo pgrx package --pg-config "$PG_CONFIG" >target/package.log 2>&1 \
  || { tail -30 target/package.log >&2; exit 1; }
built=target/release/pg_chunkwise-pg$major
rm -rf "$root"
mkdir -p "$root/DEBIAN"
cp -a "$built/." "$root/"
extdir="$root$("$PG_CONFIG" --sharedir)/extension"
bash .ci/install-frozen-scripts.sh "$extdir"
cp sql/pg_chunkwise--*--*.sql "$extdir/"
doc=$root/usr/share/doc/$name
mkdir -p "$doc"
cp packaging/copyright "$doc/copyright"
gzip -9n -c CHANGELOG.md >"$doc/changelog.gz"
chmod -R u=rwX,go=rX "$root"
strip --strip-unneeded "$root$("$PG_CONFIG" --pkglibdir)/pg_chunkwise.so"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version-1/" -e "s/@MAJOR@/$major/g" -e "s/@SIZE@/$size/" \
  packaging/control >"$root/DEBIAN/control"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
