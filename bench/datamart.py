"""The datamart refresh (examples/datamart), 20,000 users by default: pg_chunkwise with 2
workers (plan_by_activity + run) against the way it is done today, a shell runner that
writes the prioritized user ids to a file and has 2 shell workers take them under flock,
one psql per user (bench/shell_runner.sh). Both plan in the same order and are timed
from planning to the last user. The shell runner, 60 times slower, refreshes the head of
the ranking only (5,000 users by default, --shell-users): the two are compared by users
per second, and their datamart rows for those users must be the same."""

import pathlib
import subprocess
import tempfile

from lib import ROOT, markdown_table, timed

EXAMPLE = ROOT / "examples" / "datamart"
RUNNER = ROOT / "bench" / "shell_runner.sh"
# What the refresh computes that does not move with the clock (now()-relative windows
# such as actions_1d would differ between two runs minutes apart).
CONTENT_COLUMNS = ("user_id, actions_total, views, clicks, carts, purchases, refunds, logins, revenue_total, "
                   "refunded_total, net_revenue, avg_order, max_order, min_order, stddev_order, first_seen, "
                   "last_seen, last_purchase, active_days, active_weeks, click_through, conversion, refund_rate")
# Over the users of the slice the shell runner refreshes: their rows' count and hash,
# and how many of them are still marked modified.
SLICE_CONTENTS = (f"SELECT count(*), sum(hashtextextended(row({CONTENT_COLUMNS})::text, 0)::numeric), "
                  "(SELECT count(*) FROM dwh.dimension_users u JOIN bench_slice s ON s.user_id = u.dimension_user_id "
                  " WHERE u.modified) "
                  "FROM dwh.datamart_users d JOIN bench_slice s USING (user_id)")
# The activity ranking plan_by_activity applies, for the shell runner's id file.
RANKED = ("SELECT key FROM dwh.modified_users ORDER BY chunkwise.activity_tier(last_activity, actions), "
          "actions DESC, last_activity DESC NULLS LAST, key")


def psql_args(cluster):
    return ["-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "postgres"]


def build(cluster, conn, users):
    conn.execute("DROP SCHEMA IF EXISTS dwh CASCADE")
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    for script in ("schema.sql", "data.sql"):
        subprocess.run(["psql", *psql_args(cluster), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-v", f"users={users}", "-f", str(EXAMPLE / script)],
                       check=True, capture_output=True)
    # As autovacuum would have by the time a refresh runs: without the visibility map the
    # activity ranking's index-only scans of fact_actions made 3.4M heap fetches, 1 s of a
    # 20,000-user refresh (0.3 s with it).
    conn.execute("VACUUM ANALYZE dwh.dimension_users, dwh.fact_actions")


def reset(conn):
    conn.execute("TRUNCATE dwh.datamart_users")
    conn.execute("UPDATE dwh.dimension_users SET modified = true")
    conn.execute("VACUUM ANALYZE dwh.dimension_users")
    conn.execute("CHECKPOINT")


def chunkwise(cluster, conn, workers=2, items_per_commit=1):
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'datamart'")
    conn.execute(
        "SELECT chunkwise.create_task('datamart', call => 'dwh.update_datamart_user', "
        "after => 'UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = $1', "
        "workers => %s, items_per_commit => %s)", (workers, items_per_commit))
    def refresh():
        conn.execute("SELECT chunkwise.plan_by_activity('datamart', "
                     "'SELECT key, last_activity, actions FROM dwh.modified_users')")
        conn.execute("SELECT * FROM chunkwise.run('datamart', %s)", (workers,))
    return timed(refresh)[0]


def shell(cluster, conn):
    """The shell runner over the slice's users, in ranking order (the slice is the head
    of the same ranking, so its ids file is what the whole run would start with)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False) as ids:
        path = pathlib.Path(ids.name)
    def refresh():
        with open(path, "w") as out:
            subprocess.run(["psql", *psql_args(cluster), "-X", "-q", "-c",
                            "COPY (SELECT user_id FROM bench_slice ORDER BY rank) TO STDOUT"],
                           check=True, stdout=out)
        subprocess.run(["bash", str(RUNNER), str(path), "2", *psql_args(cluster)], check=True)
    seconds = timed(refresh)[0]
    path.unlink()
    return seconds


def run(cluster, args):
    users = 300 if args.smoke else args.users
    # The shell runner takes 60 times longer: it refreshes the head of the ranking only
    # (its rate per user does not depend on how many follow), so the whole benchmark
    # stays within minutes. Both contenders' results are compared on that slice.
    slice_users = min(users, args.shell_users)
    conn = cluster.connect()
    build(cluster, conn, users)
    conn.execute("DROP TABLE IF EXISTS bench_slice")
    conn.execute(f"CREATE TABLE bench_slice AS SELECT key AS user_id, row_number() OVER () AS rank "
                 f"FROM ({RANKED}) r LIMIT {slice_users}")
    results, expected = [], None
    for name, contender, refreshed in [
            ("pg_chunkwise, 2 workers", chunkwise, users),
            ("shell runner: flock + one psql per user, 2 threads", shell, slice_users)]:
        reset(conn)
        seconds = contender(cluster, conn)
        contents = conn.execute(SLICE_CONTENTS).fetchone()
        expected = expected or contents
        results.append({"contender": name, "users": refreshed, "seconds": round(seconds, 3),
                        "users_per_second": round(refreshed / seconds),
                        "same_result": contents == expected and contents[2] == 0})
        print(f"  {name}: {refreshed} users in {seconds:.1f} s", flush=True)
    for r in results:
        r["chunkwise_speedup"] = round(results[0]["users_per_second"] / r["users_per_second"], 2)
    conn.execute("SELECT chunkwise.drop_task('datamart')")
    conn.execute("DROP TABLE bench_slice")
    return {"workload": {"users": users, "shell_runner_users": slice_users, "smoke": args.smoke},
            "results": results}


def tables(result):
    return markdown_table(
        ["contender", "users refreshed", "wall s", "users/s", "pg_chunkwise is faster by (users/s)",
         "same datamart rows (shell runner's users)"],
        [[r["contender"], r["users"], f"{r['seconds']:.1f}", r["users_per_second"],
          f"{r['chunkwise_speedup']:.1f}x", "yes" if r["same_result"] else "**NO**"]
         for r in result["results"]],
    )
