"""The floor the enqueue and plan benchmarks compare against: a queue-shaped table (a
bigserial id, a partial unique index on (task, key) for pending items, a partial claim
index) and a plain SQL function doing the same INSERT ... ON CONFLICT as an enqueue:
what one row into such a queue costs with nothing else around it."""

from statistics import median

SCHEMA = """
DROP SCHEMA IF EXISTS bench_floor CASCADE;
CREATE SCHEMA bench_floor;
CREATE TABLE bench_floor.items (
    id bigserial PRIMARY KEY,
    task int NOT NULL,
    key bigint NOT NULL,
    priority bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'pending',
    not_before timestamptz NOT NULL DEFAULT now(),
    enqueued_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX ON bench_floor.items (task, key) WHERE status = 'pending';
CREATE INDEX ON bench_floor.items (task, priority, id) WHERE status = 'pending';
CREATE FUNCTION bench_floor.enqueue(task int, key bigint, priority bigint DEFAULT 0) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO bench_floor.items (task, key, priority) VALUES (task, key, priority)
    ON CONFLICT (task, key) WHERE status = 'pending' DO UPDATE SET priority = EXCLUDED.priority
    RETURNING id
$$;
"""


def create(conn):
    conn.execute(SCHEMA)


def empty(conn):
    conn.execute("TRUNCATE bench_floor.items")


def drop(conn):
    conn.execute("DROP SCHEMA bench_floor CASCADE")


def against_floor(seconds, count, unit, is_floor):
    """The results of `seconds` (a list of wall times per (contender, case), each run
    handling `count` `unit`s): the median, the rate, and its ratio to the median of the
    floor's contender (`is_floor(name)`) in the same case."""
    results = []
    for (name, case), runs in seconds.items():
        wall = median(runs)
        results.append({"contender": name, "case": case, unit: count, "seconds": round(wall, 4),
                        f"{unit}_per_second": round(count / wall)})
    floors = {r["case"]: r["seconds"] for r in results if is_floor(r["contender"])}
    for r in results:
        r["vs_floor"] = round(r["seconds"] / floors[r["case"]], 2)
    return results
