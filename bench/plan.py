"""Planning near insert speed: `plan()` and `plan_by_activity()` of N keys into an empty
task, then `plan()` of the same N keys again (all pending: a priority update each),
against one set-based INSERT ... SELECT of the same rows into a queue-shaped table (the
floor, bench/queue_floor.py) and the same INSERT again (each key pending: ON CONFLICT DO
UPDATE); `plan_by_activity()` against the same INSERT of its source ranked in SQL.
Targets: planning within 1.5x of the floor, re-planning within 2x."""

import queue_floor
from lib import fresh_task, markdown_table, timed

TASK = "plan_bench"
ROUNDS = 3

KEYS = "SELECT g AS key FROM generate_series(1, {n}) g"
# An activity-shaped source: a last activity spread over a year and a count of actions.
ACTIVITY = ("SELECT g AS key, now() - (g % 365) * interval '1 day' AS last_activity, "
            "(g % 97)::bigint AS actions FROM generate_series(1, {n}) g")


# The floor of ranked planning: the same source ranked in SQL the way plan_by_activity
# ranks it with the default settings (recency windows 7, 30, 90 days, then actions over
# 100 and 10; more actions first, then the newest), inserted in rank order in one
# statement. Keys arrive in rank order, not key order, as they do for plan_by_activity.
RANKED_FLOOR = """
INSERT INTO bench_floor.items (task, key, priority)
SELECT 1, key, row_number() OVER (ORDER BY tier, actions DESC, last_activity DESC) AS rank
  FROM (SELECT key, actions, last_activity,
               CASE WHEN last_activity >= now() - interval '7 days' THEN 0
                    WHEN last_activity >= now() - interval '30 days' THEN 1
                    WHEN last_activity >= now() - interval '90 days' THEN 2 ELSE 3 END * 3
             + CASE WHEN actions > 100 THEN 1 WHEN actions > 10 THEN 2 ELSE 3 END AS tier
          FROM ({source}) source) tiered
 ORDER BY rank
ON CONFLICT (task, key) WHERE status = 'pending' DO UPDATE SET priority = EXCLUDED.priority
"""


def floor_insert(n):
    return ("INSERT INTO bench_floor.items (task, key, priority) "
            f"SELECT 1, g, g FROM generate_series(1, {n}) g "
            "ON CONFLICT (task, key) WHERE status = 'pending' DO UPDATE SET priority = EXCLUDED.priority")


def run(cluster, args):
    n = 20_000 if args.smoke else args.plan_keys
    conn = cluster.connect()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    queue_floor.create(conn)
    plan = ("SELECT chunkwise.plan(%s, %s)", (TASK, KEYS.format(n=n)))
    by_activity = ("SELECT chunkwise.plan_by_activity(%s, %s)", (TASK, ACTIVITY.format(n=n)))
    floor = (floor_insert(n), None)
    ranked_floor = (RANKED_FLOOR.format(source=ACTIVITY.format(n=n)), None)
    # (contender, case, fresh queue first?, statement); each round runs them in this order.
    steps = [
        ("chunkwise.plan", "new keys", True, plan),
        ("chunkwise.plan", "pending keys again", False, plan),
        ("chunkwise.plan_by_activity", "new keys, ranked by activity", True, by_activity),
        ("one INSERT ... SELECT (floor)", "new keys", True, floor),
        ("one INSERT ... SELECT (floor)", "pending keys again", False, floor),
        ("one INSERT ... SELECT (floor)", "new keys, ranked by activity", True, ranked_floor),
    ]
    seconds = {(name, case): [] for name, case, _, _ in steps}
    for _ in range(ROUNDS):  # alternating, so that all see the same machine
        for name, case, fresh, (sql, params) in steps:
            if fresh:
                if name.startswith("one"):
                    queue_floor.empty(conn)
                else:
                    fresh_task(conn, TASK)
                conn.execute("VACUUM ANALYZE")
                conn.execute("CHECKPOINT")
            seconds[(name, case)].append(timed(lambda: conn.execute(sql, params))[0])
    queue_floor.drop(conn)
    conn.execute("SELECT chunkwise.drop_task(%s)", (TASK,))
    results = queue_floor.against_floor(seconds, n, "keys", lambda name: name.startswith("one"))
    for r in results:
        print(f"  {r['contender']}, {r['case']}: {r['seconds']} s ({r['vs_floor']}x the floor)", flush=True)
    return {"workload": {"smoke": args.smoke, "keys": n, "rounds": ROUNDS},
            "results": results,
            "targets": {"new_keys_vs_floor_at_most": 1.5, "pending_keys_vs_floor_at_most": 2.0}}


def tables(result):
    return markdown_table(
        ["case", "contender", "keys", "wall s (median of 3)", "keys/s", "x the floor"],
        [[r["case"], r["contender"], r["keys"], f"{r['seconds']:.2f}", r["keys_per_second"],
          f"{r['vs_floor']:.2f}"] for r in result["results"]],
    )
