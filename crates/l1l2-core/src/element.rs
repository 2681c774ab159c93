//! The element types the library reads, and what each one needs: how to reduce one contiguous
//! run, how its result is rounded, and for floats how a gradient or prox value is written back.

use half::{bf16, f16};

use crate::accumulate::{AnyPartial, ExactPartial, FloatPartial, Partial};
use crate::dtype::{BoolByte, DType};
use crate::kernels::{self, RunSink, Target, LANES};

mod sealed {
    pub trait Sealed {}
}

/// A Rust type whose slices the library reads: `f16`, `bf16`, `f32`, `f64`, every signed and
/// unsigned integer up to 64 bits, and `bool`.
pub trait Element: Copy + Send + Sync + sealed::Sealed + 'static {
    /// The [`DType`] of a view of this type.
    const DTYPE: DType;
}

macro_rules! impl_element {
    ($($ty:ty => $dtype:ident),* $(,)?) => {$(
        impl sealed::Sealed for $ty {}
        impl Element for $ty {
            const DTYPE: DType = DType::$dtype;
        }
    )*};
}

impl_element!(
    f16 => F16, bf16 => BF16, f32 => F32, f64 => F64,
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    bool => Bool,
);

/// Plain data: every bit pattern of `size_of::<Self>()` bytes is a valid value and the type has no
/// padding, so a buffer of bytes may be read (and written) as a slice of it.
///
/// # Safety
/// Implement only for such types.
pub(crate) unsafe trait Pod: Copy + Default + Send + Sync + 'static {}

macro_rules! unsafe_impl_pod {
    ($($ty:ty),*) => {$(
        // SAFETY: IEEE floats, bfloat16 (u16 bits), integers and `BoolByte` (`repr(transparent)`
        // over u8) accept every bit pattern and have no padding.
        unsafe impl Pod for $ty {}
    )*};
}

unsafe_impl_pod!(f16, bf16, f32, f64, i8, i16, i32, i64, u8, u16, u32, u64, BoolByte);

/// How the type a [`DType`] dispatches to is reduced. (Bool is read as [`BoolByte`].)
pub(crate) trait Reduce: Pod {
    type Partial: Partial + Into<AnyPartial>;

    /// The partial sums of `run[0], run[step], run[2 * step], ..`; `step` divides the kernel's
    /// lane count (see `kernels::float_sums`). `sink` sees every element of `run` once.
    fn reduce_run<S: RunSink<Self>>(run: &[Self], step: usize, sink: &mut S) -> Self::Partial;

    /// Rounds an f64 result to the precision of the type a caller reports results in (Keras returns
    /// the input's float dtype; integer and bool inputs report float64). Correctly rounded, once.
    fn round_result(value: f64) -> f64;
}

/// Float elements widen to f64 inside the SIMD kernel.
pub(crate) trait Float: Pod {
    /// Lane sums run uncompensated for this many steps before folding into the compensated total:
    /// few for f64 (whose squares are inexact and whose precision is the output's), many for
    /// narrower inputs (f64 accumulation has 29+ bits to spare over their output precision).
    const STEPS_PER_FOLD: usize;

    /// Whether a block's lane sums are a pairwise tree over its `STEPS_PER_FOLD` steps rather than
    /// sequential. f64: three levels of additions over 8 steps keep the error bound of 4 steps
    /// added in sequence with half the folds (the fold costs as many operations per lane as
    /// 3 steps); float64 calls from cache took 3-10% less time.
    const PAIRWISE: bool;

    /// The most steps a lane adds sequentially without exceeding the block's error bound: the
    /// tail of a run, shorter than a block, is summed in groups of this many steps.
    const PLAIN_STEPS: usize = if Self::PAIRWISE {
        Self::STEPS_PER_FOLD.ilog2() as usize + 1
    } else {
        Self::STEPS_PER_FOLD
    };

    /// Whether `x * x` is exact in f64 (significands of at most 26 bits). Then a fused
    /// multiply-add gives the same bits as a multiply and an add, and the kernel may use it.
    const EXACT_SQUARES: bool;

    /// `x` as f64 (exact for every input type).
    fn widen(self) -> f64;

    /// `x` correctly rounded from f64 (round to nearest, ties to even; overflow to infinity).
    fn narrow(value: f64) -> Self;

    /// Writes the native-endian bytes of `self` at the start of `bytes`.
    fn write_ne_bytes(self, bytes: &mut [u8; 8]);

    /// `|x|` as f64 (exact for every input type).
    #[inline(always)]
    fn widen_abs(self) -> f64 {
        self.widen().abs()
    }

