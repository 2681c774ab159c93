//! Accumulators: a compensated f64 pair for float inputs and exact integers for integer inputs.
//!
//! Every accumulator merges with `merge` in an order fixed by the caller, so the result depends on the
//! data and its layout only, never on how many threads ran.

/// A running sum carried as `hi + lo`, where `lo` holds the exact rounding error of every addition
/// (Dekker's Fast2Sum when adding a term, Knuth's TwoSum when merging). Adding non-negative terms this way keeps the relative error near one ulp
/// however many terms there are.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Compensated {
    hi: f64,
    lo: f64,
}

impl Compensated {
    /// The sum `hi + lo` from its two parts (as [`Compensated::parts`] gave them).
    pub fn from_parts(hi: f64, lo: f64) -> Self {
        Self { hi, lo }
    }

    /// `(hi, lo)`: the leading part and the carried rounding error.
    pub fn parts(self) -> (f64, f64) {
        (self.hi, self.lo)
    }

    /// Adds a non-negative term (every sum the kernels keep is of non-negative terms; an infinity
    /// or NaN may come too). Dekker's Fast2Sum on the pair ordered by size gives the sum and
    /// error of TwoSum, bit for bit, in five operations instead of six: the kernels' fold runs
    /// this for every lane every few steps, as many operations as the steps themselves.
    #[inline(always)]
    pub fn add(&mut self, term: f64) {
        self.add_carrying(term, |error, lo| lo + error);
    }

    /// [`Compensated::add`] with the error added into `lo` by `carry(error, lo)`, which must round
    /// as `lo + error` does (the kernels pass a fused multiply-add by one).
    #[inline(always)]
    pub(crate) fn add_carrying(&mut self, term: f64, carry: impl Fn(f64, f64) -> f64) {
        debug_assert!(!(term < 0.0 || self.hi < 0.0), "a negative term or total");
        // Written as comparisons, not `f64::max`, so that they compile to one max and one min
        // instruction each (their NaN handling does not matter: a NaN makes `hi` NaN either way).
        let (big, small) = if self.hi > term {
            (self.hi, term)
        } else {
            (term, self.hi)
        };
        let sum = big + small;
        self.hi = sum;
        self.lo = carry(small - (sum - big), self.lo);
    }

    #[inline(always)]
    pub fn merge(self, other: Self) -> Self {
        let (sum, err) = two_sum(self.hi, other.hi);
        Self {
            hi: sum,
            lo: self.lo + other.lo + err,
        }
    }

    /// `copies` times the sum, the product's rounding error kept (a fused multiply-add): the result
    /// is within a few f64 roundings of the exact product (one more, 2^-53 relative, for a count
    /// above 2^53, which f64 cannot hold exactly).
    pub fn repeat(self, copies: u64) -> Self {
        let k = copies as f64;
        let hi = self.hi * k;
        if !hi.is_finite() {
            return Self { hi, lo: 0.0 };
        }
        let error = self.hi.mul_add(k, -hi);
        Self {
            hi,
            lo: self.lo.mul_add(k, error),
        }
    }

    /// The sum rounded once. Once `hi` is infinite or NaN the error term is meaningless (inf - inf).
    #[inline]
    pub fn value(self) -> f64 {
        if self.hi.is_finite() {
            self.hi + self.lo
        } else {
            self.hi
        }
    }
}

/// `a + b` and its exact rounding error (Knuth; no precondition on magnitudes).
#[inline(always)]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let sum = a + b;
    let b_virtual = sum - a;
    let a_virtual = sum - b_virtual;
    (sum, (a - a_virtual) + (b - b_virtual))
}

/// An unsigned 192-bit integer: enough for the exact sum of 2^64 squares of 64-bit integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct U192 {
    high: u64,
    low: u128,
}

impl U192 {
    /// The value `high * 2^128 + low`.
    pub fn from_parts(high: u64, low: u128) -> Self {
        Self { high, low }
    }

    /// `(high, low)`: the value is `high * 2^128 + low`.
    pub fn parts(self) -> (u64, u128) {
        (self.high, self.low)
    }

    /// The sum, or `None` when it does not fit 192 bits.
    pub fn checked_merge(self, other: Self) -> Option<Self> {
        let (low, carry) = self.low.overflowing_add(other.low);
        let high = self
            .high
            .checked_add(other.high)?
            .checked_add(u64::from(carry))?;
        Some(Self { high, low })
    }

