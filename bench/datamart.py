"""The datamart refresh (examples/datamart), 20,000 users by default: pg_chunkwise with 2
workers (plan_by_activity + run) against the way it is done today, a shell runner that
writes the prioritized user ids to a file and has 2 shell workers take them under flock,
one psql per user (bench/shell_runner.sh). Both plan in the same order and are timed
from planning to the last user; both must leave the same datamart contents."""

import pathlib
import subprocess
import tempfile

from lib import ROOT, markdown_table, timed

EXAMPLE = ROOT / "examples" / "datamart"
RUNNER = ROOT / "bench" / "shell_runner.sh"
# What the refresh computes that does not move with the clock (now()-relative windows
# such as actions_1d would differ between two runs minutes apart).
CONTENTS = ("SELECT count(*), sum(hashtextextended(row(user_id, actions_total, views, clicks, carts, "
            "purchases, refunds, logins, revenue_total, refunded_total, net_revenue, avg_order, max_order, "
            "min_order, stddev_order, first_seen, last_seen, last_purchase, active_days, active_weeks, "
            "click_through, conversion, refund_rate)::text, 0)::numeric), "
            "(SELECT count(*) FROM dwh.dimension_users WHERE modified) FROM dwh.datamart_users")
# The activity ranking plan_by_activity applies, for the shell runner's id file.
RANKED_IDS = ("COPY (SELECT key FROM dwh.modified_users ORDER BY chunkwise.activity_tier(last_activity, actions), "
              "actions DESC, last_activity DESC NULLS LAST, key) TO STDOUT")


def psql_args(cluster):
    return ["-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "postgres"]


def build(cluster, conn, users):
    conn.execute("DROP SCHEMA IF EXISTS dwh CASCADE")
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    for script in ("schema.sql", "data.sql"):
        subprocess.run(["psql", *psql_args(cluster), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-v", f"users={users}", "-f", str(EXAMPLE / script)],
                       check=True, capture_output=True)


def reset(conn):
    conn.execute("TRUNCATE dwh.datamart_users")
    conn.execute("UPDATE dwh.dimension_users SET modified = true")
    conn.execute("VACUUM ANALYZE dwh.dimension_users")
    conn.execute("CHECKPOINT")


def chunkwise(cluster, conn):
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'datamart'")
    conn.execute(
        "SELECT chunkwise.create_task('datamart', call => 'dwh.update_datamart_user', "
        "after => 'UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = $1', workers => 2)")
    def refresh():
        conn.execute("SELECT chunkwise.plan_by_activity('datamart', "
                     "'SELECT key, last_activity, actions FROM dwh.modified_users')")
        conn.execute("SELECT * FROM chunkwise.run('datamart', 2)")
    return timed(refresh)[0]


def shell(cluster, conn):
    with tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False) as ids:
        path = pathlib.Path(ids.name)
    def refresh():
        with open(path, "w") as out:
            subprocess.run(["psql", *psql_args(cluster), "-X", "-q", "-c", RANKED_IDS],
                           check=True, stdout=out)
        subprocess.run(["bash", str(RUNNER), str(path), "2", *psql_args(cluster)], check=True)
    seconds = timed(refresh)[0]
    path.unlink()
    return seconds


def run(cluster, args):
    users = 300 if args.smoke else args.users
    conn = cluster.connect()
    build(cluster, conn, users)
    results, expected = [], None
    for name, contender in [("pg_chunkwise, 2 workers", chunkwise),
                            ("shell runner: flock + one psql per user, 2 threads", shell)]:
        reset(conn)
        seconds = contender(cluster, conn)
        contents = conn.execute(CONTENTS).fetchone()
        expected = expected or contents
        results.append({"contender": name, "users": users, "seconds": round(seconds, 3),
                        "users_per_second": round(users / seconds),
                        "same_result": contents == expected and contents[2] == 0})
        print(f"  {name}: {seconds:.1f} s", flush=True)
    for r in results:
        r["chunkwise_speedup"] = round(r["seconds"] / results[0]["seconds"], 2)
    conn.execute("SELECT chunkwise.drop_task('datamart')")
    return {"workload": {"users": users, "smoke": args.smoke}, "results": results}


def tables(result):
    return markdown_table(
        ["contender", "users", "wall s", "users/s", "pg_chunkwise is faster by", "same datamart"],
        [[r["contender"], r["users"], f"{r['seconds']:.1f}", r["users_per_second"],
          f"{r['chunkwise_speedup']:.1f}x", "yes" if r["same_result"] else "**NO**"]
         for r in result["results"]],
    )
