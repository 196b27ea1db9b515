-- pg_chunkwise 0.1.0 -> 0.2.0. Released scripts never change; every schema change after
-- 0.2.0 goes into the next script of the chain (pg_chunkwise--0.2.0--0.3.0.sql, ...).
-- CI installs 0.1.0, queues and runs work with the 0.1.0 library, updates, runs the
-- rest, and checks that the updated extension's objects equal a fresh 0.2.0's.

\echo Use "ALTER EXTENSION pg_chunkwise UPDATE" to load this file. \quit

-- Refuse while workers of this database run: they run the old library against the old
-- tables. Nothing is changed; run the update again once they are done.
DO $guard$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_stat_activity
                WHERE backend_type = 'chunkwise worker'
                  AND datname = pg_catalog.current_database()) THEN
        RAISE EXCEPTION 'pg_chunkwise workers are running in this database'
            USING ERRCODE = 'object_in_use',
                  HINT = 'Let the runs finish (SELECT * FROM chunkwise.runs WHERE state = ''running'') or chunkwise.cancel() them, then run ALTER EXTENSION pg_chunkwise UPDATE again; nothing was changed.';
    END IF;
END
$guard$;

-- Security (issue 15): SQL functions pin their search_path.
CREATE OR REPLACE FUNCTION chunkwise._visible(owner oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pg_has_role(owner, 'USAGE') OR pg_catalog.pg_has_role('pg_monitor', 'USAGE')
$$;

-- Liveness from the workers' own session rows, not from application_name.
CREATE TABLE chunkwise.worker_sessions (
    pid           int PRIMARY KEY,
    run_id        bigint NOT NULL,
    backend_start timestamptz NOT NULL
);
REVOKE ALL ON chunkwise.worker_sessions FROM PUBLIC;

CREATE OR REPLACE VIEW chunkwise._live_workers WITH (security_barrier) AS
SELECT a.pid,
       w.run_id,
       a.state,
       a.query,
       a.query_start,
       a.backend_start
  FROM chunkwise.worker_sessions w
  JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid AND a.backend_start = w.backend_start
 WHERE a.backend_type = 'chunkwise worker';
REVOKE ALL ON chunkwise._live_workers FROM PUBLIC;

-- Owners as dependencies: each task's anchor domain, owned by its owner.
ALTER TABLE chunkwise.tasks ADD COLUMN anchor regtype UNIQUE;

-- Lifecycle (issue 16): retention of done and skipped items and finished runs, set per
-- task and applied at the end of its runs.
ALTER TABLE chunkwise.tasks
    ADD COLUMN retain_done interval NOT NULL DEFAULT '7 days',
    ADD COLUMN retain_runs interval NOT NULL DEFAULT '30 days';
CREATE INDEX items_skipped_idx ON chunkwise.items (task_id, finished_at)
    WHERE status = 'skipped';

-- Throughput (issue 23): the group-head index leaves out items without a group, so an
-- enqueue or plan into a task without sequential groups inserts into one index fewer.
-- Rebuilt in place (a share lock on items while it builds: run the update off-peak).
DROP INDEX chunkwise.items_group_head_idx;
CREATE INDEX items_group_head_idx ON chunkwise.items (task_id, group_key, priority, item_id)
    WHERE status IN ('pending', 'dead') AND group_key IS NOT NULL;
-- The same CHECK on status, written as an array constant: the IN list was folded again
-- at every INSERT's executor start (see bootstrap.sql). Validating it reads the table.
ALTER TABLE chunkwise.items
    DROP CONSTRAINT items_status_check,
    ADD CONSTRAINT items_status_check
        CHECK (status = ANY ('{pending,done,dead,skipped}'::text[]));

-- Always-on tasks (issue 19): pools of resident workers, woken at the commit of an enqueue.
ALTER TABLE chunkwise.tasks
    ADD COLUMN always_on boolean NOT NULL DEFAULT false,
    ADD COLUMN min_workers int NOT NULL DEFAULT 1,
    ADD COLUMN idle_timeout interval NOT NULL DEFAULT '5 minutes';

-- Resource governance (issue 20): a rate limit, load gates, lock manners, splitting ranges.
ALTER TABLE chunkwise.tasks
    ADD COLUMN max_rate float8,
    ADD COLUMN max_replication_lag interval,
    ADD COLUMN max_load float8,
    ADD COLUMN pause_when text,
    ADD COLUMN lock_timeout interval,
    ADD COLUMN split_on_timeout boolean NOT NULL DEFAULT false,
    ADD COLUMN split_min_width bigint NOT NULL DEFAULT 1;

-- Pipelines (issue 21): callbacks, the tasks a run starts or waits for, the durable
-- state of what follows each run.
ALTER TABLE chunkwise.tasks
    ADD COLUMN on_success regprocedure,
    ADD COLUMN on_failure regprocedure,
    ADD COLUMN then_tasks int[] NOT NULL DEFAULT '{}',
    ADD COLUMN depends_on int[] NOT NULL DEFAULT '{}',
    ADD COLUMN cycle_requested_by bigint;
ALTER TABLE chunkwise.run_history
    ADD COLUMN outcome text CHECK (outcome IN ('succeeded', 'failed')),
    ADD COLUMN followup text CHECK (followup IN ('armed', 'done', 'gave_up')),
    ADD COLUMN followup_attempts int NOT NULL DEFAULT 0,
    ADD COLUMN followup_not_before timestamptz,
    ADD COLUMN followup_error text;

-- create_task and alter_task take retain_done, retain_runs, always_on, min_workers,
-- idle_timeout and the governance options.
DROP FUNCTION chunkwise.create_task(text, regproc, text, text, text, int, bigint, int, interval,
                                    interval, interval, int, bool, bool, bool);
DROP FUNCTION chunkwise.alter_task(text, regproc, text, text, text, int, bigint, int, interval,
                                   interval, interval, int, bool, bool, bool);
CREATE FUNCTION chunkwise.create_task(
	"task" TEXT, /* Option < & str > */
	"call" regproc DEFAULT NULL, /* Option < RegProc > */
	"statement" TEXT DEFAULT NULL, /* Option < & str > */
	"after" TEXT DEFAULT NULL, /* Option < & str > */
	"source" TEXT DEFAULT NULL, /* Option < & str > */
	"workers" INT DEFAULT NULL, /* Option < i32 > */
	"max_items_per_cycle" bigint DEFAULT NULL, /* Option < i64 > */
	"max_attempts" INT DEFAULT 5, /* Option < i32 > */
	"retry_backoff" interval DEFAULT '10 seconds', /* Option < Interval > */
	"retry_backoff_max" interval DEFAULT '1 hour', /* Option < Interval > */
	"item_timeout" interval DEFAULT NULL, /* Option < Interval > */
	"items_per_commit" INT DEFAULT 1, /* Option < i32 > */
	"synchronous_commit" bool DEFAULT true, /* Option < bool > */
	"sequential_groups" bool DEFAULT false, /* Option < bool > */
	"rank_by_activity" bool DEFAULT false, /* Option < bool > */
	"retain_done" interval DEFAULT '7 days', /* Option < Interval > */
	"retain_runs" interval DEFAULT '30 days', /* Option < Interval > */
	"always_on" bool DEFAULT false, /* Option < bool > */
	"min_workers" INT DEFAULT 1, /* Option < i32 > */
	"idle_timeout" interval DEFAULT '5 minutes', /* Option < Interval > */
	"max_rate" double precision DEFAULT NULL, /* Option < f64 > */
	"max_replication_lag" interval DEFAULT NULL, /* Option < Interval > */
	"max_load" double precision DEFAULT NULL, /* Option < f64 > */
	"pause_when" TEXT DEFAULT NULL, /* Option < & str > */
	"lock_timeout" interval DEFAULT NULL, /* Option < Interval > */
	"split_on_timeout" bool DEFAULT false, /* Option < bool > */
	"split_min_width" bigint DEFAULT 1, /* Option < i64 > */
	"on_success" regproc DEFAULT NULL, /* Option < RegProc > */
	"on_failure" regproc DEFAULT NULL, /* Option < RegProc > */
	"then" TEXT[] DEFAULT NULL, /* Option < Vec < String > > */
	"depends_on" TEXT[] DEFAULT NULL /* Option < Vec < String > > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'create_task_wrapper';

CREATE FUNCTION chunkwise.alter_task(
	"task" TEXT, /* Option < & str > */
	"call" regproc DEFAULT NULL, /* Option < RegProc > */
	"statement" TEXT DEFAULT NULL, /* Option < & str > */
	"after" TEXT DEFAULT NULL, /* Option < & str > */
	"source" TEXT DEFAULT NULL, /* Option < & str > */
	"workers" INT DEFAULT NULL, /* Option < i32 > */
	"max_items_per_cycle" bigint DEFAULT NULL, /* Option < i64 > */
	"max_attempts" INT DEFAULT NULL, /* Option < i32 > */
	"retry_backoff" interval DEFAULT NULL, /* Option < Interval > */
	"retry_backoff_max" interval DEFAULT NULL, /* Option < Interval > */
	"item_timeout" interval DEFAULT NULL, /* Option < Interval > */
	"items_per_commit" INT DEFAULT NULL, /* Option < i32 > */
	"synchronous_commit" bool DEFAULT NULL, /* Option < bool > */
	"sequential_groups" bool DEFAULT NULL, /* Option < bool > */
	"rank_by_activity" bool DEFAULT NULL, /* Option < bool > */
	"retain_done" interval DEFAULT NULL, /* Option < Interval > */
	"retain_runs" interval DEFAULT NULL, /* Option < Interval > */
	"always_on" bool DEFAULT NULL, /* Option < bool > */
	"min_workers" INT DEFAULT NULL, /* Option < i32 > */
	"idle_timeout" interval DEFAULT NULL, /* Option < Interval > */
	"max_rate" double precision DEFAULT NULL, /* Option < f64 > */
	"max_replication_lag" interval DEFAULT NULL, /* Option < Interval > */
	"max_load" double precision DEFAULT NULL, /* Option < f64 > */
	"pause_when" TEXT DEFAULT NULL, /* Option < & str > */
	"lock_timeout" interval DEFAULT NULL, /* Option < Interval > */
	"split_on_timeout" bool DEFAULT NULL, /* Option < bool > */
	"split_min_width" bigint DEFAULT NULL, /* Option < i64 > */
	"on_success" regproc DEFAULT NULL, /* Option < RegProc > */
	"on_failure" regproc DEFAULT NULL, /* Option < RegProc > */
	"then" TEXT[] DEFAULT NULL, /* Option < Vec < String > > */
	"depends_on" TEXT[] DEFAULT NULL /* Option < Vec < String > > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'alter_task_wrapper';

CREATE FUNCTION chunkwise._owner(anchor regtype, creator oid) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT d.typowner FROM pg_catalog.pg_type d WHERE d.oid = anchor), creator)
$$;

-- Why a worker waits instead of claiming: workers publish
-- 'task <name>: throttled by <reason>; <n> items done' as their query while a gate is
-- closed or max_rate holds them back. NULL for a worker that is not throttled.
CREATE FUNCTION chunkwise._throttle_reason(state text, query text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN state IS DISTINCT FROM 'active'
                THEN substring(query FROM ': throttled by (.*); [0-9]+ items done$') END
$$;

CREATE OR REPLACE VIEW chunkwise.task_status WITH (security_barrier) AS
SELECT t.task,
       chunkwise._owner(t.anchor, t.owner)::regrole AS owner,
       t.paused,
       c.pending,
       c.waiting_retry,
       coalesce(w.running, 0) AS running,
       c.done,
       c.dead,
       coalesce(w.workers, 0) AS active_workers,
       b.blocked_groups,
       round(r.per_second, 2) AS items_per_second,
       CASE WHEN r.per_second > 0
            THEN make_interval(secs => round((c.pending + c.waiting_retry) / r.per_second))
       END AS estimated_time_left,
       -- What retention keeps: done and skipped items, finished runs.
       c.done + c.skipped AS kept_items,
       (SELECT count(*) FROM chunkwise.run_history h WHERE h.task_id = t.task_id) AS kept_runs,
       t.always_on,
       -- Workers of an always-on pool asleep until items come.
       coalesce(w.workers - w.running - w.throttled_workers, 0) AS idle_workers,
       -- Why its workers wait instead of claiming (max_rate, a load gate, pause_when).
       w.throttled
  FROM chunkwise.tasks t
 CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE i.status = 'pending' AND i.not_before <= now()) AS pending,
               count(*) FILTER (WHERE i.status = 'pending' AND i.not_before > now()) AS waiting_retry,
               count(*) FILTER (WHERE i.status = 'done') AS done,
               count(*) FILTER (WHERE i.status = 'dead') AS dead,
               count(*) FILTER (WHERE i.status = 'skipped') AS skipped
          FROM chunkwise.items i
         WHERE i.task_id = t.task_id) c
 CROSS JOIN LATERAL (
        -- In a task with sequential_groups, a dead item blocks its group.
        SELECT CASE WHEN t.sequential_groups THEN count(DISTINCT i.group_key) ELSE 0 END AS blocked_groups
          FROM chunkwise.items i
         WHERE i.task_id = t.task_id AND i.status = 'dead') b
 CROSS JOIN LATERAL (
        -- Throughput over the last minute, or over the part of it the work has run, so
        -- that a run ten seconds old is not measured against sixty.
        SELECT count(*) / greatest(extract(epoch FROM now() - min(i.finished_at)), 1.0) AS per_second
          FROM chunkwise.items i
         WHERE i.task_id = t.task_id AND i.status = 'done'
           AND i.finished_at > now() - interval '1 minute') r
  LEFT JOIN LATERAL (
        SELECT count(*) AS workers,
               count(*) FILTER (WHERE lw.state = 'active') AS running,
               count(lt.reason) AS throttled_workers,
               string_agg(DISTINCT lt.reason, '; ') AS throttled
          FROM chunkwise._live_workers lw
         CROSS JOIN LATERAL chunkwise._throttle_reason(lw.state, lw.query) lt(reason)
          JOIN chunkwise.run_history ru USING (run_id)
         WHERE ru.task_id = t.task_id) w ON true
 WHERE chunkwise._visible(chunkwise._owner(t.anchor, t.owner));

CREATE OR REPLACE VIEW chunkwise.failures WITH (security_barrier) AS
SELECT t.task,
       i.key,
       i.hi,
       i.status,
       i.attempts,
       t.max_attempts,
       i.last_sqlstate AS sqlstate,
       i.last_error AS message,
       i.last_failed_at,
       CASE WHEN i.status = 'pending' THEN i.not_before END AS next_retry,
       i.group_key,
       (t.sequential_groups AND i.status = 'dead') AS blocks_group,
       i.item_id
  FROM chunkwise.items i
  JOIN chunkwise.tasks t USING (task_id)
 WHERE i.last_failed_at IS NOT NULL AND i.status IN ('pending', 'dead')
   AND chunkwise._visible(chunkwise._owner(t.anchor, t.owner));

CREATE OR REPLACE VIEW chunkwise.runs WITH (security_barrier) AS
SELECT r.run_id,
       t.task,
       CASE WHEN coalesce(l.live, 0) > 0 THEN 'running'
            WHEN r.cancelled THEN 'cancelled'
            WHEN r.workers_exited < r.workers_started THEN 'interrupted'
            ELSE 'finished'
       END AS state,
       r.started_at,
       CASE WHEN coalesce(l.live, 0) = 0 THEN r.finished_at END AS finished_at,
       round(extract(epoch FROM CASE WHEN coalesce(l.live, 0) > 0 THEN clock_timestamp()
                                     ELSE r.finished_at END - r.started_at)::numeric, 3) AS seconds,
       r.workers_requested,
       r.workers_started,
       r.workers_exited,
       coalesce(l.live, 0) AS workers_live,
       r.max_items,
       r.processed,
       r.failed,
       r.dead,
       r.outcome
  FROM chunkwise.run_history r
  JOIN chunkwise.tasks t USING (task_id)
  LEFT JOIN LATERAL (SELECT count(*) AS live FROM chunkwise._live_workers lw
                      WHERE lw.run_id = r.run_id) l ON true
 WHERE chunkwise._visible(chunkwise._owner(t.anchor, t.owner));

CREATE OR REPLACE VIEW chunkwise.workers WITH (security_barrier) AS
SELECT lw.pid,
       t.task,
       lw.run_id,
       CASE WHEN lw.state = 'active' THEN substring(lw.query FROM ': key (-?[0-9]+) ')::bigint END AS current_key,
       CASE WHEN lw.state = 'active' THEN substring(lw.query FROM '\(item ([0-9]+)\)')::bigint END AS current_item,
       CASE WHEN lw.state = 'active' THEN lw.query_start END AS since,
       coalesce(substring(lw.query FROM '; ([0-9]+) items done')::bigint, 0) AS items_done,
       lw.backend_start AS started_at,
       CASE WHEN lw.state = 'active' THEN 'busy'
            WHEN lt.reason IS NOT NULL THEN 'throttled'
            ELSE 'idle' END AS state,
       lt.reason AS throttled
  FROM chunkwise._live_workers lw
 CROSS JOIN LATERAL chunkwise._throttle_reason(lw.state, lw.query) lt(reason)
  JOIN chunkwise.run_history r USING (run_id)
  JOIN chunkwise.tasks t USING (task_id)
 WHERE chunkwise._visible(chunkwise._owner(t.anchor, t.owner));

CREATE OR REPLACE VIEW chunkwise.priority_summary WITH (security_barrier) AS
SELECT t.task,
       i.priority / 1000000000000 AS tier,
       count(*) FILTER (WHERE i.status = 'pending' AND i.not_before <= now()) AS pending,
       count(*) FILTER (WHERE i.status = 'pending' AND i.not_before > now()) AS waiting_retry,
       count(*) FILTER (WHERE i.status = 'done') AS done,
       count(*) FILTER (WHERE i.status = 'dead') AS dead,
       min(i.finished_at) FILTER (WHERE i.status = 'done') AS first_done,
       max(i.finished_at) FILTER (WHERE i.status = 'done') AS last_done
  FROM chunkwise.items i
  JOIN chunkwise.tasks t USING (task_id)
 WHERE chunkwise._visible(chunkwise._owner(t.anchor, t.owner))
 GROUP BY t.task, i.priority / 1000000000000;

CREATE FUNCTION chunkwise."_lock_task_definitions"(
	"task_ids" INT[] /* alloc::vec::Vec<i32> */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'lock_task_definitions_wrapper';

REVOKE ALL ON FUNCTION chunkwise._lock_task_definitions(int[]) FROM PUBLIC;

CREATE FUNCTION chunkwise._forget_dropped_tasks() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gone int[];
BEGIN
    SELECT pg_catalog.array_agg(t.task_id) INTO gone
      FROM chunkwise.tasks t
      JOIN pg_catalog.pg_event_trigger_dropped_objects() d
        ON d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.objid = t.anchor;
    IF gone IS NULL THEN
        RETURN;
    END IF;
    -- As drop_task: wait for the transactions enqueueing into them to end, so that no
    -- item of theirs stays behind without a task.
    PERFORM chunkwise._lock_task_definitions(gone);
    DELETE FROM chunkwise.items WHERE task_id = ANY (gone);
    DELETE FROM chunkwise.groups WHERE task_id = ANY (gone);
    DELETE FROM chunkwise.run_history WHERE task_id = ANY (gone);
    DELETE FROM chunkwise.tasks WHERE task_id = ANY (gone);
END $$;

REVOKE ALL ON FUNCTION chunkwise._forget_dropped_tasks() FROM PUBLIC;

CREATE EVENT TRIGGER chunkwise_forget_dropped_tasks ON sql_drop
    EXECUTE FUNCTION chunkwise._forget_dropped_tasks();

-- Anchors for the tasks that exist (those whose owner still exists; an orphaned task
-- keeps failing with "owner no longer exists" until it is dropped). Created here they
-- would become members of the extension, which pg_dump leaves out: they are taken out
-- again, as create_task's anchors are never members.
DO $anchors$
DECLARE
    t record;
    anchor_name text;
BEGIN
    -- Under Citus the anchors belong to the coordinator only, as create_task's do.
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    FOR t IN SELECT task_id, task, owner::regrole AS owner FROM chunkwise.tasks
              WHERE EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = owner)
    LOOP
        anchor_name := pg_catalog.format('chunkwise.%I', 'task:' || t.task);
        EXECUTE pg_catalog.format('CREATE DOMAIN %s AS pg_catalog.bool', anchor_name);
        EXECUTE pg_catalog.format('COMMENT ON DOMAIN %s IS %L', anchor_name,
            'Owner of pg_chunkwise task ' || t.task || ': DROP OWNED drops the task, REASSIGN OWNED hands it over.');
        EXECUTE pg_catalog.format('ALTER DOMAIN %s OWNER TO %s', anchor_name, t.owner);
        UPDATE chunkwise.tasks SET anchor = anchor_name::pg_catalog.regtype WHERE task_id = t.task_id;
    END LOOP;
    DELETE FROM pg_catalog.pg_depend
     WHERE classid = 'pg_catalog.pg_type'::pg_catalog.regclass
       AND objid IN (SELECT anchor FROM chunkwise.tasks WHERE anchor IS NOT NULL)
       AND refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND deptype = 'e';
END
$anchors$;

-- Structure (issue 18): a task's groups and runs go with it by foreign keys (its items,
-- the hot insert path, keep no key: see bootstrap.sql). Rows of tasks deleted by hand
-- (drop_task leaves none) would block the keys: they are removed first.
DELETE FROM chunkwise.groups g
 WHERE NOT EXISTS (SELECT FROM chunkwise.tasks t WHERE t.task_id = g.task_id);
