//! A run's throughput as a small inline SVG line: items done per second over the run,
//! in at most `BUCKETS` steps. Server-drawn, so the page needs no chart library.

use maud::{Markup, html};

const WIDTH: f64 = 160.0;
const HEIGHT: f64 = 32.0;
const BUCKETS: usize = 40;

/// Items per second in each of up to `buckets` equal slices of a run `seconds` long,
/// from (second of the run, items done in it) points.
pub fn rates(points: &[(i32, i64)], seconds: f64, buckets: usize) -> Vec<f64> {
    let last_second = points.iter().map(|&(s, _)| s).max().unwrap_or(0).max(0) as f64;
    let span = seconds.max(last_second + 1.0).ceil().max(1.0);
    let count = buckets.min(span as usize).max(1);
    let width = span / count as f64;
    let mut items = vec![0.0; count];
    for &(second, done) in points {
        let slot = ((second.max(0) as f64 / width) as usize).min(count - 1);
        items[slot] += done as f64;
    }
    items.into_iter().map(|n| n / width).collect()
}

/// The line's points in SVG coordinates (y grows downwards; the peak touches the top).
fn polyline(rates: &[f64]) -> String {
    let peak = rates.iter().cloned().fold(0.0, f64::max);
    let step = if rates.len() > 1 {
        WIDTH / (rates.len() - 1) as f64
    } else {
        0.0
    };
    rates
        .iter()
        .enumerate()
        .map(|(i, rate)| {
            let y = if peak > 0.0 {
                HEIGHT - 1.0 - (rate / peak) * (HEIGHT - 2.0)
            } else {
                HEIGHT - 1.0
            };
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The chart of one run; `None` when none of its items are kept (retention removed
/// them, or nothing was done).
pub fn throughput(points: &[(i32, i64)], seconds: f64) -> Option<Markup> {
    if points.is_empty() {
        return None;
    }
    let rates = rates(points, seconds, BUCKETS);
    let peak = rates.iter().cloned().fold(0.0, f64::max);
    let label = format!("items per second over the run, peak {peak:.1}/s");
    Some(html! {
        svg class="spark" width=(WIDTH) height=(HEIGHT) viewBox=(format!("0 0 {WIDTH} {HEIGHT}"))
            role="img" aria-label=(label) {
            title { (label) }
            polyline points=(polyline(&rates)) fill="none" stroke="currentColor" stroke-width="1.5" {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_run_gets_one_bucket_per_second() {
        assert_eq!(rates(&[(0, 5), (2, 7)], 3.0, 40), vec![5.0, 0.0, 7.0]);
    }

    #[test]
    fn a_long_run_is_folded_into_equal_buckets() {
        // 100 s at 2 items/s in 40 buckets of 2.5 s: 2 items/s in every bucket.
        let points: Vec<(i32, i64)> = (0..100).map(|s| (s, 2)).collect();
        let r = rates(&points, 100.0, 40);
        assert_eq!(r.len(), 40);
        let total: f64 = r.iter().map(|x| x * 2.5).sum();
        assert!((total - 200.0).abs() < 1e-9, "items kept: {total}");
        assert!(r.iter().all(|&x| (x - 2.0).abs() < 0.5), "{r:?}");
    }

    #[test]
    fn points_past_the_recorded_duration_are_kept() {
        // A running run's duration lags its newest items.
        let r = rates(&[(0, 1), (9, 4)], 5.0, 40);
        assert_eq!(r.len(), 10);
        assert_eq!(r[9], 4.0);
    }

    #[test]
    fn the_peak_touches_the_top_and_zero_the_bottom() {
        let line = polyline(&[0.0, 10.0, 5.0]);
        assert_eq!(line, "0.0,31.0 80.0,1.0 160.0,16.0");
        assert!(throughput(&[], 3.0).is_none());
    }
}
