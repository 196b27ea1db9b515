"""Claim cost with sequential groups: 100,000 pending no-op items spread over 1,000
groups (round-robin claim, one item per group in flight) against the same items without
groups (plain priority-order claim). Each runs a fixed number of items with 2 workers;
the time per item is claim + no-op + mark done + commit."""

from lib import markdown_table, timed

TASKS = {
    "ungrouped": "SELECT chunkwise.create_task('ungrouped', statement => 'SELECT $1')",
    "grouped": "SELECT chunkwise.create_task('grouped', statement => 'SELECT $1', sequential_groups => true)",
}


def plan(conn, task, items, groups):
    group = "NULL" if task == "ungrouped" else f"(g % {groups})::text"
    conn.execute(
        f"SELECT chunkwise.plan('{task}', 'SELECT g::bigint AS key, {group} AS group_key "
        f"FROM generate_series(1, {items}) g')"
    )


def run(cluster, args):
    items, groups, measured = (2_000, 20, 500) if args.smoke else (100_000, 1_000, 20_000)
    conn = cluster.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    results = []
    for task, create in TASKS.items():
        conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = %s", (task,))
        conn.execute(create)
        plan(conn, task, items, groups)
        conn.execute("VACUUM ANALYZE chunkwise.items")
        seconds, _ = timed(lambda: conn.execute(
            "SELECT * FROM chunkwise.run(%s, 2, max_items => %s)", (task, measured)))
        results.append({
            "claim": task, "pending": items, "groups": groups if task == "grouped" else None,
            "items_run": measured, "seconds": round(seconds, 3),
            "ms_per_item": round(seconds / measured * 1000, 3),
        })
        print(f"  {task}: {seconds / measured * 1000:.3f} ms per item", flush=True)
        conn.execute("SELECT chunkwise.drop_task(%s)", (task,))
    base = results[0]["ms_per_item"]
    for r in results:
        r["vs_ungrouped"] = round(r["ms_per_item"] / base, 2)
    return {"workload": {"pending": items, "groups": groups, "items_run": measured,
                         "workers": 2, "smoke": args.smoke},
            "results": results}


def tables(result):
    return markdown_table(
        ["claim", "pending items", "groups", "items run", "wall s", "ms per item", "vs ungrouped"],
        [[r["claim"], r["pending"], r["groups"] or "", r["items_run"], f"{r['seconds']:.2f}",
          f"{r['ms_per_item']:.3f}", f"{r['vs_ungrouped']:.2f}x"] for r in result["results"]],
    )
