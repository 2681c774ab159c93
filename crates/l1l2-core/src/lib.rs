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
mod element;
mod kernels;
mod layout;
pub mod parallel;
#[doc(hidden)]
pub mod probe;

use std::fmt;

pub use element::Element;
pub use half::{bf16, f16};
pub use kernels::{isa, Isa};
pub use parallel::{num_threads, set_num_threads};

use accumulate::Partial;
use layout::Layout;

/// `sum |x|` and `sum x^2` of an input, each rounded once to f64.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    /// `sum |x|`.
    pub sum_abs: f64,
    /// `sum x^2`.
    pub sum_squares: f64,
}

impl Sums {
    /// Keras' `L1L2(l1, l2)` penalty: `l1 * sum_abs + l2 * sum_squares`, where a factor of exactly
    /// zero drops its term (so a NaN or infinity in the data does not leak through a disabled term).
    ///
    /// ```
    /// let s = l1l2_core::Sums { sum_abs: f64::NAN, sum_squares: 4.0 };
    /// assert_eq!(s.penalty(0.0, 0.5), 2.0);
    /// ```
    pub fn penalty(&self, l1: f64, l2: f64) -> f64 {
        self.weighted((l1 != 0.0).then_some(l1), (l2 != 0.0).then_some(l2))
    }

    /// `l1 * sum_abs + l2 * sum_squares` with absent terms left out; `Some(0.0)` keeps the term and
    /// so propagates NaN (Keras' `L1(0)` and `L2(0)`).
    ///
    /// ```
    /// let s = l1l2_core::Sums { sum_abs: f64::NAN, sum_squares: 4.0 };
    /// assert!(s.weighted(Some(0.0), None).is_nan());
    /// assert_eq!(s.weighted(None, Some(0.25)), 1.0);
    /// ```
    pub fn weighted(&self, l1: Option<f64>, l2: Option<f64>) -> f64 {
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
    finish::<T>(parallel::reduce(data.len(), size_of::<T>(), &|range| {
        T::reduce_run(&data[range], 1)
    }))
}

/// Keras' `L1L2(l1, l2)` penalty of a slice; see [`Sums::penalty`].
///
/// ```
/// assert_eq!(l1l2_core::penalty(&[1.0f64, -2.0], 0.5, 0.25), 0.5 * 3.0 + 0.25 * 5.0);
/// ```
pub fn penalty<T: Element>(data: &[T], l1: f64, l2: f64) -> f64 {
    sums(data).penalty(l1, l2)
}

fn finish<T: Element>(partial: T::Partial) -> Sums {
    let (sum_abs, sum_squares) = partial.finish();
    Sums {
        sum_abs,
        sum_squares,
    }
}

/// An n-dimensional strided view into a buffer, as numpy, ndarray and DLPack describe arrays:
/// element `[i0, i1, ..]` is `data[offset + i0 * strides[0] + i1 * strides[1] + ..]`, strides in
/// elements (negative and zero allowed). Validated once on construction; reduced in place.
///
/// ```
/// use l1l2_core::StridedView;
/// let buffer = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// // The transpose of a 2x3 C-order matrix, then every column reversed.
/// let view = StridedView::new(&buffer, 3, &[3, 2], &[1, -3])?;
/// assert_eq!(view.sums().sum_abs, 21.0);
/// // The second column of the 2x3 matrix.
/// let column = StridedView::new(&buffer, 1, &[2], &[3])?;
/// assert_eq!(column.sums().sum_squares, 4.0 + 25.0);
/// # Ok::<(), l1l2_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct StridedView<'a, T> {
    data: &'a [T],
    layout: Layout,
}

impl<'a, T: Element> StridedView<'a, T> {
    /// Checks that every addressed element lies inside `data`.
    pub fn new(
        data: &'a [T],
        offset: usize,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self, Error> {
        let layout = Layout::new(data.len(), offset, shape, strides)?;
        Ok(Self { data, layout })
    }

    /// The number of elements in the view.
    pub fn len(&self) -> usize {
        self.layout.len()
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `sum |x|` and `sum x^2` over the view, in one pass, in place.
    pub fn sums(&self) -> Sums {
        finish::<T>(parallel::reduce(self.len(), size_of::<T>(), &|range| {
            self.layout.reduce_range(self.data, range)
        }))
    }

    /// Keras' `L1L2(l1, l2)` penalty of the view; see [`Sums::penalty`].
    pub fn penalty(&self, l1: f64, l2: f64) -> f64 {
        self.sums().penalty(l1, l2)
    }
}

/// Why a [`StridedView`] was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// `shape` and `strides` have different lengths.
    ShapeStridesMismatch {
        /// Dimensions in `shape`.
        shape_len: usize,
        /// Dimensions in `strides`.
        strides_len: usize,
    },
    /// The view addresses elements outside the buffer.
    OutOfBounds {
        /// Lowest addressed index (may be negative).
        first: i128,
        /// Highest addressed index.
        last: i128,
        /// Length of the buffer.
        buffer_len: usize,
    },
    /// The element count overflows `usize`.
    TooLarge,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShapeStridesMismatch {
                shape_len,
                strides_len,
            } => write!(
                f,
                "shape has {shape_len} dimensions but strides has {strides_len}"
            ),
            Self::OutOfBounds {
                first,
                last,
                buffer_len,
            } => write!(
                f,
                "view addresses elements {first}..={last} of a buffer of {buffer_len}"
            ),
            Self::TooLarge => write!(f, "element count overflows usize"),
        }
    }
}

impl std::error::Error for Error {}
