//! # l1l2-core
//!
//! The L1/L2 regularization penalty `l1 * sum(|x|) + l2 * sum(x^2)` (Keras' `L1L2`), computed in one
//! pass over the data, with SIMD chosen at run time (AVX-512F, AVX2+FMA+F16C, baseline; NEON on
//! aarch64) and a deterministic multi-threaded reduction.
//!
//! * **Exact enough to trust**: f16, bf16 and f32 inputs accumulate in f64; f64 inputs use
//!   compensated lane sums, so the relative error stays within a few ulp at any length. Integer and
//!   bool inputs are summed exactly and rounded once. A narrow input never overflows the sum.
//! * **Deterministic**: the same input gives the same bits for any thread count and on every call.
//!   "Same input" includes the data's address modulo 64 bytes: the kernel reads from cache-line
//!   boundaries, so a copy at another offset can differ in the last bits (within the accuracy
//!   bounds).
//! * **In place**: strided views (negative, zero or arbitrary strides) are reduced without a copy.
//! * **Training kernels**: [`value_and_grad`] writes (or adds) the penalty's gradient into a
//!   buffer the caller owns while it computes the penalty, in one pass; [`prox`] is the proximal
//!   step of the elastic-net penalty, in place; the `_many` forms take a whole model's tensors in
//!   one parallel region.
//! * **One description of an array**: [`ArrayView`] and [`ArrayViewMut`] (pointer, [`DType`],
//!   shape, strides) serve every dtype and op; their constructors validate bounds, alignment and
//!   strides, and ops check shapes, dtypes and overlap before writing anything.
//!
//! ```
//! let weights = [0.5f32, -1.0, 2.0];
//! let s = l1l2_core::sums(&weights);
//! assert_eq!((s.sum_abs, s.sum_squares), (3.5, 5.25));
//! // 0.01 * 3.5 + 0.001 * 5.25
//! assert!((l1l2_core::penalty(&weights, 0.01, 0.001) - 0.04025).abs() < 1e-15);
//! ```
//!
//! Thread count: [`set_num_threads`], else the `L1L2_NUM_THREADS` or `RAYON_NUM_THREADS`
//! environment variable, else the CPU count. Called from inside a rayon pool, the reduction runs in
//! that pool. Processes created by `fork()` get a pool of their own (see [`parallel`]).

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod accumulate;
mod dims;
mod dtype;
mod element;
mod error;
mod extremes;
mod kernels;
mod layout;
mod ops;
mod orthogonal;
pub mod parallel;
mod partial;
mod placement;
#[cfg(feature = "probe")]
#[doc(hidden)]
pub mod probe;
mod view;

pub use dtype::DType;
pub use element::Element;
pub use error::Error;
pub use half::{bf16, f16};
pub use kernels::{isa, Isa};
pub use ops::{prox, prox_many, sums_many, value_and_grad, value_and_grad_many, Factors, Update};
pub use orthogonal::{orthogonal_penalty, Vectors};
pub use parallel::{num_threads, set_num_threads};
pub use partial::SumsPartial;
pub use view::{ArrayView, ArrayViewMut};

/// `sum |x|` and `sum x^2` of an input, each rounded once to f64.
///
/// For float64 inputs beyond f64's comfortable range (squares under 2^-1022, sums over its largest
/// value) the sums are also kept scaled by a power of two, so that [`Sums::penalty`] applies the
/// factors before the final rounding: `1e-300 * (1e200)^2` is `1e100`, while `sum_squares`
/// itself is infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    /// `sum |x|`.
    pub sum_abs: f64,
    /// `sum x^2`.
    pub sum_squares: f64,
    scaled: Option<extremes::Scaled>,
}

impl Sums {
    /// Sums of the given values (in f64's range: no scaled form).
    ///
    /// ```
    /// let s = l1l2_core::Sums::new(3.5, 5.25);
    /// assert_eq!(s.penalty(0.5, 0.0), 1.75);
    /// ```
    pub fn new(sum_abs: f64, sum_squares: f64) -> Self {
        Self {
            sum_abs,
            sum_squares,
            scaled: None,
        }
    }

    /// The sums of a scaled float64 pass (see `extremes`).
    pub(crate) fn from_scaled(scaled: extremes::Scaled) -> Self {
        let (sum_abs, sum_squares) = scaled.rounded();
        Self {
            sum_abs,
            sum_squares,
            scaled: Some(scaled),
        }
    }

    /// Keras' `L1L2(l1, l2)` penalty: `l1 * sum_abs + l2 * sum_squares`, where a factor of exactly
    /// zero drops its term (so a NaN or infinity in the data does not leak through a disabled term).
    ///
    /// ```
    /// let s = l1l2_core::Sums::new(f64::NAN, 4.0);
    /// assert_eq!(s.penalty(0.0, 0.5), 2.0);
    /// ```
    pub fn penalty(&self, l1: f64, l2: f64) -> f64 {
        self.weighted((l1 != 0.0).then_some(l1), (l2 != 0.0).then_some(l2))
    }

    /// `l1 * sum_abs + l2 * sum_squares` with absent terms left out; `Some(0.0)` keeps the term and
    /// so propagates NaN (Keras' `L1(0)` and `L2(0)`).
    ///
    /// ```
    /// let s = l1l2_core::Sums::new(f64::NAN, 4.0);
    /// assert!(s.weighted(Some(0.0), None).is_nan());
    /// assert_eq!(s.weighted(None, Some(0.25)), 1.0);
    /// ```
    pub fn weighted(&self, l1: Option<f64>, l2: Option<f64>) -> f64 {
        // The scaled form, unless the caller has changed the public fields since.
        if let Some(scaled) = self.scaled.filter(|scaled| {
            let (sum_abs, sum_squares) = scaled.rounded();
            (sum_abs.to_bits(), sum_squares.to_bits())
                == (self.sum_abs.to_bits(), self.sum_squares.to_bits())
        }) {
            let (abs, squares, e) = (scaled.abs, scaled.squares, scaled.exponent);
            let l1_term = l1.map_or(0.0, |factor| extremes::scaled_product(factor, abs, e));
            let l2_term = l2.map_or(0.0, |factor| {
                extremes::scaled_product(factor, squares, 2 * e)
            });
            return l1_term + l2_term;
        }
        let l1_term = l1.map_or(0.0, |factor| factor * self.sum_abs);
        let l2_term = l2.map_or(0.0, |factor| factor * self.sum_squares);
        l1_term + l2_term
    }
}

/// `sum |x|` and `sum x^2` of a slice, in one pass.
///
/// ```
/// use l1l2_core::f16;
/// let x = [f16::from_f32(60000.0); 4]; // squares far beyond f16's range
/// assert_eq!(l1l2_core::sums(&x).sum_squares, 4.0 * 60000.0 * 60000.0);
/// ```
pub fn sums<T: Element>(data: &[T]) -> Sums {
    ArrayView::from_slice(data).sums()
}

/// Keras' `L1L2(l1, l2)` penalty of a slice, in f64; see [`Sums::penalty`].
///
/// ```
/// assert_eq!(l1l2_core::penalty(&[1.0f64, -2.0], 0.5, 0.25), 0.5 * 3.0 + 0.25 * 5.0);
/// ```
pub fn penalty<T: Element>(data: &[T], l1: f64, l2: f64) -> f64 {
    sums(data).penalty(l1, l2)
}
