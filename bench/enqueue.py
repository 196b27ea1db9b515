"""Enqueue at insert speed: N single `chunkwise.enqueue` calls in one statement, against
the same number of calls of a plain SQL function into a queue-shaped table (the floor,
bench/queue_floor.py); then the same keys again (each pending: a priority update).
Target: within 2x of the floor."""

import queue_floor
from lib import fresh_task, markdown_table, timed

TASK = "enqueue_bench"
ROUNDS = 3


def run(cluster, args):
    calls = 2_000 if args.smoke else 20_000
    conn = cluster.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    queue_floor.create(conn)
    contenders = {
        "chunkwise.enqueue": (
            lambda: fresh_task(conn, TASK),
            "SELECT count(chunkwise.enqueue(%s, g)) FROM generate_series(1, %s) g", (TASK, calls)),
        "plain SQL function (floor)": (
            lambda: queue_floor.empty(conn),
            "SELECT count(bench_floor.enqueue(1, g)) FROM generate_series(1, %s) g", (calls,)),
    }
    seconds = {(name, case): [] for name in contenders for case in ("new keys", "pending keys again")}
    for _ in range(ROUNDS):  # alternating, so that both see the same machine
        for name, (reset, sql, params) in contenders.items():
            reset()
            conn.execute("CHECKPOINT")
            seconds[(name, "new keys")].append(timed(lambda: conn.execute(sql, params))[0])
            seconds[(name, "pending keys again")].append(timed(lambda: conn.execute(sql, params))[0])
    queue_floor.drop(conn)
    conn.execute("SELECT chunkwise.drop_task(%s)", (TASK,))
    results = queue_floor.against_floor(seconds, calls, "calls", lambda name: name.startswith("plain"))
    for r in results:
        r["us_per_call"] = round(r["seconds"] / calls * 1e6, 1)
        print(f"  {r['contender']}, {r['case']}: {r['calls_per_second']} calls/s ({r['vs_floor']}x the floor)",
              flush=True)
    return {"workload": {"smoke": args.smoke, "calls": calls, "rounds": ROUNDS},
            "results": results, "targets": {"vs_floor_at_most": 2.0}}


def tables(result):
    return markdown_table(
        ["case", "contender", "calls", "wall s (median of 3)", "calls/s", "µs per call", "x the floor"],
        [[r["case"], r["contender"], r["calls"], f"{r['seconds']:.3f}", r["calls_per_second"],
          r["us_per_call"], f"{r['vs_floor']:.2f}"] for r in result["results"]],
    )
