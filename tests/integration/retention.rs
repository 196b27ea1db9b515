//! Retention: a task's done and skipped items and finished runs older than its
//! `retain_done` / `retain_runs` go at the end of its runs, a bounded batch at a time;
//! pending and dead items never do.

use crate::fixtures::{bump_task, run_task};
use crate::harness::{column, one, queue_snapshot, sql_error, test_db};

/// Items of task `bump` by status, as `status=count` pairs in status order.
fn items_by_status(db: &mut postgres::Client) -> String {
    one(
        db,
        "SELECT string_agg(status || '=' || n, ' ' ORDER BY status) \
           FROM (SELECT status, count(*) AS n FROM chunkwise.items GROUP BY status) s",
    )
}

#[test]
fn old_finished_items_and_runs_go_at_the_end_of_a_run_in_bounded_batches() {
    let mut db = test_db("retention");
    bump_task(&mut db, 30, 0.0);
    // Key 7 dies on its first attempt.
    db.batch_execute(
        "SELECT chunkwise.alter_task('bump', retain_done => '1 hour', retain_runs => '1 hour', max_attempts => 1);
         CREATE OR REPLACE PROCEDURE bump(k bigint) LANGUAGE plpgsql AS $$
         BEGIN
           IF k = 7 THEN RAISE EXCEPTION 'seven'; END IF;
           UPDATE counters SET n = n + 1 WHERE counters.k = bump.k;
         END $$;",
    )
    .unwrap();
    let first = run_task(&mut db, "bump", Some(2));
    let first_run: i64 = first.get("run_id");
    assert_eq!(items_by_status(&mut db), "dead=1 done=29");

    // Age everything by two hours, and add 25,000 old done items of the past: more than
    // one run's end removes.
    db.batch_execute(
        "UPDATE chunkwise.items SET finished_at = finished_at - interval '2 hours', \
                                    last_failed_at = last_failed_at - interval '2 hours';
         UPDATE chunkwise.run_history SET started_at = started_at - interval '2 hours', \
                                          finished_at = finished_at - interval '2 hours';
         INSERT INTO chunkwise.items (task_id, key, status, finished_at)
         SELECT t.task_id, 1000 + g, 'done', now() - interval '3 hours' - g * interval '1 second'
           FROM chunkwise.tasks t, generate_series(1, 25000) g WHERE t.task = 'bump';
         SELECT chunkwise.plan('bump', 'SELECT generate_series(100, 104)::bigint AS key');",
    )
    .unwrap();
    let kept: (i64, i64) = crate::harness::two(
        &mut db,
        "SELECT kept_items, kept_runs FROM chunkwise.task_status WHERE task = 'bump'",
    );
    assert_eq!(kept, (25_029, 1), "task_status shows what retention keeps");

    run_task(&mut db, "bump", Some(2));
    // 10,000 of the oldest done items went, the dead and the pending never do; the
    // five new ones are done and young.
    assert_eq!(items_by_status(&mut db), "dead=1 done=15034");
    let oldest_left: i64 = one(
        &mut db,
        "SELECT min(key) FROM chunkwise.items WHERE status = 'done' AND key > 1000",
    );
    assert_eq!(
        oldest_left, 1001,
        "the oldest went first: keys 16001 to 26000"
    );
    let runs: Vec<i64> = column(&mut db, "SELECT run_id FROM chunkwise.runs ORDER BY run_id");
    assert!(!runs.contains(&first_run), "the old run went: {runs:?}");
    assert_eq!(runs.len(), 1);

    // Two more runs work the old backlog off (15,029 rows older than an hour); what is
    // young stays: the five planned above and key 200, run twice.
    for _ in 0..2 {
        db.batch_execute("SELECT chunkwise.enqueue('bump', 200)")
            .unwrap();
        run_task(&mut db, "bump", Some(1));
    }
    assert_eq!(items_by_status(&mut db), "dead=1 done=7");
}

#[test]
fn retention_settings_are_checked() {
    let mut db = test_db("retention_input");
    bump_task(&mut db, 3, 0.0);
    let before = queue_snapshot(&mut db);
    for (sql, code) in [
        (
            "SELECT chunkwise.alter_task('bump', retain_done => '-1 day')",
            "22023",
        ),
        (
            "SELECT chunkwise.alter_task('bump', retain_runs => '-1 second')",
            "22023",
        ),
        (
            "SELECT chunkwise.create_task('x', statement => 'SELECT $1', retain_done => NULL)",
            "22004",
        ),
        (
            "SELECT chunkwise.alter_task('bump', retain_done => 'a week')",
            "22007",
        ),
    ] {
        let (found, message, hint) = sql_error(db.batch_execute(sql));
        assert_eq!(found, code, "{sql}: {message}");
        if code != "22007" {
            assert!(!hint.is_empty(), "{sql}: a hint");
        }
    }
    assert_eq!(
        queue_snapshot(&mut db),
        before,
        "refused calls change nothing"
    );
}
