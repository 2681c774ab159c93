//! A read-bandwidth probe: the least work that still reads every byte once, through the same
//! chunking and thread pool as the real reduction. Benchmarks use it as the roofline a one-pass
//! penalty cannot beat on the machine and in the run at hand; it is not part of the stable API.

use crate::accumulate::Partial;
use crate::parallel;

#[derive(Clone, Copy, Default)]
struct Xor(u64);

impl Partial for Xor {
    fn merge(self, other: Self) -> Self {
        Self(self.0 ^ other.0)
    }
    fn finish(self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// XOR of all 8-byte words of `words` (one vector instruction per 32-64 bytes: memory-bound).
pub fn read_probe(words: &[u64]) -> u64 {
    parallel::reduce(words.len(), size_of::<u64>(), &|range| {
        Xor(words[range].iter().fold(0, |acc, &word| acc ^ word))
    })
    .0
}
