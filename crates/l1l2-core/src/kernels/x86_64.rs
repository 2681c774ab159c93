//! x86-64 instantiations of the generic float kernel. Each wrapper only adds target features: the
//! body is `float_sums_generic`, inlined and vectorized for that instruction set.

use super::float_sums_generic;
use crate::accumulate::FloatPartial;
use crate::element::Float;

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn float_sums_avx512<T: Float>(run: &[T]) -> FloatPartial {
    float_sums_generic(run)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn float_sums_avx2<T: Float>(run: &[T]) -> FloatPartial {
    float_sums_generic(run)
}
