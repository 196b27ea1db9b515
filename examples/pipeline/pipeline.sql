-- The pipeline example: the file loads of examples/files feed the warehouse of
-- examples/datamart. Run as the role that owns every task (see run.sh), after both
-- examples' schema.sql (and the datamart's data.sql).
--
--   load_files  --then-->  post_orders  --then-->  datamart  --on_success-->  refresh_top_users
--
-- One scheduled cycle of the first task drives all of it:
--   SELECT cron.schedule('pipeline', '*/5 * * * *', $$CALL chunkwise.run_cycle('load_files')$$);
-- When load_files' run succeeds, post_orders runs a cycle of its own (planning the files
-- loaded and not yet posted), then the datamart (planning the users those orders
-- touched, most recently active first), then the top-users view is refreshed. A run
-- that leaves a file dead calls on_failure instead and starts nothing after it.

-- Which loaded files' orders are in the warehouse already.
ALTER TABLE loads.files ADD COLUMN posted_at timestamptz;

-- Posts one loaded file's orders as purchases of the users they belong to (in this demo
-- a customer number is the order id folded onto the users) and marks those users
-- modified, so that the datamart refreshes them.
CREATE PROCEDURE dwh.post_file(p_file bigint)
LANGUAGE plpgsql AS $$
BEGIN
    WITH posted AS (
        INSERT INTO dwh.fact_actions (user_id, action_type, amount, happened_at)
        SELECT 1 + o.order_id % (SELECT count(*) FROM dwh.dimension_users), 'purchase',
               o.amount, clock_timestamp()
          FROM loads.orders o
         WHERE o.file_id = p_file
        RETURNING user_id)
    UPDATE dwh.dimension_users u SET modified = true
     WHERE u.dimension_user_id IN (SELECT user_id FROM posted);
    UPDATE loads.files SET posted_at = clock_timestamp() WHERE file_id = p_file;
END
$$;

SELECT chunkwise.create_task('post_orders',
         call    => 'dwh.post_file',
         workers => 2,
         source  => 'SELECT file_id AS key FROM loads.files WHERE loaded_at IS NOT NULL AND posted_at IS NULL');

-- What the reports read, refreshed when a datamart run succeeds.
CREATE MATERIALIZED VIEW dwh.top_users AS
SELECT user_id, net_revenue, purchases, last_purchase
  FROM dwh.datamart_users
 ORDER BY net_revenue DESC NULLS LAST, user_id
 LIMIT 10
  WITH NO DATA;
CREATE TABLE dwh.refresh_log (task text, run_id bigint, processed bigint, refreshed_at timestamptz);

-- A callback: called once per datamart run that succeeded, in a transaction of its own.
CREATE PROCEDURE dwh.refresh_top_users(task text, run_id bigint, processed bigint,
                                       failed bigint, dead bigint)
LANGUAGE plpgsql AS $$
BEGIN
    REFRESH MATERIALIZED VIEW dwh.top_users;
    INSERT INTO dwh.refresh_log VALUES (task, run_id, processed, clock_timestamp());
END
$$;

SELECT chunkwise.create_task('datamart',
         call             => 'dwh.update_datamart_user',
         after            => 'UPDATE dwh.dimension_users SET modified = false WHERE dimension_user_id = $1',
         source           => 'SELECT key, last_activity, actions FROM dwh.modified_users',
         rank_by_activity => true,
         workers          => 2,
         on_success       => 'dwh.refresh_top_users');

-- The chain ("then" is a reserved word in SQL: quote it).
SELECT chunkwise.alter_task('post_orders', "then" => '{datamart}');
SELECT chunkwise.alter_task('load_files', "then" => '{post_orders}');