    #[inline(always)]
    pub fn add(&mut self, term: u128) {
        let (low, carry) = self.low.overflowing_add(term);
        self.low = low;
        self.high += u64::from(carry);
    }

    #[inline]
    pub fn merge(mut self, other: Self) -> Self {
        self.add(other.low);
        self.high += other.high;
        self
    }

    /// `copies` times the value; the caller guarantees the product fits 192 bits (it does for a
    /// sum of at most 2^64 squares of 64-bit integers, however many of them are copies).
    pub fn repeat(self, copies: u64) -> Self {
        let k = u128::from(copies);
        let low_part = (self.low as u64 as u128) * k; // bits 0..128
        let mid_part = (self.low >> 64) * k; // bits 64..192
        let high_part = u128::from(self.high) * k; // bits 128..
        let (low, carry) = low_part.overflowing_add(mid_part << 64);
        Self {
            high: ((mid_part >> 64) + high_part + u128::from(carry)) as u64,
            low,
        }
    }

    /// The value correctly rounded to f64 (round half to even).
    pub fn to_f64(self) -> f64 {
        if self.high == 0 {
            return self.low as f64; // `as` rounds correctly
        }
        // Keep the top 128 significant bits; fold the dropped bits into a sticky bit so that the
        // final rounding (at bit ~74) still sees whether anything non-zero was cut.
        let shift = 64 - self.high.leading_zeros(); // 1..=64
        let top = (u128::from(self.high) << (128 - shift)) | (self.low >> shift);
        let dropped = self.low & ((1u128 << shift) - 1);
        let top = top | u128::from(dropped != 0);
        top as f64 * 2f64.powi(shift as i32)
    }
}

/// The partial result of one piece of the input; merged in a fixed order.
pub trait Partial: Copy + Default + Send + Sync {
    fn merge(self, other: Self) -> Self;
    /// The partial of `copies` copies of the piece (for broadcast inputs).
    fn repeat(self, copies: u64) -> Self;
    /// `(sum |x|, sum x^2)`, each rounded once to f64.
    fn finish(self) -> (f64, f64);
}

/// Partial sums of a float input.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FloatPartial {
    pub abs: Compensated,
    pub squares: Compensated,
}

impl Partial for FloatPartial {
    #[inline]
    fn merge(self, other: Self) -> Self {
        Self {
            abs: self.abs.merge(other.abs),
            squares: self.squares.merge(other.squares),
        }
    }

    fn repeat(self, copies: u64) -> Self {
        Self {
            abs: self.abs.repeat(copies),
            squares: self.squares.repeat(copies),
        }
    }

    fn finish(self) -> (f64, f64) {
        (self.abs.value(), self.squares.value())
    }
}

/// Exact partial sums of an integer or bool input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactPartial {
    /// `|x| <= 2^63` for every supported integer, so 2^64 of them fit in 128 bits.
    pub abs: u128,
    pub squares: U192,
}

impl Partial for ExactPartial {
    #[inline]
    fn merge(self, other: Self) -> Self {
        Self {
            abs: self.abs + other.abs,
            squares: self.squares.merge(other.squares),
        }
    }

    /// Exact: a tensor has at most 2^64 elements, copies included, so the totals still fit.
    fn repeat(self, copies: u64) -> Self {
        Self {
            abs: self.abs * u128::from(copies),
            squares: self.squares.repeat(copies),
        }
    }

    fn finish(self) -> (f64, f64) {
        (self.abs as f64, self.squares.to_f64())
    }
}

/// The partial of a tensor of any dtype: what the dtype-erased engine merges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum AnyPartial {
    /// Nothing read yet (the merge identity).
    #[default]
    Empty,
    /// Of a float input.
    Float(FloatPartial),
    /// Of an integer or bool input.
    Exact(ExactPartial),
}

impl From<FloatPartial> for AnyPartial {
    fn from(partial: FloatPartial) -> Self {
        Self::Float(partial)
    }
}

impl From<ExactPartial> for AnyPartial {
    fn from(partial: ExactPartial) -> Self {
        Self::Exact(partial)
    }
}

impl Partial for AnyPartial {
    #[inline]
    fn merge(self, other: Self) -> Self {
        match (self, other) {
            (Self::Empty, other) => other,
            (this, Self::Empty) => this,
            (Self::Float(a), Self::Float(b)) => Self::Float(a.merge(b)),
            (Self::Exact(a), Self::Exact(b)) => Self::Exact(a.merge(b)),
            // One tensor has one dtype: its pieces are all of one kind.
            _ => unreachable!("merging partials of different dtypes"),
        }
    }

