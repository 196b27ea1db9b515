#!/usr/bin/env bash
# Writes the demo's incoming files: one big sender and nine small ones, CSV of orders,
# and a manifest (org,path) in arrival order. One file of "initech" is malformed.
#   examples/files/generate.sh DIR
set -euo pipefail
dir=$1
rm -rf "$dir"; mkdir -p "$dir"
manifest="$dir/manifest.csv"
: > "$manifest"
write_file() { # org n
  local org=$1 n=$2 path="$dir/$1/$(printf '%05d' "$2").csv"
  mkdir -p "$dir/$org"
  { echo "order_id,amount"
    for i in $(seq 1 20); do echo "$((n * 100 + i)),$((i * 3)).50"; done
  } > "$path"
  echo "$org,$path" >> "$manifest"
}
# The big sender's backlog arrives first, then the small senders' files.
for n in $(seq 1 300); do write_file acme "$n"; done
for org in globex initech umbrella hooli stark wayne wonka tyrell cyberdyne; do
  for n in 1 2 3; do write_file "$org" "$n"; done
done
# A malformed file: a text where an amount belongs.
sed -i '5s/,.*/,twelve/' "$dir/initech/00002.csv"
chmod -R a+rX "$dir"
