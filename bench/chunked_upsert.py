"""Chunked upsert: a stage table of N rows (10% new keys, 90% updates) upserted into a
target of 4N rows with two indexes, by

  1. one INSERT ... ON CONFLICT statement (the baseline),
  2. pg_chunkwise plan_ranges + run() with 1, 2 and 4 workers,
  3. pg_chunkwise plan_blocks + run() with 2 workers,
  4. a client thread pool of 2 threads opening a connection per chunk (the way
     operators do it today), cutting the same chunks with one query of its own,

each into a fresh copy of the target, every result checked equal to the baseline's.
Then the per-chunk overhead: a no-op statement over many one-row ranges.
Planning time is part of each contender's time: it is work the operator waits for.
"""

import concurrent.futures

import psycopg

from lib import timed

UPSERT = (
    "INSERT INTO {target} (id, v, note) SELECT s.id, s.v, s.note FROM stage s {where} "
    "ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, note = EXCLUDED.note"
)
BY_KEY = "WHERE s.id >= $1 AND s.id < $2"
BY_BLOCK = "WHERE s.ctid >= chunkwise.block_tid($1) AND s.ctid < chunkwise.block_tid($2)"


def build(conn, rows):
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_chunkwise")
    conn.execute("DROP TABLE IF EXISTS stage, target_template")
    conn.execute(
        "CREATE TABLE target_template AS "
        "SELECT g::bigint AS id, 0::bigint AS v, 'old row ' || g AS note "
        "FROM generate_series(1, 4 * %s::bigint) g",
        (rows,),
    )
    # Every tenth stage row is a new key past the target's end; the rest update every
    # fourth target row.
    conn.execute(
        "CREATE TABLE stage AS "
        "SELECT CASE WHEN g %% 10 = 0 THEN 4 * %(n)s + g ELSE 4 * g END AS id, "
        "       g AS v, 'staged ' || g AS note "
        "FROM generate_series(1, %(n)s::bigint) g",
        {"n": rows},
    )
    conn.execute("ALTER TABLE stage ADD PRIMARY KEY (id)")
    conn.execute("VACUUM ANALYZE stage")


def fresh_target(conn, name):
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} AS TABLE target_template")
    conn.execute(f"ALTER TABLE {name} ADD PRIMARY KEY (id)")
    conn.execute(f"CREATE INDEX ON {name} (v)")
    conn.execute(f"VACUUM ANALYZE {name}")
    conn.execute("CHECKPOINT")


def fingerprint(conn, name):
    return conn.execute(
        f"SELECT count(*), sum(hashtextextended(t::text, 0)::numeric) FROM {name} t"
    ).fetchone()


def one_statement(conn, target, **_):
    return timed(lambda: conn.execute(UPSERT.format(target=target, where="")))[0], None


def chunkwise_run(conn, target, task, plan_sql, workers):
    where = BY_BLOCK if "plan_blocks" in plan_sql else BY_KEY
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = %s", (task,))
    conn.execute(
        "SELECT chunkwise.create_task(%s, statement => %s)",
        (task, UPSERT.format(target=target, where=where)),
    )
    plan_seconds, _ = timed(lambda: conn.execute(plan_sql, (task,)))
    run_seconds, _ = timed(lambda: conn.execute("SELECT * FROM chunkwise.run(%s, %s)", (task, workers)))
    return plan_seconds + run_seconds, plan_seconds


def thread_pool(conn, target, dsn, chunk_rows, threads, **_):
    def cut_points():
        keys = [r[0] for r in conn.execute(
            "SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM stage) s "
            "WHERE (rn - 1) %% %s = 0 ORDER BY id",
            (chunk_rows,),
        )]
        end = conn.execute("SELECT max(id) + 1 FROM stage").fetchone()[0]
        return list(zip(keys, keys[1:] + [end]))

    statement = UPSERT.format(target=target, where="WHERE s.id >= %s AND s.id < %s")

    def one_chunk(bounds):
        with psycopg.connect(dsn) as chunk_conn:  # a connection per chunk, as today
            chunk_conn.execute(statement, bounds)

    def run_all():
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(one_chunk, cut_points()))

    return timed(run_all)[0], None


