//! One row per scenario: requests, completions, errors by code, latency percentiles (of completed
//! requests, from the call to the result, waiting included), throughput and peak RSS per service.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::load::Outcome;

/// A finished scenario.
#[derive(Debug)]
pub struct Row {
    pub name: String,
    pub clients: usize,
    pub outcomes: Vec<Outcome>,
    pub wall: Duration,
    /// Peak RSS (bytes) per service.
    pub peaks: BTreeMap<String, u64>,
    /// What the scenario checked beyond the counts (failover seen, identical PNGs, RSS drift).
    pub notes: Vec<String>,
    /// Whether the scenario met its goal.
    pub ok: bool,
}

/// Nearest-rank percentile of sorted `v` (`p` in (0, 1]).
pub fn percentile(v: &[Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1024.0 * 1024.0))
}

impl Row {
    pub fn completed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.result.is_ok()).count()
    }

    /// Failures counted by gRPC code name.
    pub fn errors(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in &self.outcomes {
            if let Err((code, _)) = &o.result {
                *m.entry(format!("{code:?}")).or_insert(0) += 1;
            }
        }
        m
    }

    fn latencies(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| o.latency)
            .collect();
        v.sort();
        v
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

/// The Markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | clients | requests | completed | errors by code | p50 s | p95 s | p99 s | images/s | peak RSS MiB (text-encoder / denoiser / vae / gateway) | checks |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let lat = r.latencies();
        let errors = r.errors();
        let errors = if errors.is_empty() {
            "none".to_string()
        } else {
            errors
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let peak = |k: &str| r.peaks.get(k).map_or("-".into(), |b| mib(*b));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} / {} / {} / {} | {}{} |",
            r.name,
            r.clients,
            r.outcomes.len(),
            r.completed(),
            errors,
            secs(percentile(&lat, 0.50)),
            secs(percentile(&lat, 0.95)),
            secs(percentile(&lat, 0.99)),
            r.completed() as f64 / r.wall.as_secs_f64().max(1e-9),
            peak("text-encoder"),
            peak("denoiser"),
            peak("vae"),
            peak("gateway"),
            if r.ok { "ok" } else { "FAILED" },
            if r.notes.is_empty() {
                String::new()
            } else {
                format!(": {}", r.notes.join("; "))
            },
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_secs).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_secs(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_secs(99)));
        assert_eq!(
            percentile(&v[..1], 0.95),
            Some(Duration::from_secs(1)),
            "one sample is every percentile"
        );
        assert_eq!(percentile(&[], 0.5), None);
    }
}
