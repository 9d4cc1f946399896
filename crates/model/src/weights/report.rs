//! How many bytes of weights a loaded component keeps resident, by storage format.

use std::collections::BTreeMap;

/// Tensors, parameters and resident bytes of one storage format (`F32`, `BF16`, `F8_E4M3`, `Q8_0`, `Q4_K`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatUsage {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

/// Resident weight memory of a component, by format, as the loader handed the tensors to the model.
///
/// The bytes are those of the tensors the model keeps (stage-dtype copies for dense tensors, the file's blocks
/// for quantized and fp8 ones); transient buffers (a layer's weight dequantized for one matmul) are not included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub by_format: BTreeMap<String, FormatUsage>,
}

impl MemoryReport {
    /// Records one tensor of `params` values held in `bytes` bytes of `format`.
    pub fn add(&mut self, format: &str, params: u64, bytes: u64) {
        let u = self.by_format.entry(format.to_string()).or_default();
        u.tensors += 1;
        u.params += params;
        u.bytes += bytes;
    }

    /// Adds every entry of `other`.
    pub fn merge(&mut self, other: &MemoryReport) {
        for (f, u) in &other.by_format {
            let e = self.by_format.entry(f.clone()).or_default();
            e.tensors += u.tensors;
            e.params += u.params;
            e.bytes += u.bytes;
        }
    }

    /// `(format, tensors, params, bytes)` per format, in format order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, usize, u64, u64)> {
        self.by_format
            .iter()
            .map(|(f, u)| (f.as_str(), u.tensors, u.params, u.bytes))
    }

    pub fn total_bytes(&self) -> u64 {
        self.by_format.values().map(|u| u.bytes).sum()
    }

    pub fn total_params(&self) -> u64 {
        self.by_format.values().map(|u| u.params).sum()
    }

    /// Average bits per parameter over all weights.
    pub fn bits_per_param(&self) -> f64 {
        let p = self.total_params();
        if p == 0 {
            return 0.0;
        }
        self.total_bytes() as f64 * 8.0 / p as f64
    }
}

/// `1.23 GiB` style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

impl std::fmt::Display for MemoryReport {
    /// `1.50 GiB in 1933 tensors (20.43 G params, 4.52 bits/param): Q4_K 1.2 GiB (840), F32 ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tensors: usize = self.by_format.values().map(|u| u.tensors).sum();
        write!(
            f,
            "{} in {tensors} tensors ({:.3} G params, {:.2} bits/param)",
            human_bytes(self.total_bytes()),
            self.total_params() as f64 / 1e9,
            self.bits_per_param()
        )?;
        let mut formats: Vec<_> = self.by_format.iter().collect();
        formats.sort_by_key(|f| std::cmp::Reverse(f.1.bytes));
        for (i, (name, u)) in formats.into_iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{name} {} ({})", human_bytes(u.bytes), u.tensors)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_display() {
        let mut r = MemoryReport::default();
        r.add("Q8_0", 64, 68);
        r.add("Q8_0", 32, 34);
        r.add("F32", 10, 40);
        assert_eq!(r.total_bytes(), 142);
        assert_eq!(r.total_params(), 106);
        assert_eq!(r.by_format["Q8_0"].tensors, 2);
        let s = r.to_string();
        assert!(s.starts_with("142 B in 3 tensors"), "{s}");
        assert!(s.contains("Q8_0 102 B (2), F32 40 B (1)"), "{s}");
        let mut all = MemoryReport::default();
        all.merge(&r);
        all.merge(&r);
        assert_eq!(all.total_bytes(), 284);
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
