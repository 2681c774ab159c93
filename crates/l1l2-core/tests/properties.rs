//! Property tests of the kernels against independent references: an exact sum (Shewchuk's
//! expansion, as Python's `math.fsum`, over exactly computed terms) and a naive f64 loop.

use l1l2_core::{bf16, f16, set_num_threads, sums, ArrayView, Element};
use proptest::prelude::*;

/// Exact running sum of f64 terms as a non-overlapping expansion (Shewchuk), rounded once at the
/// end — the algorithm of Python's `math.fsum`.
#[derive(Default)]
struct ExactSum {
    partials: Vec<f64>,
    special: f64, // inf / NaN seen
}

impl ExactSum {
    fn add(&mut self, mut x: f64) {
        if !x.is_finite() {
            self.special += x;
            return;
        }
        let mut kept = 0;
        for i in 0..self.partials.len() {
            let mut y = self.partials[i];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            if hi.is_infinite() {
                // The exact sum left f64's range: it rounds to infinity (fsum would raise).
                self.special += hi;
                return;
            }
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        self.partials.truncate(kept);
        self.partials.push(x);
    }

    /// Adds `x * x` exactly (as a rounded product and its exact error).
    fn add_square(&mut self, x: f64) {
        let product = x * x;
        self.add(product);
        if product.is_finite() {
            self.add(x.mul_add(x, -product));
        }
    }

    fn value(&self) -> f64 {
        if self.special != 0.0 || self.special.is_nan() {
            return self.special;
        }
        // Sum from the top with correct rounding of the final result (fsum's half-way fix).
        let mut iter = self.partials.iter().rev();
        let Some(&first) = iter.next() else {
            return 0.0;
        };
        let mut hi = first;
        let mut lo = 0.0;
        let rest: Vec<f64> = iter.copied().collect();
        let mut index = 0;
        while index < rest.len() {
            let x = hi;
            let y = rest[index];
            index += 1;
            hi = x + y;
            lo = y - (hi - x);
            if lo != 0.0 {
                break;
            }
        }
        if index < rest.len()
            && ((lo < 0.0 && rest[index] < 0.0) || (lo > 0.0 && rest[index] > 0.0))
        {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }
}

fn exact_sums(values: &[f64]) -> (f64, f64) {
    let (mut abs, mut squares) = (ExactSum::default(), ExactSum::default());
    for &x in values {
        abs.add(x.abs());
        squares.add_square(x);
    }
    (abs.value(), squares.value())
}

fn ulp(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 || !x.is_finite() {
        return f64::from_bits(1);
    }
    f64::from_bits(x.to_bits() + 1) - x
}

/// `got` is within `ulps` ulp of `exact`, or both are the same non-finite value. An absolute slack
/// of one subnormal per element covers squares that underflow.
fn assert_close(got: f64, exact: f64, ulps: f64, len: usize, what: &str) {
    if exact.is_nan() {
        assert!(got.is_nan(), "{what}: got {got}, expected NaN");
        return;
    }
    if exact.is_infinite() {
        assert_eq!(got, exact, "{what}");
        return;
    }
    let slack = ulps * ulp(exact) + len as f64 * f64::from_bits(1);
    assert!(
        (got - exact).abs() <= slack,
        "{what}: got {got:e}, exact {exact:e}, diff {:e} > {slack:e}",
        (got - exact).abs()
    );
}

/// Checks `sums(values)` against the exact sums: the f64 sums within the kernel's a-priori bound
/// for `T` (`T::SUM_ULPS`), and the penalty-style result rounded to `T` within 1 ulp of `T` of the
/// exact value rounded to `T`, which is the library's promise for narrow inputs.
fn check<T: Element + Into64>(values: &[T]) {
    let wide: Vec<f64> = values.iter().map(|v| v.to_f64()).collect();
    let (exact_abs, exact_squares) = exact_sums(&wide);
    let got = sums(values);
    let ulps = T::SUM_ULPS;
    assert_close(got.sum_abs, exact_abs, ulps, values.len(), "sum_abs");
    assert_close(
        got.sum_squares,
        exact_squares,
        ulps,
        values.len(),
        "sum_squares",
    );
    assert_rounded_within_1_ulp::<T>(got.sum_abs, exact_abs, "sum_abs");
    assert_rounded_within_1_ulp::<T>(got.sum_squares, exact_squares, "sum_squares");
    // The naive f64 loop too: within its own error bound (n * 2^-53 relative) plus ours.
    let naive_abs: f64 = wide.iter().map(|x| x.abs()).sum();
    let naive_squares: f64 = wide.iter().map(|x| x * x).sum();
    let bound = (values.len() as f64 + ulps) * f64::EPSILON;
    if naive_abs.is_finite() {
        assert!((got.sum_abs - naive_abs).abs() <= bound * naive_abs + 1e-300);
    }
    if naive_squares.is_finite() {
        assert!((got.sum_squares - naive_squares).abs() <= bound * naive_squares + 1e-300);
    }
}

/// `got` and `exact`, each rounded to `T` (float64 for f64), differ by at most one ulp of `T`.
fn assert_rounded_within_1_ulp<T: Element + Into64>(got: f64, exact: f64, what: &str) {
    let (got, exact) = (T::DTYPE.round_result(got), T::DTYPE.round_result(exact));
    if !exact.is_finite() || exact.is_nan() {
        assert!(
            got == exact || (got.is_nan() && exact.is_nan()),
            "{what}: {got} vs {exact}"
        );
        return;
    }
    let exponent = ((exact.to_bits() >> 52) & 0x7ff) as i32 - 1023; // f64 subnormals: clamped
    let ulp = 2f64.powi((exponent.max(T::MIN_EXP) - (T::PRECISION - 1)).max(-1022));
    assert!(
        (got - exact).abs() <= ulp,
        "{what}: {got:e} vs {exact:e} rounded to the input type"
    );
}

/// What the checks need to know of each float type.
trait Into64: Copy {
    /// Bound on the relative error of the f64 sums, in f64 ulp: 4 for f64 (compensated every 4
    /// plain steps); 64 for narrower types, whose lanes add 64 values plainly before compensation
    /// (63 roundings at most, 2^-47 relative: still 2^23 below float32's ulp).
    const SUM_ULPS: f64 = 64.0;
    /// Significand bits and smallest normal exponent of the output type.
    const PRECISION: i32;
    const MIN_EXP: i32;
    fn to_f64(self) -> f64;
}
impl Into64 for f64 {
    const SUM_ULPS: f64 = 4.0;
    const PRECISION: i32 = 53;
    const MIN_EXP: i32 = -1022;
    fn to_f64(self) -> f64 {
        self
    }
}
impl Into64 for f32 {
    const PRECISION: i32 = 24;
    const MIN_EXP: i32 = -126;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}
impl Into64 for f16 {
    const PRECISION: i32 = 11;
    const MIN_EXP: i32 = -14;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}
impl Into64 for bf16 {
    const PRECISION: i32 = 8;
    const MIN_EXP: i32 = -126;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// Finite doubles over the whole exponent range, often special-looking ones.
fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e3f64..1e3,
        1 => prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        1 => Just(-0.0),
        1 => -1e-150f64..1e-150,
        1 => -1e150f64..1e150,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn f64_within_4_ulp_of_exact(values in prop::collection::vec(any_f64(), 0..300)) {
        check(&values);
    }

    #[test]
    fn f32_sums_within_1_ulp_of_exact(bits in prop::collection::vec(any::<u32>(), 0..300)) {
        let values: Vec<f32> = bits.into_iter().map(f32::from_bits).filter(|x| x.is_finite()).collect();
        check(&values);
    }

    #[test]
    fn f16_every_bit_pattern_mix(bits in prop::collection::vec(any::<u16>(), 0..300)) {
        let values: Vec<f16> = bits.into_iter().map(f16::from_bits).filter(|x| x.is_finite()).collect();
        check(&values);
    }

    #[test]
    fn bf16_every_bit_pattern_mix(bits in prop::collection::vec(any::<u16>(), 0..300)) {
        let values: Vec<bf16> = bits.into_iter().map(bf16::from_bits).filter(|x| x.is_finite()).collect();
        check(&values);
    }

    #[test]
    fn long_inputs_cross_chunk_and_thread_boundaries(len in 0usize..400_000, seed in any::<u64>()) {
        let values = random_f64(len, seed);
        check(&values);
        let narrow: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        check(&narrow);
    }

    #[test]
    fn strided_views_match_exact_sums_of_the_addressed_elements(
        rows in 1usize..40, cols in 1usize..40, row_step in -3isize..4, col_step in -3isize..4,
        seed in any::<u64>(),
    ) {
        let buffer = random_f64(rows * cols, seed);
        // A view of every |row_step|-th row and |col_step|-th column, reversed where negative;
        // a zero step broadcasts the first row/column.
        let pick = |len: usize, step: isize| -> (usize, usize, isize) {
            match step {
                0 => (len, 0, 0),
                s if s > 0 => (len.div_ceil(s as usize), 0, s),
                s => (len.div_ceil(s.unsigned_abs()), len - 1, s),
            }
        };
        let (view_rows, first_row, rs) = pick(rows, row_step);
        let (view_cols, first_col, cs) = pick(cols, col_step);
        let offset = first_row * cols + first_col;
        let strides = [rs * cols as isize, cs];
        let view = ArrayView::new(&buffer, offset, &[view_rows, view_cols], &strides).unwrap();
        let mut addressed = Vec::new();
        for i in 0..view_rows as isize {
            for j in 0..view_cols as isize {
                addressed.push(buffer[(offset as isize + i * strides[0] + j * strides[1]) as usize]);
            }
        }
        let (exact_abs, exact_squares) = exact_sums(&addressed);
        let got = view.sums();
        assert_close(got.sum_abs, exact_abs, 4.0, addressed.len(), "strided abs");
        assert_close(got.sum_squares, exact_squares, 4.0, addressed.len(), "strided squares");
    }
}

fn random_f64(len: usize, seed: u64) -> Vec<f64> {
    // xorshift: values of mixed sign over ~12 decades.
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mantissa = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            mantissa * 10f64.powi((state % 13) as i32 - 6)
        })
        .collect()
}

