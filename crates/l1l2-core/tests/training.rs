//! Integration tests of the training kernels (`value_and_grad`, `prox` and their `_many` forms)
//! against independent references:
//!
//! * the gradient without accumulation against its exact value (an exact Shewchuk expansion of
//!   `l1 * sign(x) + 2 * l2 * x`, whose product is split exactly by a fused multiply-add), rounded
//!   by this file's own rounding to each format (f16 and bf16 too, no `half` conversion);
//! * the accumulated gradient and the prox step within an a-priori error bound of their exact
//!   (expansion or double-double) values;
//! * the penalty against the bits of the reduction alone, for every layout;
//! * every error, each leaving every buffer untouched;
//! * the `_many` forms against the single calls, and all of it for any thread count.
//!
//! Run it with `L1L2_MAX_ISA=avx2` and `L1L2_MAX_ISA=baseline` too, to cover every kernel.

use l1l2_core::{
    bf16, f16, prox, prox_many, set_num_threads, sums_many, value_and_grad, value_and_grad_many,
    ArrayView, ArrayViewMut, DType, Element, Error, Factors, Update,
};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------------
// Exact arithmetic and rounding of the references
// ------------------------------------------------------------------------------------------------

/// Exact running sum of f64 terms as a non-overlapping expansion (Shewchuk), rounded once at the
/// end (the algorithm of Python's `math.fsum`).
#[derive(Clone, Default)]
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

    /// The sum, correctly rounded to f64.
    fn value(&self) -> f64 {
        if self.special != 0.0 || self.special.is_nan() {
            return self.special;
        }
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

    /// `(hi, lo)`: the sum correctly rounded to f64, and the remainder `sum - hi` correctly
    /// rounded (its sign is the sign of the exact remainder).
    fn hi_lo(&self) -> (f64, f64) {
        let hi = self.value();
        if !hi.is_finite() {
            return (hi, 0.0);
        }
        let mut rest = self.clone();
        rest.add(-hi);
        (hi, rest.value())
    }
}

/// `a * b` as the rounded product and its exact error (exact unless the product under- or
/// overflows).
fn two_product(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

/// 2^n for n in f64's range (subnormal powers included), built from bits.
fn pow2(n: i32) -> f64 {
    assert!((-1074..=1023).contains(&n), "2^{n}");
    if n >= -1022 {
        f64::from_bits(((n + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (n + 1074))
    }
}

/// `m * 2^e`, exact whenever the result is representable.
fn ldexp(m: f64, e: i32) -> f64 {
    let first = e.clamp(-1000, 1000);
    m * pow2(first) * pow2(e - first)
}

/// `a = m * 2^e` for finite `a != 0` (sign dropped).
fn decompose(a: f64) -> (u64, i32) {
    let bits = a.to_bits() & !(1u64 << 63);
    let biased = (bits >> 52) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    if biased == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), biased - 1075)
    }
}

fn floor_log2(a: f64) -> i32 {
    let (m, e) = decompose(a);
    63 - m.leading_zeros() as i32 + e
}

/// A binary floating-point format: significand bits (implicit bit included), smallest normal
/// exponent, largest finite value.
#[derive(Clone, Copy, Debug)]
struct Fmt {
    precision: i32,
    min_exp: i32,
    max: f64,
}

const F64_FMT: Fmt = Fmt {
    precision: 53,
    min_exp: -1022,
    max: f64::MAX,
};

impl Fmt {
    /// The format of `2^k` times the values of this one (for working on scaled values).
    fn scaled(self, k: i32) -> Fmt {
        let max = ldexp(self.max, k);
        Fmt {
            precision: self.precision,
            min_exp: self.min_exp + k,
            max: if max.is_finite() { max } else { f64::MAX },
        }
    }

    /// The unit in the last place of `v` in this format (the smallest subnormal at 0).
    fn ulp(self, v: f64) -> f64 {
        let e = if v == 0.0 || !v.is_finite() {
            self.min_exp
        } else {
            floor_log2(v.abs()).max(self.min_exp)
        };
        ldexp(1.0, e - (self.precision - 1))
    }

    fn min_subnormal(self) -> f64 {
        ldexp(1.0, self.min_exp - (self.precision - 1))
    }

    /// The threshold at and beyond which a value rounds to infinity.
    fn overflow_threshold(self) -> f64 {
        self.max + 0.5 * self.ulp(self.max)
    }
}

/// An f64 rounded to a format: ties-to-even result, whether `v` was exactly a midpoint, and the
/// two format values around `v` (`below <= v <= above`; equal when `v` is representable).
#[derive(Clone, Copy, Debug)]
struct Rounded {
    value: f64,
    midpoint: bool,
    below: f64,
    above: f64,
}

/// Rounds `v` to `fmt`, to nearest with ties to even, by integer arithmetic on the significand
/// (overflow to infinity).
fn round_fmt(v: f64, fmt: Fmt) -> Rounded {
    if !v.is_finite() || v == 0.0 {
        return Rounded {
            value: v,
            midpoint: false,
            below: v,
            above: v,
        };
    }
    let a = v.abs();
    let (m, e) = decompose(a);
    let q_exp = floor_log2(a).max(fmt.min_exp) - (fmt.precision - 1);
    let shift = q_exp - e;
    let (lower, upper, up, midpoint) = if shift <= 0 {
        (a, a, false, false)
    } else if shift > 54 {
        // a < 2^(q_exp - 2): below a quarter ulp, rounds to zero.
        (0.0, ldexp(1.0, q_exp), false, false)
    } else {
        let q = m >> shift;
        let rem = m & ((1u64 << shift) - 1);
        let half = 1u64 << (shift - 1);
        let up = rem > half || (rem == half && q % 2 == 1);
        (
            ldexp(q as f64, q_exp),
            ldexp((q + 1) as f64, q_exp),
            up,
            rem == half,
        )
    };
    let clamp = |x: f64| if x > fmt.max { f64::INFINITY } else { x };
    let (lower, upper) = (clamp(lower), clamp(upper));
    let magnitude = if up { upper } else { lower };
    if v < 0.0 {
        Rounded {
            value: -magnitude,
            midpoint,
            below: -upper,
            above: -lower,
        }
    } else {
        Rounded {
            value: magnitude,
            midpoint,
            below: lower,
            above: upper,
        }
    }
}

/// The correct rounding to `fmt` of the exact value `hi + lo`, where `hi` is that value correctly
/// rounded to f64 (in the same scaling) and `lo` the rounded remainder: `hi` rounded, unless `hi`
/// is a midpoint of `fmt` and the remainder decides the direction.
fn round_exact(hi: f64, lo: f64, fmt: Fmt) -> f64 {
    let r = round_fmt(hi, fmt);
    if r.midpoint && lo != 0.0 {
        if lo > 0.0 {
            r.above
        } else {
            r.below
        }
    } else {
        r.value
    }
}

/// Same value: equal bits, or both NaN.
fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

// ------------------------------------------------------------------------------------------------
// The float types under test
// ------------------------------------------------------------------------------------------------

trait Float: Element + Copy + std::fmt::Debug {
    const FMT: Fmt;
    const NAME: &'static str;
    fn to64(self) -> f64;
    /// From a value of the type (exact; NaN to a NaN).
    fn from64(v: f64) -> Self;
    fn bits(self) -> u64;
    fn from_random_bits(bits: u64) -> Self;
    /// A NaN with a payload, to fill destination buffers with.
    fn sentinel() -> Self;
}

