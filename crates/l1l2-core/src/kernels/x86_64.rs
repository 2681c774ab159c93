//! x86-64 instantiations of the generic float kernel. Each wrapper only adds target features: the
//! body is `float_sums_generic`, inlined and vectorized for that instruction set. f16 input is
//! widened with F16C's `vcvtph2ps` first (the only place intrinsics are needed).

use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};

use half::f16;

use super::{float_sums_generic, staged_f16_sums};
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
    staged_f16_sums::<true>(run, step, |block, out| widen_f16c(block, out))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_sums_avx2(run: &[f16], step: usize) -> FloatPartial {
    staged_f16_sums::<true>(run, step, |block, out| widen_f16c(block, out))
}

/// `out[i] = block[i]` as f32, eight at a time with `vcvtph2ps` (exact).
#[target_feature(enable = "avx,f16c")]
fn widen_f16c(block: &[f16], out: &mut [f32]) {
    let mut sources = block.chunks_exact(8);
    let mut targets = out.chunks_exact_mut(8);
    for (source, target) in sources.by_ref().zip(targets.by_ref()) {
        // SAFETY: `source` is 8 f16 = 16 readable bytes and `target` 8 f32 = 32 writable bytes;
        // both intrinsics accept unaligned addresses; F16C and AVX are enabled on this function.
        unsafe {
            let halves = _mm_loadu_si128(source.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(target.as_mut_ptr(), _mm256_cvtph_ps(halves));
        }
    }
    for (source, target) in sources.remainder().iter().zip(targets.into_remainder()) {
        *target = source.to_f32();
    }
}
