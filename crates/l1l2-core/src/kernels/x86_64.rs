//! x86-64 instruction sets: one wrapper each that only adds target features and runs a generic
//! [`Kernel`] inside them, F16C widening and the software prefetch (the only places intrinsics
//! are needed).

use std::arch::x86_64::{
    __m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128, _mm_prefetch, _MM_HINT_T1,
};

use half::f16;

use super::{Kernel, Target, LANES};

/// AVX-512F with AVX2, FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

/// AVX2 with FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

impl Target for Avx512 {
    const FMA: bool = true;
    const F16C: bool = true;
}

impl Target for Avx2 {
    const FMA: bool = true;
    const F16C: bool = true;
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn run_avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<Avx512>()
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn run_avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<Avx2>()
}

/// `|x|` of one step of `LANES` f16 values, widened 8 at a time by `vcvtph2ps`.
///
/// # Safety
/// The CPU must have F16C. Callers check `I::F16C` of a [`Target`] whose kernels only run inside
/// `run_avx2`/`run_avx512` (which `dispatch` calls after detecting F16C); this function is always
/// inlined into them.
#[inline(always)]
pub(crate) unsafe fn widen_abs_f16c(step: &[f16]) -> [f64; LANES] {
    debug_assert_eq!(step.len(), LANES);
    let mut halves = [0f32; LANES];
    for (source, target) in step.chunks_exact(8).zip(halves.chunks_exact_mut(8)) {
        // SAFETY: `source` is 8 f16 = 16 readable bytes and `target` 8 f32 = 32 writable bytes;
        // both intrinsics accept unaligned addresses; F16C is available (the caller's contract).
        unsafe {
            let packed = _mm_loadu_si128(source.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(target.as_mut_ptr(), _mm256_cvtph_ps(packed));
        }
    }
    std::array::from_fn(|lane| f64::from(halves[lane].abs()))
}

/// Asks the CPU to bring the cache line at `address` into L2 (SSE's `prefetcht1`, part of every
/// x86-64 CPU). Any address will do: a prefetch never faults, and past the end of a slice it only
/// fetches a line nobody reads.
#[inline(always)]
pub(crate) fn prefetch(address: *const u8) {
    // SAFETY: a prefetch is a hint: it reads nothing into the program's state, never faults (an
    // unmapped address is ignored) and writes nothing, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(address.cast::<i8>()) }
}
