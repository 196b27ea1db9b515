-- pg_chunkwise bootstrap: the queue's tables and the DBA views.
--
-- The tables are private to the extension owner: callers reach them only through the
-- chunkwise.* functions, which check task ownership and switch to the extension owner
-- for their own bookkeeping. The views are readable by everybody but show a task only
-- to members of its owner role and of pg_monitor.

-- Everybody may call the functions and read the views; the functions check ownership.
GRANT USAGE ON SCHEMA chunkwise TO PUBLIC;

CREATE TABLE chunkwise.tasks (
    task_id             int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task                text NOT NULL UNIQUE,
    owner               oid NOT NULL,
    call                regprocedure,
    statement           text,
    after               text,
    source              text,
    workers             int,
    max_items_per_cycle bigint,
    max_attempts        int NOT NULL,
    retry_backoff       interval NOT NULL,
    retry_backoff_max   interval NOT NULL,
    item_timeout        interval,
    items_per_commit    int NOT NULL,
    synchronous_commit  boolean NOT NULL,
    sequential_groups   boolean NOT NULL,
    rank_by_activity    boolean NOT NULL,
    paused              boolean NOT NULL DEFAULT false,
    -- chunkwise.cancel() stops every run of the task numbered up to this one.
    cancelled_through   bigint NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- The domain chunkwise."task:<name>", owned by the task's owner: it makes the task
    -- a dependency of the owner role for DROP ROLE, REASSIGN OWNED and DROP OWNED. Its
    -- owner is the task's owner (chunkwise._owner); `owner` is the role that created
    -- the task, used only for a task without an anchor.
    anchor              regtype UNIQUE,
    -- Retention: done and skipped items and finished runs older than these are removed
    -- at the end of the task's runs, a bounded batch at a time.
    retain_done         interval NOT NULL DEFAULT '7 days',
    retain_runs         interval NOT NULL DEFAULT '30 days',
    -- Always-on (needs the preloaded library): a pool of min_workers to workers resident
    -- workers, woken at the commit of an enqueue; a member idle for idle_timeout leaves
    -- while the pool is above min_workers.
    always_on           boolean NOT NULL DEFAULT false,
    min_workers         int NOT NULL DEFAULT 1,
    idle_timeout        interval NOT NULL DEFAULT '5 minutes',
    -- Governance, read by running workers every second (alter_task changes a run under
    -- way): items per second across the task's workers; gates checked between items
    -- (the most replication lag of any standby, the 1-minute load average per core, the
    -- owner's predicate); lock_timeout inside each item; a timed-out [lo, hi) item
    -- splits in two halves, down to split_min_width.
    max_rate            float8,
    max_replication_lag interval,
    max_load            float8,
    pause_when          text,
    lock_timeout        interval,
    split_on_timeout    boolean NOT NULL DEFAULT false,
    split_min_width     bigint NOT NULL DEFAULT 1,
    -- Pipelines (see src/pipeline): procedures called once per run when it is over, the
    -- tasks (ids) a successful run starts a cycle of and the tasks whose success this
    -- one's cycles wait for; the run that asked for a cycle of this task not yet started
    -- (its next run takes the request).
    on_success          regprocedure,
    on_failure          regprocedure,
    then_tasks          int[] NOT NULL DEFAULT '{}',
    depends_on          int[] NOT NULL DEFAULT '{}',
    cycle_requested_by  bigint,
    CHECK ((call IS NULL) <> (statement IS NULL))
);

-- One row per unit of work. Items are never moved between tables: a status change is
-- one UPDATE in the same transaction as the item's effects. No foreign key to tasks:
-- its check, one lookup per inserted row, made plan() of 1M keys 25-30% slower (8.4 s
-- against 6.4-6.9 s); drop_task deletes a task's items itself (its groups and runs go
-- with it by ON DELETE CASCADE).
CREATE TABLE chunkwise.items (
    item_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         int NOT NULL,
    key             bigint NOT NULL,
    hi              bigint,
    priority        bigint NOT NULL DEFAULT 0,
    group_key       text,
    payload         jsonb,
    -- An array constant, not IN (...): every INSERT re-reads its table's CHECKs from
    -- the catalog, and an IN list is an array expression folded again each time (with
    -- an executor of its own), a sixth of a single enqueue's cost.
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status = ANY ('{pending,done,dead,skipped}'::text[])),
    attempts        int NOT NULL DEFAULT 0,
    not_before      timestamptz NOT NULL DEFAULT now(),
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    run_id          bigint,
    last_sqlstate   text,
    last_error      text,
    last_failed_at  timestamptz
);

