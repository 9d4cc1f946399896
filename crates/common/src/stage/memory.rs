//! The memory report of a stage: the weight bytes its model keeps resident (by component and storage
//! format, from the model crate's loader) and the process's peak resident set size, as Prometheus gauges
//! (`metric_names::WEIGHTS_RESIDENT_BYTES`, `PROCESS_PEAK_RSS_BYTES`, `PROCESS_RSS_BYTES`) and one log line
//! once the model is loaded.

use crate::metric_names as m;

/// Weights of one storage format of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsUsage {
    /// `transformer`, `text_encoder`, `vae`, `controlnet:<id>`.
    pub component: String,
    /// `F32`, `BF16`, `F8_E4M3`, `Q8_0`, `Q4_K`, ...
    pub format: String,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

impl WeightsUsage {
    pub fn new(component: &str, format: &str, tensors: usize, params: u64, bytes: u64) -> Self {
        Self {
            component: component.to_string(),
            format: format.to_string(),
            tensors,
            params,
            bytes,
        }
    }
}

/// The usage of one component from `(format, tensors, params, bytes)` entries (the model crate's
/// `MemoryReport::entries`).
pub fn usage<'a>(
    component: &str,
    entries: impl IntoIterator<Item = (&'a str, usize, u64, u64)>,
) -> Vec<WeightsUsage> {
    entries
        .into_iter()
        .map(|(f, t, p, b)| WeightsUsage::new(component, f, t, p, b))
        .collect()
}

/// Resident and peak resident set size of this process in bytes (`VmRSS`, `VmHWM` of
/// `/proc/self/status`); `None` where that file does not exist (not Linux).
pub fn rss_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Sets the RSS gauges of `service` (after loading and after every job, so the peak covers requests).
pub fn record_rss(service: &'static str) {
    if let Some((rss, peak)) = rss_bytes() {
        metrics::gauge!(m::PROCESS_RSS_BYTES, "service" => service).set(rss as f64);
        metrics::gauge!(m::PROCESS_PEAK_RSS_BYTES, "service" => service).set(peak as f64);
    }
}

/// Sets the weight gauges of `service` and logs the memory report once the model is loaded.
pub fn record_weights(service: &'static str, usage: &[WeightsUsage]) {
    for u in usage {
        metrics::gauge!(m::WEIGHTS_RESIDENT_BYTES, "service" => service,
            "component" => u.component.clone(), "format" => u.format.clone())
        .set(u.bytes as f64);
    }
    record_rss(service);
    let total: u64 = usage.iter().map(|u| u.bytes).sum();
    let params: u64 = usage.iter().map(|u| u.params).sum();
    let formats = usage
        .iter()
        .map(|u| {
            format!(
                "{} {} {} ({} tensors)",
                u.component,
                u.format,
                mib(u.bytes),
                u.tensors
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let (rss, peak) = rss_bytes().unwrap_or((0, 0));
    tracing::info!(
        stage = service,
        weights_bytes = total,
        params,
        rss_bytes = rss,
        peak_rss_bytes = peak,
        "memory: weights {} resident ({formats}); process RSS {}, peak {}",
        mib(total),
        mib(rss),
        mib(peak)
    );
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_from_proc() {
        let (rss, peak) = rss_bytes().expect("Linux /proc/self/status");
        assert!(rss > 0 && peak >= rss, "rss {rss} peak {peak}");
        // growing the process raises the peak to at least the new size
        let big = vec![1u8; 64 << 20];
        let (_, after) = rss_bytes().expect("status");
        assert!(after >= 64 << 20, "peak {after} below a 64 MiB allocation");
        drop(big);
    }
}
