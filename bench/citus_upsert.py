"""Scale-out overhead: the chunked upsert of chunked_upsert (stage of N rows, target of
4N, two indexes) on one node against a local 3-node Citus cluster on the same machine
(coordinator plus two worker nodes, 8 shards), by

  1. one INSERT ... ON CONFLICT on one node (the baseline),
  2. pg_chunkwise plan_ranges with 2 workers on one node,
  3. one distributed INSERT ... ON CONFLICT on the Citus cluster (Citus runs it shard
     by shard in parallel),
  4. pg_chunkwise plan_shards with 2 workers on the Citus cluster, each item a
     function call Citus delegates to the shard's node.

The three nodes share this machine's cores, so this shows Citus's overhead, not its
speed-up: that needs nodes on machines of their own. Results are checked equal.
Skipped (and said so) where Citus is not installed.
"""

import os
import subprocess

from chunked_upsert import UPSERT, build, fingerprint, fresh_target
from lib import ROOT, Cluster, markdown_table, timed

SHARDS = 8
CITUS_SETTINGS = (
    "listen_addresses = '127.0.0.1'",
    "shared_preload_libraries = 'citus'",
    "max_prepared_transactions = 64",
)
UPSERT_SHARD = """
CREATE FUNCTION upsert_shard(route bigint, lo bigint, hi bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
  EXECUTE format(
    'INSERT INTO %s AS t (id, v, note) SELECT s.id, s.v, s.note FROM %s s
      WHERE worker_hash(s.id) >= $1 AND worker_hash(s.id) < $2
     ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, note = EXCLUDED.note',
    shard_name('target', get_shard_id_for_distribution_column('target', route)),
    shard_name('stage', get_shard_id_for_distribution_column('stage', route)))
  USING lo, hi;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END $$;
"""


def citus_installed():
    sharedir = subprocess.run(["pg_config", "--sharedir"], capture_output=True, text=True).stdout.strip()
    return os.path.exists(os.path.join(sharedir, "extension", "citus.control"))


class CitusCluster:
    """A coordinator and two worker nodes, each a cluster of its own (.ci/cluster.sh)."""

    def __init__(self, base_port=54332):
        self.nodes = [Cluster(f"/tmp/pg_chunkwise_bench_citus{i}", base_port + i) for i in range(3)]

    def __enter__(self):
        from lib import SERVER_SETTINGS

        for node in self.nodes:
            subprocess.run([ROOT / ".ci" / "cluster.sh", "start", node.dir, str(node.port),
                            *SERVER_SETTINGS, *CITUS_SETTINGS], check=True)
            node.connect().execute("CREATE EXTENSION citus")
        coordinator = self.coordinator()
        coordinator.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.nodes[0].port,))
        for worker in self.nodes[1:]:
            coordinator.execute("SELECT citus_add_node('127.0.0.1', %s)", (worker.port,))
        return self

    def __exit__(self, *exc):
        for node in self.nodes:
            subprocess.run([ROOT / ".ci" / "cluster.sh", "stop", node.dir], check=False)

    def coordinator(self):
        return self.nodes[0].connect()


def one_node(cluster, rows):
    conn = cluster.connect()
    build(conn, rows)
    results = []
    fresh_target(conn, "target")
    seconds, _ = timed(lambda: conn.execute(UPSERT.format(target="target", where="")))
    results.append(("one node: one INSERT ... ON CONFLICT (baseline)", seconds, fingerprint(conn, "target")))
    fresh_target(conn, "target")
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'ranges'")
    conn.execute("SELECT chunkwise.create_task('ranges', statement => %s)",
                 (UPSERT.format(target="target", where="WHERE s.id >= $1 AND s.id < $2"),))
    chunk_rows = max(1, rows // (4 * SHARDS))  # as many items per worker as plan_shards makes
    seconds, _ = timed(lambda: (
        conn.execute("SELECT chunkwise.plan_ranges('ranges', 'stage', 'id', %s)", (chunk_rows,)),
        conn.execute("SELECT * FROM chunkwise.run('ranges', 2)"),
    ))
    results.append(("one node: pg_chunkwise plan_ranges, 2 workers", seconds, fingerprint(conn, "target")))
    conn.execute("DROP TABLE IF EXISTS target, target_template, stage")
    return results


def distribute_target(conn):
    fresh_target(conn, "target")
    conn.execute("SELECT create_distributed_table('target', 'id', colocate_with => 'stage')")
    conn.execute("SELECT truncate_local_data_after_distributing_table('target')")
    conn.execute("VACUUM ANALYZE target")


def three_nodes(rows):
    results = []
    with CitusCluster() as citus:
        conn = citus.coordinator()
        build(conn, rows)
        conn.execute("SELECT create_distributed_table('stage', 'id', shard_count => %s)", (SHARDS,))
        conn.execute("SELECT truncate_local_data_after_distributing_table('stage')")
        conn.execute(UPSERT_SHARD)
        conn.execute("SELECT create_distributed_function('upsert_shard(bigint,bigint,bigint)', 'route', "
                     "colocate_with => 'stage', force_delegation => true)")

        distribute_target(conn)
        seconds, _ = timed(lambda: conn.execute(UPSERT.format(target="target", where="")))
        results.append(("3-node Citus: one distributed INSERT ... ON CONFLICT", seconds,
                         fingerprint(conn, "target")))

        distribute_target(conn)
        conn.execute("SELECT chunkwise.create_task('shards', statement => "
                     "$$SELECT upsert_shard(($3->>'route')::bigint, $1, $2)$$)")
        seconds, _ = timed(lambda: (
            conn.execute("SELECT chunkwise.plan_shards('shards', 'target')"),
            conn.execute("SELECT * FROM chunkwise.run('shards', 2)"),
        ))
        results.append(("3-node Citus: pg_chunkwise plan_shards, 2 workers", seconds,
                        fingerprint(conn, "target")))
    return results


def run(cluster, args):
    rows = max(1, args.rows // 4)
    if not citus_installed():
        print("  SKIPPED: Citus is not installed (make setup installs ../shared/citus when present)")
        return {"workload": {"stage_rows": rows, "skipped": "Citus not installed"}, "results": []}
    measured = one_node(cluster, rows) + three_nodes(rows)
    baseline_seconds, expected = measured[0][1], measured[0][2]
    results = []
    for name, seconds, got in measured:
        results.append({"contender": name, "seconds": round(seconds, 3),
                        "vs_baseline": round(baseline_seconds / seconds, 2),
                        "same_result": got == expected})
        print(f"  {name}: {seconds:.2f} s", flush=True)
    return {
        "workload": {"stage_rows": rows, "target_rows": 4 * rows, "shards": SHARDS,
                     "worker_nodes": 2, "smoke": args.smoke},
        "results": results,
    }


def tables(result):
    if not result["results"]:
        return "skipped: " + result["workload"]["skipped"]
    return markdown_table(
        ["contender (same 2-core machine)", "wall s", "speed vs one statement on one node", "result = baseline"],
        [[r["contender"], f"{r['seconds']:.2f}", f"{r['vs_baseline']:.2f}x",
          "yes" if r["same_result"] else "**NO**"] for r in result["results"]],
    )
