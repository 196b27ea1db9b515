"""Runs the benchmarks side by side on a throwaway cluster, prints their tables and
writes bench/results/<name>.json. `bench/run.sh --help` for the options."""

import argparse
import sys

import always_on
import backlog_memory
import chunked_upsert
import citus_upsert
import claim_groups
import datamart
import enqueue
import governance
import per_item
import plan
import readme
import retention
import scaling
from lib import Cluster, machine_facts, save

SCENARIOS = {
    "chunked_upsert": chunked_upsert,
    "claim_groups": claim_groups,
    "per_item": per_item,
    "backlog_memory": backlog_memory,
    "datamart": datamart,
    "citus_upsert": citus_upsert,
    "retention": retention,
    "always_on": always_on,
    "governance": governance,
    "enqueue": enqueue,
    "plan": plan,
    "scaling": scaling,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"which benchmarks to run: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--readme", action="store_true",
                        help="run nothing: rewrite the README's tables from bench/results/*.json")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds in all: checks the benchmarks still run")
    parser.add_argument("--rows", type=int, default=2_000_000, help="stage rows of chunked_upsert")
    parser.add_argument("--chunk-rows", type=int, default=20_000, help="rows per chunk")
    parser.add_argument("--items", type=int, default=50_000, help="items of per_item")
    parser.add_argument("--users", type=int, default=20_000, help="users of datamart")
    parser.add_argument("--shell-users", type=int, default=5_000,
                        help="users the datamart's shell runner refreshes (the head of the ranking)")
    parser.add_argument("--plan-keys", type=int, default=1_000_000, help="keys of plan")
    parser.add_argument("--scaling-workers", default="1,2,4,8",
                        help="worker counts of scaling (comma-separated; the largest also runs the datamart)")
    parser.add_argument("--scaling-lanes", default="64,0",
                        help="chunkwise.lane_size values scaling compares (comma-separated; 0: no lanes)")
    parser.add_argument("--datamart-runs", type=int, default=3, help="runs of each datamart contender in scaling")
    parser.add_argument("--noop-chunks", type=int, default=10_000,
                        help="chunks of the per-chunk overhead measurement")
    parser.add_argument("--tag", help="save results as bench/results/SCENARIO.TAG.json (e.g. 16cores): "
                        "published beside the default ones, in the README between <!-- bench:SCENARIO.TAG --> markers")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    args.scenarios = args.scenarios or list(SCENARIOS)
    if args.readme:
        readme.update({name: SCENARIOS[name] for name in args.scenarios})
        return
    if args.smoke:
        args.rows, args.chunk_rows, args.noop_chunks = 20_000, 1_000, 500

    failed = False
    with Cluster() as cluster:
        facts = machine_facts(cluster.connect())
        print(f"machine: {facts['nproc']} cores, {facts['cpu']}, PostgreSQL {facts['postgres']}")
        for name in args.scenarios:
            print(f"\n== {name}", flush=True)
            scenario = SCENARIOS[name]
            result = scenario.run(cluster, args)
            result["machine"] = facts
            print("\n" + scenario.tables(result))
            print(f"\nwritten to {save(name, result, args.smoke, args.tag)}")
            failed |= not all(r.get("same_result", True) for r in result["results"])
    if failed:
        sys.exit("a contender's result differs from the baseline's")


if __name__ == "__main__":
    main()
