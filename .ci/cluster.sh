#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster owned by the postgres OS user, on a Unix socket in
# its own directory (never the system cluster).
#   .ci/cluster.sh start DIR PORT [extra postgresql.conf lines...]
#   .ci/cluster.sh restart DIR
#   .ci/cluster.sh stop DIR
set -euo pipefail
BINDIR=$("${PG_CONFIG:-/usr/bin/pg_config}" --bindir)
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cmd=$1 dir=$2
case "$cmd" in
  start)
    port=$3; shift 3
    if [ -f "$dir/data/postmaster.pid" ]; then as_postgres "$BINDIR/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true; fi
    rm -rf "$dir"; mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    as_postgres "$BINDIR/initdb" -A trust -U postgres --no-sync -D "$dir/data" >/dev/null
    {
      echo "listen_addresses = ''"
      echo "unix_socket_directories = '$dir'"
      echo "port = $port"
      echo "max_worker_processes = 32"
      for line in "$@"; do echo "$line"; done
    } >> "$dir/data/postgresql.conf"
    as_postgres "$BINDIR/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
    ;;
  restart)
    as_postgres "$BINDIR/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w restart >/dev/null
    ;;
  stop)
    as_postgres "$BINDIR/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 start DIR PORT [conf...] | restart DIR | stop DIR" >&2; exit 2 ;;
esac
