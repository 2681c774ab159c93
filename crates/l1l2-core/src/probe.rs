//! A read-bandwidth probe: the least work that still reads every byte once, through the same
//! chunking and thread pool as the real reduction. Benchmarks use it as the roofline a one-pass
//! penalty cannot beat on the machine and in the run at hand; it is not part of the stable API.
//!
//! Like the float kernel it reads from the first cache-line boundary on with many independent
//! accumulators, compiled per instruction set: a roofline must not be slowed by line-straddling
//! loads or by how the compiler happens to lay out a generic loop.

use crate::accumulate::Partial;
use crate::kernels::{dispatch, Kernel, Target};
use crate::parallel;

#[derive(Clone, Copy, Default)]
struct Xor(u64);

impl Partial for Xor {
    fn merge(self, other: Self) -> Self {
        Self(self.0 ^ other.0)
    }
    fn repeat(self, copies: u64) -> Self {
        Self(if copies % 2 == 1 { self.0 } else { 0 }) // x ^ x = 0
    }
    fn finish(self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// XOR of all 8-byte words of `words` (one vector instruction per 16-64 bytes: memory-bound).
pub fn read_probe(words: &[u64]) -> u64 {
    parallel::reduce(words.len(), size_of::<u64>(), &|range| {
        Xor(xor_words(&words[range]))
    })
    .0
}

fn xor_words(words: &[u64]) -> u64 {
    dispatch(XorWords(words))
}

struct XorWords<'a>(&'a [u64]);

impl Kernel for XorWords<'_> {
    type Output = u64;
    /// Words before the first 64-byte boundary, then the rest as one XOR fold, which LLVM's loop
    /// vectorizer unrolls over independent vector accumulators for the ISA at hand.
    #[inline(always)]
    fn run<I: Target>(self) -> u64 {
        let words = self.0;
        let (head, body) = words.split_at(words.as_ptr().align_offset(64).min(words.len()));
        let xor = |words: &[u64]| words.iter().fold(0, |total, word| total ^ word);
        xor(head) ^ xor(body)
    }
}