    /// `|x|` as f64 for one whole step of `LANES` values (`step.len() == LANES`), with the
    /// instructions of `I`. Types whose widening has a vector instruction of its own override this.
    #[inline(always)]
    fn widen_abs_step<I: Target>(step: &[Self]) -> [f64; LANES] {
        let mut widened = [0.0; LANES];
        for (target, value) in widened.iter_mut().zip(step) {
            *target = value.widen_abs();
        }
        widened
    }
}

impl Float for f64 {
    fn write_ne_bytes(self, bytes: &mut [u8; 8]) {
        let raw = self.to_ne_bytes();
        bytes[..raw.len()].copy_from_slice(&raw);
    }
    const STEPS_PER_FOLD: usize = 8;
    const PAIRWISE: bool = true;
    const EXACT_SQUARES: bool = false;
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(value: f64) -> Self {
        value
    }
}

impl Float for f32 {
    fn write_ne_bytes(self, bytes: &mut [u8; 8]) {
        let raw = self.to_ne_bytes();
        bytes[..raw.len()].copy_from_slice(&raw);
    }
    const STEPS_PER_FOLD: usize = 64;
    const PAIRWISE: bool = false;
    const EXACT_SQUARES: bool = true;
    #[inline(always)]
    fn widen(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn narrow(value: f64) -> Self {
        value as f32 // `as` rounds correctly
    }
    #[inline(always)]
    fn widen_abs(self) -> f64 {
        f64::from(self.abs()) // abs on 8 f32 lanes, then widen: one vector op less than after
    }
}

impl Float for f16 {
    fn write_ne_bytes(self, bytes: &mut [u8; 8]) {
        let raw = self.to_bits().to_ne_bytes();
        bytes[..raw.len()].copy_from_slice(&raw);
    }
    const STEPS_PER_FOLD: usize = 64;
    const PAIRWISE: bool = false;
    const EXACT_SQUARES: bool = true;
    #[inline(always)]
    fn widen(self) -> f64 {
        f64::from(f16_to_f32(self.to_bits()))
    }
    #[inline(always)]
    fn narrow(value: f64) -> Self {
        f16::from_bits(f32_to_f16(round_to_odd_f32(value)))
    }
    #[inline(always)]
    fn widen_abs_step<I: Target>(step: &[Self]) -> [f64; LANES] {
        #[cfg(target_arch = "x86_64")]
        if I::F16C {
            // SAFETY: a `Target` with F16C is only instantiated inside the F16C wrappers of
            // `kernels::dispatch`, which run after detecting F16C.
            return unsafe { kernels::x86_64::widen_abs_f16c(step) };
        }
        let mut widened = [0.0; LANES];
        for (target, value) in widened.iter_mut().zip(step) {
            *target = value.widen_abs();
        }
        widened
    }
}

impl Float for bf16 {
    fn write_ne_bytes(self, bytes: &mut [u8; 8]) {
        let raw = self.to_bits().to_ne_bytes();
        bytes[..raw.len()].copy_from_slice(&raw);
    }
    const STEPS_PER_FOLD: usize = 64;
    const PAIRWISE: bool = false;
    const EXACT_SQUARES: bool = true;
    #[inline(always)]
    fn widen(self) -> f64 {
        // bf16 is the top half of an f32.
        f64::from(f32::from_bits(u32::from(self.to_bits()) << 16))
    }
    #[inline(always)]
    fn narrow(value: f64) -> Self {
        bf16::from_bits(f32_to_bf16(round_to_odd_f32(value)))
    }
    #[inline(always)]
    fn widen_abs(self) -> f64 {
        f64::from(f32::from_bits(u32::from(self.to_bits() & 0x7fff) << 16))
    }
}

/// `value` rounded to f32 toward zero, with the last bit set if that was inexact ("round to odd").
/// Rounding that once more, to nearest even, to a format of at most 22 significand bits (f16,
/// bf16) gives the correctly rounded result (Boldo and Melquiond, 2008): two fast hardware
/// conversions instead of one exact software rounding.
#[inline(always)]
fn round_to_odd_f32(value: f64) -> f32 {
    let nearest = value as f32;
    let bits = nearest.to_bits();
    let widened = f64::from(nearest);
    if widened == value || value.is_nan() {
        return nearest;
    }
    // `nearest` is inexact: step back toward zero if it rounded away, then make the last bit odd.
    let truncated = if widened.abs() > value.abs() {
        bits - 1
    } else {
        bits
    };
    f32::from_bits(truncated | 1)
}

// The conversions between f32 and the 16-bit formats, written as integer operations and selects
// so that the gradient and prox loops vectorise around them (`half`'s conversions check for F16C
// at run time on every call, which kept those loops scalar: ~9 ns per float16 element).

/// The f32 of f16 bits `h` (exact; NaN stays NaN).
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    const REBIAS: u32 = (127 - 15) << 23;
    let sign = u32::from(h & 0x8000) << 16;
    let magnitude = u32::from(h & 0x7fff);
    let shifted = magnitude << 13;
    let bits = if magnitude >= 0x7c00 {
        shifted + 2 * REBIAS // infinity and NaN: the exponent becomes all ones
    } else if magnitude < 0x0400 {
        // Zero and subnormals, `m * 2^-24`: `2^-14 * (1 + m / 1024)` less `2^-14`, exactly.
        let one_more = f32::from_bits(shifted + REBIAS + (1 << 23));
        (one_more - f32::from_bits(REBIAS + (1 << 23))).to_bits()
    } else {
        shifted + REBIAS
    };
    f32::from_bits(bits | sign)
}