DELETE FROM chunkwise.run_history r
 WHERE NOT EXISTS (SELECT FROM chunkwise.tasks t WHERE t.task_id = r.task_id);
ALTER TABLE chunkwise.groups
    ADD FOREIGN KEY (task_id) REFERENCES chunkwise.tasks ON DELETE CASCADE;
ALTER TABLE chunkwise.run_history
    ADD FOREIGN KEY (task_id) REFERENCES chunkwise.tasks ON DELETE CASCADE;

-- Pipelines (issue 21): the view of the chains.
-- Every task with its place in the pipelines: what starts it or holds it, what it
-- starts, how its latest run ended, and what its next cycle waits for (each task it
-- depends on whose latest run did not succeed or that still has pending items; NULL when
-- nothing holds it: run_cycle's NOTICE reads the same column).
CREATE VIEW chunkwise.pipeline WITH (security_barrier) AS
SELECT t.task,
       ARRAY(SELECT u.task FROM chunkwise.tasks u
              WHERE t.task_id = ANY (u.then_tasks) ORDER BY u.task) AS started_by,
       ARRAY(SELECT u.task FROM chunkwise.tasks u
              WHERE u.task_id = ANY (t.depends_on) ORDER BY u.task) AS depends_on,
       ARRAY(SELECT d.task FROM chunkwise.tasks d
              WHERE d.task_id = ANY (t.then_tasks) ORDER BY d.task) AS starts,
       t.on_success,
       t.on_failure,
       h.run_id AS last_run_id,
       CASE WHEN h.run_id IS NULL THEN NULL
            WHEN h.outcome IS NOT NULL THEN h.outcome
            ELSE 'not over' END AS last_run,
       h.followup AS last_followup,
       h.followup_error AS last_callback_error,
       t.cycle_requested_by IS NOT NULL AS cycle_requested,
       w.waiting_for
  FROM chunkwise.tasks t
  LEFT JOIN LATERAL (SELECT r.run_id, r.outcome, r.followup, r.followup_error
                       FROM chunkwise.run_history r
                      WHERE r.task_id = t.task_id ORDER BY r.run_id DESC LIMIT 1) h ON true
  CROSS JOIN LATERAL (
      SELECT string_agg(format('%s (%s)', u.task,
                 CASE WHEN uh.run_id IS NULL THEN 'no run yet'
                      WHEN uh.outcome IS NULL THEN 'its latest run is not over'
                      WHEN uh.outcome <> 'succeeded' THEN 'its latest run failed'
                      ELSE up.pending || ' items pending' END), ', ' ORDER BY u.task) AS waiting_for
        FROM chunkwise.tasks u
        LEFT JOIN LATERAL (SELECT r.run_id, r.outcome FROM chunkwise.run_history r
                            WHERE r.task_id = u.task_id ORDER BY r.run_id DESC LIMIT 1) uh ON true
        CROSS JOIN LATERAL (SELECT count(*) AS pending FROM chunkwise.items i
                             WHERE i.task_id = u.task_id AND i.status = 'pending') up
       WHERE u.task_id = ANY (t.depends_on)
         AND (uh.outcome IS DISTINCT FROM 'succeeded' OR up.pending > 0)) w
 WHERE chunkwise._visible(chunkwise._owner(t.anchor, t.owner));

GRANT SELECT ON chunkwise.pipeline TO PUBLIC;

-- Items done per second of each run, for the dashboard's throughput chart: one row per
-- second of the run in which at least one of its items finished (what retention keeps).
CREATE VIEW chunkwise.run_throughput WITH (security_barrier) AS
SELECT r.run_id,
       t.task,
       floor(extract(epoch FROM i.finished_at - r.started_at))::int AS second,
       count(*) AS items
  FROM chunkwise.run_history r
  JOIN chunkwise.tasks t USING (task_id)
  JOIN chunkwise.items i
    ON i.task_id = r.task_id AND i.run_id = r.run_id AND i.status = 'done'
   AND i.finished_at >= r.started_at
 WHERE chunkwise._visible(chunkwise._owner(t.anchor, t.owner))
 GROUP BY r.run_id, t.task, 3;

GRANT SELECT ON chunkwise.run_throughput TO PUBLIC;

-- run_cycle commits while it waits for its run (a second at a time), so that a cycle
-- holds no snapshot, nor the cluster's xmin horizon, for the length of its run:
-- _cycle_run (start and wait in one statement) becomes _cycle_start and _cycle_wait.
CREATE OR REPLACE PROCEDURE chunkwise.run_cycle(task text)
LANGUAGE plpgsql AS $procedure$
BEGIN
    IF chunkwise._cycle_begin(task) THEN
        COMMIT;
        IF chunkwise._cycle_start(task) THEN
            LOOP
                COMMIT;
                EXIT WHEN chunkwise._cycle_wait(task);
            END LOOP;
        END IF;
    END IF;
END
$procedure$;

DROP FUNCTION chunkwise._cycle_run(text);

CREATE FUNCTION chunkwise."_cycle_start"(
	"task" TEXT /* Option < & str > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'cycle_start_wrapper';

CREATE FUNCTION chunkwise."_cycle_wait"(
	"task" TEXT /* Option < & str > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'cycle_wait_wrapper';