#[test]
fn every_remainder_of_the_lane_width_and_fold_block() {
    for len in 0..=1100 {
        let values = random_f64(len, len as u64 + 7);
        check(&values);
        let narrow: Vec<f16> = values.iter().map(|&x| f16::from_f64(x)).collect();
        check(&narrow);
    }
}

/// The kernel's lanes start at the first cache-line-aligned element: every start offset within a
/// line, with every remainder around a step and a fold block, stays within the accuracy bound,
/// contiguous and as `x[::2]` / `x[::4]` spans.
#[test]
fn every_start_offset_within_a_cache_line() {
    let lens = (0..=40).chain([255, 256, 257, 1023, 1024, 1025, 5003]);
    for len in lens {
        let buffer = random_f64(len * 4 + 16, len as u64 + 101);
        let narrow: Vec<f32> = buffer.iter().map(|&x| x as f32).collect();
        let half: Vec<f16> = buffer.iter().map(|&x| f16::from_f64(x)).collect();
        let brain: Vec<bf16> = buffer.iter().map(|&x| bf16::from_f64(x)).collect();
        for offset in 0..16 {
            check(&buffer[offset..offset + len]);
            check(&narrow[offset..offset + len]);
            check(&half[offset..offset + len]);
            check(&brain[offset..offset + len]);
            for step in [2, 4] {
                let view = ArrayView::new(&buffer, offset, &[len], &[step as isize]).unwrap();
                let addressed: Vec<f64> = buffer[offset..]
                    .iter()
                    .step_by(step)
                    .take(len)
                    .copied()
                    .collect();
                let (exact_abs, exact_squares) = exact_sums(&addressed);
                let got = view.sums();
                assert_close(got.sum_abs, exact_abs, 4.0, len, "strided abs");
                assert_close(got.sum_squares, exact_squares, 4.0, len, "strided squares");
            }
        }
    }
}

