#!/usr/bin/env bash
# Copies the frozen install scripts of released versions (sql/pg_chunkwise--X.Y.Z.sql;
# never the upgrade scripts, which pgrx copies itself) into the extension directory $1.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in sql/pg_chunkwise--*.sql; do
  case "$(basename "$script")" in
    pg_chunkwise--*--*.sql) ;;
    *) install -m 0644 "$script" "$1/" ;;
  esac
done
