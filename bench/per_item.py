"""Per-item overhead: N items (default 50,000) whose work is a trivial INSERT into a log
table, by

  1. pg_chunkwise with 1, 2 and 4 workers, synchronous_commit on and off,
  2. pgbench doing the same work per transaction with the same number of clients:
     claim a row with SKIP LOCKED, CALL the target, mark the row done ("equal work"),
  3. pgbench doing only the CALL (the ceiling: no queue at all),
  4. graphile-worker 0.17.3 (a fast Postgres job queue for Node.js; its newest release,
     0.18.0, needs Node 22 and the image has Node 20) running the same CALL as its task
     with the same concurrency (bench/graphile/drain.mjs),

each on a fresh log table, each timed the way its own tools report it: pg_chunkwise by
the wall time of `run()` (its workers' start included), pgbench by its own tps once its
clients are connected, graphile-worker from its first `job:start` to its last
`job:complete` event (no poller beside it, the Node process's start excluded). The setup
of each queue is not timed.
"""

import json
import os
import pathlib
import re
import subprocess
import tempfile
import urllib.parse

from lib import markdown_table, timed

EQUAL_WORK = """BEGIN;
SELECT id AS claimed FROM pgb_queue WHERE NOT done ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED \\gset
CALL log_item(:claimed);
UPDATE pgb_queue SET done = true WHERE id = :claimed;
END;
"""
CALL_ONLY = """\\set k random(1, 1000000000)
CALL log_item(:k);
"""


def setup(conn):
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    conn.execute("DROP TABLE IF EXISTS log, pgb_queue")
    conn.execute("CREATE TABLE log (k bigint, at timestamptz DEFAULT now())")
    conn.execute("CREATE OR REPLACE PROCEDURE log_item(k bigint) LANGUAGE sql AS 'INSERT INTO log (k) VALUES (k)'")


def fresh_log(conn):
    conn.execute("TRUNCATE log")
    conn.execute("CHECKPOINT")


def logged(conn):
    return conn.execute("SELECT count(*), count(DISTINCT k) FROM log").fetchone()


def chunkwise(conn, items, workers, synchronous):
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'per_item'")
    conn.execute(
        "SELECT chunkwise.create_task('per_item', call => 'log_item', synchronous_commit => %s)",
        (synchronous,),
    )
    conn.execute(
        "SELECT chunkwise.plan('per_item', format('SELECT g AS key FROM generate_series(1, %%s) g', %s::int))",
        (items,),
    )
    conn.execute("VACUUM ANALYZE chunkwise.items")
    fresh_log(conn)
    seconds, _ = timed(lambda: conn.execute("SELECT * FROM chunkwise.run('per_item', %s)", (workers,)))
    return seconds


