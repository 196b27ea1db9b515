"""Always-on pools: enqueue-to-start latency, idle cost and throughput.

  1. Latency: single enqueues arriving every 5 ms, then bursts of 100 items in one
     transaction every 200 ms, into a pool of 4 resident pg_chunkwise workers; the same
     arrivals into graphile-worker (concurrency 4, woken by LISTEN/NOTIFY) on the same
     cluster. Each item's latency is the target's clock_timestamp() at its start minus
     the clock_timestamp() of its enqueue (written in the same statement), so both are
     measured the same way, by the server's clock: p50, p95, p99, and the medians of
     its two parts, split at the enqueue's commit timestamp (track_commit_timestamp).
  2. Idle: the pool of 4 (and its supervisor and launcher) with nothing to do for 60 s:
     CPU time from /proc, and the transactions the database counted meanwhile (a poll
     would show as transactions).
  3. Throughput: 20,000 trivial items planned into the resident pool (timed from the
     plan's commit to the last item's start being visible) against the same items run by
     chunkwise.run() with 4 workers (timed from its call, after the plan).
"""

import os
import pathlib
import statistics
import subprocess
import time
import urllib.parse

from lib import markdown_table, timed

GRAPHILE = pathlib.Path(__file__).resolve().parent / "graphile"
POOL = 4


def setup(conn):
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    conn.execute("DROP TABLE IF EXISTS ao_log, ao_enqueued")
    conn.execute("CREATE TABLE ao_log (k bigint, at timestamptz)")
    conn.execute("CREATE TABLE ao_enqueued (k bigint, at timestamptz)")
    conn.execute("CREATE OR REPLACE PROCEDURE ao_item(k bigint) LANGUAGE sql AS "
                 "'INSERT INTO ao_log VALUES (k, clock_timestamp())'")
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task LIKE 'ao_%'")


def wait_until(what, check, timeout=120):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def logged(conn):
    return conn.execute("SELECT count(*) FROM ao_log").fetchone()[0]


def percentiles(conn):
    """Latency percentiles, and the medians of its two parts: from the enqueuing
    statement to its commit (the commit timestamp of the row's transaction), and from
    there to the item's start (the WAL flush, the wake-up, the claim and the call)."""
    rows = conn.execute(
        "SELECT (extract(epoch FROM l.at - e.at) * 1000)::float8, "
        "       (extract(epoch FROM pg_xact_commit_timestamp(e.xmin) - e.at) * 1000)::float8 "
        "  FROM ao_log l JOIN ao_enqueued e USING (k)"
    ).fetchall()
    ms = sorted(r[0] for r in rows)
    cut = statistics.quantiles(ms, n=100, method="inclusive")
    to_commit = statistics.median(r[1] for r in rows)
    after_commit = statistics.median(r[0] - r[1] for r in rows)
    return {"items": len(ms), "p50_ms": round(cut[49], 2), "p95_ms": round(cut[94], 2),
            "p99_ms": round(cut[98], 2), "to_commit_p50_ms": round(to_commit, 2),
            "commit_to_start_p50_ms": round(after_commit, 2)}


# (name, items per transaction, seconds between transactions)
PATTERNS = (("single every 5 ms", 1, 0.005), ("bursts of 100 every 200 ms", 100, 0.2))


def arrivals(conn, enqueue_sql, transactions, size, gap):
    """Sends `transactions` enqueues of `size` items, `gap` seconds apart, waits until
    all ran, and returns their latency figures."""
    conn.execute("TRUNCATE ao_log, ao_enqueued")
    for n in range(transactions):
        first = n * size + 1
        conn.execute(
            f"WITH e AS (INSERT INTO ao_enqueued SELECT k, clock_timestamp() "
            f"FROM generate_series(%s::bigint, %s) k RETURNING k) SELECT {enqueue_sql} FROM e",
            (first, first + size - 1),
        )
        time.sleep(gap)
    wait_until("every item to start", lambda: logged(conn) >= transactions * size)
    return percentiles(conn)


def counts(singles, bursts):
    return {"single every 5 ms": singles, "bursts of 100 every 200 ms": bursts}


def chunkwise_latency(conn, singles, bursts):
    conn.execute(f"SELECT chunkwise.create_task('ao_live', call => 'ao_item', always_on => true, "
                 f"workers => {POOL}, min_workers => {POOL})")
    wait_until("the pool", lambda: len(worker_pids(conn)) == POOL)
    return {name: arrivals(conn, "chunkwise.enqueue('ao_live', e.k)", counts(singles, bursts)[name], size, gap)
            for name, size, gap in PATTERNS}


def pool_pids(conn):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type IN "
        "('chunkwise worker', 'chunkwise supervisor', 'chunkwise launcher')").fetchall()]


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total


def idle_cost(conn, seconds):
    pids = pool_pids(conn)
    commits = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    conn.execute("SELECT pg_stat_force_next_flush()")
    before_tx = conn.execute(commits).fetchone()[0]
    before = cpu_ticks(pids)
    time.sleep(seconds)
    spent = cpu_ticks(pids) - before
    conn.execute("SELECT pg_stat_force_next_flush()")
    after_tx = conn.execute(commits).fetchone()[0]
    hz = os.sysconf("SC_CLK_TCK")
    return {"processes": len(pids), "seconds": seconds,
            "cpu_percent_of_one_core": round(100.0 * spent / hz / seconds, 3),
            # Transactions counted meanwhile, less this measurement's own two statements.
            "transactions": after_tx - before_tx - 2}


