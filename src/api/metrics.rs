//! `chunkwise.metrics()`: the monitoring views' figures in the Prometheus text
//! exposition format (version 0.0.4), for an exporter's custom query or a scrape script.
//! It reads the views as the caller, so it shows the tasks the caller may see.

use std::fmt::Write;

use pgrx::prelude::*;

use crate::always_on::{self, LATENCY_BUCKETS, PoolFigures};
use crate::catalog::Task;
use crate::columns::Columns;
use crate::error::{OrRaise, SqlResult};
use crate::security::{may_see, with_pinned_search_path};

/// One metric family: name, type, help, and the SQL expression giving its value per task
/// over `task_status s` joined with the task's run totals `r`.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: &'static str,
}

const FAMILIES: &[Family] = &[
    Family {
        name: "chunkwise_items_pending",
        kind: "gauge",
        help: "Items due to run now.",
        value: "s.pending",
    },
    Family {
        name: "chunkwise_items_waiting_retry",
        kind: "gauge",
        help: "Failed items waiting for their next attempt.",
        value: "s.waiting_retry",
    },
    Family {
        name: "chunkwise_items_running",
        kind: "gauge",
        help: "Items being run by a worker now.",
        value: "s.running",
    },
    Family {
        name: "chunkwise_items_done",
        kind: "gauge",
        help: "Items done and not purged.",
        value: "s.done",
    },
    Family {
        name: "chunkwise_items_dead",
        kind: "gauge",
        help: "Items that failed max_attempts times.",
        value: "s.dead",
    },
    Family {
        name: "chunkwise_workers_active",
        kind: "gauge",
        help: "Live background workers of the task.",
        value: "s.active_workers",
    },
    Family {
        name: "chunkwise_task_paused",
        kind: "gauge",
        help: "1 when the task is paused.",
        value: "s.paused::int",
    },
    Family {
        name: "chunkwise_items_per_second",
        kind: "gauge",
        help: "Items done per second over the last minute.",
        value: "coalesce(s.items_per_second, 0)",
    },
    Family {
        name: "chunkwise_runs_total",
        kind: "counter",
        help: "Runs started (purge forgets old ones: a counter reset).",
        value: "r.runs",
    },
    Family {
        name: "chunkwise_items_processed_total",
        kind: "counter",
        help: "Items done by runs (purge forgets old runs: a counter reset).",
        value: "r.processed",
    },
    Family {
        name: "chunkwise_item_failures_total",
        kind: "counter",
        help: "Failed item attempts (purge forgets old runs: a counter reset).",
        value: "r.failed",
    },
];

/// A label value as the exposition format wants it: backslash, quote and newline escaped.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[pg_extern(stable, parallel_safe)]
fn metrics() -> String {
    let run = || -> SqlResult<String> {
        let values = FAMILIES
            .iter()
            .map(|f| format!("({})::float8", f.value))
            .collect::<Vec<_>>()
            .join(", ");
        let query = format!(
            "SELECT s.task, ARRAY[{values}] AS figures \
               FROM chunkwise.task_status s \
               LEFT JOIN LATERAL (SELECT count(*) AS runs, coalesce(sum(processed), 0) AS processed, \
                                         coalesce(sum(failed), 0) AS failed \
                                    FROM chunkwise.runs WHERE runs.task = s.task) r ON true \
              ORDER BY s.task"
        );
        let rows: Vec<(String, Vec<f64>)> = Spi::connect(|client| {
            client
                .select(&query, None, &[])?
                .map(|row| Ok((row.required("task")?, row.required("figures")?)))
                .collect::<SqlResult<_>>()
        })?;
        let mut text = exposition(&rows);
        text.push_str(&pool_exposition(&visible_pools()?));
        Ok(text)
    };
    with_pinned_search_path(run).or_raise()
}

/// The always-on pools of this database whose tasks the caller may see, by task name.
fn visible_pools() -> SqlResult<Vec<(String, PoolFigures)>> {
    // SAFETY: reads this backend's database.
    let database = unsafe { pg_sys::MyDatabaseId };
    let mut pools = Vec::new();
    for figures in always_on::pool_figures(database) {
        if let Some(task) = Task::by_id(figures.task_id)?
            && may_see(task.owner)
        {
            pools.push((task.name, figures));
        }
    }
    pools.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(pools)
}

/// A pool gauge: name, help, and its value from a pool's figures.
type PoolGauge = (&'static str, &'static str, fn(&PoolFigures) -> i32);

