"""Claims that scale: what one more worker buys.

1. No-op items (`statement => 'SELECT $1'`, synchronous_commit off), N of them (50,000
   by default), run by 1, 2, 4 and 8 workers (`--scaling-workers`), once with lanes
   (`chunkwise.lane_size` 64, the default: each worker claims in a stretch of the queue
   of its own) and once without (0: every worker claims at the front of the queue, as
   0.2.0 did before lanes) (`--scaling-lanes`): items per second, the worker time each
   item costs (workers x wall / items: the claim, the mark-done and the commit, since
   the item itself does nothing), and the rate against the best rate of at most 2
   workers with the same lanes. On a 2-core box more than 2 workers cannot add speed;
   the target is that they do not take it away (no drop past 2 workers worse than 15%).
   After the timed runs, one more run per worker count samples the workers' wait events
   (pg_stat_activity every 20 ms) to show what they wait for.
2. The datamart refresh (examples/datamart) with W workers against W hand-split loops
   (W psql sessions, each a DO block that refreshes the users with key % W = i and
   commits after each), `--datamart-runs` times each: wall time and max/min over the
   runs. pg_chunkwise runs it twice: as the example defines it (one transaction per
   user, as the loops) and with items_per_commit 10 (ten users per commit, each still
   in a subtransaction of its own, so a failing user rolls back alone). W is the largest
   worker count of 1; the lanes are the default's. The time of pg_chunkwise includes its
   activity ranking (plan_by_activity); the loops take the users in key order.

On a 16-core machine: `bash bench/run.sh scaling --scaling-workers 1,2,4,8,16
--datamart-runs 5 --tag 16cores` (targets there: 8 workers >= 5x one worker; 16 workers
>= 1.3x sixteen hand-split loops with max/min <= 1.3); on one with no PostgreSQL,
no compiler and no network, bench/bundle.sh and bench/run_bundled.sh."""

import collections
import subprocess
import threading
import time
from statistics import median

from psycopg import sql

import datamart
from lib import fresh_task, markdown_table, timed

TASK = "scaling_bench"
# Users per transaction of the batched datamart contender (each still in a
# subtransaction of its own: a failing user rolls back alone).
BATCH = 10
LOOPS = "{workers} hand-split loops (psql DO, commit per user)"
ROUNDS = 3
WAIT_SAMPLE = ("SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity "
               "WHERE backend_type = 'chunkwise worker'")


def plan_noop(conn, items):
    fresh_task(conn, TASK, ", synchronous_commit => false")
    conn.execute("SELECT chunkwise.plan(%s, 'SELECT g AS key FROM generate_series(1, ' || %s || ') g')",
                 (TASK, items))
    conn.execute("VACUUM ANALYZE chunkwise.items")
    conn.execute("CHECKPOINT")


def run_noop(conn, workers):
    seconds, row = timed(lambda: conn.execute(
        "SELECT processed FROM chunkwise.run(%s, %s)", (TASK, workers)).fetchone())
    return seconds, row[0]


def sampled_waits(cluster, conn, items, workers):
    """One more run, with its workers' wait events sampled from another session."""
    plan_noop(conn, items)
    waits, stop = collections.Counter(), threading.Event()
    def sample():
        with cluster.connect() as watcher:
            while not stop.wait(0.02):
                waits.update(w for (w,) in watcher.execute(WAIT_SAMPLE).fetchall())
    watcher = threading.Thread(target=sample)
    watcher.start()
    run_noop(conn, workers)
    stop.set()
    watcher.join()
    total = sum(waits.values()) or 1
    return ", ".join(f"{w} {n * 100 // total}%" for w, n in waits.most_common(3))


def set_lane_size(cluster, conn, size):
    """chunkwise.lane_size for the workers started from now on (a reload: the postmaster
    that starts them has read it once a new session sees it)."""
    if size is None:
        conn.execute("ALTER SYSTEM RESET chunkwise.lane_size")
    else:
        conn.execute(sql.SQL("ALTER SYSTEM SET chunkwise.lane_size = {}").format(size))
    conn.execute("SELECT pg_reload_conf()")
    expected = conn.execute("SELECT boot_val FROM pg_settings WHERE name = 'chunkwise.lane_size'").fetchone()[0] \
        if size is None else str(size)
    deadline = time.monotonic() + 10
    while True:
        with cluster.connect() as fresh:
            if fresh.execute("SHOW chunkwise.lane_size").fetchone()[0] == expected:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"chunkwise.lane_size did not become {expected} after a reload")
        time.sleep(0.05)