#[test]
fn nan_and_infinity_propagate() {
    let mut values = random_f64(1000, 3);
    values[517] = f64::INFINITY;
    let s = sums(&values);
    assert_eq!((s.sum_abs, s.sum_squares), (f64::INFINITY, f64::INFINITY));
    values[900] = f64::NAN;
    let s = sums(&values);
    assert!(s.sum_abs.is_nan() && s.sum_squares.is_nan());
    // A NaN far from the infinity, in another chunk of a long input.
    let mut long = random_f64(300_000, 4);
    long[10] = f64::NEG_INFINITY;
    long[299_000] = f64::NAN;
    assert!(sums(&long).sum_abs.is_nan());
}

#[test]
fn signed_zeros_and_subnormals() {
    let tiny = f64::from_bits(1);
    let s = sums(&[-0.0, 0.0, tiny, -tiny, f64::MIN_POSITIVE]);
    assert_eq!(s.sum_abs, 2.0 * tiny + f64::MIN_POSITIVE);
    assert_eq!(s.sum_squares, 0.0);
    assert!(s.sum_abs.is_sign_positive() && s.sum_squares.is_sign_positive());
    let h = f16::from_bits(1); // 2^-24
    let s = sums(&[h, -h]);
    assert_eq!((s.sum_abs, s.sum_squares), (2f64.powi(-23), 2f64.powi(-47)));
}

