"""What every benchmark needs: a throwaway cluster, wall-clock timing, the machine's
facts, a printed table and a JSON result under bench/results/."""

import contextlib
import datetime
import json
import os
import pathlib
import platform
import subprocess
import time

import psycopg
from psycopg import sql

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The same server settings for every contender: enough WAL that no checkpoint lands in
# the middle of one run and not another, durable commits (fsync and synchronous_commit
# stay on), room for the workers, the library preloaded for always-on pools.
SERVER_SETTINGS = (
    "shared_buffers = 1GB",
    "max_wal_size = 16GB",
    "checkpoint_timeout = 1h",
    "maintenance_work_mem = 512MB",
    "max_worker_processes = 32",
    "max_connections = 100",
    "chunkwise.max_workers = 16",
    # The always-on launcher (bench/always_on.py); it sits idle for the others.
    "shared_preload_libraries = 'pg_chunkwise'",
)


class Cluster:
    """A PostgreSQL 15 cluster of our own on a Unix socket (.ci/cluster.sh)."""

    def __init__(self, directory="/tmp/pg_chunkwise_bench", port=54331):
        self.dir = directory
        self.port = port

    def __enter__(self):
        subprocess.run(
            [ROOT / ".ci" / "cluster.sh", "start", self.dir, str(self.port), *SERVER_SETTINGS],
            check=True,
        )
        return self

    def __exit__(self, *exc):
        subprocess.run([ROOT / ".ci" / "cluster.sh", "stop", self.dir], check=False)

    @contextlib.contextmanager
    def settings(self, **values):
        """Server settings one scenario needs that take a restart: set while it runs, then
        reset (so that they cost the other scenarios nothing)."""
        self._alter_system(values)
        try:
            yield
        finally:
            self._alter_system({name: None for name in values})

    def _alter_system(self, values):
        with self.connect() as conn:
            for name, value in values.items():
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)) if value is None
                             else sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        subprocess.run([ROOT / ".ci" / "cluster.sh", "restart", self.dir], check=True)

    def dsn(self, dbname="postgres"):
        return f"host={self.dir} port={self.port} user=postgres dbname={dbname}"

    def connect(self, dbname="postgres"):
        conn = psycopg.connect(self.dsn(dbname), autocommit=True)
        conn.add_notice_handler(lambda notice: None)  # progress NOTICEs: not timed output
        return conn


def timed(action):
    """Runs `action()` and returns (wall seconds, its result)."""
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def fresh_task(conn, task, options=""):
    """Drops `task` if it is there and creates it again, a no-op statement task with
    `options` (", name => value ..." SQL) on top."""
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = %s", (task,))
    conn.execute(f"SELECT chunkwise.create_task(%s, statement => 'SELECT $1'{options})", (task,))


def machine_facts(conn):
    settings = dict(
        conn.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
            (["shared_buffers", "max_wal_size", "synchronous_commit", "fsync", "wal_level",
              "max_worker_processes", "work_mem"],),
        ).fetchall()
    )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    memory_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    # A bundled run (bench/run_bundled.sh) has no git: the bundle says what it was built from.
    commit = os.environ.get("CHUNKWISE_BENCH_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "postgres": conn.execute("SHOW server_version").fetchone()[0],
        "settings": settings,
        "commit": commit,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def save(name, payload, smoke, tag=None):
    """Writes the result as JSON: bench/results/NAME.json, NAME.TAG.json for a tagged run
    (another machine's figures, kept beside this one's), or NAME.smoke.json for a smoke
    run (ignored by git, so a smoke run never overwrites the published figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.' + tag if tag else ''}{'.smoke' if smoke else ''}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
