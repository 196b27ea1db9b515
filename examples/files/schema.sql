-- The file-loading example: per-organisation CSV files of orders, loaded with
-- server-side COPY, in arrival order within an organisation, organisations in turn.
-- Run as the role that owns the task; it needs pg_read_server_files (see run.sh).

CREATE SCHEMA loads;

-- One row per file that arrived; loaded_at is set in the same transaction as the load.
CREATE TABLE loads.files (
    file_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org        text NOT NULL,
    path       text NOT NULL UNIQUE,
    arrived_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    loaded_at  timestamptz,
    rows       bigint
);

CREATE TABLE loads.orders (
    file_id  bigint NOT NULL REFERENCES loads.files,
    org      text NOT NULL,
    order_id bigint NOT NULL,
    amount   numeric(12, 2) NOT NULL,
    PRIMARY KEY (org, order_id)
);

-- Loads one file: COPY into a scratch table, then into orders with the file's org.
-- A malformed file fails here with COPY's own error, which chunkwise.failures shows.
CREATE PROCEDURE loads.load_file(file_id bigint, payload jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    loaded bigint;
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS incoming (order_id bigint, amount numeric(12, 2));
    TRUNCATE incoming;
    EXECUTE format('COPY incoming FROM %L WITH (FORMAT csv, HEADER true)', payload->>'path');
    INSERT INTO loads.orders (file_id, org, order_id, amount)
    SELECT load_file.file_id, payload->>'org', order_id, amount FROM incoming;
    GET DIAGNOSTICS loaded = ROW_COUNT;
    UPDATE loads.files f SET loaded_at = clock_timestamp(), rows = loaded
     WHERE f.file_id = load_file.file_id;
END
$$;

-- The task: one organisation's files strictly in order, organisations in turn.
SELECT chunkwise.create_task('load_files',
         call => 'loads.load_file',
         sequential_groups => true,
         workers => 2,
         max_attempts => 3,
         retry_backoff => '1 second',
         source => $$SELECT file_id AS key, org AS group_key,
                            jsonb_build_object('path', path, 'org', org) AS payload
                       FROM loads.files WHERE loaded_at IS NULL
                      ORDER BY arrived_at, file_id$$);
