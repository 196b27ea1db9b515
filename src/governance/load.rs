//! `max_load`: the machine's load, as `uptime` shows it, per core.
//!
//! The 1-minute load average of /proc/loadavg (runnable and uninterruptible processes,
//! averaged by the kernel) divided by the cores online. It follows a change within
//! seconds and settles within about a minute: a gate for sustained load, not for
//! spikes. `chunkwise.loadavg_file` points elsewhere where the machine's figure lives in
//! another file (a container's LXCFS view) and in tests.

use crate::gucs;

/// The load per core now, or why it cannot be read.
pub fn load_per_core() -> Result<f64, String> {
    let path = gucs::loadavg_file();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let average = parse_one_minute_average(&text)
        .ok_or_else(|| format!("{path} does not start with a load average"))?;
    Ok(average / cores() as f64)
}

/// The first field of a /proc/loadavg line.
fn parse_one_minute_average(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_field_is_the_one_minute_average() {
        assert_eq!(
            parse_one_minute_average("2.50 1.20 0.80 3/412 12345\n"),
            Some(2.5)
        );
        assert_eq!(parse_one_minute_average("0.00 0.01 0.05 1/99 7"), Some(0.0));
        assert_eq!(parse_one_minute_average(""), None);
        assert_eq!(parse_one_minute_average("load 1 2"), None);
        assert_eq!(parse_one_minute_average("-1 0 0"), None);
    }
}