    fn repeat(self, copies: u64) -> Self {
        match self {
            Self::Empty => Self::Empty,
            Self::Float(partial) => Self::Float(partial.repeat(copies)),
            Self::Exact(partial) => Self::Exact(partial.repeat(copies)),
        }
    }

    fn finish(self) -> (f64, f64) {
        match self {
            Self::Empty => (0.0, 0.0),
            Self::Float(partial) => partial.finish(),
            Self::Exact(partial) => partial.finish(),
        }
    }
}

/// The "partial" of an op that only writes (the prox step).
impl Partial for () {
    fn merge(self, _other: Self) -> Self {}
    fn repeat(self, _copies: u64) -> Self {}
    fn finish(self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compensated_sum_recovers_lost_low_bits() {
        let mut acc = Compensated::default();
        acc.add(1.0);
        for _ in 0..1000 {
            acc.add(f64::EPSILON / 4.0);
        }
        // exact: 1 + 250 eps, representable
        assert_eq!(acc.value(), 1.0 + 250.0 * f64::EPSILON);
    }

    #[test]
    fn adding_a_term_keeps_the_exact_error_of_two_sum() {
        // Pairs in either order, of close and of far-apart sizes, subnormals and zeros: the
        // ordered Fast2Sum of `add` must leave the sum and error Knuth's TwoSum computes.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut values = vec![
            0.0,
            f64::MIN_POSITIVE / 3.0,
            1.0,
            1.0 + f64::EPSILON,
            3.0e300,
        ];
        for _ in 0..2000 {
            // Random significand, exponent within +-80 of 1: many pairs overlap, many do not.
            let bits = (next() >> 12) | ((1023 + next() % 161 - 80) << 52);
            values.push(f64::from_bits(bits));
        }
        for (i, &a) in values.iter().enumerate() {
            for &b in values.iter().skip(i % 7).step_by(97) {
                let mut acc = Compensated::from_parts(a, 0.0);
                acc.add(b);
                let (sum, err) = two_sum(a, b);
                assert_eq!(acc.parts(), (sum, err), "{a:e} + {b:e}");
            }
        }
    }

    #[test]
    fn compensated_keeps_infinity_and_nan() {
        let mut acc = Compensated::default();
        acc.add(1.0);
        acc.add(f64::INFINITY);
        acc.add(2.0);
        assert_eq!(acc.value(), f64::INFINITY);
        acc.add(f64::NAN);
        assert!(acc.value().is_nan());
    }

    #[test]
    fn repeats_are_exact_products() {
        let mut x = U192::default();
        x.add(u128::MAX);
        x.add(12345);
        // (2^128 + 12344) * (2^64 - 1), worked out by hand in 64-bit limbs.
        let y = x.repeat(u64::MAX);
        assert_eq!(y.high, u64::MAX);
        assert_eq!(y.low, 12344u128 * u128::from(u64::MAX));
        let mut c = Compensated::default();
        c.add(0.1);
        let tripled = c.repeat(3);
        // 3 * 0.1 (the double) is exactly a tie between two doubles: rounded to even, as `*` does.
        assert_eq!(tripled.value(), 0.1f64 * 3.0);
        assert_eq!(Compensated::default().repeat(7).value(), 0.0);
    }

    #[test]
    fn u192_rounds_correctly() {
        // 2^128 + 2^75 + 1: the 1 must act as a sticky bit and round the tie at bit 75 up.
        let mut x = U192::default();
        x.add(u128::MAX);
        x.add(1); // = 2^128
        x.add(1u128 << 75);
        x.add(1);
        let expected = 2f64.powi(128) * (1.0 + 2f64.powi(-52));
        assert_eq!(x.to_f64(), expected);
        // exactly the tie without sticky: round to even (down)
        let mut y = U192::default();
        y.add(u128::MAX);
        y.add(1);
        y.add(1u128 << 75);
        assert_eq!(y.to_f64(), 2f64.powi(128));
        // many carries
        let mut z = U192::default();
        for _ in 0..8 {
            z.add(u128::MAX);
        }
        assert_eq!(z.to_f64(), 8.0 * 2f64.powi(128));
    }
}