impl Float for f64 {
    const FMT: Fmt = F64_FMT;
    const NAME: &'static str = "f64";
    fn to64(self) -> f64 {
        self
    }
    fn from64(v: f64) -> Self {
        v
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn from_random_bits(bits: u64) -> Self {
        f64::from_bits(bits)
    }
    fn sentinel() -> Self {
        f64::from_bits(0x7ff8_dead_beef_0001)
    }
}

impl Float for f32 {
    const FMT: Fmt = Fmt {
        precision: 24,
        min_exp: -126,
        max: f32::MAX as f64,
    };
    const NAME: &'static str = "f32";
    fn to64(self) -> f64 {
        f64::from(self)
    }
    fn from64(v: f64) -> Self {
        let r = v as f32;
        assert!(v.is_nan() || f64::from(r) == v, "{v} is not an f32");
        r
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn from_random_bits(bits: u64) -> Self {
        f32::from_bits(bits as u32)
    }
    fn sentinel() -> Self {
        f32::from_bits(0x7fc0_1234)
    }
}

impl Float for f16 {
    const FMT: Fmt = Fmt {
        precision: 11,
        min_exp: -14,
        max: 65504.0,
    };
    const NAME: &'static str = "f16";
    fn to64(self) -> f64 {
        self.to_f64()
    }
    fn from64(v: f64) -> Self {
        let r = f16::from_f64(v);
        assert!(v.is_nan() || r.to_f64() == v, "{v} is not an f16");
        r
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn from_random_bits(bits: u64) -> Self {
        f16::from_bits(bits as u16)
    }
    fn sentinel() -> Self {
        f16::from_bits(0x7e55)
    }
}

impl Float for bf16 {
    const FMT: Fmt = Fmt {
        precision: 8,
        min_exp: -126,
        max: 3.389_531_389_251_535_5e38, // 0x7f7f
    };
    const NAME: &'static str = "bf16";
    fn to64(self) -> f64 {
        self.to_f64()
    }
    fn from64(v: f64) -> Self {
        let r = bf16::from_f64(v);
        assert!(v.is_nan() || r.to_f64() == v, "{v} is not a bf16");
        r
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn from_random_bits(bits: u64) -> Self {
        bf16::from_bits(bits as u16)
    }
    fn sentinel() -> Self {
        bf16::from_bits(0x7fa5)
    }
}

// ------------------------------------------------------------------------------------------------
// Random data
// ------------------------------------------------------------------------------------------------

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn sign(&mut self) -> f64 {
        if self.next() & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

/// Data of type `T`: mostly moderate values, with NaN, ±inf, ±0, subnormals, the type's extremes,
/// powers of two and arbitrary bit patterns mixed in.
fn random_value<T: Float>(rng: &mut Rng) -> T {
    let fmt = T::FMT;
    let v = match rng.below(24) {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        3 => 0.0,
        4 => -0.0,
        5 => {
            let top = 1u64 << (fmt.precision - 1);
            rng.sign() * (1 + rng.below(top - 1)) as f64 * fmt.min_subnormal()
        }
        6 => {
            let extremes = [
                fmt.max,
                ldexp(1.0, fmt.min_exp),
                fmt.min_subnormal(),
                65504.0,
                6e-8,
                1.0,
                0.5,
                3.0,
            ];
            rng.sign() * extremes[rng.below(extremes.len() as u64) as usize]
        }
        7 => rng.sign() * ldexp(1.0, rng.below(40) as i32 - 20),
        8 | 9 => return T::from_random_bits(rng.next()),
        _ => (rng.unit() - 0.5) * 10f64.powi(rng.below(9) as i32 - 4),
    };
    T::from64(round_fmt(v, fmt).value)
}

fn random_vec<T: Float>(rng: &mut Rng, len: usize) -> Vec<T> {
    (0..len).map(|_| random_value(rng)).collect()
}

/// Finite data of moderate range only (for the accumulate and prox bounds' large-input checks).
fn moderate_vec<T: Float>(rng: &mut Rng, len: usize) -> Vec<T> {
    (0..len)
        .map(|_| {
            let v = (rng.unit() - 0.5) * 10f64.powi(rng.below(7) as i32 - 3);
            T::from64(round_fmt(v, T::FMT).value)
        })
        .collect()
}

/// The factor combinations every test runs with.
fn factor_sets() -> Vec<Factors> {
    let l1l2 = |l1, l2| Factors::l1l2(l1, l2).unwrap();
    let new = |l1, l2| Factors::new(l1, l2).unwrap();
    vec![
        l1l2(0.01, 0.001),
        l1l2(0.5, 0.0),
        l1l2(0.0, 0.25),
        l1l2(1e-3, 1e3),
        l1l2(0.3, 0.7),
        new(Some(0.0), None),
        new(None, Some(0.0)),
        new(Some(0.0), Some(0.0)),
        new(None, None),
        // 2 * l2 = 1 + 2^-24 puts 2 * l2 * x on f32 midpoints for powers of two, and a tiny l1
        // then decides the direction below f64's precision (the allowed double rounding).
        new(Some(ldexp(1.0, -70)), Some(0.5 + ldexp(1.0, -25))),
        new(Some(ldexp(1.0, -70)), Some(0.5 + ldexp(1.0, -12))),
        // Just above an f16 (bf16) midpoint by far less than an f32 half-ulp: a conversion
        // through f32 would round twice.
        new(Some(ldexp(1.0, -40)), Some(0.5 + ldexp(1.0, -12))),
        new(Some(ldexp(1.0, -40)), Some(0.5 + ldexp(1.0, -9))),
    ]
}

fn updates() -> [Update; 7] {
    [
        Update::Overwrite,
        Update::Scaled { scale: 1.0 },
        Update::Scaled { scale: -1.0 / 3.0 },
        Update::Scaled { scale: 0.0 },
        Update::Accumulate { scale: 1.0 },
        Update::Accumulate { scale: -1.0 / 3.0 },
        Update::Accumulate { scale: 0.0 },
    ]
}

// ------------------------------------------------------------------------------------------------
// References
// ------------------------------------------------------------------------------------------------

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x // ±0 (NaN handled by the callers)
    }
}

/// The exact terms of `2^k * (l1 * sign(x) + l2_twice * x)` for finite `x` (or infinite `x` when
/// only `l1` is present): the L1 term, and the product with its error (left out when zero).
fn grad_terms(x: f64, l1: Option<f64>, l2_twice: Option<f64>, k: i32) -> Vec<f64> {
    let mut terms = Vec::with_capacity(3);
    if let Some(l1) = l1 {
        terms.push(ldexp(l1 * sign(x), k));
    }
    if let Some(c) = l2_twice {
        let (p, e) = two_product(c, ldexp(x, k));
        terms.push(p);
        if p.is_finite() && e != 0.0 {
            terms.push(e);
        }
    }
    terms
}

/// The gradient of one element rounded to `fmt`: as the kernel computes it (`hi`, the exact value
/// correctly rounded to f64, then rounded to `fmt` ties-to-even), and correctly rounded; they
/// differ only when `hi` is a midpoint of `fmt`.
#[derive(Clone, Copy, Debug)]
struct GradRef {
    kernel: f64,
    correct: f64,
    midpoint: bool,
}

fn grad_reference(x: f64, factors: &Factors, fmt: Fmt) -> GradRef {
    let exactly = |v: f64| GradRef {
        kernel: v,
        correct: v,
        midpoint: false,
    };
    let (l1, l2) = (factors.l1(), factors.l2());
    if x.is_nan() {
        // NaN stays NaN through any present term; with no term the gradient is 0.
        return exactly(if l1.is_some() || l2.is_some() {
            f64::NAN
        } else {
            0.0
        });
    }
    if x.is_infinite() {
        if let Some(l2) = l2 {
            // 2 * l2 * inf, plus a finite l1 term of the same sign; 0 * inf is NaN.
            return exactly(if l2 == 0.0 { f64::NAN } else { x });
        }
    }
    let l2_twice = l2.map(|l2| 2.0 * l2);
    // Work on values scaled by 2^k where the product's exact error would under- or overflow.
    let k = match l2_twice {
        Some(c) if x.is_finite() && c != 0.0 && x != 0.0 => {
            let p = (c * x).abs();
            if p < ldexp(1.0, -960) {
                600
            } else if p > ldexp(1.0, 1000) {
                -600
            } else {
                0
            }
        }
        _ => 0,
    };
    let terms = grad_terms(x, l1, l2_twice, k);
    if terms.iter().all(|&t| t == 0.0) {
        // Signed zeros add as IEEE says; no term at all is +0.
        return exactly(terms.iter().copied().reduce(|a, b| a + b).unwrap_or(0.0));
    }
    let mut sum = ExactSum::default();
    for &t in &terms {
        sum.add(t);
    }
    let (hs, ls) = sum.hi_lo();
    let hi = ldexp(round_exact(hs, ls, F64_FMT.scaled(k)), -k);
    let rounded = round_fmt(hi, fmt);
    let correct = ldexp(round_exact(hs, ls, fmt.scaled(k)), -k);
    GradRef {
        kernel: rounded.value,
        correct,
        midpoint: rounded.midpoint,
    }
}

/// Checks an overwritten gradient element; counts the midpoint cases seen.
fn check_overwrite(x: f64, got: f64, factors: &Factors, fmt: Fmt, midpoints: &mut usize) -> bool {
    let r = grad_reference(x, factors, fmt);
    if r.midpoint && r.kernel != r.correct {
        *midpoints += 1;
    } else if !same(r.kernel, r.correct) {
        panic!("reference inconsistent at x = {x:e}: {r:?}");
    }
    // The sign of a zero gradient is checked by `gradient_keeps_the_sign_of_zero`.
    same(got, r.kernel) || (got == 0.0 && r.kernel == 0.0)
}

/// Checks an accumulated gradient element `got` against the exact
/// `g_old + scale * (l1 sign(x) + 2 l2 x)`: within half an ulp of the dtype plus the f64 roundings
/// on the way (`2^-52` relative to each of the magnitudes involved), or the same non-finite value.
fn check_accumulate(
    x: f64,
    g_old: f64,
    scale: f64,
    got: f64,
    factors: &Factors,
    fmt: Fmt,
) -> Result<(), String> {
    let expect = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    let present = factors.l1().is_some() || factors.l2().is_some();
    if x.is_nan() {
        // NaN through any present term; with none, g + 0.
        let expected = if present { f64::NAN } else { g_old + 0.0 };
        return expect(same(got, expected), format!("{expected:e}"));
    }
    if x.is_infinite() && factors.l2().is_some() {
        // scale * (±inf, or NaN for L2(0)) + g_old, as IEEE says (0 * inf is NaN).
        let t = grad_reference(x, factors, F64_FMT).correct;
        let expected = scale * t + g_old;
        return expect(same(got, expected), format!("{expected:e}"));
    }
    let l2_twice = factors.l2().map(|l2| 2.0 * l2);
    // The exact `g + scale * term` and `scale * term` (for finite `g`), each correctly rounded to
    // f64; computed scaled by 2^-600 when a product leaves f64's range.
    let exact_sums = |k: i32, g: f64| {
        let (mut sum, mut scaled_term) = (ExactSum::default(), ExactSum::default());
        sum.add(ldexp(g, k));
        let mut finite = true;
        for term in grad_terms(x, factors.l1(), l2_twice, k) {
            let (p, e) = two_product(scale, term);
            finite &= p.is_finite();
            for part in [p, e] {
                sum.add(part);
                scaled_term.add(part);
            }
        }
        (sum.value(), scaled_term.value(), finite)
    };
    let exact_at = |g: f64| {
        if scale == 0.0 {
            return (g, 0.0); // a finite term times 0
        }
        match exact_sums(0, g) {
            (exact, scaled_term, true) => (exact, scaled_term),
            // |scale * term| >= 2^1000: g's bits lost below 2^-474 are far below the bound.
            _ => {
                let (exact, scaled_term, _) = exact_sums(-600, g);
                (ldexp(exact, 600), ldexp(scaled_term, 600))
            }
        }
    };
    if !g_old.is_finite() {
        // ±inf or NaN plus the scaled term: unchanged, unless the scaled term itself is beyond
        // f64's range (then IEEE's inf - inf is NaN).
        let (_, scaled_term) = exact_at(0.0);
        let expected = g_old + scaled_term;
        return expect(same(got, expected), format!("{expected:e}"));
    }
    let (exact, scaled_term) = exact_at(g_old);
    if exact.is_infinite() {
        return expect(got == exact, format!("{exact:e}"));
    }
    let bound = 0.5 * fmt.ulp(exact)
        + (scaled_term.abs() + g_old.abs() + exact.abs()) * ldexp(1.0, -52)
        + 16.0 * ldexp(1.0, -1074);
    let ok = if got.is_infinite() {
        got.signum() == exact.signum() && exact.abs() + bound >= fmt.overflow_threshold()
    } else {
        (got - exact).abs() <= bound
    };
    expect(ok, format!("exact {exact:e} within {bound:e}"))
}

/// The exact prox step of `|x|` as a double-double `(hi, lo)` (finite `x`), `None` when it shrinks
/// to 0 (`|x| <= lr * l1`).
fn prox_exact(x: f64, lr: f64, factors: &Factors) -> Option<(f64, f64)> {
    let l1 = factors.l1().unwrap_or(0.0);
    let l2 = factors.l2().unwrap_or(0.0);
    // Tiny inputs are scaled by 2^600: the double-double quotient needs normal numbers.
    let k = if x.abs() < ldexp(1.0, -900) { 600 } else { 0 };
    let mut num = ExactSum::default();
    let (p, e) = two_product(lr, l1);
    num.add(ldexp(x.abs(), k));
    num.add(-ldexp(p, k));
    num.add(-ldexp(e, k));
    let (nh, nl) = num.hi_lo();
    if nh <= 0.0 {
        return None;
    }
    let mut den = ExactSum::default();
    let (q, f) = two_product(2.0 * lr, l2);
    den.add(1.0);
    den.add(q);
    den.add(f);
    let (dh, dl) = den.hi_lo();
    // One Newton step of the double-double quotient.
    let q1 = nh / dh;
    let r = (-q1).mul_add(dh, nh) + nl - q1 * dl;
    let q2 = r / dh;
    let hi = q1 + q2;
    Some((ldexp(hi, -k), ldexp(q2 - (hi - q1), -k)))
}

fn check_prox(x: f64, lr: f64, got: f64, factors: &Factors, fmt: Fmt) -> bool {
    if x.is_nan() {
        return got.is_nan();
    }
    if got.is_nan() || got.is_sign_negative() != x.is_sign_negative() {
        return false;
    }
    if x.is_infinite() {
        return got == x;
    }
    let Some((hi, lo)) = prox_exact(x, lr, factors) else {
        return got == 0.0; // ±0 (the sign was checked above)
    };
    let bound = 0.5 * fmt.ulp(hi) + 3.5 * ldexp(1.0, -53) * hi + fmt.min_subnormal() + lo.abs();
    (got.abs() - hi).abs() <= bound
}

// ------------------------------------------------------------------------------------------------
// Layouts
// ------------------------------------------------------------------------------------------------

/// One operand's placement: a buffer of `buf_len` elements, the element `[0, 0, ..]` at `offset`.
#[derive(Clone, Debug)]
struct Side {
    buf_len: usize,
    offset: usize,
    strides: Vec<isize>,
}

impl Side {
    /// The smallest buffer for `shape` and `strides`, with `PAD` unaddressed elements on each side.
    fn new(shape: &[usize], strides: &[isize]) -> Side {
        const PAD: usize = 3;
        let len: usize = shape.iter().product();
        if len == 0 {
            return Side {
                buf_len: 2 * PAD,
                offset: PAD,
                strides: strides.to_vec(),
            };
        }
        let (mut low, mut high) = (0usize, 0usize);
        for (&dim, &stride) in shape.iter().zip(strides) {
            let reach = (dim - 1) * stride.unsigned_abs();
            if stride < 0 {
                low += reach;
            } else {
                high += reach;
            }
        }
        Side {
            buf_len: PAD + low + high + 1 + PAD,
            offset: PAD + low,
            strides: strides.to_vec(),
        }
    }

