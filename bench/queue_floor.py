"""The floor the enqueue and plan benchmarks compare against: a queue-shaped table (a
bigserial id, a partial unique index on (task, key) for pending items, a partial claim
index) and a plain SQL function doing the same INSERT ... ON CONFLICT as an enqueue:
what one row into such a queue costs with nothing else around it."""

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