def throughput(conn, items):
    plan = f"SELECT chunkwise.plan('%s', 'SELECT g AS key FROM generate_series(1, {items}) g')"
    conn.execute("TRUNCATE ao_log")
    # The pool starts at the plan's commit; run() is timed from its call, after its plan.
    # The plan's own time is in neither.
    conn.execute(plan % "ao_live")
    seconds, _ = timed(lambda: wait_until("the pool's items", lambda: logged(conn) >= items))
    pool = {"contender": f"always-on pool of {POOL}", "seconds": round(seconds, 3),
            "items_per_second": round(items / seconds)}
    conn.execute("SELECT chunkwise.create_task('ao_batch', call => 'ao_item')")
    conn.execute(plan % "ao_batch")
    conn.execute("TRUNCATE ao_log")
    seconds, _ = timed(lambda: conn.execute(f"SELECT * FROM chunkwise.run('ao_batch', {POOL})"))
    batch = {"contender": f"chunkwise.run(), {POOL} workers", "seconds": round(seconds, 3),
             "items_per_second": round(items / seconds)}
    return [pool, batch]


def graphile_latency(cluster, conn, singles, bursts):
    url = (f"postgresql://postgres@/postgres?host={urllib.parse.quote(cluster.dir)}"
           f"&port={cluster.port}")
    node = ["node", str(GRAPHILE / "drain.mjs")]
    subprocess.run([*node, "migrate", url], check=True, capture_output=True)
    conn.execute("DELETE FROM graphile_worker._private_jobs")
    figures = {}
    for name, size, gap in PATTERNS:
        transactions = counts(singles, bursts)[name]
        # Serves the jobs (CALL ao_item) until all of them completed, then stops.
        conn.execute("TRUNCATE ao_log, ao_enqueued")
        worker = subprocess.Popen([*node, "drain", url, str(transactions * size), str(POOL),
                                   "ao_item"], stdout=subprocess.DEVNULL)
        wait_until("graphile-worker to listen", lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE '%listen%' "
            "AND pid <> pg_backend_pid()").fetchone()[0] > 0, timeout=30)
        figures[name] = arrivals(
            conn, "graphile_worker.add_job('log_item', json_build_object('k', e.k))",
            transactions, size, gap)
        worker.wait(timeout=120)
    return figures


def run(cluster, args):
    # Each latency is split at its enqueue's commit timestamp (a few bytes per commit, the
    # same for every contender).
    with cluster.settings(track_commit_timestamp="on"):
        return measure(cluster, args)


def measure(cluster, args):
    singles, bursts, idle_seconds, items = (200, 5, 2, 2_000) if args.smoke else (1_000, 20, 60, 20_000)
    conn = cluster.connect()
    setup(conn)
    ours = chunkwise_latency(conn, singles, bursts)
    print(f"  pg_chunkwise: {ours}", flush=True)
    idle = idle_cost(conn, idle_seconds)
    print(f"  idle pool: {idle}", flush=True)
    rates = throughput(conn, items)
    print(f"  throughput: {rates}", flush=True)
    conn.execute("SELECT chunkwise.alter_task('ao_live', always_on => false)")
    wait_until("the pool to leave", lambda: not worker_pids(conn))
    theirs = graphile_latency(cluster, conn, singles, bursts)
    print(f"  graphile-worker: {theirs}", flush=True)
    results = []
    for contender, figures in (("pg_chunkwise always-on pool of 4", ours),
                               ("graphile-worker, concurrency 4", theirs)):
        for pattern, f in figures.items():
            results.append({"contender": contender, "arrivals": pattern, **f,
                            "same_result": f["items"] == counts(singles, bursts)[pattern]
                            * (1 if pattern.startswith("single") else 100)})
    for r in results:
        other = next(o for o in results if o["arrivals"] == r["arrivals"]
                     and o["contender"].startswith("graphile"))
        r["p50_vs_graphile"] = round(r["p50_ms"] / other["p50_ms"], 3) if other["p50_ms"] else None
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task LIKE 'ao_%'")
    return {"workload": {"singles": singles, "bursts": bursts, "pool": POOL, "smoke": args.smoke},
            "results": results, "idle": idle, "throughput": rates}


def worker_pids(conn):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'chunkwise worker'").fetchall()]


def tables(result):
    latency = markdown_table(
        ["contender", "arrivals", "items", "p50 ms", "p95 ms", "p99 ms", "p50 / graphile-worker's",
         "enqueue to commit, p50 ms", "commit to start, p50 ms"],
        [[r["contender"], r["arrivals"], r["items"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
          f"{r['p50_vs_graphile']:.2f}x" if r["p50_vs_graphile"] is not None else "-",
          r["to_commit_p50_ms"], r["commit_to_start_p50_ms"]]
         for r in result["results"]],
    )
    idle = result["idle"]
    idle_table = markdown_table(
        ["idle pool", "processes", "seconds", "CPU, % of one core", "transactions meanwhile"],
        [[f"{result['workload']['pool']} workers + supervisor + launcher", idle["processes"],
          idle["seconds"], idle["cpu_percent_of_one_core"], idle["transactions"]]],
    )
    rates = result["throughput"]
    throughput_table = markdown_table(
        ["throughput", "seconds", "items/s", "vs run()"],
        [[r["contender"], r["seconds"], r["items_per_second"],
          f"{r['items_per_second'] / rates[1]['items_per_second']:.2f}x"] for r in rates],
    )
    return latency + "\n\n" + idle_table + "\n\n" + throughput_table
