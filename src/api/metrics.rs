//! `chunkwise.metrics()`: the monitoring views' figures in the Prometheus text
//! exposition format (version 0.0.4), for an exporter's custom query or a scrape script.
//! It reads the views as the caller, so it shows the tasks the caller may see.

use std::fmt::Write;

use pgrx::prelude::*;

use crate::columns::Columns;
use crate::error::{OrRaise, SqlResult};
use crate::security::with_pinned_search_path;

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
        Ok(exposition(&rows))
    };
    with_pinned_search_path(run).or_raise()
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