    /// The buffer index of every element, in C order of the logical indices.
    fn addressed(&self, shape: &[usize]) -> Vec<usize> {
        let len: usize = shape.iter().product();
        let mut out = Vec::with_capacity(len);
        if len == 0 {
            return out;
        }
        let mut index = vec![0usize; shape.len()];
        loop {
            let pos = self.offset as isize
                + index
                    .iter()
                    .zip(&self.strides)
                    .map(|(&i, &s)| i as isize * s)
                    .sum::<isize>();
            out.push(pos as usize);
            let mut d = shape.len();
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                index[d] += 1;
                if index[d] < shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }
}

fn c_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut step = 1isize;
    for (stride, &dim) in strides.iter_mut().zip(shape).rev() {
        *stride = step;
        step *= dim.max(1) as isize;
    }
    strides
}

fn f_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut step = 1isize;
    for (stride, &dim) in strides.iter_mut().zip(shape) {
        *stride = step;
        step *= dim.max(1) as isize;
    }
    strides
}

/// An input layout and a destination layout of the same shape.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    shape: Vec<usize>,
    x: Side,
    g: Side,
}

impl Case {
    fn new(name: &str, shape: &[usize], x: &[isize], g: &[isize]) -> Case {
        Case {
            name: name.to_string(),
            shape: shape.to_vec(),
            x: Side::new(shape, x),
            g: Side::new(shape, g),
        }
    }
}

/// Every layout pairing, over a 1-D length `n` and a 2-D shape `r x c`.
fn layout_cases(n: usize, r: usize, c: usize) -> Vec<Case> {
    let one = |name: &str, x: isize, g: isize| Case::new(name, &[n], &[x], &[g]);
    let mut cases = vec![one("contiguous", 1, 1)];
    for step in 2..=5 {
        cases.push(one(&format!("every {step}th element"), step, step));
    }
    cases.extend([
        one("x every 3rd, g contiguous", 3, 1),
        one("x every 2nd, g contiguous", 2, 1),
        one("x contiguous, g every 2nd", 1, 2),
        one("reversed", -1, -1),
        one("x reversed, g contiguous", -1, 1),
        one("x contiguous, g reversed", 1, -1),
        one("x every 2nd reversed, g every 3rd", -2, 3),
        one("x every 4th, g reversed", 4, -1),
        one("x broadcast", 0, 1),
    ]);
    let shape = [r, c];
    let (cs, fs) = (c_strides(&shape), f_strides(&shape));
    let (r_, c_) = (r as isize, c as isize);
    cases.extend([
        Case::new("2-D C order", &shape, &cs, &cs),
        Case::new("2-D Fortran order", &shape, &fs, &fs),
        Case::new("x C, g Fortran", &shape, &cs, &fs),
        Case::new("x Fortran, g C", &shape, &fs, &cs),
        // The transpose of a c x (r + 3) C-order matrix with padded rows.
        Case::new("x transposed (padded rows), g C", &shape, &[1, r_ + 3], &cs),
        Case::new("x C, g transposed", &shape, &cs, &[1, r_]),
        Case::new(
            "rows reversed, every 2nd column",
            &shape,
            &[-2 * c_, 2],
            &cs,
        ),
        Case::new("both reversed in both axes", &shape, &[-c_, -1], &[-1, -r_]),
        Case::new("x broadcast rows, g C", &shape, &[0, 1], &cs),
        Case::new("x broadcast columns, g Fortran", &shape, &[1, 0], &fs),
        Case::new("x one broadcast value", &shape, &[0, 0], &cs),
        // The (2, 1, 0) transpose of a c x r x 2 C-order array.
        Case::new(
            "3-D transposed",
            &[2, r, c],
            &[1, 2, 2 * r_],
            &c_strides(&[2, r, c]),
        ),
        Case::new("0-d", &[], &[], &[]),
        Case::new("empty", &[0], &[1], &[1]),
        Case::new("empty 2-D", &[3, 0], &[5, 1], &[0, 1]),
    ]);
    cases
}

/// A writable layout for prox (no broadcast).
fn prox_cases(n: usize, r: usize, c: usize) -> Vec<(String, Vec<usize>, Side)> {
    layout_cases(n, r, c)
        .into_iter()
        .map(|case| (case.name, case.shape, case.g))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Checks over one layout
// ------------------------------------------------------------------------------------------------

/// Failures, with the first few described.
#[derive(Default)]
struct Report {
    checked: usize,
    failures: usize,
    messages: Vec<String>,
    midpoints: usize,
}

impl Report {
    fn fail(&mut self, message: impl FnOnce() -> String) {
        self.failures += 1;
        if self.messages.len() < 12 {
            self.messages.push(message());
        }
    }

    fn assert_ok(&self, what: &str) {
        assert!(
            self.failures == 0,
            "{what}: {} of {} checks failed:\n{}",
            self.failures,
            self.checked,
            self.messages.join("\n")
        );
    }
}

/// Runs `value_and_grad` over `case` and checks every element, the penalty bits and the
/// unaddressed destination elements.
fn check_grad_case<T: Float>(
    case: &Case,
    x_buf: &[T],
    factors: &Factors,
    update: Update,
    rng: &mut Rng,
    report: &mut Report,
) {
    let mut g_buf: Vec<T> = match update {
        Update::Accumulate { .. } => random_vec(rng, case.g.buf_len),
        _ => vec![T::sentinel(); case.g.buf_len],
    };
    let g_old = g_buf.clone();
    let x = ArrayView::new(x_buf, case.x.offset, &case.shape, &case.x.strides).unwrap();
    let expected_penalty = T::DTYPE.round_result(factors.penalty(&x.sums()));
    let value = {
        let mut g =
            ArrayViewMut::new(&mut g_buf, case.g.offset, &case.shape, &case.g.strides).unwrap();
        value_and_grad(&x, &mut g, factors, update).unwrap()
    };
    let context = || {
        format!(
            "{} {} len {} {factors:?} {update:?}",
            T::NAME,
            case.name,
            x.len()
        )
    };
    report.checked += 1;
    // The same bits; a NaN's payload is checked by `penalty_nan_payload_is_the_reductions`.
    if !same(value, expected_penalty) {
        report.fail(|| {
            format!(
                "{}: penalty {value:e} ({:#x}) != reduction's {expected_penalty:e} ({:#x})",
                context(),
                value.to_bits(),
                expected_penalty.to_bits()
            )
        });
    }
    let x_index = case.x.addressed(&case.shape);
    let g_index = case.g.addressed(&case.shape);
    let mut touched = vec![false; g_buf.len()];
    for (&xi, &gi) in x_index.iter().zip(&g_index) {
        touched[gi] = true;
        let xv = x_buf[xi].to64();
        let got = g_buf[gi].to64();
        let old = g_old[gi].to64();
        report.checked += 1;
        let result = match update {
            Update::Overwrite => {
                if check_overwrite(xv, got, factors, T::FMT, &mut report.midpoints) {
                    Ok(())
                } else {
                    let r = grad_reference(xv, factors, T::FMT);
                    Err(format!(
                        "{:e} (correctly rounded: {:e})",
                        r.kernel, r.correct
                    ))
                }
            }
            // `scale * gradient` is what adding it to +0 gives (up to the sign of a zero).
            Update::Scaled { scale } => check_accumulate(xv, 0.0, scale, got, factors, T::FMT),
            Update::Accumulate { scale } => check_accumulate(xv, old, scale, got, factors, T::FMT),
            _ => unreachable!("an update the tests do not know"),
        };
        if let Err(expected) = result {
            report.fail(|| {
                format!(
                    "{}: x[{xi}] = {xv:e} ({:#x}), g_old = {old:e}: got {got:e} ({:#x}), \
                     expected {expected}",
                    context(),
                    x_buf[xi].bits(),
                    g_buf[gi].bits(),
                )
            });
        }
    }
    for (i, (&now, &before)) in g_buf.iter().zip(&g_old).enumerate() {
        if !touched[i] && now.bits() != before.bits() {
            report.fail(|| {
                format!(
                    "{}: unaddressed g[{i}] changed from {:#x} to {:#x}",
                    context(),
                    before.bits(),
                    now.bits()
                )
            });
        }
    }
}

/// Runs `prox` over one layout and checks every element and the unaddressed ones.
fn check_prox_case<T: Float>(
    name: &str,
    shape: &[usize],
    side: &Side,
    lr: f64,
    factors: &Factors,
    rng: &mut Rng,
    report: &mut Report,
) {
    let mut buf: Vec<T> = random_vec(rng, side.buf_len);
    let before = buf.clone();
    {
        let mut x = ArrayViewMut::new(&mut buf, side.offset, shape, &side.strides).unwrap();
        prox(&mut x, lr, factors).unwrap();
    }
    let mut touched = vec![false; buf.len()];
    for i in side.addressed(shape) {
        touched[i] = true;
        let (xv, got) = (before[i].to64(), buf[i].to64());
        report.checked += 1;
        let exact_identity = lr == 0.0 && !same(got, xv);
        if exact_identity || !check_prox(xv, lr, got, factors, T::FMT) {
            let (hi, lo) = prox_exact(xv, lr, factors).unwrap_or((0.0, 0.0));
            report.fail(|| {
                format!(
                    "{} prox {name} lr {lr} {factors:?}: x[{i}] = {xv:e} ({:#x}) -> got {got:e} \
                     ({:#x}), exact {hi:e} + {lo:e}",
                    T::NAME,
                    before[i].bits(),
                    buf[i].bits()
                )
            });
        }
    }
    for (i, (&now, &old)) in buf.iter().zip(&before).enumerate() {
        if !touched[i] && now.bits() != old.bits() {
            report.fail(|| {
                format!(
                    "{} prox {name}: unaddressed x[{i}] changed from {:#x} to {:#x}",
                    T::NAME,
                    old.bits(),
                    now.bits()
                )
            });
        }
    }
}

/// Lengths around every lane width and block remainder.
fn lengths() -> Vec<usize> {
    (0..=70)
        .chain([127, 128, 129, 255, 256, 257, 300])
        .collect()
}

fn contiguous_grad_all_lengths<T: Float>(seed: u64, report: &mut Report) {
    let mut rng = Rng::new(seed);
    for len in lengths() {
        let case = Case::new("contiguous", &[len], &[1], &[1]);
        let x_buf: Vec<T> = random_vec(&mut rng, case.x.buf_len);
        for factors in factor_sets() {
            for update in updates() {
                check_grad_case(&case, &x_buf, &factors, update, &mut rng, report);
            }
        }
    }
}

fn every_layout_grad<T: Float>(seed: u64, report: &mut Report) {
    let mut rng = Rng::new(seed);
    let sizes = [
        (1, 1, 1),
        (7, 3, 5),
        (64, 8, 9),
        (257, 17, 33),
        (3001, 40, 61),
    ];
    let factors = [
        Factors::l1l2(0.01, 0.001).unwrap(),
        Factors::l1l2(0.0, 0.25).unwrap(),
        Factors::new(Some(0.0), None).unwrap(),
    ];
    for (n, r, c) in sizes {
        for case in layout_cases(n, r, c) {
            let x_buf: Vec<T> = random_vec(&mut rng, case.x.buf_len);
            for f in &factors {
                for update in [Update::Overwrite, Update::Accumulate { scale: 0.37 }] {
                    check_grad_case(&case, &x_buf, f, update, &mut rng, report);
                }
            }
        }
    }
}

fn every_layout_prox<T: Float>(seed: u64, report: &mut Report) {
    let mut rng = Rng::new(seed);
    let factor_list = [
        Factors::l1l2(0.01, 0.001).unwrap(),
        Factors::l1l2(0.5, 0.0).unwrap(),
        Factors::new(None, Some(0.25)).unwrap(),
        Factors::l1l2(1e-3, 1e3).unwrap(),
        Factors::new(None, None).unwrap(),
    ];
    for (n, r, c) in [(1, 1, 1), (9, 2, 7), (130, 11, 13), (2049, 45, 46)] {
        for (name, shape, side) in prox_cases(n, r, c) {
            if side.strides.contains(&0) && shape.iter().product::<usize>() > 1 {
                continue; // broadcast destinations are refused (tested with the errors)
            }
            for factors in &factor_list {
                for lr in [0.0, 0.1, 1.0, 3.7] {
                    check_prox_case::<T>(&name, &shape, &side, lr, factors, &mut rng, report);
                }
            }
        }
    }
}

fn prox_all_lengths<T: Float>(seed: u64, report: &mut Report) {
    let mut rng = Rng::new(seed);
    for len in lengths() {
        let side = Side::new(&[len], &[1]);
        for factors in factor_sets() {
            for lr in [0.0, 0.01, 0.5, 2.0, 1e-6] {
                check_prox_case::<T>("contiguous", &[len], &side, lr, &factors, &mut rng, report);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The references themselves
// ------------------------------------------------------------------------------------------------

/// The rounding this file uses: `as f32` for f32; for f16 and bf16 every midpoint between two
/// consecutive values rounds to the even one, a hair above or below to the nearer one.
#[test]
fn reference_rounding_is_correct() {
    let f32_fmt = <f32 as Float>::FMT;
    let mut rng = Rng::new(1);
    for _ in 0..200_000 {
        let v = f64::from_bits(rng.next());
        let want = v as f32;
        let got = round_fmt(v, f32_fmt).value;
        assert!(same(got, f64::from(want)), "{v:e}: {got:e} vs {want:e}");
        // The remainder decides at a midpoint.
        let r = round_fmt(v, f32_fmt);
        if r.midpoint {
            assert!(round_exact(v, 1e-300, f32_fmt) == r.above);
        }
    }
    for (fmt, values) in [
        (
            <f16 as Float>::FMT,
            (0..0x7c00u16)
                .map(|b| f16::from_bits(b).to_f64())
                .collect::<Vec<_>>(),
        ),
        (
            <bf16 as Float>::FMT,
            (0..0x7f80u16)
                .map(|b| bf16::from_bits(b).to_f64())
                .collect(),
        ),
    ] {
        let mut values = values;
        values.push(f64::INFINITY); // the value above the largest finite one
        for (i, pair) in values.windows(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            let b_fin = if b.is_infinite() {
                fmt.max + fmt.ulp(fmt.max)
            } else {
                b
            };
            let m = (a + b_fin) / 2.0;
            let even = if i % 2 == 0 { a } else { b };
            for sign in [1.0, -1.0] {
                assert_eq!(round_fmt(sign * a, fmt).value, sign * a);
                let r = round_fmt(sign * m, fmt);
                assert!(r.midpoint, "{m:e}");
                assert_eq!(r.value, sign * even, "midpoint {m:e}");
                assert_eq!(round_exact(sign * m, sign * 1e-300, fmt), sign * b);
                assert_eq!(round_exact(sign * m, -sign * 1e-300, fmt), sign * a);
                let above = f64::from_bits(m.to_bits() + 1);
                let below = f64::from_bits(m.to_bits() - 1);
                assert_eq!(round_fmt(sign * above, fmt).value, sign * b, "{above:e}");
                assert_eq!(round_fmt(sign * below, fmt).value, sign * a, "{below:e}");
                assert!(!round_fmt(sign * above, fmt).midpoint);
            }
        }
    }
    // Below half the smallest subnormal: zero, keeping the sign.
    let h = <f16 as Float>::FMT;
    assert_eq!(
        round_fmt(-ldexp(1.0, -26), h).value.to_bits(),
        (-0.0f64).to_bits()
    );
    assert_eq!(round_fmt(ldexp(1.0, -1074), h).value, 0.0);
    // f64 subnormals are their own values in the f64 format.
    assert_eq!(
        round_fmt(ldexp(3.0, -1074), F64_FMT).value,
        ldexp(3.0, -1074)
    );
}

/// The exact gradient reference on hand-computed cases.
#[test]
fn reference_gradient_on_known_values() {
    let f = Factors::l1l2(0.1, 0.25).unwrap();
    let r = grad_reference(0.5, &f, F64_FMT);
    assert_eq!(r.kernel, 0.1 + 0.25); // 0.1 + 0.5 * 0.5, one rounding
    let r = grad_reference(-2.0, &f, <f32 as Float>::FMT);
    assert_eq!(r.kernel, f64::from((-0.1f64 - 1.0) as f32));
    // A product whose error is below f64's subnormals, and one beyond its range.
    let tiny = ldexp(3.0, -1074);
    let r = grad_reference(tiny, &Factors::new(None, Some(0.75)).unwrap(), F64_FMT);
    assert_eq!(r.kernel, ldexp(4.0, -1074)); // 4.5 * 2^-1074 rounds to even
    let big = Factors::new(None, Some(1e3)).unwrap();
    assert_eq!(grad_reference(1e306, &big, F64_FMT).kernel, f64::INFINITY);
    assert_eq!(grad_reference(-1e300, &big, F64_FMT).kernel, -2e303);
    // A midpoint of f32 with a remainder far below f64's precision: the kernel's double rounding.
    let f = Factors::new(Some(ldexp(1.0, -70)), Some(0.5 + ldexp(1.0, -25))).unwrap();
    let r = grad_reference(1.0, &f, <f32 as Float>::FMT);
    assert!(r.midpoint);
    assert_eq!(r.kernel, 1.0);
    assert_eq!(r.correct, 1.0 + ldexp(1.0, -23));
}

// ------------------------------------------------------------------------------------------------
// Gradient, prox and penalty: every length, every layout, every dtype
// ------------------------------------------------------------------------------------------------

#[test]
fn grad_every_length_every_dtype() {
    let mut report = Report::default();
    contiguous_grad_all_lengths::<f16>(11, &mut report);
    contiguous_grad_all_lengths::<bf16>(12, &mut report);
    contiguous_grad_all_lengths::<f32>(13, &mut report);
    contiguous_grad_all_lengths::<f64>(14, &mut report);
    report.assert_ok("gradient, contiguous");
    assert!(report.checked > 100_000);
    // The midpoint factors did reach the one case where the kernel's rounding is not correct.
    assert!(report.midpoints > 0);
}

#[test]
fn grad_every_layout_every_dtype() {
    let mut report = Report::default();
    every_layout_grad::<f16>(21, &mut report);
    every_layout_grad::<bf16>(22, &mut report);
    every_layout_grad::<f32>(23, &mut report);
    every_layout_grad::<f64>(24, &mut report);
    report.assert_ok("gradient, layouts");
}

#[test]
fn prox_every_length_every_dtype() {
    let mut report = Report::default();
    prox_all_lengths::<f16>(31, &mut report);
    prox_all_lengths::<bf16>(32, &mut report);
    prox_all_lengths::<f32>(33, &mut report);
    prox_all_lengths::<f64>(34, &mut report);
    report.assert_ok("prox, contiguous");
}

#[test]
fn prox_every_layout_every_dtype() {
    let mut report = Report::default();
    every_layout_prox::<f16>(41, &mut report);
    every_layout_prox::<bf16>(42, &mut report);
    every_layout_prox::<f32>(43, &mut report);
    every_layout_prox::<f64>(44, &mut report);
    report.assert_ok("prox, layouts");
}

/// Long inputs cross chunk and thread boundaries (whatever the thread count, which this test does
/// not set).
#[test]
fn long_inputs_match_the_references() {
    let mut report = Report::default();
    let mut rng = Rng::new(51);
    for len in [100_003, 1_000_003] {
        let case = Case::new("contiguous", &[len], &[1], &[1]);
        let x: Vec<f32> = random_vec(&mut rng, case.x.buf_len);
        let f = Factors::l1l2(0.01, 0.001).unwrap();
        check_grad_case(&case, &x, &f, Update::Overwrite, &mut rng, &mut report);
        check_grad_case(
            &case,
            &x,
            &f,
            Update::Accumulate { scale: 0.125 },
            &mut rng,
            &mut report,
        );
        let side = Side::new(&[len], &[1]);
        check_prox_case::<f32>("long", &[len], &side, 0.05, &f, &mut rng, &mut report);
    }
    // Long strided and 2-D views, f64 and f16.
    let case = Case::new("every 2nd, g reversed", &[300_001], &[2], &[-1]);
    let x: Vec<f64> = random_vec(&mut rng, case.x.buf_len);
    let f = Factors::l1l2(0.5, 0.25).unwrap();
    check_grad_case(&case, &x, &f, Update::Overwrite, &mut rng, &mut report);
    let shape = [700, 900];
    let case = Case::new(
        "x C, g Fortran",
        &shape,
        &c_strides(&shape),
        &f_strides(&shape),
    );
    let x: Vec<f16> = random_vec(&mut rng, case.x.buf_len);
    let f = Factors::l1l2(1e-3, 1e-2).unwrap();
    check_grad_case(&case, &x, &f, Update::Overwrite, &mut rng, &mut report);
    check_grad_case(
        &case,
        &x,
        &f,
        Update::Accumulate { scale: -2.0 },
        &mut rng,
        &mut report,
    );
    let side = Side::new(&shape, &f_strides(&shape));
    check_prox_case::<f16>("2-D Fortran", &shape, &side, 0.5, &f, &mut rng, &mut report);
    // Finite data too, where a NaN cannot hide a wrong penalty.
    let case = Case::new("contiguous", &[250_000], &[1], &[1]);
    let x: Vec<bf16> = moderate_vec(&mut rng, case.x.buf_len);
    check_grad_case(&case, &x, &f, Update::Overwrite, &mut rng, &mut report);
    report.assert_ok("long inputs");
}

/// The kernel rounds the f64 value of the gradient to the dtype, so it differs from the correct
/// rounding exactly when that f64 is a midpoint of the dtype and the exact value is not.
#[test]
fn double_rounding_only_at_midpoints() {
    fn run<T: Float>(l2: f64) -> Vec<(f64, f64, f64)> {
        let f = Factors::new(Some(ldexp(1.0, -70)), Some(l2)).unwrap();
        let xs: Vec<T> = [1.0, -1.0, 2.0, 0.25, -64.0]
            .iter()
            .map(|&v| T::from64(v))
            .collect();
        let mut g = vec![T::sentinel(); xs.len()];
        value_and_grad(
            &ArrayView::from_slice(&xs),
            &mut ArrayViewMut::from_slice(&mut g),
            &f,
            Update::Overwrite,
        )
        .unwrap();
        xs.iter()
            .zip(&g)
            .map(|(x, g)| {
                let r = grad_reference(x.to64(), &f, T::FMT);
                assert!(r.midpoint, "{} {:?}", T::NAME, x);
                assert_ne!(r.kernel, r.correct);
                assert_eq!(g.to64(), r.kernel, "{} x = {:?}", T::NAME, x);
                assert!((r.kernel - r.correct).abs() <= T::FMT.ulp(r.correct));
                (x.to64(), g.to64(), r.correct)
            })
            .collect()
    }
    run::<f32>(0.5 + ldexp(1.0, -25));
    run::<f16>(0.5 + ldexp(1.0, -12));
    run::<bf16>(0.5 + ldexp(1.0, -9));

    // Above a midpoint by 2^-40 (relative): not a tie in f64, so the rounding is correct, and a
    // conversion through f32 (which would land on the tie) would round to even instead.
    fn once<T: Float>(l2: f64, up: f64) {
        let f = Factors::new(Some(ldexp(1.0, -40)), Some(l2)).unwrap();
        let xs: Vec<T> = [1.0, 1.0, -1.0, 1.0]
            .iter()
            .map(|&v| T::from64(v))
            .collect();
        let mut g = vec![T::sentinel(); xs.len()];
        value_and_grad(
            &ArrayView::from_slice(&xs),
            &mut ArrayViewMut::from_slice(&mut g),
            &f,
            Update::Overwrite,
        )
        .unwrap();
        for (x, g) in xs.iter().zip(&g) {
            let r = grad_reference(x.to64(), &f, T::FMT);
            assert!(!r.midpoint && r.kernel == r.correct);
            assert_eq!(r.correct, x.to64() * (1.0 + up));
            assert_eq!(g.to64(), r.correct, "{} x = {:?}", T::NAME, x);
        }
    }
    once::<f16>(0.5 + ldexp(1.0, -12), ldexp(1.0, -10));
    once::<bf16>(0.5 + ldexp(1.0, -9), ldexp(1.0, -7));
}

/// `value_and_grad` returns "exactly the bits" of the reduction alone: with two NaNs of different
/// payloads in the input, the same one must come out (at every start offset in a cache line, as
/// the kernel's lanes start at a line boundary).
#[test]
fn penalty_nan_payload_is_the_reductions() {
    let mut failures = Vec::new();
    let buffer = vec![1.0f32; 400];
    for len in [16usize, 64, 300] {
        for (i, j) in [(8, 10), (10, 8), (12, 14), (1, len - 1)] {
            for start in 0..16 {
                let mut data = buffer.clone();
                let x = &mut data[start..start + len];
                x[i] = f32::from_bits(0xffe3_3823);
                x[j] = f32::NAN;
                let mut g = vec![0.0f32; len];
                let f = Factors::new(None, Some(0.25)).unwrap();
                let view = ArrayView::from_slice(x);
                let value = value_and_grad(
                    &view,
                    &mut ArrayViewMut::from_slice(&mut g),
                    &f,
                    Update::Overwrite,
                )
                .unwrap();
                let reduction = DType::F32.round_result(f.penalty(&view.sums()));
                if value.to_bits() != reduction.to_bits() {
                    failures.push(format!(
                        "f32 len {len} at {:#x} (mod 64), all 1 but x[{i}] = NaN 0xffe33823, \
                         x[{j}] = NaN 0x7fc00000, L2(0.25): value_and_grad {:#x}, reduction {:#x}",
                        x.as_ptr() as usize % 64,
                        value.to_bits(),
                        reduction.to_bits()
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 192 cases differ:\n{}",
        failures.len(),
        failures[..failures.len().min(8)].join("\n")
    );
}

/// `sign(±0) = ±0`: the gradient at -0 is -0 and at +0 is +0 whenever a term is present (every
/// term is a signed zero there), on the vectorised and the strided paths.
#[test]
fn gradient_keeps_the_sign_of_zero() {
    fn run<T: Float>(failures: &mut Vec<String>) {
        let x: Vec<T> = (0..200)
            .map(|i| T::from64(if i % 3 == 0 { -0.0 } else { 0.0 }))
            .collect();
        let factor_list = [
            Factors::l1l2(0.01, 0.001).unwrap(),
            Factors::l1l2(0.5, 0.0).unwrap(),
            Factors::l1l2(0.0, 0.25).unwrap(),
            Factors::new(Some(0.0), None).unwrap(),
            Factors::new(Some(0.0), Some(0.0)).unwrap(),
        ];
        for f in factor_list {
            for (shape, stride) in [(200usize, 1isize), (66, 3)] {
                let mut g = vec![T::sentinel(); shape];
                value_and_grad(
                    &ArrayView::new(&x, 0, &[shape], &[stride]).unwrap(),
                    &mut ArrayViewMut::from_slice(&mut g),
                    &f,
                    Update::Overwrite,
                )
                .unwrap();
                for (j, gj) in g.iter().enumerate() {
                    let xj = x[j * stride as usize];
                    if gj.bits() != xj.bits() {
                        failures.push(format!(
                            "{} stride {stride} {f:?}: x = {:e} gives g = {:e} ({:#x})",
                            T::NAME,
                            xj.to64(),
                            gj.to64(),
                            gj.bits()
                        ));
                        break;
                    }
                }
            }
        }
    }
    let mut failures = Vec::new();
    run::<f16>(&mut failures);
    run::<bf16>(&mut failures);
    run::<f32>(&mut failures);
    run::<f64>(&mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The documented examples of the factors' semantics, by hand.
#[test]
fn absent_and_zero_factors() {
    let x = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        2.0,
        -3.0,
    ];
    let run = |f: Factors| {
        let mut g = [f32::sentinel(); 7];
        let value = value_and_grad(
            &ArrayView::from_slice(&x),
            &mut ArrayViewMut::from_slice(&mut g),
            &f,
            Update::Overwrite,
        )
        .unwrap();
        // The sign of the zero at x = -0 is `gradient_keeps_the_sign_of_zero`'s to check.
        g[3] = g[3].abs();
        (value, g.map(f32::to_bits))
    };
    let bits = |mut v: [f32; 7]| {
        v[3] = v[3].abs();
        v.map(f32::to_bits)
    };
    const N: f32 = f32::NAN;
    const I: f32 = f32::INFINITY;
    // L1(0): 0 * sign(x) keeps NaN and signed zeros; the L2 term is absent.
    let (value, g) = run(Factors::new(Some(0.0), None).unwrap());
    assert!(value.is_nan());
    assert_eq!(g[0] & 0x7fc0_0000, 0x7fc0_0000);
    assert_eq!(&g[1..], &bits([N, 0.0, -0.0, -0.0, 0.0, 0.0, -0.0])[1..]);
    // L2(0): 0 * x is NaN at infinity.
    let (value, g) = run(Factors::new(None, Some(0.0)).unwrap());
    assert!(value.is_nan());
    assert!(g[..3].iter().all(|&b| f32::from_bits(b).is_nan()));
    assert_eq!(&g[3..], &bits([N, N, N, -0.0, 0.0, 0.0, -0.0])[3..]);
    // L1L2(0, 0): both terms dropped, even NaN gives a zero gradient and penalty.
    let (value, g) = run(Factors::l1l2(0.0, 0.0).unwrap());
    assert_eq!(value.to_bits(), 0);
    assert_eq!(g, bits([0.0; 7]));
    // L1L2(0.5, 0): the L2 term is dropped, so infinity gives ±0.5 and no NaN.
    let (value, g) = run(Factors::l1l2(0.5, 0.0).unwrap());
    assert!(value.is_nan()); // |NaN| still counts
    assert!(f32::from_bits(g[0]).is_nan());
    assert_eq!(&g[1..], &bits([N, 0.5, -0.5, -0.0, 0.0, 0.5, -0.5])[1..]);
    // Negative zero factors count as zero.
    assert_eq!(
        Factors::new(Some(-0.0), None).unwrap(),
        Factors::new(Some(0.0), None).unwrap()
    );
    assert_eq!(Factors::l1l2(-0.0, 0.5).unwrap().l1(), None);
    // L2(1): 2 * x, infinity stays infinite.
    let (_, g) = run(Factors::new(None, Some(1.0)).unwrap());
    assert_eq!(&g[1..], &bits([N, I, -I, -0.0, 0.0, 4.0, -6.0])[1..]);
    // Accumulating with absent factors adds zero: g stays, NaN data or not (-0 + 0 = +0).
    let mut g = [1.5f32, -0.0, f32::INFINITY, 2.0, -1.0, 7.0, 0.0];
    value_and_grad(
        &ArrayView::from_slice(&x),
        &mut ArrayViewMut::from_slice(&mut g),
        &Factors::new(None, None).unwrap(),
        Update::Accumulate { scale: 3.0 },
    )
    .unwrap();
    assert_eq!(
        g.map(f32::to_bits),
        bits([1.5, 0.0, I, 2.0, -1.0, 7.0, 0.0])
    );
    // The prox step with absent factors is the identity.
    let mut w = [1.5f32, -0.0, -2.5];
    prox(
        &mut ArrayViewMut::from_slice(&mut w),
        0.7,
        &Factors::new(None, None).unwrap(),
    )
    .unwrap();
    assert_eq!(w.map(f32::to_bits), [1.5f32, -0.0, -2.5].map(f32::to_bits));
    // Plain shrinkage, to zero with the sign kept.
    let mut w = [0.5f32, -0.05, 2.0, -0.0, f32::NEG_INFINITY];
    prox(
        &mut ArrayViewMut::from_slice(&mut w),
        0.1,
        &Factors::l1l2(1.0, 0.0).unwrap(),
    )
    .unwrap();
    assert_eq!(
        w.map(f32::to_bits),
        [0.4f32, -0.0, 1.9, -0.0, f32::NEG_INFINITY].map(f32::to_bits)
    );
}

// ------------------------------------------------------------------------------------------------
// Errors: every check before anything is written
// ------------------------------------------------------------------------------------------------

fn bits_of<T: Float>(values: &[T]) -> Vec<u64> {
    values.iter().map(|v| v.bits()).collect()
}

#[test]
fn grad_argument_errors_write_nothing() {
    let x = [1.0f32, -2.0, 3.0, 4.0, -5.0, 6.0];
    let x64 = [1.0f64; 6];
    let f = Factors::l1l2(0.1, 0.2).unwrap();
    let mut g = [f32::sentinel(); 6];
    let mut g64 = [f64::sentinel(); 6];
    let (g_before, g64_before) = (bits_of(&g), bits_of(&g64));
    let xv = ArrayView::from_slice(&x);

    // g's dtype differs.
    let err = value_and_grad(
        &xv,
        &mut ArrayViewMut::from_slice(&mut g64),
        &f,
        Update::Overwrite,
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::DTypeMismatch {
            source: DType::F32,
            destination: DType::F64
        }
    );
    let err = value_and_grad(
        &ArrayView::from_slice(&x64),
        &mut ArrayViewMut::from_slice(&mut g),
        &f,
        Update::Accumulate { scale: 1.0 },
    )
    .unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { .. }), "{err:?}");

    // Shapes differ (same element count).
    let mut g2 = ArrayViewMut::new(&mut g, 0, &[2, 3], &[3, 1]).unwrap();
    let err = value_and_grad(&xv, &mut g2, &f, Update::Overwrite).unwrap_err();
    assert_eq!(
        err,
        Error::ShapeMismatch {
            source: vec![6],
            destination: vec![2, 3]
        }
    );
    let mut g5 = ArrayViewMut::new(&mut g, 0, &[5], &[1]).unwrap();
    let err = value_and_grad(&xv, &mut g5, &f, Update::Overwrite).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");

    // Integer input.
    let ints = [1i32, -2, 3];
    let mut gi = [7i32; 3];
    let err = value_and_grad(
        &ArrayView::from_slice(&ints),
        &mut ArrayViewMut::from_slice(&mut gi),
        &f,
        Update::Overwrite,
    )
    .unwrap_err();
    assert_eq!(err, Error::NotFloat { dtype: DType::I32 });
    assert_eq!(gi, [7; 3]);
    let err = value_and_grad(
        &ArrayView::from_slice(&ints),
        &mut ArrayViewMut::new(&mut g, 0, &[3], &[1]).unwrap(),
        &f,
        Update::Overwrite,
    )
    .unwrap_err();
    assert_eq!(err, Error::NotFloat { dtype: DType::I32 });
    let mut wi = [3u8, 4];
    let err = prox(
        &mut ArrayViewMut::from_slice(&mut wi),
        0.1,
        &Factors::l1l2(1.0, 0.0).unwrap(),
    )
    .unwrap_err();
    assert_eq!(err, Error::NotFloat { dtype: DType::U8 });
    assert_eq!(wi, [3, 4]);

    // Non-finite scale.
    for scale in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = value_and_grad(
            &xv,
            &mut ArrayViewMut::from_slice(&mut g),
            &f,
            Update::Accumulate { scale },
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "scale", .. }),
            "{err:?}"
        );
    }
    assert_eq!(bits_of(&g), g_before);
    assert_eq!(bits_of(&g64), g64_before);
}

#[test]
fn invalid_factors_and_learning_rates() {
    for bad in [-1.0, -1e-300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for (l1, l2, name) in [(Some(bad), None, "l1"), (None, Some(bad), "l2")] {
            let err = Factors::new(l1, l2).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { name: n, .. } if n == name),
                "{err:?}"
            );
        }
        assert!(matches!(
            Factors::l1l2(bad, 0.1),
            Err(Error::InvalidArgument { name: "l1", .. })
        ));
        assert!(matches!(
            Factors::l1l2(0.1, bad),
            Err(Error::InvalidArgument { name: "l2", .. })
        ));
    }
    let f = Factors::l1l2(0.1, 0.1).unwrap();
    let mut w = [1.0f64, -2.0, f64::NAN];
    let before = bits_of(&w);
    for lr in [-0.1, -1e-300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = prox(&mut ArrayViewMut::from_slice(&mut w), lr, &f).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "lr", .. }),
            "{err:?}"
        );
        let err = prox_many(&mut [ArrayViewMut::from_slice(&mut w)], lr, &f).unwrap_err();
        assert!(matches!(
            err.root(),
            Error::InvalidArgument { name: "lr", .. }
        ));
    }
    assert_eq!(bits_of(&w), before);
    // -0.0 is a valid learning rate: the identity.
    prox(&mut ArrayViewMut::from_slice(&mut w), -0.0, &f).unwrap();
    assert_eq!(w[..2], [1.0, -2.0]);
}

#[test]
fn destinations_that_repeat_memory_are_refused() {
    let mut buf = [0.0f32; 16];
    // A broadcast destination.
    for (shape, strides) in [
        (vec![4], vec![0]),
        (vec![3, 4], vec![0, 1]),
        (vec![3, 4], vec![4, 0]),
    ] {
        let err = ArrayViewMut::new(&mut buf, 0, &shape, &strides).unwrap_err();
        assert_eq!(err, Error::BroadcastDestination, "{shape:?} {strides:?}");
    }
    // Strides that make different elements share memory.
    for (shape, strides) in [
        (vec![3, 3], vec![1, 1]),
        (vec![2, 4], vec![2, 1]),
        (vec![3, 3], vec![-1, 1]),
    ] {
        let err = ArrayViewMut::new(&mut buf, 2, &shape, &strides).unwrap_err();
        assert_eq!(
            err,
            Error::SelfOverlappingDestination,
            "{shape:?} {strides:?}"
        );
    }
    // Foreign memory: the same checks.
    let ptr = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: the strides address elements of `buf` (16 f32), which outlives the call; no view is
    // created (construction is refused), so nothing is read or written through it.
    let err = unsafe { ArrayViewMut::from_raw_parts(ptr, DType::F32, &[3, 3], &[4, 4]) };
    assert_eq!(err.unwrap_err(), Error::SelfOverlappingDestination);
    // SAFETY: as above.
    let err = unsafe { ArrayViewMut::from_raw_parts(ptr, DType::F32, &[5], &[0]) };
    assert_eq!(err.unwrap_err(), Error::BroadcastDestination);
    // A one-element broadcast dimension repeats nothing.
    assert!(ArrayViewMut::new(&mut buf, 0, &[1, 4], &[0, 1]).is_ok());
    assert!(buf.iter().all(|&v| v == 0.0));
}

#[test]
fn overlapping_source_and_destination_are_refused() {
    let f = Factors::l1l2(0.1, 0.2).unwrap();
    let mut buf: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
    let before = bits_of(&buf);
    let ptr = buf.as_mut_ptr();
    // (x: offset, shape, byte strides), (g: offset, shape, byte strides)
    type Part = (usize, Vec<usize>, Vec<isize>);
    let pairs: Vec<(Part, Part)> = vec![
        ((0, vec![8], vec![4]), (0, vec![8], vec![4])), // the same memory
        ((0, vec![8], vec![4]), (4, vec![8], vec![4])), // g starts inside x
        ((6, vec![8], vec![4]), (0, vec![8], vec![4])), // x starts inside g
        ((0, vec![8], vec![4]), (7, vec![8], vec![-4])), // g reversed over x
        ((0, vec![2, 4], vec![16, 4]), (3, vec![2, 4], vec![4, 8])), // 2-D, F order g
        ((10, vec![4], vec![8]), (0, vec![4], vec![32])), // strided, touching x's last element
    ];
    for ((xo, xs, xb), (go, gs, gb)) in pairs {
        // SAFETY: both views address elements of `buf` (32 f32) only, which outlives them; no
        // reference to `buf` is used while they live, and the library must refuse the pair (their
        // memory overlaps) before reading or writing any element, which is what is tested.
        let err = unsafe {
            let x = ArrayView::from_raw_parts(ptr.add(xo).cast(), DType::F32, &xs, &xb).unwrap();
            let mut g =
                ArrayViewMut::from_raw_parts(ptr.add(go).cast(), DType::F32, &gs, &gb).unwrap();
            value_and_grad(&x, &mut g, &f, Update::Accumulate { scale: 1.0 }).unwrap_err()
        };
        assert!(matches!(err, Error::Overlap { .. }), "{xo} {xs:?}: {err:?}");
    }
    // Adjacent but disjoint is fine (and writes only g).
    // SAFETY: x is elements 0..8 and g elements 8..16 of `buf`, disjoint; `buf` outlives both and
    // is not otherwise accessed while they live.
    unsafe {
        let x = ArrayView::from_raw_parts(ptr.cast(), DType::F32, &[8], &[4]).unwrap();
        let mut g =
            ArrayViewMut::from_raw_parts(ptr.add(8).cast(), DType::F32, &[8], &[4]).unwrap();
        value_and_grad(&x, &mut g, &f, Update::Overwrite).unwrap();
    }
    assert_eq!(bits_of(&buf[..8]), before[..8]);
    assert_eq!(bits_of(&buf[16..]), before[16..]);
    let expected = grad_reference(-10.0, &f, <f32 as Float>::FMT).kernel;
    assert_eq!(f64::from(buf[8]), expected);
}

#[test]
fn list_errors_write_no_destination() {
    let f = Factors::l1l2(0.1, 0.2).unwrap();
    let mut rng = Rng::new(61);
    let xa: Vec<f32> = random_vec(&mut rng, 50);
    let xb: Vec<f64> = random_vec(&mut rng, 40);
    let xc: Vec<f16> = random_vec(&mut rng, 40_000);
    let mut ga = vec![f32::sentinel(); 50];
    let mut gb = vec![f64::sentinel(); 40];
    let mut gc = vec![f16::sentinel(); 40_000];
    let mut gbad = vec![f32::sentinel(); 40];
    let before = (bits_of(&ga), bits_of(&gb), bits_of(&gc), bits_of(&gbad));
    let xs = [
        ArrayView::from_slice(&xa),
        ArrayView::from_slice(&xc),
        ArrayView::from_slice(&xb),
        ArrayView::from_slice(&xa),
    ];
    // The third pair's destination has the wrong dtype: index 2.
    let mut gs = [
        ArrayViewMut::from_slice(&mut ga),
        ArrayViewMut::from_slice(&mut gc),
        ArrayViewMut::from_slice(&mut gbad),
        ArrayViewMut::from_slice(&mut gb),
    ];
    for update in [Update::Overwrite, Update::Accumulate { scale: 2.0 }] {
        let err = value_and_grad_many(&xs, &mut gs, &f, update).unwrap_err();
        match &err {
            Error::InList { index: 2, error } => assert_eq!(
                **error,
                Error::DTypeMismatch {
                    source: DType::F64,
                    destination: DType::F32
                }
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(err.root(), Error::DTypeMismatch { .. }));
    }
    // Length mismatch.
    let err = value_and_grad_many(&xs[..3], &mut gs, &f, Update::Overwrite).unwrap_err();
    assert_eq!(
        err,
        Error::LengthMismatch {
            sources: 3,
            destinations: 4
        }
    );
    // Bad scale, before anything else.
    let err = value_and_grad_many(&xs, &mut gs, &f, Update::Accumulate { scale: f64::NAN });
    assert!(matches!(
        err.unwrap_err().root(),
        Error::InvalidArgument { name: "scale", .. }
    ));
    drop(gs);
    assert_eq!(
        (bits_of(&ga), bits_of(&gb), bits_of(&gc), bits_of(&gbad)),
        before
    );

    // A shape mismatch and an integer input in the middle of a list.
    let ints = [1i64, 2, 3];
    let mut gi = [0i64; 3];
    let x2 = [
        ArrayView::from_slice(&xa),
        ArrayView::from_slice(&ints),
        ArrayView::from_slice(&xb),
    ];
    let mut g2 = [
        ArrayViewMut::from_slice(&mut ga),
        ArrayViewMut::from_slice(&mut gi),
        ArrayViewMut::new(&mut gb, 0, &[5, 8], &[8, 1]).unwrap(),
    ];
    let err = value_and_grad_many(&x2, &mut g2, &f, Update::Overwrite).unwrap_err();
    assert_eq!(
        err,
        Error::NotFloat { dtype: DType::I64 }.in_list(1),
        "{err:?}"
    );
    let err = value_and_grad_many(
        &[x2[0].clone(), x2[2].clone()],
        &mut g2[1..],
        &f,
        Update::Overwrite,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InList { index: 0, .. }), "{err:?}");
    let err =
        value_and_grad_many(&[x2[2].clone()], &mut g2[2..], &f, Update::Overwrite).unwrap_err();
    assert!(
        matches!(err, Error::InList { index: 0, ref error } if matches!(**error, Error::ShapeMismatch { .. })),
        "{err:?}"
    );
    drop(g2);
    assert_eq!(
        (bits_of(&ga), bits_of(&gb)),
        (before.0.clone(), before.1.clone())
    );
    assert_eq!(gi, [0; 3]);
}

#[test]
fn list_overlaps_write_nothing() {
    let f = Factors::l1l2(0.1, 0.2).unwrap();
    let mut buf: Vec<f64> = (0..64).map(|i| i as f64 * 0.5 - 3.0).collect();
    let before = bits_of(&buf);
    let ptr = buf.as_mut_ptr();
    let other: Vec<f64> = vec![2.0; 8];
    let mut other_g = vec![f64::sentinel(); 8];
    let other_before = bits_of(&other_g);
    // SAFETY (all blocks below): every view addresses elements of `buf` (64 f64) only, which
    // outlives them; no reference to `buf` is used while they live; each call must refuse the
    // list (a destination overlaps an input or another destination) before any access.
    let err = unsafe {
        let x0 = ArrayView::from_slice(&other);
        let x1 = ArrayView::from_raw_parts(ptr.cast(), DType::F64, &[8], &[8]).unwrap();
        let g0 = ArrayViewMut::from_raw_parts(ptr.add(4).cast(), DType::F64, &[8], &[8]).unwrap();
        let g1 = ArrayViewMut::from_raw_parts(ptr.add(32).cast(), DType::F64, &[8], &[8]).unwrap();
        // g0 overlaps x1 (a different pair).
        value_and_grad_many(&[x0, x1], &mut [g0, g1], &f, Update::Overwrite).unwrap_err()
    };
    assert!(matches!(err, Error::Overlap { .. }), "{err:?}");
    let err = unsafe {
        let x0 = ArrayView::from_slice(&other);
        let x1 = ArrayView::from_raw_parts(ptr.cast(), DType::F64, &[8], &[8]).unwrap();
        let g0 = ArrayViewMut::from_raw_parts(ptr.add(20).cast(), DType::F64, &[8], &[8]).unwrap();
        let g1 = ArrayViewMut::from_raw_parts(ptr.add(24).cast(), DType::F64, &[8], &[-8]).unwrap();
        // g0 and g1 overlap each other.
        value_and_grad_many(&[x0, x1], &mut [g0, g1], &f, Update::Overwrite).unwrap_err()
    };
    assert!(matches!(err, Error::Overlap { .. }), "{err:?}");
    let err = unsafe {
        let x0 = ArrayView::from_slice(&other);
        let x1 = ArrayView::from_raw_parts(ptr.cast(), DType::F64, &[8], &[8]).unwrap();
        let g0 = ArrayViewMut::from_slice(&mut other_g);
        let g1 = ArrayViewMut::from_raw_parts(ptr.add(56).cast(), DType::F64, &[8], &[8]).unwrap();
        let g2 = ArrayViewMut::from_raw_parts(ptr.add(3).cast(), DType::F64, &[8], &[8]).unwrap();
        // The last destination overlaps the second input.
        value_and_grad_many(
            &[x0, x1.clone(), x1],
            &mut [g0, g1, g2],
            &f,
            Update::Overwrite,
        )
        .unwrap_err()
    };
    assert!(matches!(err, Error::Overlap { .. }), "{err:?}");
    // prox_many with two views of the same memory, and with partly overlapping views.
    for (a, b) in [(0usize, 0usize), (0, 7), (10, 3)] {
        let err = unsafe {
            let v0 =
                ArrayViewMut::from_raw_parts(ptr.add(a).cast(), DType::F64, &[8], &[8]).unwrap();
            let v1 =
                ArrayViewMut::from_raw_parts(ptr.add(b).cast(), DType::F64, &[8], &[8]).unwrap();
            let v2 =
                ArrayViewMut::from_raw_parts(ptr.add(40).cast(), DType::F64, &[8], &[8]).unwrap();
            prox_many(&mut [v2, v0, v1], 0.1, &f).unwrap_err()
        };
        assert!(matches!(err, Error::Overlap { .. }), "{a} {b}: {err:?}");
    }
    assert_eq!(bits_of(&buf), before);
    assert_eq!(bits_of(&other_g), other_before);
    // prox_many: a non-float tensor in the list.
    let mut ints = [5i16; 4];
    let mut w = [1.0f32; 4];
    let err = prox_many(
        &mut [
            ArrayViewMut::from_slice(&mut w),
            ArrayViewMut::from_slice(&mut ints),
        ],
        0.1,
        &f,
    )
    .unwrap_err();
    assert_eq!(err, Error::NotFloat { dtype: DType::I16 }.in_list(1));
    assert_eq!((w, ints), ([1.0; 4], [5; 4]));
}

// ------------------------------------------------------------------------------------------------
// The _many forms against the single calls
// ------------------------------------------------------------------------------------------------

/// A buffer of one of the float types.
#[derive(Clone, Debug)]
enum Buf {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Buf {
    fn random(kind: u64, rng: &mut Rng, len: usize) -> Buf {
        match kind % 4 {
            0 => Buf::F16(random_vec(rng, len)),
            1 => Buf::BF16(random_vec(rng, len)),
            2 => Buf::F32(random_vec(rng, len)),
            _ => Buf::F64(random_vec(rng, len)),
        }
    }

    fn view(&self, side: &Side, shape: &[usize]) -> ArrayView<'_> {
        let (o, s) = (side.offset, side.strides.as_slice());
        match self {
            Buf::F16(v) => ArrayView::new(v, o, shape, s),
            Buf::BF16(v) => ArrayView::new(v, o, shape, s),
            Buf::F32(v) => ArrayView::new(v, o, shape, s),
            Buf::F64(v) => ArrayView::new(v, o, shape, s),
        }
        .unwrap()
    }

    fn view_mut(&mut self, side: &Side, shape: &[usize]) -> ArrayViewMut<'_> {
        let (o, s) = (side.offset, side.strides.as_slice());
        match self {
            Buf::F16(v) => ArrayViewMut::new(v, o, shape, s),
            Buf::BF16(v) => ArrayViewMut::new(v, o, shape, s),
            Buf::F32(v) => ArrayViewMut::new(v, o, shape, s),
            Buf::F64(v) => ArrayViewMut::new(v, o, shape, s),
        }
        .unwrap()
    }

    fn bits(&self) -> Vec<u64> {
        match self {
            Buf::F16(v) => bits_of(v),
            Buf::BF16(v) => bits_of(v),
            Buf::F32(v) => bits_of(v),
            Buf::F64(v) => bits_of(v),
        }
    }
}

/// A random layout of about `len` elements.
fn random_case(rng: &mut Rng, len: usize, scalar: bool) -> Case {
    let len = len.max(1);
    let r = (1..=len.min(40)).rev().find(|r| len % r == 0).unwrap_or(1);
    let c = len / r;
    let shape = [r, c];
    let (cs, fs) = (c_strides(&shape), f_strides(&shape));
    match rng.below(if scalar { 8 } else { 7 }) {
        0 => Case::new("contiguous", &[len], &[1], &[1]),
        1 => Case::new("every 2nd, g contiguous", &[len], &[2], &[1]),
        2 => Case::new("reversed, g every 3rd", &[len], &[-1], &[3]),
        3 => Case::new("x C, g Fortran", &shape, &cs, &fs),
        4 => Case::new("Fortran", &shape, &fs, &fs),
        5 => Case::new("x broadcast rows", &shape, &[0, 1], &cs),
        6 => Case::new("every 4th, g reversed", &[len], &[4], &[-1]),
        _ => Case::new("0-d", &[], &[], &[]),
    }
}

struct ManyFixture {
    cases: Vec<Case>,
    xs: Vec<Buf>,
    gs: Vec<Buf>,
}

fn many_fixture(seed: u64) -> ManyFixture {
    let mut rng = Rng::new(seed);
    let mut cases = Vec::new();
    for i in 0..503 {
        let large = i % 170 == 85;
        let len = if large {
            600_001 + rng.below(100_000) as usize
        } else {
            1 + rng.below(40) as usize
        };
        cases.push(random_case(&mut rng, len, !large));
    }
    // An empty tensor in the list too.
    cases.push(Case::new("empty", &[0], &[1], &[1]));
    let kinds: Vec<u64> = (0..cases.len()).map(|_| rng.below(4)).collect();
    let xs = cases
        .iter()
        .zip(&kinds)
        .map(|(case, &kind)| Buf::random(kind, &mut rng, case.x.buf_len))
        .collect();
    let gs = cases
        .iter()
        .zip(&kinds)
        .map(|(case, &kind)| Buf::random(kind, &mut rng, case.g.buf_len))
        .collect();
    ManyFixture { cases, xs, gs }
}

#[test]
fn grad_many_equals_single_calls() {
    let fixture = many_fixture(71);
    assert!(
        fixture
            .cases
            .iter()
            .filter(|c| c.shape.iter().product::<usize>() > 600_000)
            .count()
            >= 3
    );
    let xs: Vec<ArrayView<'_>> = fixture
        .cases
        .iter()
        .zip(&fixture.xs)
        .map(|(case, buf)| buf.view(&case.x, &case.shape))
        .collect();
    // sums_many: each view's own sums.
    let sums = sums_many(&xs);
    for (i, (s, x)) in sums.iter().zip(&xs).enumerate() {
        let single = x.sums();
        assert!(
            s.sum_abs.to_bits() == single.sum_abs.to_bits()
                && s.sum_squares.to_bits() == single.sum_squares.to_bits(),
            "sums_many[{i}] {s:?} vs {single:?}"
        );
    }
    for factors in [
        Factors::l1l2(0.01, 0.001).unwrap(),
        Factors::new(Some(0.0), None).unwrap(),
    ] {
        for update in [Update::Overwrite, Update::Accumulate { scale: -0.75 }] {
            let mut many = fixture.gs.clone();
            let values = {
                let mut gs: Vec<ArrayViewMut<'_>> = fixture
                    .cases
                    .iter()
                    .zip(many.iter_mut())
                    .map(|(case, buf)| buf.view_mut(&case.g, &case.shape))
                    .collect();
                value_and_grad_many(&xs, &mut gs, &factors, update).unwrap()
            };
            let mut single = fixture.gs.clone();
            for (i, ((case, buf), x)) in fixture
                .cases
                .iter()
                .zip(single.iter_mut())
                .zip(&xs)
                .enumerate()
            {
                let value =
                    value_and_grad(x, &mut buf.view_mut(&case.g, &case.shape), &factors, update)
                        .unwrap();
                assert!(
                    same(value, values[i]),
                    "penalty {i} ({}, {:?}): {value:e} vs {:e}",
                    case.name,
                    x.dtype(),
                    values[i]
                );
                let reduction = x.dtype().round_result(factors.penalty(&sums[i]));
                assert!(
                    same(value, reduction),
                    "penalty {i}: {value:e} vs {reduction:e}"
                );
            }
            for (i, (a, b)) in many.iter().zip(&single).enumerate() {
                assert!(
                    a.bits() == b.bits(),
                    "gradient {i} ({}, {:?}) differs from the single call",
                    fixture.cases[i].name,
                    xs[i].dtype()
                );
            }
        }
    }
    // And the list's gradients against the reference, for the small f32 and f16 tensors.
    let mut report = Report::default();
    let mut rng = Rng::new(72);
    for (case, buf) in fixture.cases.iter().zip(&fixture.xs).take(60) {
        let f = Factors::l1l2(0.01, 0.001).unwrap();
        match buf {
            Buf::F32(x) => check_grad_case(case, x, &f, Update::Overwrite, &mut rng, &mut report),
            Buf::F16(x) => check_grad_case(case, x, &f, Update::Overwrite, &mut rng, &mut report),
            _ => {}
        }
    }
    report.assert_ok("list tensors");
}

#[test]
fn prox_many_equals_single_calls() {
    let fixture = many_fixture(81);
    let writable: Vec<(usize, &Case)> = fixture
        .cases
        .iter()
        .enumerate()
        .filter(|(_, case)| !case.g.strides.contains(&0))
        .collect();
    for (lr, factors) in [
        (0.1, Factors::l1l2(0.01, 0.001).unwrap()),
        (2.5, Factors::new(None, Some(0.3)).unwrap()),
    ] {
        let mut many = fixture.gs.clone();
        {
            let mut views: Vec<ArrayViewMut<'_>> = many
                .iter_mut()
                .zip(&fixture.cases)
                .map(|(buf, case)| buf.view_mut(&case.g, &case.shape))
                .collect();
            prox_many(&mut views, lr, &factors).unwrap();
        }
        let mut single = fixture.gs.clone();
        for &(i, case) in &writable {
            prox(&mut single[i].view_mut(&case.g, &case.shape), lr, &factors).unwrap();
        }
        for (i, (a, b)) in many.iter().zip(&single).enumerate() {
            assert!(a.bits() == b.bits(), "prox {i} ({})", fixture.cases[i].name);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Thread counts (the only test that sets them)
// ------------------------------------------------------------------------------------------------

#[test]
fn bit_identical_for_any_thread_count() {
    let mut rng = Rng::new(91);
    let x32: Vec<f32> = random_vec(&mut rng, 2_000_003);
    let x64: Vec<f64> = moderate_vec(&mut rng, 2_100_000);
    let g32_old: Vec<f32> = random_vec(&mut rng, x32.len());
    let strided: Vec<f32> = moderate_vec(&mut rng, 4_000_000);
    let f = Factors::l1l2(0.01, 0.001).unwrap();
    // One digest per result (the outputs of four runs would not fit in memory side by side).
    #[derive(Default)]
    struct Digests(Vec<u64>, std::collections::hash_map::DefaultHasher);
    impl Digests {
        fn push(&mut self, word: u64) {
            self.0.push(word);
        }
        fn extend(&mut self, words: impl IntoIterator<Item = u64>) {
            let mut hasher = self.1.clone();
            for word in words {
                hasher.write_u64(word);
            }
            self.0.push(hasher.finish());
        }
    }
    use std::hash::Hasher;
    let run = || {
        let mut out = Digests::default();
        // value_and_grad, overwrite and accumulate.
        let mut g32 = g32_old.clone();
        let v = value_and_grad(
            &ArrayView::from_slice(&x32),
            &mut ArrayViewMut::from_slice(&mut g32),
            &f,
            Update::Accumulate { scale: 0.5 },
        )
        .unwrap();
        out.push(v.to_bits());
        out.extend(g32.iter().map(|v| u64::from(v.to_bits())));
        let mut g64 = vec![0.0f64; x64.len()];
        let v = value_and_grad(
            &ArrayView::from_slice(&x64),
            &mut ArrayViewMut::from_slice(&mut g64),
            &f,
            Update::Overwrite,
        )
        .unwrap();
        out.push(v.to_bits());
        out.extend(g64.iter().map(|v| v.to_bits()));
        // value_and_grad_many over both and a strided 2-D view.
        let shape = [1000, 2000];
        let xs = [
            ArrayView::from_slice(&x32),
            ArrayView::from_slice(&x64),
            ArrayView::new(&strided, 3_999_999, &shape, &[-4000, -2]).unwrap(),
        ];
        let mut ga = vec![0.0f32; x32.len()];
        let mut gb = vec![0.0f64; x64.len()];
        let mut gc = vec![0.0f32; 2_000_000];
        let values = value_and_grad_many(
            &xs,
            &mut [
                ArrayViewMut::from_slice(&mut ga),
                ArrayViewMut::from_slice(&mut gb),
                ArrayViewMut::new(&mut gc, 0, &shape, &[1, 1000]).unwrap(),
            ],
            &f,
            Update::Overwrite,
        )
        .unwrap();
        out.extend(values.iter().map(|v| v.to_bits()));
        out.extend(ga.iter().map(|v| u64::from(v.to_bits())));
        out.extend(gb.iter().map(|v| v.to_bits()));
        out.extend(gc.iter().map(|v| u64::from(v.to_bits())));
        out.extend(
            sums_many(&xs)
                .iter()
                .flat_map(|s| [s.sum_abs.to_bits(), s.sum_squares.to_bits()]),
        );
        // prox, single and many.
        let mut w32 = x32.clone();
        let mut w64 = x64.clone();
        prox(&mut ArrayViewMut::from_slice(&mut w32), 0.05, &f).unwrap();
        prox_many(&mut [ArrayViewMut::from_slice(&mut w64)], 0.05, &f).unwrap();
        out.extend(w32.iter().map(|v| u64::from(v.to_bits())));
        out.extend(w64.iter().map(|v| v.to_bits()));
        out.0
    };
    let mut results = Vec::new();
    for threads in [1, 2, 3, 8] {
        set_num_threads(threads);
        results.push((threads, run()));
    }
    set_num_threads(0);
    let (_, first) = &results[0];
    for (threads, result) in &results[1..] {
        assert_eq!(result.len(), first.len());
        let differ = result.iter().zip(first).position(|(a, b)| a != b);
        assert!(
            differ.is_none(),
            "{threads} threads differ from 1 at word {differ:?}"
        );
    }
    // The single-threaded gradient is also the reference's.
    let mut report = Report::default();
    let case = Case::new("contiguous", &[x64.len()], &[1], &[1]);
    let mut padded = vec![0.0; 3];
    padded.extend_from_slice(&x64);
    padded.extend([0.0; 3]);
    check_grad_case(&case, &padded, &f, Update::Overwrite, &mut rng, &mut report);
    report.assert_ok("thread test data");
}

// ------------------------------------------------------------------------------------------------
// Random factors, scales and learning rates
// ------------------------------------------------------------------------------------------------

fn any_factor() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(0.0)),
        4 => (-12i32..4, 0.0f64..1.0).prop_map(|(e, m)| Some((1.0 + m) * 2f64.powi(e))),
    ]
}

fn check_random<T: Float>(bits: &[u64], l1: Option<f64>, l2: Option<f64>, scale: f64, lr: f64) {
    let f = Factors::new(l1, l2).unwrap();
    let x: Vec<T> = bits.iter().map(|&b| T::from_random_bits(b)).collect();
    let mut rng = Rng::new(bits.first().copied().unwrap_or(1));
    let mut report = Report::default();
    let case = Case::new("contiguous", &[x.len()], &[1], &[1]);
    let mut padded = vec![T::from64(0.0); 3];
    padded.extend_from_slice(&x);
    padded.extend([T::from64(1.0); 3]);
    check_grad_case(&case, &padded, &f, Update::Overwrite, &mut rng, &mut report);
    check_grad_case(
        &case,
        &padded,
        &f,
        Update::Accumulate { scale },
        &mut rng,
        &mut report,
    );
    let side = Side::new(&[x.len()], &[1]);
    check_prox_case::<T>(
        "contiguous",
        &[x.len()],
        &side,
        lr,
        &f,
        &mut rng,
        &mut report,
    );
    report.assert_ok("random factors");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bit_patterns_and_factors(
        bits in prop::collection::vec(any::<u64>(), 0..200),
        l1 in any_factor(),
        l2 in any_factor(),
        scale in -4.0f64..4.0,
        lr in prop_oneof![Just(0.0), 0.0f64..3.0, 1e-9f64..1e-6],
    ) {
        check_random::<f64>(&bits, l1, l2, scale, lr);
        check_random::<f32>(&bits, l1, l2, scale, lr);
        check_random::<f16>(&bits, l1, l2, scale, lr);
        check_random::<bf16>(&bits, l1, l2, scale, lr);
    }
}