/// The f16 bits of `f` rounded to nearest, ties to even (overflow to infinity; NaN stays NaN).
#[inline(always)]
fn f32_to_f16(f: f32) -> u16 {
    let bits = f.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let magnitude = bits & 0x7fff_ffff;
    let half = if magnitude > 0x7f80_0000 {
        0x7e00 | ((magnitude >> 13) & 0x3ff) // NaN, quiet
    } else if magnitude >= 0x4780_0000 {
        0x7c00 // at least 2^16 (infinity included): beyond every rounding boundary
    } else if magnitude < 0x3880_0000 {
        // Below 2^-14, the grid is 2^-24, f32's spacing in [0.5, 1): adding 0.5 rounds to it
        // (ties to even) and leaves the f16 bits, the smallest normal included, above 0.5's.
        (f32::from_bits(magnitude) + 0.5).to_bits() - 0x3f00_0000
    } else {
        // Rebias the exponent, then round away the 13 low bits: adding 0xfff plus the lowest kept
        // bit carries exactly when above the midpoint, or at it with an odd kept bit.
        let odd = (magnitude >> 13) & 1;
        (magnitude - ((127 - 15) << 23) + 0x0fff + odd) >> 13
    };
    (sign | half) as u16
}

/// The bf16 bits of `f` rounded to nearest, ties to even (overflow to infinity; NaN stays NaN).
#[inline(always)]
fn f32_to_bf16(f: f32) -> u16 {
    let bits = f.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x0040) as u16; // NaN, quiet
    }
    // As for f16: a carry out of the 16 low bits rounds up (into the exponent, up to infinity).
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

macro_rules! impl_float_reduce {
    ($($ty:ty),* $(,)?) => {$(
        impl Reduce for $ty {
            type Partial = FloatPartial;
            #[inline]
            fn reduce_run<S: RunSink<Self>>(run: &[Self], step: usize, sink: &mut S) -> FloatPartial {
                kernels::float_sums(run, step, sink)
            }
            #[inline]
            fn round_result(value: f64) -> f64 {
                <$ty as Float>::narrow(value).widen()
            }
        }
    )*};
}

impl_float_reduce!(f64, f32, f16, bf16);

/// `|x|` of an integer as u64 (exact, also for `i64::MIN`).
pub(crate) trait Magnitude: Copy {
    fn magnitude(self) -> u64;
}

macro_rules! impl_integer_reduce {
    ($($ty:ty => |$x:ident| $magnitude:expr),* $(,)?) => {$(
        impl Magnitude for $ty {
            #[inline(always)]
            fn magnitude(self) -> u64 {
                let $x = self;
                $magnitude
            }
        }
        impl Reduce for $ty {
            type Partial = ExactPartial;
            #[inline]
            fn reduce_run<S: RunSink<Self>>(run: &[Self], step: usize, sink: &mut S) -> ExactPartial {
                sink.visit(0, run);
                kernels::exact_sums(run, step)
            }
            #[inline]
            fn round_result(value: f64) -> f64 {
                value
            }
        }
    )*};
}

