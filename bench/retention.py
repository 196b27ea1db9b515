"""Retention: does a queue full of old finished items slow the work down, and does
removing them slow a run's end?

  - the same no-op items (2 workers) run with no old rows and with 5,000,000 old done
    items of the same task in the queue (kept: retain_done is longer than their age):
    items/s and the start-up of a one-item run (launch, first claim, exit) must stay
    >= 0.8 of the clean queue's;
  - the end of a one-item run when all 5,000,000 are older than retain_done, against
    one with nothing to remove: the run removes one bounded batch (10,000), however big
    the backlog.
"""

from lib import markdown_table, timed

TASK = "retention"


def fresh_task(conn):
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = %s", (TASK,))
    conn.execute("SELECT chunkwise.create_task(%s, statement => 'SELECT $1', retain_done => '30 days')",
                 (TASK,))


def add_old_items(conn, count):
    conn.execute(
        "INSERT INTO chunkwise.items (task_id, key, status, finished_at, enqueued_at) "
        "SELECT t.task_id, -g, 'done', now() - interval '2 days', now() - interval '2 days' "
        "FROM chunkwise.tasks t, generate_series(1, %s) g WHERE t.task = %s",
        (count, TASK),
    )
    conn.execute("VACUUM ANALYZE chunkwise.items")


def one_item_run(conn, key):
    conn.execute("SELECT chunkwise.enqueue(%s, %s)", (TASK, key))
    seconds, _ = timed(lambda: conn.execute("SELECT * FROM chunkwise.run(%s, 1)", (TASK,)))
    return seconds


def measure(conn, label, items, startups):
    conn.execute(
        "SELECT chunkwise.plan(%s, format('SELECT g AS key FROM generate_series(1, %%s) g', %s::int))",
        (TASK, items),
    )
    seconds, _ = timed(lambda: conn.execute("SELECT * FROM chunkwise.run(%s, 2)", (TASK,)))
    startup = sorted(one_item_run(conn, 10_000_000 + i) for i in range(startups))[startups // 2]
    old = conn.execute(
        "SELECT count(*) FROM chunkwise.items WHERE status = 'done' AND key < 0").fetchone()[0]
    return {"queue": label, "old_done_items": old, "items": items, "seconds": round(seconds, 3),
            "items_per_second": round(items / seconds), "startup_seconds": round(startup, 4)}


def run(cluster, args):
    old, items, startups = (50_000, 2_000, 3) if args.smoke else (5_000_000, 20_000, 7)
    conn = cluster.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    fresh_task(conn)
    clean = measure(conn, "clean", items, startups)
    fresh_task(conn)
    add_old_items(conn, old)
    full = measure(conn, f"{old:,} old done items", items, startups)
    runs = [clean, full]
    print(f"  items/s {clean['items_per_second']} vs {full['items_per_second']}, "
          f"start-up {clean['startup_seconds']} vs {full['startup_seconds']} s", flush=True)

    # Now everything old is due for removal: each run's end removes one batch.
    ends = []
    for label, retain in [("nothing to remove", "30 days"), (f"{old:,} to remove", "1 day")]:
        conn.execute("SELECT chunkwise.alter_task(%s, retain_done => %s)", (TASK, retain))
        left_before = conn.execute(
            "SELECT count(*) FROM chunkwise.items WHERE key < 0").fetchone()[0]
        seconds = one_item_run(conn, 20_000_000 + len(ends))
        left = conn.execute("SELECT count(*) FROM chunkwise.items WHERE key < 0").fetchone()[0]
        ends.append({"case": label, "removed": left_before - left, "seconds": round(seconds, 4)})
    print(f"  run end: {ends[0]['seconds']} s, and {ends[1]['seconds']} s removing {ends[1]['removed']}",
          flush=True)
    conn.execute("SELECT chunkwise.drop_task(%s)", (TASK,))
    return {
        "workload": {"smoke": args.smoke, "old_items": old, "items": items},
        "runs": runs, "ends": ends, "results": [],
        "items_per_second_ratio": round(full["items_per_second"] / clean["items_per_second"], 2),
        "startup_ratio": round(clean["startup_seconds"] / full["startup_seconds"], 2),
        "targets": {"items_per_second_ratio_at_least": 0.8, "startup_ratio_at_least": 0.8},
    }


def tables(result):
    clean = result["runs"][0]
    queue_table = markdown_table(
        ["queue", "items run", "wall s", "items/s", "vs clean", "1-item run s", "vs clean"],
        [[r["queue"], r["items"], f"{r['seconds']:.2f}", r["items_per_second"],
          f"{r['items_per_second'] / clean['items_per_second']:.2f}", f"{r['startup_seconds']:.3f}",
          f"{clean['startup_seconds'] / r['startup_seconds']:.2f}"]
         for r in result["runs"]],
    )
    end_table = markdown_table(
        ["end of a 1-item run", "old rows removed", "wall s"],
        [[e["case"], e["removed"], f"{e['seconds']:.3f}"] for e in result["ends"]],
    )
    return queue_table + "\n\n" + end_table
