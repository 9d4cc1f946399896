//! `torch.randn` with `torch.Generator("cpu").manual_seed(seed)` in float32, bit-for-bit up to libm rounding
//! (see shared/reference/torch-cpu-randn.md): MT19937 seeded with the low 32 bits of the seed, one 24-bit
//! uniform per 32-bit draw, and torch's `normal_fill` Box-Muller over blocks of 16.

/// MT19937 (32-bit) exactly as torch's `mt19937` engine.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; Self::N],
    index: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;
    const MATRIX_A: u32 = 0x9908_b0df;
    const UPPER_MASK: u32 = 0x8000_0000;
    const LOWER_MASK: u32 = 0x7fff_ffff;

    /// `init_genrand(seed)`.
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; Self::N];
        state[0] = seed;
        for i in 1..Self::N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: Self::N,
        }
    }

    fn twist(&mut self) {
        for i in 0..Self::N {
            let y = (self.state[i] & Self::UPPER_MASK)
                | (self.state[(i + 1) % Self::N] & Self::LOWER_MASK);
            let mag = if y & 1 == 1 { Self::MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// Next tempered 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A CPU generator whose stream continues across calls, like a `torch.Generator` reused by a pipeline.
#[derive(Clone)]
pub struct TorchCpuGenerator {
    mt: Mt19937,
}

/// `normal_fill` needs at least one block of 16 values; torch takes a different scalar path below that.
pub const MIN_RANDN_ELEMENTS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("torch-compatible randn needs at least {MIN_RANDN_ELEMENTS} elements, got {0}")]
pub struct TooFewElements(pub usize);

impl TorchCpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: only the low 32 bits of the seed matter.
    pub fn new(seed: u64) -> Self {
        Self {
            mt: Mt19937::new(seed as u32),
        }
    }

    /// A float32 uniform in [0, 1): 24 random bits times 2^-24.
    fn uniform(&mut self) -> f32 {
        (self.mt.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `torch.randn(n)` (any shape with n elements, row-major). Errors for n < 16.
    pub fn randn(&mut self, n: usize) -> Result<Vec<f32>, TooFewElements> {
        if n < MIN_RANDN_ELEMENTS {
            return Err(TooFewElements(n));
        }
        let mut d: Vec<f32> = (0..n).map(|_| self.uniform()).collect();
        let mut i = 0;
        while i + 16 <= n {
            box_muller_16(&mut d[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) {
            let tail = &mut d[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform();
            }
            box_muller_16(tail);
        }
        Ok(d)
    }
}

/// torch `normal_fill_16`: pairs (j, j+8) of a 16-block become `r cos θ`, `r sin θ`.
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let r = (-2.0f32 * u1.ln()).sqrt();
        let theta = 2.0f32 * std::f32::consts::PI * u2;
        d[j] = r * theta.cos();
        d[j + 8] = r * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_output() {
        // The C reference mt19937ar with init_genrand(5489) starts 3499211612, 581869302.
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        assert_eq!(mt.next_u32(), 581_869_302);
    }

    #[test]
    fn seed_zero_matches_torch() {
        let v = TorchCpuGenerator::new(0).randn(64).expect("64 >= 16");
        let expected = [-1.125_839_8f32, -1.152_360_2, -0.250_578_58, -0.433_878_8];
        for (a, b) in v.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn only_low_32_bits_of_the_seed_count() {
        let a = TorchCpuGenerator::new(7).randn(32).expect("32 >= 16");
        let b = TorchCpuGenerator::new(7 + (1u64 << 32))
            .randn(32)
            .expect("32 >= 16");
        assert_eq!(a, b);
    }

    #[test]
    fn small_tensors_are_refused() {
        assert_eq!(TorchCpuGenerator::new(0).randn(15), Err(TooFewElements(15)));
    }

    #[test]
    fn matches_noise_saved_from_torch() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny/refs/t2i_64"
        );
        let bytes = std::fs::read(format!("{dir}/tensors.safetensors")).expect("fixture present");
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(format!("{dir}/manifest.json")).expect("manifest present"),
        )
        .expect("manifest is JSON");
        let seed = manifest["args"]["seed"].as_u64().expect("args.seed");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let view = st.tensor("rng.0").expect("rng.0");
        let expected: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ours = TorchCpuGenerator::new(seed)
            .randn(expected.len())
            .expect("latent noise is large");
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "max abs difference {worst}");
    }

    #[test]
    fn stream_continues_across_calls() {
        let mut g = TorchCpuGenerator::new(3);
        let first = g.randn(32).expect("32");
        let second = g.randn(32).expect("32");
        let both = TorchCpuGenerator::new(3).randn(64).expect("64");
        assert_eq!([first, second].concat(), both);
    }
}
