//! x86-64 instantiations of the generic float kernel. Each wrapper only adds target features: the
//! body is `float_sums_generic`, inlined and vectorized for that instruction set. f16 input is
//! widened step by step in registers with F16C's `vcvtph2ps` (the only place intrinsics are needed).

use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};

use half::f16;

use super::{float_sums_generic, LANES};
use crate::accumulate::FloatPartial;
use crate::element::Float;

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn float_sums_avx512<T: Float>(run: &[T], step: usize) -> FloatPartial {
    float_sums_generic::<T, true>(run, step)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn float_sums_avx2<T: Float>(run: &[T], step: usize) -> FloatPartial {
    float_sums_generic::<T, true>(run, step)
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn f16_sums_avx512(run: &[f16], step: usize) -> FloatPartial {
    float_sums_generic::<F16c, true>(as_f16c(run), step)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_sums_avx2(run: &[f16], step: usize) -> FloatPartial {
    float_sums_generic::<F16c, true>(as_f16c(run), step)
}

/// An f16 that the kernel widens with F16C, 8 values per `vcvtph2ps`. Private to this module and
/// only used by the two wrappers above, which are compiled with F16C enabled.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct F16c(f16);

fn as_f16c(run: &[f16]) -> &[F16c] {
    // SAFETY: `F16c` is a `repr(transparent)` wrapper of `f16`: same size, alignment and validity,
    // so the slice's memory is a valid `[F16c]` of the same length for the same lifetime.
    unsafe { std::slice::from_raw_parts(run.as_ptr().cast::<F16c>(), run.len()) }
}

impl Float for F16c {
    const STEPS_PER_FOLD: usize = <f32 as Float>::STEPS_PER_FOLD;
    const EXACT_SQUARES: bool = true;

    #[inline(always)]
    fn widen_abs(self) -> f64 {
        self.0.to_f64().abs() // the < LANES elements of a tail
    }

    #[inline(always)]
    fn widen_abs_step(step: &[Self]) -> [f64; LANES] {
        debug_assert_eq!(step.len(), LANES);
        let mut halves = [0f32; LANES];
        for (source, target) in step.chunks_exact(8).zip(halves.chunks_exact_mut(8)) {
            // SAFETY: `source` is 8 f16 = 16 readable bytes and `target` 8 f32 = 32 writable
            // bytes; both intrinsics accept unaligned addresses. F16C is available: this type is
            // only reduced inside `f16_sums_avx2`/`f16_sums_avx512`, compiled with F16C, into
            // which this function is always inlined.
            unsafe {
                let packed = _mm_loadu_si128(source.as_ptr().cast::<__m128i>());
                _mm256_storeu_ps(target.as_mut_ptr(), _mm256_cvtph_ps(packed));
            }
        }
        std::array::from_fn(|lane| f64::from(halves[lane].abs()))
    }
}