def pgbench(cluster, script, clients, transactions, synchronous):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    os.chmod(f.name, 0o644)
    env = dict(os.environ, PGOPTIONS=f"-c synchronous_commit={'on' if synchronous else 'off'}")
    command = ["pgbench", "-n", "-M", "prepared", "-h", cluster.dir, "-p", str(cluster.port),
               "-U", "postgres", "-c", str(clients), "-j", str(clients),
               "-t", str(transactions // clients), "-f", f.name, "postgres"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    pathlib.Path(f.name).unlink()
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr}")
    # pgbench's own figure: transactions per second once its clients are connected.
    tps = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", done.stdout, re.M)
    if not tps:
        raise RuntimeError(f"no tps in pgbench's report: {done.stdout}")
    return transactions // clients * clients / float(tps.group(1))


def equal_work(cluster, conn, items, clients, synchronous):
    conn.execute("DROP TABLE IF EXISTS pgb_queue")
    conn.execute("CREATE TABLE pgb_queue (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false)")
    conn.execute("INSERT INTO pgb_queue (id) SELECT generate_series(1, %s)", (items,))
    conn.execute("CREATE INDEX ON pgb_queue (id) WHERE NOT done")
    conn.execute("VACUUM ANALYZE pgb_queue")
    fresh_log(conn)
    return pgbench(cluster, EQUAL_WORK, clients, items, synchronous)


def call_only(cluster, conn, items, clients, synchronous):
    fresh_log(conn)
    return pgbench(cluster, CALL_ONLY, clients, items, synchronous)


GRAPHILE = pathlib.Path(__file__).resolve().parent / "graphile"


def graphile_url(cluster, synchronous):
    options = urllib.parse.quote(f"-c synchronous_commit={'on' if synchronous else 'off'}")
    return (f"postgresql://postgres@/postgres?host={urllib.parse.quote(cluster.dir)}"
            f"&port={cluster.port}&options={options}")


def graphile(cluster, conn, items, concurrency, synchronous):
    node = lambda *argv: subprocess.run(["node", str(GRAPHILE / "drain.mjs"), *argv],
                                        capture_output=True, text=True, check=True)
    url = graphile_url(cluster, synchronous)
    node("migrate", url)
    conn.execute("DELETE FROM graphile_worker._private_jobs")
    conn.execute(
        "SELECT graphile_worker.add_jobs(ARRAY(SELECT json_populate_record(null::graphile_worker.job_spec, "
        "json_build_object('identifier', 'log_item', 'payload', json_build_object('k', g))) "
        "FROM generate_series(1, %s) g))",
        (items,),
    )
    fresh_log(conn)
    report = json.loads(node("drain", url, str(items), str(concurrency)).stdout)
    if report["failed"]:
        raise RuntimeError(f"graphile-worker: {report['failed']} jobs failed")
    return report["seconds"]


def run(cluster, args):
    items = 2_000 if args.smoke else args.items
    conn = cluster.connect()
    setup(conn)
    results = []
    for synchronous in (True, False):
        for workers in (1, 2, 4):
            for name, measure, distinct_keys in [
                (f"pg_chunkwise, {workers} worker{'s' if workers > 1 else ''}",
                 lambda: chunkwise(conn, items, workers, synchronous), True),
                (f"pgbench equal work, {workers} client{'s' if workers > 1 else ''}",
                 lambda: equal_work(cluster, conn, items, workers, synchronous), True),
                (f"pgbench CALL only, {workers} client{'s' if workers > 1 else ''}",
                 lambda: call_only(cluster, conn, items, workers, synchronous), False),
                (f"graphile-worker, concurrency {workers}",
                 lambda: graphile(cluster, conn, items, workers, synchronous), True),
            ]:
                seconds = measure()
                count, distinct = logged(conn)
                expected = items // workers * workers
                # Every item logged once (the CALL-only ceiling logs random keys).
                correct = count == expected and (not distinct_keys or distinct == expected)
                results.append({
                    "contender": name, "workers": workers, "synchronous_commit": synchronous,
                    "items": expected, "seconds": round(seconds, 3),
                    "items_per_second": round(expected / seconds), "same_result": correct,
                })
                print(f"  {name}, synchronous_commit {'on' if synchronous else 'off'}: "
                      f"{expected / seconds:.0f} items/s", flush=True)
    for r in results:
        same = [o for o in results if o["workers"] == r["workers"]
                and o["synchronous_commit"] == r["synchronous_commit"]]
        ours = next(o for o in same if o["contender"].startswith("pg_chunkwise"))
        r["chunkwise_vs_this"] = round(ours["items_per_second"] / r["items_per_second"], 2)
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'per_item'")
    return {"workload": {"items": items, "smoke": args.smoke}, "results": results}


def tables(result):
    return markdown_table(
        ["contender", "synchronous_commit", "items/s", "pg_chunkwise / this", "every item once"],
        [[r["contender"], "on" if r["synchronous_commit"] else "off", r["items_per_second"],
          f"{r['chunkwise_vs_this']:.2f}x", "yes" if r["same_result"] else "**NO**"]
         for r in result["results"]],
    )