/// The always-on pools' families: their size, idle members, and the enqueue-to-start
/// latency histogram. Nothing without pools (the library is not preloaded, or no task is
/// always-on).
fn pool_exposition(pools: &[(String, PoolFigures)]) -> String {
    let mut out = String::new();
    if pools.is_empty() {
        return out;
    }
    let gauges: [PoolGauge; 2] = [
        (
            "chunkwise_pool_workers",
            "Workers of the task's always-on pool.",
            |p| p.active,
        ),
        (
            "chunkwise_pool_workers_idle",
            "Workers of the task's always-on pool sleeping until items come.",
            |p| p.idle,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (task, figures) in pools {
            let _ = writeln!(
                out,
                "{name}{{task=\"{}\"}} {}",
                label_value(task),
                value(figures)
            );
        }
    }
    let name = "chunkwise_enqueue_to_start_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Seconds from an item's enqueue (or its retry time) to its start by an always-on pool.\n\
         # TYPE {name} histogram"
    );
    for (task, figures) in pools {
        let task = label_value(task);
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&figures.latency_buckets) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{task=\"{task}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{task=\"{task}\",le=\"+Inf\"}} {}\n\
             {name}_sum{{task=\"{task}\"}} {}\n\
             {name}_count{{task=\"{task}\"}} {}",
            figures.latency_count, figures.latency_sum, figures.latency_count
        );
    }
    out
}

/// The text exposition of the families' figures: `rows` holds each task with one figure
/// per family, in `FAMILIES` order.
fn exposition(rows: &[(String, Vec<f64>)]) -> String {
    let mut out = String::new();
    for (index, family) in FAMILIES.iter().enumerate() {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        for (task, values) in rows {
            let _ = writeln!(
                out,
                "{}{{task=\"{}\"}} {}",
                family.name,
                label_value(task),
                values.get(index).copied().unwrap_or(0.0)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_give_size_gauges_and_a_cumulative_latency_histogram() {
        assert_eq!(pool_exposition(&[]), "");
        let mut buckets = [0; LATENCY_BUCKETS.len() + 1];
        buckets[0] = 3; // <= 1 ms
        buckets[2] = 1; // <= 5 ms
        buckets[LATENCY_BUCKETS.len()] = 1; // over a minute
        let figures = PoolFigures {
            task_id: 1,
            active: 4,
            idle: 3,
            latency_buckets: buckets,
            latency_sum: 90.5,
            latency_count: 5,
        };
        let text = pool_exposition(&[("files".to_string(), figures)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"chunkwise_pool_workers{task=\"files\"} 4"));
        assert!(lines.contains(&"chunkwise_pool_workers_idle{task=\"files\"} 3"));
        assert!(lines.contains(&"# TYPE chunkwise_enqueue_to_start_seconds histogram"));
        let bucket = |le: &str| {
            lines
                .iter()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "chunkwise_enqueue_to_start_seconds_bucket{{task=\"files\",le=\"{le}\"}} "
                    ))
                })
                .map(|v| v.parse::<u64>().unwrap())
        };
        assert_eq!(bucket("0.001"), Some(3));
        assert_eq!(bucket("0.002"), Some(3));
        assert_eq!(bucket("0.005"), Some(4));
        assert_eq!(bucket("60"), Some(4));
        assert_eq!(bucket("+Inf"), Some(5));
        assert!(lines.contains(&"chunkwise_enqueue_to_start_seconds_sum{task=\"files\"} 90.5"));
        assert!(lines.contains(&"chunkwise_enqueue_to_start_seconds_count{task=\"files\"} 5"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("plain"), "plain");
        assert_eq!(label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn every_family_has_help_type_and_one_line_per_task() {
        let figures: Vec<f64> = (0..FAMILIES.len()).map(|i| i as f64 + 0.5).collect();
        let rows = vec![
            ("datamart".to_string(), figures.clone()),
            ("odd \"name\"".to_string(), figures),
        ];
        let text = exposition(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), FAMILIES.len() * 4);
        for (index, family) in FAMILIES.iter().enumerate() {
            let block = &lines[index * 4..index * 4 + 4];
            assert_eq!(block[0], format!("# HELP {} {}", family.name, family.help));
            assert_eq!(block[1], format!("# TYPE {} {}", family.name, family.kind));
            assert_eq!(
                block[2],
                format!(
                    "{}{{task=\"datamart\"}} {}",
                    family.name,
                    index as f64 + 0.5
                )
            );
            assert_eq!(
                block[3],
                format!(
                    "{}{{task=\"odd \\\"name\\\"\"}} {}",
                    family.name,
                    index as f64 + 0.5
                )
            );
        }
    }
}