#[test]
fn f16_extremes_do_not_overflow() {
    let values = vec![f16::MAX; 70_000];
    let s = sums(&values);
    assert_eq!(s.sum_abs, 70_000.0 * 65504.0);
    assert_eq!(s.sum_squares, 70_000.0 * 65504.0 * 65504.0);
    // A penalty whose true value fits in f16 comes back finite: 1e-6 * 4.585e9 = 4585.28 -> 4584.
    assert_eq!(l1l2_core::DType::F16.round_result(s.sum_abs * 1e-6), 4584.0);
}

#[test]
fn integers_are_exact() {
    let values = [i64::MIN, i64::MIN, i64::MAX, -1];
    let s = sums(&values);
    let abs_exact: u128 = 2 * (1u128 << 63) + (i64::MAX as u128) + 1;
    assert_eq!(s.sum_abs, abs_exact as f64);
    // 2 * 2^126 + (2^63 - 1)^2 + 1 = 2^127 + 2^126 - 2^64 + 2: rounds to 2^127 + 2^126.
    assert_eq!(s.sum_squares, 2f64.powi(127) + 2f64.powi(126));
    let s = sums(&[u64::MAX; 5]);
    let square = (u64::MAX as u128) * (u64::MAX as u128);
    // 5 * (2^64 - 1)^2 = 5 * 2^128 - 10 * 2^64 + 5: rounds to 5 * 2^128.
    assert_eq!(s.sum_squares, 5.0 * 2f64.powi(128));
    assert!(square < u128::MAX);
    let bools: Vec<bool> = (0..100_001).map(|i| i % 3 == 0).collect();
    let s = sums(&bools);
    assert_eq!((s.sum_abs, s.sum_squares), (33_334.0, 33_334.0));
    let small: Vec<i8> = (0..200_000).map(|i| (i % 256) as u8 as i8).collect();
    let expected_abs: i64 = small.iter().map(|&x| i64::from(x).abs()).sum();
    let expected_squares: i64 = small.iter().map(|&x| i64::from(x) * i64::from(x)).sum();
    let s = sums(&small);
    assert_eq!(s.sum_abs, expected_abs as f64);
    assert_eq!(s.sum_squares, expected_squares as f64);
}