def noop_scaling(cluster, conn, items, worker_counts, lane_sizes):
    seconds = {(lanes, w): [] for lanes in lane_sizes for w in worker_counts}
    processed_ok = True
    for _ in range(ROUNDS):  # alternating, so that all see the same machine
        for lanes in lane_sizes:
            set_lane_size(cluster, conn, lanes)
            for workers in worker_counts:
                plan_noop(conn, items)
                wall, processed = run_noop(conn, workers)
                processed_ok &= processed == items
                seconds[(lanes, workers)].append(wall)
    results = []
    for lanes in lane_sizes:
        set_lane_size(cluster, conn, lanes)
        runs = []
        for workers in worker_counts:
            wall = median(seconds[(lanes, workers)])
            runs.append({"part": "no-op items", "lane_size": lanes, "workers": workers, "items": items,
                         "seconds": round(wall, 3), "items_per_second": round(items / wall),
                         "worker_us_per_item": round(workers * wall / items * 1e6, 1),
                         "same_result": processed_ok})
        best_of_two = max(r["items_per_second"] for r in runs if r["workers"] <= 2)
        one = next((r["items_per_second"] for r in runs if r["workers"] == 1), None)
        for r in runs:
            r["vs_best_of_1_2"] = round(r["items_per_second"] / best_of_two, 2)
            r["vs_1_worker"] = round(r["items_per_second"] / one, 2) if one else None
            r["waits"] = sampled_waits(cluster, conn, items, r["workers"])
            print(f"  no-op items, lane_size {lanes}, {r['workers']} workers: {r['items_per_second']} items/s, "
                  f"{r['vs_1_worker']}x 1 worker, {r['vs_best_of_1_2']}x the best of 1-2 workers; "
                  f"waits: {r['waits']}", flush=True)
        results += runs
    set_lane_size(cluster, conn, None)
    conn.execute("SELECT chunkwise.drop_task(%s)", (TASK,))
    return results


def hand_split_loops(cluster, workers):
    """W psql sessions at once, session i refreshing the users with key % W = i."""
    loop = ("DO $$ DECLARE u bigint; BEGIN "
            "FOR u IN SELECT key FROM dwh.modified_users WHERE key % {w} = {i} LOOP "
            "CALL dwh.update_datamart_user(u); "
            "UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = u; "
            "COMMIT; END LOOP; END $$")
    def refresh():
        sessions = [subprocess.Popen(["psql", *datamart.psql_args(cluster), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                                      "-c", loop.format(w=workers, i=i)]) for i in range(workers)]
        if any(s.wait() != 0 for s in sessions):
            raise RuntimeError("a hand-split loop failed")
    return timed(refresh)[0]


def datamart_scaling(cluster, conn, users, workers, runs):
    datamart.build(cluster, conn, users)
    contenders = {f"pg_chunkwise, {workers} workers": lambda: datamart.chunkwise(cluster, conn, workers),
                  f"pg_chunkwise, {workers} workers, items_per_commit 10":
                      lambda: datamart.chunkwise(cluster, conn, workers, BATCH),
                  LOOPS.format(workers=workers): lambda: hand_split_loops(cluster, workers)}
    seconds = {name: [] for name in contenders}
    left = {name: 0 for name in contenders}
    for _ in range(runs):
        for name, refresh in contenders.items():
            datamart.reset(conn)
            seconds[name].append(refresh())
            left[name] += conn.execute("SELECT count(*) FROM dwh.dimension_users WHERE modified").fetchone()[0]
    results = []
    for name, walls in seconds.items():
        results.append({"part": "datamart", "contender": name, "workers": workers, "users": users,
                        "runs": runs, "seconds": round(median(walls), 3), "min_s": round(min(walls), 3),
                        "max_s": round(max(walls), 3), "max_over_min": round(max(walls) / min(walls), 2),
                        "users_per_second": round(users / median(walls)), "same_result": left[name] == 0})
    *ours, loops = results
    for r in ours:
        r["vs_loops"] = round(loops["seconds"] / r["seconds"], 2)
    for r in results:
        print(f"  datamart, {r['contender']}: {r['seconds']} s (max/min {r['max_over_min']})", flush=True)
    conn.execute("SELECT chunkwise.drop_task('datamart')")
    return results


def run(cluster, args):
    worker_counts = [int(w) for w in args.scaling_workers.split(",")]
    lane_sizes = [int(size) for size in args.scaling_lanes.split(",")]
    items = 2_000 if args.smoke else args.items
    users = 300 if args.smoke else args.users
    runs = 1 if args.smoke else args.datamart_runs
    conn = cluster.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    results = noop_scaling(cluster, conn, items, worker_counts, lane_sizes)
    results += datamart_scaling(cluster, conn, users, max(worker_counts), runs)
    return {"workload": {"smoke": args.smoke, "items": items, "users": users, "datamart_runs": runs,
                         "rounds": ROUNDS, "lane_sizes": lane_sizes},
            "results": results,
            "targets": {"past_2_workers_vs_best_of_1_2_at_least": 0.85,
                        "16_cores_8_workers_vs_1_at_least": 5.0,
                        "16_cores_datamart_vs_loops_at_least": 1.3, "max_over_min_at_most": 1.3}}


def tables(result):
    noop = [r for r in result["results"] if r["part"] == "no-op items"]
    mart = [r for r in result["results"] if r["part"] == "datamart"]
    return markdown_table(
        ["lane_size", "workers", "no-op items", "wall s (median of 3)", "items/s", "worker µs per item",
         "x 1 worker", "x best of 1-2 workers", "waits seen (sampled run)"],
        [[r.get("lane_size", "-"), r["workers"], r["items"], f"{r['seconds']:.2f}", r["items_per_second"],
          r["worker_us_per_item"], f"{r['vs_1_worker']:.2f}" if r["vs_1_worker"] else "-",
          f"{r['vs_best_of_1_2']:.2f}", r["waits"]]
         for r in noop],
    ) + "\n\n" + markdown_table(
        ["datamart refresh", "users", "runs", "median s", "min s", "max s", "max/min", "loops / pg_chunkwise"],
        [[r["contender"], r["users"], r["runs"], f"{r['seconds']:.2f}", f"{r['min_s']:.2f}", f"{r['max_s']:.2f}",
          f"{r['max_over_min']:.2f}", f"{r['vs_loops']:.2f}x" if "vs_loops" in r else ""] for r in mart],
    )
