-- Chunked planning: key ranges, block ranges, block_tid, and their refusals.
CREATE EXTENSION pg_chunkwise;
\set SHOW_CONTEXT never
CREATE TABLE stage (id int, v text);
INSERT INTO stage SELECT g, 'v' || g FROM generate_series(1, 95) g;
INSERT INTO stage VALUES (NULL, 'no key');
CREATE PROCEDURE load_range(lo bigint, hi bigint) LANGUAGE sql AS 'SELECT 1';
CREATE PROCEDURE load_one(k bigint) LANGUAGE sql AS 'SELECT 1';
SELECT chunkwise.create_task('by_range', call => 'load_range');
SELECT chunkwise.create_task('by_key', call => 'load_one');

-- Key ranges of 20 rows; the row without a key is in none, and says so
SELECT chunkwise.plan_ranges('by_range', 'stage', 'id', 20);
SELECT key AS lo, hi, priority FROM chunkwise.items ORDER BY key;
-- Planning again adds nothing: the pending ranges are already there
SELECT chunkwise.plan_ranges('by_range', 'stage', 'id', 20);

-- Block ranges and the tid a range starts at
SELECT chunkwise.block_tid(0), chunkwise.block_tid(12345), chunkwise.block_tid(4294967295);
CREATE TABLE wide AS SELECT g AS id, repeat('x', 500) AS pad FROM generate_series(1, 100) g;
SELECT chunkwise.create_task('by_block', statement => 'SELECT count(*) FROM wide WHERE ctid >= chunkwise.block_tid($1) AND ctid < chunkwise.block_tid($2)');
SELECT chunkwise.plan_blocks('by_block', 'wide', 3);
SELECT i.key AS first_block, i.hi AS end_block
  FROM chunkwise.items i JOIN chunkwise.tasks t USING (task_id) WHERE t.task = 'by_block' ORDER BY i.key;

-- Refusals
SELECT chunkwise.plan_ranges('by_key', 'stage', 'id', 20);
SELECT chunkwise.plan_ranges('by_range', 'stage', 'v', 20);
SELECT chunkwise.plan_ranges('by_range', 'stage', 'missing', 20);
SELECT chunkwise.plan_ranges('by_range', 'stage', 'id', 0);
SELECT chunkwise.plan_blocks('by_block', 'wide', 0);
SELECT chunkwise.block_tid(-1);
SELECT count(*) AS items FROM chunkwise.items;

DROP EXTENSION pg_chunkwise;
DROP TABLE stage, wide;
DROP PROCEDURE load_range, load_one;