-- The claim walks this partial index in (priority, item_id) order: it holds only
-- pending items, so its cost does not grow with the number of finished ones.
CREATE INDEX items_claim_idx ON chunkwise.items (task_id, priority, item_id)
    WHERE status = 'pending';
-- Re-planning a key that is still pending updates it instead of adding a twin.
CREATE UNIQUE INDEX items_pending_key_idx ON chunkwise.items (task_id, key)
    WHERE status = 'pending';
-- Progress, throughput over the last minute and per-run counts read finished items by time.
CREATE INDEX items_done_idx ON chunkwise.items (task_id, finished_at)
    WHERE status = 'done';
-- Retention finds old skipped items (rare: one per skip()) without reading the others.
CREATE INDEX items_skipped_idx ON chunkwise.items (task_id, finished_at)
    WHERE status = 'skipped';
-- chunkwise.failures lists items that failed at least once and are not done.
CREATE INDEX items_failed_idx ON chunkwise.items (task_id, last_failed_at)
    WHERE last_failed_at IS NOT NULL AND status IN ('pending', 'dead');

-- Sequential groups: one row per group of a task with sequential_groups. Each worker
-- walks the groups in group_key order, round-robin, taking the head item of the next
-- group whose head is due (so a big group cannot starve small ones), and keeps the
-- group's row locked while it runs the head: at most one item of a group is in flight,
-- and a group's items run in order. `open` counts its pending and dead items, so that
-- finished groups are passed over; it is in no index, so updating it is a HOT update.
CREATE TABLE chunkwise.groups (
    task_id   int NOT NULL REFERENCES chunkwise.tasks ON DELETE CASCADE,
    group_key text NOT NULL,
    open      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, group_key)
);
-- A group's head: its first item not yet done or skipped, in (priority, item_id) order.
-- Items without a group (every item of a task without sequential groups) stay out: they
-- would cost each enqueue and plan one more index insert for nothing.
CREATE INDEX items_group_head_idx ON chunkwise.items (task_id, group_key, priority, item_id)
    WHERE status IN ('pending', 'dead') AND group_key IS NOT NULL;

-- One row per run, written by its workers in their own transactions (the caller of
-- run() cannot commit before the run ends). Whether a run is still live is read from
-- the workers' own sessions (below), so a run whose workers died is never shown as
-- running (chunkwise.runs is the view DBAs read).
CREATE TABLE chunkwise.run_history (
    run_id            bigint PRIMARY KEY,
    task_id           int NOT NULL REFERENCES chunkwise.tasks ON DELETE CASCADE,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz,
    workers_requested int NOT NULL,
    workers_started   int NOT NULL DEFAULT 0,
    workers_exited    int NOT NULL DEFAULT 0,
    max_items         bigint,
    processed         bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    dead              bigint NOT NULL DEFAULT 0,
    cancelled         boolean NOT NULL DEFAULT false,
    -- What follows the run once it is over (see src/pipeline): 'armed' until its outcome
    -- is decided, its callback called and its downstream cycles asked for, all in one
    -- transaction ('done'), or until its callback failed max_attempts times ('gave_up').
    outcome             text CHECK (outcome IN ('succeeded', 'failed')),
    followup            text CHECK (followup IN ('armed', 'done', 'gave_up')),
    followup_attempts   int NOT NULL DEFAULT 0,
    followup_not_before timestamptz,
    followup_error      text
);
CREATE INDEX run_history_task_idx ON chunkwise.run_history (task_id, started_at);

