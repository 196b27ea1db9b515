-- The SQL surface of pg_chunkwise: definitions, planning, the activity ranking, a small
-- run, and the errors bad input gets (message, hint and SQLSTATE).
CREATE EXTENSION pg_chunkwise;
\set SHOW_CONTEXT never
SET chunkwise.max_workers = 8;

CREATE TABLE counters (k bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
INSERT INTO counters (k) SELECT g FROM generate_series(1, 5) g;
CREATE PROCEDURE bump(k bigint) LANGUAGE sql
    AS 'UPDATE counters SET n = n + 1 WHERE counters.k = bump.k';
CREATE FUNCTION load_range(lo bigint, hi bigint, payload jsonb) RETURNS void LANGUAGE sql AS 'SELECT';
CREATE PROCEDURE takes_text(k text) LANGUAGE sql AS 'SELECT 1';

-- Definitions
SELECT chunkwise.create_task('bump', call => 'bump', max_attempts => 3);
SELECT chunkwise.create_task('ranges', call => 'load_range', workers => 2, item_timeout => '5 minutes');
SELECT chunkwise.create_task('stmt', statement => 'UPDATE counters SET n = n WHERE k = $1',
                             after => 'SELECT $1', synchronous_commit => false);
SELECT task, call, statement, after, workers, max_attempts, retry_backoff, retry_backoff_max,
       item_timeout, items_per_commit, synchronous_commit
  FROM chunkwise.tasks ORDER BY task_id;

-- Planning: new keys are added, pending keys get the new priority
SELECT chunkwise.enqueue('bump', 1, priority => 5);
SELECT chunkwise.enqueue('bump', 1, priority => 2);
SELECT chunkwise.plan('bump', 'SELECT k AS key FROM counters ORDER BY k DESC');
SELECT key, priority, status FROM chunkwise.items ORDER BY priority, item_id;

-- The activity ranking: recency tier first, then activity tier
SELECT days, actions, chunkwise.activity_tier(now() - make_interval(days => days), actions) AS tier
  FROM (VALUES (1, 500), (1, 50), (1, 5), (20, 500), (60, 50), (200, 5000)) v(days, actions);
SELECT chunkwise.activity_tier(NULL, NULL) AS never_active;

-- A run (one worker, so the summary is deterministic)
SELECT run_id IS NOT NULL AS ran, processed, failed, dead FROM chunkwise.run('bump', 1);
SELECT n, count(*) FROM counters GROUP BY n;
SELECT task, pending, waiting_retry, done, dead FROM chunkwise.task_status ORDER BY task;
SELECT run_id, processed, failed, dead FROM chunkwise.run('bump');

-- Bad input: an ERROR with a hint, and the SQLSTATE
SELECT chunkwise.run('no_such_task');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x', call => 'takes_text');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x', call => 'bump', statement => 'SELECT 1');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x', call => 'bump', workers => 0);
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x', call => 'bump', retry_backoff => '1 hour', retry_backoff_max => '1 minute');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x', statement => 'DELETE FROM counters; DROP TABLE counters');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('x; DROP TABLE counters', call => 'bump');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.create_task('bump', call => 'bump');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.enqueue('bump', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.plan('bump', 'SELECT k AS id FROM counters');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.plan('bump', 'SELECT k::text AS key FROM counters');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.plan_by_activity('bump', 'SELECT k AS key FROM counters');
\echo :LAST_ERROR_SQLSTATE
SELECT chunkwise.run('bump', max_items => 0);
\echo :LAST_ERROR_SQLSTATE
SET chunkwise.recency_windows = '30,7';
SELECT chunkwise.activity_tier(now(), 1);
\echo :LAST_ERROR_SQLSTATE
RESET chunkwise.recency_windows;

-- Refusals changed nothing
SELECT count(*) AS tasks FROM chunkwise.tasks;
SELECT table_name FROM information_schema.tables WHERE table_name = 'counters';

-- Dropping a task removes its queue
SELECT chunkwise.drop_task('stmt');
SELECT chunkwise.drop_task('bump');
SELECT count(*) AS items_left FROM chunkwise.items;
DROP EXTENSION pg_chunkwise;
