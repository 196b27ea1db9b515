"""Governance: OLTP latency beside bulk work.

pgbench's tpcb-like transactions (2 clients at a fixed rate) run alone, then beside a
chunked upsert of 2M stage rows into an 8M-row target (chunked_upsert's tables, plan_ranges
chunks, 2 workers) run four ways: unthrottled, with max_rate, with max_rate in chunks a hundredth
the size (the same rows per second), and with max_load. For each:
the OLTP latency p50/p95/p99 of the transactions that ran while the upsert did (pgbench's
per-transaction log, by completion time), and how long the upsert took. The target: with
a throttle, the OLTP p99 stays within 1.5x of alone while the upsert still finishes.
"""

import pathlib
import statistics
import subprocess
import tempfile
import time

import chunked_upsert
from lib import markdown_table

OLTP_RATE = 200  # transactions per second, both clients together
CLIENTS = 2
WARM_UP = 2  # seconds of pgbench before the upsert starts


def pgbench(cluster, args, log_prefix, seconds):
    return subprocess.Popen(
        ["pgbench", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-n",
         "-c", str(CLIENTS), "-j", str(CLIENTS), "-R", str(OLTP_RATE), "-T", str(seconds),
         "--log", f"--log-prefix={log_prefix}", "postgres"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def latencies(log_prefix, window):
    """Milliseconds of the transactions that completed inside `window` (epoch seconds)."""
    start, end = window
    ms = []
    for path in pathlib.Path(log_prefix).parent.glob(pathlib.Path(log_prefix).name + ".*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
            done = int(fields[4]) + int(fields[5]) / 1e6
            if start <= done <= end:
                ms.append(int(fields[2]) / 1000)
    ms.sort()
    cut = statistics.quantiles(ms, n=100, method="inclusive")
    return {"transactions": len(ms), "p50_ms": round(cut[49], 2), "p95_ms": round(cut[94], 2),
            "p99_ms": round(cut[98], 2)}


def upsert(conn, chunk_rows, options):
    """Plans and runs the chunked upsert in chunks of `chunk_rows` with `options` (SQL
    of create_task's); returns its seconds and its epoch window."""
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'gov_upsert'")
    statement = chunked_upsert.UPSERT.format(target="gov_target", where=chunked_upsert.BY_KEY)
    conn.execute(f"SELECT chunkwise.create_task('gov_upsert', statement => %s, workers => 2{options})",
                 (statement,))
    conn.execute("SELECT chunkwise.plan_ranges('gov_upsert', 'stage', 'id', %s)", (chunk_rows,))
    start = time.time()
    conn.execute("SELECT * FROM chunkwise.run('gov_upsert')")
    end = time.time()
    return end - start, (start, end)


def phase(cluster, conn, args, name, options, seconds, chunk_rows=None):
    """pgbench for `seconds`, with the upsert (in chunks of `chunk_rows`, by default
    --chunk-rows) started after WARM_UP unless `options` is None; the OLTP figures of
    the overlap, and the upsert's."""
    if options is not None:
        chunked_upsert.fresh_target(conn, "gov_target")
    with tempfile.TemporaryDirectory() as logs:
        prefix = f"{logs}/oltp"
        bench_started = time.time()
        oltp = pgbench(cluster, args, prefix, seconds)
        time.sleep(WARM_UP)
        if options is None:
            upsert_seconds, window = None, (bench_started + WARM_UP, bench_started + seconds)
        else:
            upsert_seconds, window = upsert(conn, chunk_rows or args.chunk_rows, options)
        _, errors = oltp.communicate()
        if oltp.returncode != 0:
            raise RuntimeError(f"pgbench failed: {errors}")
        bench_ended = time.time()
        window = (window[0], min(window[1], bench_ended))
        figures = latencies(prefix, window)
    result = {"contender": name, **figures,
              "upsert_s": round(upsert_seconds, 2) if upsert_seconds is not None else None}
    if options is not None:
        result["same_result"] = chunked_upsert.fingerprint(conn, "gov_target") == args.expected
    print(f"  {name}: {result}", flush=True)
    return result


def run(cluster, args):
    rows = args.rows
    seconds = 10 if args.smoke else 60
    conn = cluster.connect()
    chunked_upsert.build(conn, rows)
    subprocess.run(["pgbench", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres",
                    "-i", "-q", "-s", "10", "postgres"], check=True, capture_output=True)
    # The result every contender must leave: one statement's.
    chunked_upsert.fresh_target(conn, "gov_target")
    conn.execute(chunked_upsert.UPSERT.format(target="gov_target", where=""))
    args.expected = chunked_upsert.fingerprint(conn, "gov_target")
    results = [phase(cluster, conn, args, "OLTP alone", None, seconds)]
    unthrottled = phase(cluster, conn, args, "beside the upsert, unthrottled", "", seconds)
    results.append(unthrottled)
    # A quarter of the chunk rate the two workers reach unthrottled.
    chunks = -(-rows // args.chunk_rows)
    rate = round(chunks / unthrottled["upsert_s"] / 4, 1)
    results.append(phase(cluster, conn, args, f"beside the upsert, max_rate => {rate}",
                         f", max_rate => {rate}", seconds))
    # The same rows per second in chunks a hundredth the size: each chunk leaves a
    # hundredth as much WAL for the OLTP commits beside it to flush (a tenth the size did
    # worse than whole chunks in two of three runs: ten times the chunks, each still long
    # enough to be met).
    small = max(args.chunk_rows // 100, 1)
    results.append(phase(cluster, conn, args,
                         f"beside the upsert, {small:,}-row chunks, max_rate => {rate * 100:g}",
                         f", max_rate => {rate * 100:g}", seconds, chunk_rows=small))
    results.append(phase(cluster, conn, args, "beside the upsert, max_load => 0.5",
                         ", max_load => 0.5", seconds))
    alone = results[0]
    for r in results:
        r["p99_vs_alone"] = round(r["p99_ms"] / alone["p99_ms"], 2)
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'gov_upsert'")
    return {"scenario": "governance", "oltp_rate": OLTP_RATE, "clients": CLIENTS,
            "stage_rows": rows, "chunk_rows": args.chunk_rows, "results": results}


def tables(result):
    rows = [(r["contender"], r["transactions"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
             f"{r['p99_vs_alone']:.2f}x", r["upsert_s"] if r["upsert_s"] is not None else "")
            for r in result["results"]]
    return markdown_table(
        [f"pgbench tpcb-like, {result['clients']} clients at {result['oltp_rate']} tps",
         "transactions", "p50 ms", "p95 ms", "p99 ms", "p99 vs alone",
         f"upsert of {result['stage_rows']:,} rows, s"],
        rows,
    )