impl_integer_reduce!(
    i8 => |x| u64::from(x.unsigned_abs()),
    i16 => |x| u64::from(x.unsigned_abs()),
    i32 => |x| u64::from(x.unsigned_abs()),
    i64 => |x| x.unsigned_abs(),
    u8 => |x| u64::from(x),
    u16 => |x| u64::from(x),
    u32 => |x| u64::from(x),
    u64 => |x| x,
    BoolByte => |x| u64::from(x.0 != 0),
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: the two neighbouring representable values, pick the nearer (ties to even).
    fn nearest_f16(value: f64) -> f64 {
        let mut best = f16::from_bits(0);
        let mut best_err = f64::INFINITY;
        for bits in 0..0x7c00u16 {
            let candidate = f16::from_bits(bits).to_f64();
            let err = (candidate - value.abs()).abs();
            if err < best_err || (err == best_err && bits % 2 == 0) {
                best = f16::from_bits(bits);
                best_err = err;
            }
        }
        let max = 65504.0;
        if value.abs() >= max + 16.0 {
            return f64::INFINITY.copysign(value);
        }
        best.to_f64().copysign(value)
    }

    #[test]
    fn f16_rounding_is_correct_at_ties_and_edges() {
        let cases = [
            1.0 + 2f64.powi(-11),                  // tie -> even (1.0)
            1.0 + 2f64.powi(-11) + 2f64.powi(-40), // just above tie -> up (sticky bit in low word)
            1.0 + 3.0 * 2f64.powi(-11),            // tie -> even (up)
            65504.0 + 15.999,                      // rounds to max
            65520.0,                               // overflow tie -> inf
            2f64.powi(-24) * 0.5,                  // tie at the smallest subnormal -> 0
            2f64.powi(-24) * 0.5000001,            // -> smallest subnormal
            6.1e-5,                                // around the smallest normal
            -3.25159,
            0.099_975_585_937_5, // within 1 ulp under a power-of-two boundary? (sanity)
            2047.9999,
            1.999_999_999_9,
        ];
        for v in cases {
            assert_eq!(<f16 as Reduce>::round_result(v), nearest_f16(v), "{v}");
        }
    }

    #[test]
    fn bf16_rounding_keeps_sticky_bits() {
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7; a bit far below (2^-40) must round it up.
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Reduce>::round_result(v), 1.0 + 2f64.powi(-7));
        assert_eq!(<bf16 as Reduce>::round_result(1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(<bf16 as Reduce>::round_result(1e39), f64::INFINITY);
        // Just above the largest bf16 rounding boundary, and f64 values beyond f32 range.
        assert_eq!(<bf16 as Reduce>::round_result(3.3963e38), f64::INFINITY);
        assert_eq!(<f16 as Reduce>::round_result(-1e300), f64::NEG_INFINITY);
        assert_eq!(<f16 as Reduce>::round_result(1e-300), 0.0);
        assert!(<bf16 as Reduce>::round_result(f64::NAN).is_nan());
    }

    /// f32 bit patterns that exercise a 16-bit rounding: every sign, exponent and top-10
    /// significand combination, with low bits at, around and between the rounding boundaries.
    fn rounding_patterns() -> impl Iterator<Item = u32> {
        const LOW: [u32; 12] = [
            0, 1, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1234, 0xbeef,
        ];
        (0..1u32 << 19)
            .flat_map(|high| LOW.iter().map(move |&low| (high << 13) | (low & 0x1fff)))
            .chain((0..1u32 << 16).flat_map(|high| LOW.iter().map(move |&low| (high << 16) | low)))
    }

    #[test]
    fn f16_conversions_match_half() {
        for bits in 0..=u16::MAX {
            let (ours, reference) = (f16_to_f32(bits), f16::from_bits(bits).to_f32());
            assert!(
                ours.to_bits() == reference.to_bits() || (ours.is_nan() && reference.is_nan()),
                "f16 {bits:#06x}: {ours:e}, half gives {reference:e}"
            );
        }
        for bits in rounding_patterns() {
            let f = f32::from_bits(bits);
            let (ours, reference) = (f32_to_f16(f), f16::from_f32(f).to_bits());
            let both_nan = f16::from_bits(ours).is_nan() && f.is_nan();
            assert!(
                ours == reference || both_nan,
                "f32 {bits:#010x}: {ours:#06x}, half gives {reference:#06x}"
            );
        }
    }

    #[test]
    fn bf16_conversion_matches_half() {
        for bits in rounding_patterns() {
            let f = f32::from_bits(bits);
            let (ours, reference) = (f32_to_bf16(f), bf16::from_f32(f).to_bits());
            let both_nan = bf16::from_bits(ours).is_nan() && f.is_nan();
            assert!(
                ours == reference || both_nan,
                "f32 {bits:#010x}: {ours:#06x}, half gives {reference:#06x}"
            );
        }
    }

    #[test]
    fn integer_magnitudes_are_exact() {
        assert_eq!(i64::MIN.magnitude(), 1u64 << 63);
        assert_eq!(i8::MIN.magnitude(), 128);
        assert_eq!(u64::MAX.magnitude(), u64::MAX);
        assert_eq!(BoolByte(1).magnitude(), 1);
        assert_eq!(BoolByte(7).magnitude(), 1);
        assert_eq!(BoolByte(0).magnitude(), 0);
    }
}
