//! Bounded random testing ("fuzzing" within a test's time budget): a seeded generator, byte mutations of
//! valid inputs, and a runner that reports the case that panicked. Deterministic for a seed, so a failure
//! reproduces; not coverage-guided.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// xorshift64* (Vigna): small, fast, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A value a parser is likely to mishandle.
    pub fn edge_u64(&mut self) -> u64 {
        const EDGES: [u64; 10] = [
            0,
            1,
            2,
            255,
            256,
            65_535,
            1 << 31,
            u32::MAX as u64,
            1 << 62,
            u64::MAX,
        ];
        EDGES[self.below(EDGES.len())]
    }

    /// `seed` with 1..=4 random mutations: flipped, replaced, inserted or deleted bytes, a cut, a
    /// duplicated range, or random bytes.
    pub fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=self.below(4) {
            let len = v.len();
            match self.below(7) {
                0 if len > 0 => {
                    let i = self.below(len);
                    v[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    v[i] = [0, 0x7f, 0x80, 0xff][self.below(4)];
                }
                2 => {
                    let i = self.below(len + 1);
                    let b = self.next_u64() as u8;
                    v.insert(i, b);
                }
                3 if len > 0 => {
                    v.remove(self.below(len));
                }
                4 if len > 0 => v.truncate(self.below(len)),
                5 if len > 0 => {
                    let a = self.below(len);
                    let b = (a + 1 + self.below(64)).min(len);
                    let chunk = v[a..b].to_vec();
                    let at = self.below(v.len() + 1);
                    v.splice(at..at, chunk);
                }
                _ => {
                    let n = self.below(64);
                    v = self.bytes(n);
                }
            }
        }
        v
    }
}

/// `seed` encoded, mutated ([`Rng::mutate`]) and decoded again: `None` when the bytes no longer decode.
pub fn mutated<M: prost::Message + Default>(rng: &mut Rng, seed: &M) -> Option<M> {
    M::decode(rng.mutate(&seed.encode_to_vec()).as_slice()).ok()
}

/// Runs `case` with fresh generators (seeds `seed`, `seed + 1`, ...) until `budget` has passed or
/// `max_cases` ran; a panic fails with the seed of the case. Returns the number of cases run.
pub fn run(seed: u64, budget: Duration, max_cases: usize, mut case: impl FnMut(&mut Rng)) -> usize {
    let start = Instant::now();
    let mut n = 0;
    while n < max_cases && start.elapsed() < budget {
        let s = seed.wrapping_add(n as u64);
        let mut rng = Rng::new(s);
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| case(&mut rng))) {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            panic!("fuzz case with seed {s} panicked: {msg}");
        }
        n += 1;
    }
    n
}