def noop_chunks(conn, chunks, workers):
    """Seconds for a no-op statement over `chunks` one-row ranges: what claiming,
    running and committing a chunk costs beyond its work."""
    conn.execute("DROP TABLE IF EXISTS noop_keys")
    conn.execute("CREATE TABLE noop_keys AS SELECT generate_series(1, %s::bigint) AS id", (chunks,))
    conn.execute("SELECT chunkwise.drop_task(task) FROM chunkwise.tasks WHERE task = 'noop'")
    conn.execute("SELECT chunkwise.create_task('noop', statement => 'SELECT $1, $2')")
    planned = conn.execute("SELECT chunkwise.plan_ranges('noop', 'noop_keys', 'id', 1)").fetchone()[0]
    assert planned == chunks, planned
    seconds, _ = timed(lambda: conn.execute("SELECT * FROM chunkwise.run('noop', %s)", (workers,)))
    return seconds


def noop_chunks_by_pool(dsn, chunks, threads):
    """The same no-op chunks from a client thread pool opening a connection per chunk."""
    def one_chunk(lo):
        with psycopg.connect(dsn) as chunk_conn:
            chunk_conn.execute("SELECT %s::bigint, %s::bigint", (lo, lo + 1))

    def run_all():
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(one_chunk, range(1, chunks + 1)))

    return timed(run_all)[0]


def run(cluster, args):
    rows, chunk_rows, noop, smoke = args.rows, args.chunk_rows, args.noop_chunks, args.smoke
    conn = cluster.connect()
    build(conn, rows)
    rows_per_block = conn.execute(
        "SELECT reltuples / relpages FROM pg_class WHERE relname = 'stage'"
    ).fetchone()[0]
    chunk_blocks = max(1, round(chunk_rows / rows_per_block))
    contenders = [
        ("one INSERT ... ON CONFLICT (baseline)", one_statement, {}),
        *[
            (f"pg_chunkwise plan_ranges, {w} worker{'s' if w > 1 else ''}", chunkwise_run,
             {"task": f"ranges_{w}", "workers": w,
              "plan_sql": f"SELECT chunkwise.plan_ranges(%s, 'stage', 'id', {chunk_rows})"})
            for w in (1, 2, 4)
        ],
        ("pg_chunkwise plan_blocks, 2 workers", chunkwise_run,
         {"task": "blocks_2", "workers": 2,
          "plan_sql": f"SELECT chunkwise.plan_blocks(%s, 'stage', {chunk_blocks})"}),
        ("client thread pool, 2 threads, connection per chunk", thread_pool,
         {"dsn": cluster.dsn(), "chunk_rows": chunk_rows, "threads": 2}),
    ]
    results, expected = [], None
    for name, contender, args in contenders:
        fresh_target(conn, "target")
        seconds, plan_seconds = contender(conn, "target", **args)
        got = fingerprint(conn, "target")
        expected = expected or got
        results.append({
            "contender": name,
            "seconds": round(seconds, 3),
            "plan_seconds": None if plan_seconds is None else round(plan_seconds, 3),
            "same_result": got == expected,
        })
        print(f"  {name}: {seconds:.2f} s", flush=True)
    baseline = results[0]["seconds"]
    for r in results:
        r["speedup"] = round(baseline / r["seconds"], 2)

    overhead = []
    for name, measure in [
        ("pg_chunkwise, 1 worker", lambda: noop_chunks(conn, noop, 1)),
        ("pg_chunkwise, 2 workers", lambda: noop_chunks(conn, noop, 2)),
        ("client thread pool, 2 threads, connection per chunk",
         lambda: noop_chunks_by_pool(cluster.dsn(), noop, 2)),
    ]:
        seconds = measure()
        overhead.append({"contender": name, "chunks": noop, "seconds": round(seconds, 3),
                         "ms_per_chunk": round(seconds / noop * 1000, 3)})
    conn.execute("DROP TABLE IF EXISTS target, target_template, stage, noop_keys")
    return {
        "workload": {"stage_rows": rows, "target_rows": 4 * rows, "chunk_rows": chunk_rows,
                     "chunk_blocks": chunk_blocks, "smoke": smoke},
        "results": results,
        "per_chunk_overhead": overhead,
    }


def tables(result):
    from lib import markdown_table

    upsert = markdown_table(
        ["contender", "wall s", "of which planning s", "speed-up vs one statement", "result = baseline"],
        [[r["contender"], f"{r['seconds']:.2f}",
          "" if r["plan_seconds"] is None else f"{r['plan_seconds']:.2f}",
          f"{r['speedup']:.2f}x", "yes" if r["same_result"] else "**NO**"]
         for r in result["results"]],
    )
    overhead = markdown_table(
        ["per-chunk overhead", "no-op chunks", "wall s", "ms per chunk"],
        [[o["contender"], o["chunks"], f"{o['seconds']:.2f}", f"{o['ms_per_chunk']:.3f}"]
         for o in result["per_chunk_overhead"]],
    )
    return upsert + "\n\n" + overhead
