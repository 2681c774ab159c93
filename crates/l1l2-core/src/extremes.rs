//! float64 inputs at the ends of the range: squares that underflow, sums that overflow.
//!
//! The kernel sums `|x|` and `x^2` in plain f64, which is exact enough in the normal range but
//! loses squares below 2^-511 (they are subnormal or zero) and overflows for `|x|` above 2^511 or
//! sums above f64's largest value, while the penalty `l1 * sum|x| + l2 * sum x^2` may still be a
//! finite normal number (`1e-300 * (1e200)^2 = 1e100`). Only float64 inputs get there (a float32
//! squared is far inside f64's range). When the fast result shows it (an infinite sum, or a sum
//! of squares below 2^-968 from a non-zero input), the input is summed again, scaled by `2^600`
//! or `2^-600` (exact), with every addition compensated; the sums are kept with their scale, and
//! the penalty applies each factor before the one final scaling. The fast path pays one compare.

use crate::accumulate::Compensated;
use crate::layout::Layout;

/// 2^-968. Below this, a sum of squares may have lost squares to underflow: each lost square is
/// under 2^-1074, so above it even 2^50 of them stay under 2^-56 relative.
const TINY_SQUARES: f64 = f64::from_bits(55 << 52);

/// Sums kept with their scale: the true sums are `abs * 2^exponent` and
/// `squares * 2^(2 * exponent)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Scaled {
    pub abs: f64,
    pub squares: f64,
    pub exponent: i32,
}

/// Whether the fast sums of a float64 input need the scaled pass.
pub(crate) fn needs_rescaling(sum_abs: f64, sum_squares: f64) -> bool {
    sum_abs == f64::INFINITY
        || sum_squares == f64::INFINITY
        || (sum_squares < TINY_SQUARES && sum_abs > 0.0)
}

/// The sums of the float64 elements `layout` addresses in `data`, repeated `copies` times,
/// scaled away from the edge the fast sums showed (`underflow`: up by 2^600, else down).
pub(crate) fn rescaled_sums(data: &[f64], layout: &Layout, copies: u64, underflow: bool) -> Scaled {
    let k = if underflow { 600 } else { -600 };
    let scale = power_of_two(k);
    let (mut abs, mut squares) = (Compensated::default(), Compensated::default());
    let stride = layout.row_stride();
    layout.for_each_row_piece(0..layout.len(), |first, count, _| {
        for j in 0..count {
            let value = data[first + j * stride] * scale; // exact, unless it under- or overflows
            abs.add(value.abs());
            let square = value * value;
            squares.add(square);
            if square.is_finite() {
                squares.add(value.mul_add(value, -square)); // the square's rounding error
            }
        }
    });
    if copies > 1 {
        abs = abs.repeat(copies);
        squares = squares.repeat(copies);
    }
    Scaled {
        abs: abs.value(),
        squares: squares.value(),
        exponent: -k,
    }
}

/// `factor * value * 2^exponent` for a finite, non-negative factor: the product of the two
/// significands is rounded once, and scaled once into range (overflow to infinity; a subnormal
/// result is rounded once more there).
pub(crate) fn scaled_product(factor: f64, value: f64, exponent: i32) -> f64 {
    let product = factor * value;
    if factor == 0.0 || value == 0.0 || !value.is_finite() {
        return product; // 0, inf or NaN whatever the scale (0 * inf is NaN, as IEEE says)
    }
    let (factor_significand, factor_exponent) = frexp(factor);
    let (value_significand, value_exponent) = frexp(value);
    ldexp(
        factor_significand * value_significand,
        factor_exponent + value_exponent + exponent,
    )
}

/// `x * 2^e`, rounded once.
pub(crate) fn scale(x: f64, e: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let (significand, exponent) = frexp(x);
    ldexp(significand, exponent + e)
}

/// `(m, e)` with `x = m * 2^e` and `0.5 <= |m| < 1`, for finite non-zero `x`.
fn frexp(x: f64) -> (f64, i32) {
    let (x, adjust) = if x.abs() < f64::MIN_POSITIVE {
        (x * ldexp(1.0, 64), -64) // subnormal: make it normal first
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let significand = f64::from_bits((bits & !(0x7ff << 52)) | (1022 << 52));
    (significand, biased - 1022 + adjust)
}

/// `m * 2^e` for `0.25 <= |m| < 1`, rounded once (a power of two scales exactly unless the
/// result leaves the normal range).
fn ldexp(m: f64, e: i32) -> f64 {
    if e > 1025 {
        return m * f64::INFINITY; // at least 2^1024
    }
    if e > 1023 {
        return m * 4.0 * power_of_two(e - 2); // `m * 4` is exact
    }
    if e < -1074 {
        return m * 0.0; // at most half the smallest subnormal: rounds to zero (ties to even)
    }
    m * power_of_two(e)
}

/// `2^e` for `-1074 <= e <= 1023`, exactly (subnormal below -1022).
fn power_of_two(e: i32) -> f64 {
    if e >= -1022 {
        f64::from_bits(((e + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (e + 1074))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_and_scaling_are_exact() {
        assert_eq!(power_of_two(0), 1.0);
        assert_eq!(power_of_two(-1074), f64::from_bits(1));
        assert_eq!(power_of_two(1023), 2f64.powi(1023));
        assert_eq!(frexp(6.0), (0.75, 3));
        assert_eq!(frexp(f64::from_bits(1)), (0.5, -1073));
        assert_eq!(ldexp(0.75, 3), 6.0);
        assert_eq!(ldexp(0.5, 1025), f64::INFINITY);
        assert_eq!(ldexp(0.75, 1024), 0.75 * 2f64.powi(1023) * 2.0);
        assert_eq!(ldexp(0.5, -1073), f64::from_bits(1));
        assert_eq!(ldexp(0.5, -1080), 0.0);
        assert_eq!(TINY_SQUARES, 2f64.powi(-968));
        assert_eq!(scale(2f64.powi(232), -1200), 2f64.powi(-968));
        assert_eq!(scale(3.0, -1075), f64::from_bits(2)); // 1.5 * 2^-1074 rounds to even
        assert_eq!(scale(f64::MAX, 1), f64::INFINITY);
    }

    #[test]
    fn factors_apply_before_the_final_scaling() {
        // 1e-300 * (1e200)^2 = 1e100: the sum of squares, 1e400, is beyond f64.
        let (m, e) = frexp(1e200);
        let squares = m * m; // (1e200)^2 = squares * 2^(2e)
        let got = scaled_product(1e-300, squares, 2 * e);
        assert!((got - 1e100).abs() <= 2.0 * 1e100 * f64::EPSILON, "{got:e}");
        assert!(scaled_product(0.0, f64::INFINITY, 3).is_nan());
        assert_eq!(scaled_product(0.5, 0.0, -2000), 0.0);
    }
}