#[test]
fn bit_identical_for_any_thread_count() {
    let values: Vec<f32> = random_f64(3_000_001, 11)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let wide = random_f64(1_500_007, 12);
    let view_buffer = random_f64(2_000_000, 13);
    let view = ArrayView::new(&view_buffer, 1_999_999, &[1000, 666], &[-2000, -3]).unwrap();
    let mut results = Vec::new();
    for threads in [1, 2, 3, 8, 0] {
        set_num_threads(threads);
        for _ in 0..2 {
            let a = sums(&values);
            let b = sums(&wide);
            let c = view.sums();
            results.push(
                [
                    a.sum_abs,
                    a.sum_squares,
                    b.sum_abs,
                    b.sum_squares,
                    c.sum_abs,
                    c.sum_squares,
                ]
                .map(f64::to_bits),
            );
        }
    }
    set_num_threads(0);
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
}

#[test]
fn runs_inside_a_callers_rayon_pool() {
    let values = random_f64(1_000_000, 5);
    let expected = sums(&values);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let inside = pool.install(|| sums(&values));
    assert_eq!(inside, expected);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn long_strided_rows_match_exact_sums(
        len in 1usize..5000, stride in prop::sample::select(vec![2isize, 3, 4, 5, 8, -1, -2, -4]),
        start in 0usize..7, seed in any::<u64>(),
    ) {
        let buffer = random_f64(start + len * stride.unsigned_abs() + 7, seed);
        let offset = if stride < 0 { start + (len - 1) * stride.unsigned_abs() } else { start };
        let addressed: Vec<f64> = (0..len as isize)
            .map(|i| buffer[(offset as isize + i * stride) as usize])
            .collect();
        let (exact_abs, exact_squares) = exact_sums(&addressed);
        let got = ArrayView::new(&buffer, offset, &[len], &[stride]).unwrap().sums();
        assert_close(got.sum_abs, exact_abs, 4.0, len, "abs");
        assert_close(got.sum_squares, exact_squares, 4.0, len, "squares");
        let narrow: Vec<f16> = buffer.iter().map(|&x| f16::from_f64(x)).collect();
        let addressed16: Vec<f64> = (0..len as isize)
            .map(|i| narrow[(offset as isize + i * stride) as usize].to_f64())
            .collect();
        let (exact_abs, exact_squares) = exact_sums(&addressed16);
        let got = ArrayView::new(&narrow, offset, &[len], &[stride]).unwrap().sums();
        assert_close(got.sum_abs, exact_abs, f16::SUM_ULPS, len, "f16 abs");
        assert_close(got.sum_squares, exact_squares, f16::SUM_ULPS, len, "f16 squares");
        assert_rounded_within_1_ulp::<f16>(got.sum_abs, exact_abs, "f16 abs");
        assert_rounded_within_1_ulp::<f16>(got.sum_squares, exact_squares, "f16 squares");
    }
}

#[test]
fn skipped_elements_never_leak_into_strided_sums() {
    // NaN and infinity between the elements of x[::2] and x[::4] views.
    let mut buffer = vec![1.0f32; 4001];
    for (i, value) in buffer.iter_mut().enumerate() {
        if i % 2 == 1 {
            *value = if i % 4 == 1 { f32::NAN } else { f32::INFINITY };
        }
    }
    let every_other = ArrayView::new(&buffer, 0, &[2001], &[2]).unwrap().sums();
    assert_eq!(
        (every_other.sum_abs, every_other.sum_squares),
        (2001.0, 2001.0)
    );
    let every_fourth = ArrayView::new(&buffer, 0, &[1001], &[4]).unwrap().sums();
    assert_eq!(
        (every_fourth.sum_abs, every_fourth.sum_squares),
        (1001.0, 1001.0)
    );
    let ints: Vec<i64> = (0..1000).collect();
    let odd = ArrayView::new(&ints, 1, &[500], &[2]).unwrap().sums();
    assert_eq!(odd.sum_abs, (0..500).map(|i| 2 * i + 1).sum::<i64>() as f64);
}