CREATE SEQUENCE chunkwise.run_id_seq AS bigint;

-- Each worker's session, recorded by the worker itself when it starts and removed when
-- it exits: which run a live 'chunkwise worker' backend belongs to. A row counts only
-- while pg_stat_activity shows a chunkwise worker with that pid and start time, so rows
-- left by a crash (or a reused pid) mean nothing. Nothing a target can write
-- (application_name, say) decides whether a run is alive.
CREATE TABLE chunkwise.worker_sessions (
    pid           int PRIMARY KEY,
    run_id        bigint NOT NULL,
    backend_start timestamptz NOT NULL
);

-- pg_dump keeps the user's tasks, queue and history.
SELECT pg_catalog.pg_extension_config_dump('chunkwise.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('chunkwise.items', '');
SELECT pg_catalog.pg_extension_config_dump('chunkwise.run_history', '');
SELECT pg_catalog.pg_extension_config_dump('chunkwise.groups', '');

REVOKE ALL ON chunkwise.tasks, chunkwise.items, chunkwise.run_history, chunkwise.groups,
              chunkwise.worker_sessions FROM PUBLIC;
REVOKE ALL ON SEQUENCE chunkwise.run_id_seq FROM PUBLIC;

-- Who sees a task in the views: members of its owner role and of pg_monitor. One SQL
-- function, so that every view applies the same rule; like every function here it runs
-- with a pinned search_path, whatever the caller's.
-- A task's owner: its anchor's owner (REASSIGN OWNED moves it), else the creator.
CREATE FUNCTION chunkwise._owner(anchor regtype, creator oid) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT d.typowner FROM pg_catalog.pg_type d WHERE d.oid = anchor), creator)
$$;

CREATE FUNCTION chunkwise._visible(owner oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pg_has_role(owner, 'USAGE') OR pg_catalog.pg_has_role('pg_monitor', 'USAGE')
$$;

-- Live workers: the sessions workers recorded, as pg_stat_activity shows them now (the
-- query column names the item in flight).
CREATE VIEW chunkwise._live_workers WITH (security_barrier) AS
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

-- Why a worker waits instead of claiming: workers publish
-- 'task <name>: throttled by <reason>; <n> items done' as their query while a gate is
-- closed or max_rate holds them back. NULL for a worker that is not throttled.
CREATE FUNCTION chunkwise._throttle_reason(state text, query text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN state IS DISTINCT FROM 'active'
                THEN substring(query FROM ': throttled by (.*); [0-9]+ items done$') END
$$;

CREATE VIEW chunkwise.task_status WITH (security_barrier) AS
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

CREATE VIEW chunkwise.failures WITH (security_barrier) AS
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

-- Every run, with its state: running while one of its workers is alive; otherwise
-- cancelled, interrupted (a worker died without saying goodbye: crash, restart, kill -9)
-- or finished.
CREATE VIEW chunkwise.runs WITH (security_barrier) AS
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

-- Every live worker and what it is doing. Workers publish
-- 'task <name>: key <k> (item <id>); <n> items done' as their current query.
CREATE VIEW chunkwise.workers WITH (security_barrier) AS
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

-- Items by task and priority tier (priority / 10^12: the activity tier of
-- plan_by_activity; 0 for plain priorities).
CREATE VIEW chunkwise.priority_summary WITH (security_barrier) AS
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

-- Owners as dependencies. A task's anchor domain belongs to its owner, so PostgreSQL
-- refuses DROP ROLE of an owner, and REASSIGN OWNED hands the anchor (and so the task,
-- see chunkwise._owner) over. When DROP OWNED (or DROP DOMAIN) drops an anchor, this
-- drops its task with its queue and history. It runs as the extension owner with a
-- pinned search_path, whoever runs the DDL.
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

GRANT SELECT ON chunkwise.task_status, chunkwise.failures, chunkwise.runs, chunkwise.workers,
                chunkwise.priority_summary, chunkwise.pipeline, chunkwise.run_throughput TO PUBLIC;
