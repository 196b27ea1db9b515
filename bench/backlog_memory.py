"""Backlog and memory:

  - backlog: the same 10,000 no-op items run (2 workers) with 10,000 and with 1,000,000
    items pending: a claim must not get dearer as the queue grows (target: the big
    backlog keeps >= 0.8 of the small one's items/s);
  - memory: one worker runs 500,000 no-op items; its private memory (RssAnon in
    /proc/PID/status: shared buffers it touches are not its own) after 10,000 items and
    at the end must be flat (target: growth < 10 MB).
"""

import time

from lib import markdown_table, timed


def noop_task(conn, task, items):
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = %s", (task,))
    conn.execute("SELECT chunkwise.create_task(%s, statement => 'SELECT $1')", (task,))
    conn.execute(
        "SELECT chunkwise.plan(%s, format('SELECT g AS key FROM generate_series(1, %%s) g', %s::int))",
        (task, items),
    )
    conn.execute("VACUUM ANALYZE chunkwise.items")


def backlog(conn, pending, measured):
    noop_task(conn, "backlog", pending)
    seconds, _ = timed(lambda: conn.execute(
        "SELECT * FROM chunkwise.run('backlog', 2, max_items => %s)", (measured,)))
    conn.execute("SELECT chunkwise.drop_task('backlog')")
    return {"pending": pending, "items_run": measured, "seconds": round(seconds, 3),
            "items_per_second": round(measured / seconds)}


def private_memory_kb(pid):
    """(RssAnon, VmRSS) of a live process; FileNotFoundError once it is gone, also while
    it is a zombie (its status then has no memory lines)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()[0] if value.split() else "0"
    if "RssAnon" not in fields:
        raise FileNotFoundError(f"process {pid} has exited")
    return int(fields["RssAnon"]), int(fields.get("VmRSS", 0))


def memory(conn, items, early):
    noop_task(conn, "memory", items)
    conn.execute("SELECT chunkwise.start('memory', 1)")
    pid = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'chunkwise worker'").fetchone()[0]
    done = lambda: conn.execute(
        "SELECT count(*) FROM chunkwise.items WHERE status = 'done'").fetchone()[0]
    at_early, last = None, None
    while True:
        try:
            sample = private_memory_kb(pid)
        except FileNotFoundError:
            break  # the worker finished
        finished = done()
        if at_early is None and finished >= early:
            at_early = (finished, *sample)
        last = (finished, *sample)
        time.sleep(0.2)
    conn.execute("SELECT chunkwise.drop_task('memory')")
    return {"items": items, "early": {"done": at_early[0], "rss_anon_kb": at_early[1], "vm_rss_kb": at_early[2]},
            "late": {"done": last[0], "rss_anon_kb": last[1], "vm_rss_kb": last[2]},
            "growth_mb": round((last[1] - at_early[1]) / 1024, 2)}


def run(cluster, args):
    small, big, measured = (1_000, 20_000, 1_000) if args.smoke else (10_000, 1_000_000, 10_000)
    items, early = (20_000, 1_000) if args.smoke else (500_000, 10_000)
    conn = cluster.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    runs = [backlog(conn, small, measured), backlog(conn, big, measured)]
    ratio = round(runs[1]["items_per_second"] / runs[0]["items_per_second"], 2)
    print(f"  backlog: {runs[0]['items_per_second']} vs {runs[1]['items_per_second']} items/s ({ratio})", flush=True)
    mem = memory(conn, items, early)
    print(f"  memory: RssAnon {mem['early']['rss_anon_kb']} kB after {mem['early']['done']} items, "
          f"{mem['late']['rss_anon_kb']} kB after {mem['late']['done']}", flush=True)
    return {"workload": {"smoke": args.smoke}, "backlog": runs, "backlog_ratio": ratio,
            "memory": mem, "results": [],
            "targets": {"backlog_ratio_at_least": 0.8, "memory_growth_mb_below": 10}}


def tables(result):
    backlog_table = markdown_table(
        ["pending items", "items run", "wall s", "items/s", "vs smallest backlog"],
        [[b["pending"], b["items_run"], f"{b['seconds']:.2f}", b["items_per_second"],
          f"{b['items_per_second'] / result['backlog'][0]['items_per_second']:.2f}"]
         for b in result["backlog"]],
    )
    m = result["memory"]
    memory_table = markdown_table(
        ["worker memory", "items done", "RssAnon kB", "VmRSS kB"],
        [["early", m["early"]["done"], m["early"]["rss_anon_kb"], m["early"]["vm_rss_kb"]],
         ["late", m["late"]["done"], m["late"]["rss_anon_kb"], m["late"]["vm_rss_kb"]],
         ["growth", "", f"{m['growth_mb']} MB", ""]],
    )
    return backlog_table + "\n\n" + memory_table
