//! Mergeable partial sums: the state of `sum |x|` and `sum x^2` before the final rounding, for
//! inputs split across processes or machines (Dask chunks, shards, batches).
//!
//! A [`SumsPartial`] holds what the single-process reduction merges internally: compensated f64
//! pairs for float inputs, exact integers (up to 192 bits) for integer and bool inputs. Partials
//! merge in whatever order the caller fixes, and [`SumsPartial::to_bytes`] gives a stable,
//! versioned encoding to ship them between processes.
//!
//! **Same bits anywhere.** The partial of an array depends on its values in C (row-major) order
//! only: not on its memory layout (Fortran order, strides, broadcast), not on its address, not on
//! the thread count. The single-call reduction reads data from cache-line boundaries, so there
//! the bits depend on the address modulo 64 bytes; here every block of `GATHER_LEN` elements is
//! read at a 64-byte boundary (in place when it already is, else copied there first), so two
//! processes holding the same chunk at different addresses compute the same bits.
//!
//! **float64 at the ends of the range.** When a float64 partial's fast sums overflow or its
//! squares fall under 2^-968 (see `extremes`), the partial is summed again scaled by `2^-600` or
//! `2^600` and keeps that scale (`shift`). Merging two partials of different scales brings both to
//! the lower one (the larger magnitudes): what that loses lies below 2^-1074 in the scaled units,
//! far under the other side's total. A merge at scale 0 whose sum overflows is redone at `2^-600`.
//! So chunked float64 sums keep the single call's accuracy bounds at both ends of the range.

use crate::accumulate::{AnyPartial, Compensated, ExactPartial, FloatPartial, Partial, U192};
use crate::dtype::with_element;
use crate::element::{Pod, Reduce};
use crate::extremes::{self, Scaled};
use crate::kernels::NoSink;
use crate::{parallel, ArrayView, DType, Error, Factors, Sums};

/// Elements read per kernel call: a block gathered on the stack (at most 16 KiB) when it is not
/// already contiguous at a 64-byte boundary. A multiple of 32, so that consecutive blocks of a
/// 64-byte aligned contiguous input all start at a boundary.
const GATHER_LEN: usize = 2048;

/// The scales a float64 partial may carry: `2^-600` (huge values), none, `2^600` (tiny values).
const SHIFTS: [i32; 3] = [-600, 0, 600];

/// The encoding's first bytes and its version.
const MAGIC: &[u8; 4] = b"L1L2";
const VERSION: u8 = 1;

/// The mergeable state of `sum |x|` and `sum x^2` of a piece of an array; see the module docs.
///
/// ```
/// use l1l2_core::{ArrayView, SumsPartial};
/// let data = [1.0f32, -2.0, 3.0, -4.0];
/// let left = SumsPartial::of(&ArrayView::from_slice(&data[..2]));
/// let right = SumsPartial::of(&ArrayView::from_slice(&data[2..]));
/// let whole = left.merge(&right)?;
/// assert_eq!((whole.sums().sum_abs, whole.sums().sum_squares), (10.0, 30.0));
/// let shipped = SumsPartial::from_bytes(&whole.to_bytes())?;
/// assert_eq!(shipped, whole);
/// # Ok::<(), l1l2_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SumsPartial {
    /// The dtype of the data summed; `None` for the empty partial (the merge identity).
    dtype: Option<DType>,
    state: State,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum State {
    #[default]
    Empty,
    /// Of float data: the true sums are `abs * 2^-shift` and `squares * 2^(-2 shift)`.
    Float { sums: FloatPartial, shift: i32 },
    /// Of integer or bool data.
    Exact(ExactPartial),
}

impl SumsPartial {
    /// The partial of nothing: merging it changes nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The partial of every element of `x` (in parallel for large inputs, along a fixed tree).
    pub fn of(x: &ArrayView<'_>) -> Self {
        let dtype = x.dtype();
        let plain: AnyPartial =
            with_element!(dtype, |T| canonical_reduce::<T, AnyPartial>(x, &|block| {
                T::reduce_run(block, 1, &mut NoSink).into()
            }));
        let state = match plain {
            AnyPartial::Exact(exact) => State::Exact(exact),
            AnyPartial::Float(sums) => float_state(x, sums),
            AnyPartial::Empty if dtype.is_float() => State::Float {
                sums: FloatPartial::default(),
                shift: 0,
            },
            AnyPartial::Empty => State::Exact(ExactPartial::default()),
        };
        Self {
            dtype: Some(dtype),
            state,
        }
    }

    /// The dtype of the data, `None` for the empty partial.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// The partial of both pieces. Partials of different dtypes do not merge (one array has one
    /// dtype); exact sums that overflow 192 bits cannot come from one array either.
    pub fn merge(&self, other: &Self) -> Result<Self, Error> {
        let dtype = match (self.dtype, other.dtype) {
            (Some(first), Some(second)) if first != second => {
                return Err(Error::MixedDTypes { first, second })
            }
            (first, second) => first.or(second),
        };
        let state = match (self.state, other.state) {
            (State::Empty, state) | (state, State::Empty) => state,
            (State::Exact(a), State::Exact(b)) => State::Exact(merge_exact(a, b)?),
            (State::Float { sums: a, shift: s }, State::Float { sums: b, shift: t }) => {
                merge_float((a, s), (b, t))
            }
            _ => return Err(invalid("a float partial and an integer partial")),
        };
        Ok(Self { dtype, state })
    }

    /// `sum |x|` and `sum x^2`, each rounded once to f64 (with the scaled form of float64 sums
    /// beyond f64's range kept for [`Sums::penalty`]).
    pub fn sums(&self) -> Sums {
        match self.state {
            State::Empty => Sums::default(),
            State::Exact(exact) => {
                let (sum_abs, sum_squares) = exact.finish();
                Sums::new(sum_abs, sum_squares)
            }
            State::Float { sums, shift: 0 } => {
                let (sum_abs, sum_squares) = sums.finish();
                Sums::new(sum_abs, sum_squares)
            }
            State::Float { sums, shift } => Sums::from_scaled(Scaled {
                abs: sums.abs.value(),
                squares: sums.squares.value(),
                exponent: -shift,
            }),
        }
    }

    /// The penalty with `factors`, rounded once to the data's result dtype (the float dtype
    /// itself; float64 for integer, bool and empty data), as a single call rounds it.
    pub fn penalty(&self, factors: &Factors) -> f64 {
        let value = factors.penalty(&self.sums());
        self.dtype.map_or(value, |dtype| dtype.round_result(value))
    }

    /// The stable encoding (version 1, little-endian): `b"L1L2"`, the version byte, a dtype code
    /// (0 for the empty partial), then for float data the scale (i16) and the four f64 parts,
    /// for integer data the exact `sum |x|` (u128) and `sum x^2` (u128 low part, u64 high part).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(46);
        bytes.extend_from_slice(MAGIC);
        bytes.push(VERSION);
        bytes.push(self.dtype.map_or(0, dtype_code));
        match self.state {
            State::Empty => {}
            State::Float { sums, shift } => {
                bytes.extend_from_slice(&(shift as i16).to_le_bytes());
                let (abs_hi, abs_lo) = sums.abs.parts();
                let (squares_hi, squares_lo) = sums.squares.parts();
                for part in [abs_hi, abs_lo, squares_hi, squares_lo] {
                    bytes.extend_from_slice(&part.to_le_bytes());
                }
            }
            State::Exact(exact) => {
                let (high, low) = exact.squares.parts();
                bytes.extend_from_slice(&exact.abs.to_le_bytes());
                bytes.extend_from_slice(&low.to_le_bytes());
                bytes.extend_from_slice(&high.to_le_bytes());
            }
        }
        bytes
    }

    /// Decodes [`SumsPartial::to_bytes`]; anything else (another version, a truncated or padded
    /// string, an unknown dtype, a scale or sum no partial has) is an [`Error::InvalidPartial`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let header = MAGIC.len() + 2;
        if bytes.len() < header || &bytes[..MAGIC.len()] != MAGIC {
            return Err(invalid(
                "not an encoded partial (it must start with b\"L1L2\")",
            ));
        }
        if bytes[MAGIC.len()] != VERSION {
            return Err(invalid(
                "unknown encoding version (this build reads version 1)",
            ));
        }
        let code = bytes[MAGIC.len() + 1];
        let body = &bytes[header..];
        if code == 0 {
            return match body.is_empty() {
                true => Ok(Self::empty()),
                false => Err(invalid("wrong length for an empty partial")),
            };
        }
        let dtype = dtype_of_code(code).ok_or_else(|| invalid("unknown dtype code"))?;
        let state = if dtype.is_float() {
            decode_float(body)?
        } else {
            decode_exact(body)?
        };
        Ok(Self {
            dtype: Some(dtype),
            state,
        })
    }
}

fn invalid(reason: &'static str) -> Error {
    Error::InvalidPartial { reason }
}

fn decode_float(body: &[u8]) -> Result<State, Error> {
    let body: &[u8; 34] = body
        .try_into()
        .map_err(|_| invalid("wrong length for a float partial (40 bytes)"))?;
    let shift = i32::from(i16::from_le_bytes([body[0], body[1]]));
    if !SHIFTS.contains(&shift) {
        return Err(invalid("unknown scale of a float partial"));
    }
    let part = |index: usize| {
        let start = 2 + 8 * index;
        f64::from_le_bytes(body[start..start + 8].try_into().expect("8 bytes"))
    };
    let mut sums = [Compensated::default(); 2];
    for (index, sum) in sums.iter_mut().enumerate() {
        let (hi, lo) = (part(2 * index), part(2 * index + 1));
        // A sum of magnitudes is never negative, and while it is finite its error part is finite
        // and smaller than it (each rounding error is under 2^-53 of the running sum).
        if hi < 0.0 || (hi.is_finite() && !(lo.is_finite() && lo.abs() <= hi)) {
            return Err(invalid("a float partial with a negative or malformed sum"));
        }
        *sum = Compensated::from_parts(hi, lo);
    }
    Ok(State::Float {
        sums: FloatPartial {
            abs: sums[0],
            squares: sums[1],
        },
        shift,
    })
}

fn decode_exact(body: &[u8]) -> Result<State, Error> {
    let body: &[u8; 40] = body
        .try_into()
        .map_err(|_| invalid("wrong length for an integer partial (46 bytes)"))?;
    let abs = u128::from_le_bytes(body[..16].try_into().expect("16 bytes"));
    let low = u128::from_le_bytes(body[16..32].try_into().expect("16 bytes"));
    let high = u64::from_le_bytes(body[32..].try_into().expect("8 bytes"));
    Ok(State::Exact(ExactPartial {
        abs,
        squares: U192::from_parts(high, low),
    }))
}

/// Stable codes of the dtypes in the encoding (never renumbered; 0 is the empty partial).
const DTYPE_CODES: [(DType, u8); 13] = [
    (DType::F16, 1),
    (DType::BF16, 2),
    (DType::F32, 3),
    (DType::F64, 4),
    (DType::I8, 5),
    (DType::I16, 6),
    (DType::I32, 7),
    (DType::I64, 8),
    (DType::U8, 9),
    (DType::U16, 10),
    (DType::U32, 11),
    (DType::U64, 12),
    (DType::Bool, 13),
];

fn dtype_code(dtype: DType) -> u8 {
    DTYPE_CODES
        .iter()
        .find(|(known, _)| *known == dtype)
        .map_or(0, |&(_, code)| code)
}

fn dtype_of_code(code: u8) -> Option<DType> {
    DTYPE_CODES
        .iter()
        .find(|(_, known)| *known == code)
        .map(|&(dtype, _)| dtype)
}

fn merge_exact(a: ExactPartial, b: ExactPartial) -> Result<ExactPartial, Error> {
    let overflow = || invalid("exact sums beyond 2^128 / 2^192: not the partials of one array");
    Ok(ExactPartial {
        abs: a.abs.checked_add(b.abs).ok_or_else(overflow)?,
        squares: a.squares.checked_merge(b.squares).ok_or_else(overflow)?,
    })
}

/// The float state of `x` from its plain sums: for float64 at the ends of the range, the sums of
/// a scaled pass instead (see the module docs).
fn float_state(x: &ArrayView<'_>, sums: FloatPartial) -> State {
    let (sum_abs, sum_squares) = sums.finish();
    if x.dtype() != DType::F64 || !extremes::needs_rescaling(sum_abs, sum_squares) {
        return State::Float { sums, shift: 0 };
    }
    let shift = if sum_abs.is_finite() && sum_squares.is_finite() {
        600 // squares underflowed: scale up
    } else {
        -600
    };
    let factor = extremes::scale(1.0, shift);
    let sums = canonical_reduce::<f64, FloatPartial>(x, &|block| {
        let mut total = FloatPartial::default();
        for &value in block {
            let scaled = value * factor; // exact unless it leaves the range
            total.abs.add(scaled.abs());
            total.squares.add(scaled * scaled);
        }
        total
    });
    State::Float { sums, shift }
}

/// Whether a float partial is exactly zero (then it is the same at every scale).
fn is_zero(sums: &FloatPartial) -> bool {
    let (abs_hi, abs_lo) = sums.abs.parts();
    let (squares_hi, squares_lo) = sums.squares.parts();
    [abs_hi, abs_lo, squares_hi, squares_lo] == [0.0; 4]
}

/// `sums` (at scale `from`) at the scale `to`: each part rounded once (the loss is below the
/// smallest subnormal of the new units).
fn rescale(sums: FloatPartial, from: i32, to: i32) -> FloatPartial {
    let e = to - from;
    let scale = |sum: Compensated, e: i32| {
        let (hi, lo) = sum.parts();
        Compensated::from_parts(extremes::scale(hi, e), extremes::scale(lo, e))
    };
    FloatPartial {
        abs: scale(sums.abs, e),
        squares: scale(sums.squares, 2 * e),
    }
}

/// Merges two float partials at the lower of their scales (a zero partial has no say), or lower
/// still when the merged sums would overflow there.
fn merge_float(a: (FloatPartial, i32), b: (FloatPartial, i32)) -> State {
    let target = match (is_zero(&a.0), is_zero(&b.0)) {
        (true, false) => b.1,
        (false, true) => a.1,
        _ => a.1.min(b.1),
    };
    let mut merged = (FloatPartial::default(), target);
    for &shift in SHIFTS.iter().rev().filter(|&&shift| shift <= target) {
        let (x, y) = (rescale(a.0, a.1, shift), rescale(b.0, b.1, shift));
        merged = (x.merge(y), shift);
        let overflowed = |sum: Compensated, one: Compensated, other: Compensated| {
            sum.parts().0.is_infinite() && one.parts().0.is_finite() && other.parts().0.is_finite()
        };
        let (m, x, y) = (merged.0, x, y);
        if !overflowed(m.abs, x.abs, y.abs) && !overflowed(m.squares, x.squares, y.squares) {
            break;
        }
    }
    State::Float {
        sums: merged.0,
        shift: merged.1,
    }
}

/// Reduces `x` in C order along the fixed chunk tree: each chunk's elements go to `reduce_block`
/// in blocks of `GATHER_LEN`, each at a 64-byte boundary, and the block partials are merged in
/// order. The result depends on the values and the element count only.
fn canonical_reduce<T, P>(x: &ArrayView<'_>, reduce_block: &(impl Fn(&[T]) -> P + Sync)) -> P
where
    T: Pod,
    P: Partial,
{
    let span = x.span::<T>();
    let runs = CRuns::new(x);
    parallel::reduce(x.len(), size_of::<T>(), &|range| {
        let mut total = P::default();
        let mut block = LineAligned([T::default(); GATHER_LEN]);
        let mut start = range.start;
        while start < range.end {
            let len = GATHER_LEN.min(range.end - start);
            let values = match runs
                .contiguous(start)
                .map(|first| &span[first..first + len])
            {
                Some(values) if (values.as_ptr() as usize) % 64 == 0 => values,
                Some(values) => {
                    block.0[..len].copy_from_slice(values);
                    &block.0[..len]
                }
                None => {
                    runs.gather(span, start, &mut block.0[..len]);
                    &block.0[..len]
                }
            };
            total = total.merge(reduce_block(values));
            start += len;
        }
        total
    })
}

/// A value placed at a 64-byte boundary.
#[repr(align(64))]
struct LineAligned<T>(T);

/// Where the elements of `x` lie in its span, in C order.
struct CRuns {
    shape: Vec<usize>,
    strides: Vec<isize>,
    offset: usize,
    /// Whether element `i` (C order) is at `offset + i`.
    contiguous: bool,
}

impl CRuns {
    fn new(x: &ArrayView<'_>) -> Self {
        let (mut shape, mut strides) = (x.shape().to_vec(), x.strides().to_vec());
        if shape.is_empty() {
            (shape, strides) = (vec![1], vec![0]); // a 0-d array: one element
        }
        let mut expected = 1isize;
        let mut contiguous = true;
        for (&len, &stride) in shape.iter().zip(&strides).rev() {
            if len != 1 && stride != expected {
                contiguous = false;
            }
            expected = expected.saturating_mul(len as isize);
        }
        Self {
            shape,
            strides,
            offset: x.offset(),
            contiguous,
        }
    }

    /// The span index of C-order element `start`, if the elements after it follow it there.
    fn contiguous(&self, start: usize) -> Option<usize> {
        self.contiguous.then_some(self.offset + start)
    }

    /// Copies the C-order elements `start..start + out.len()` into `out`, a row at a time.
    fn gather<T: Copy>(&self, span: &[T], start: usize, out: &mut [T]) {
        let ndim = self.shape.len();
        // The multi-index of `start` and the span index it maps to.
        let mut index = vec![0usize; ndim];
        let mut rest = start;
        for axis in (0..ndim).rev() {
            index[axis] = rest % self.shape[axis];
            rest /= self.shape[axis];
        }
        let position = |index: &[usize]| {
            index
                .iter()
                .zip(&self.strides)
                .fold(self.offset as isize, |at, (&i, &stride)| {
                    at + i as isize * stride
                })
        };
        let (row_len, row_stride) = (self.shape[ndim - 1], self.strides[ndim - 1]);
        let mut filled = 0;
        while filled < out.len() {
            let take = (row_len - index[ndim - 1]).min(out.len() - filled);
            let first = position(&index);
            let targets = &mut out[filled..filled + take];
            if row_stride == 1 {
                let first = first as usize;
                targets.copy_from_slice(&span[first..first + take]);
            } else {
                for (k, target) in targets.iter_mut().enumerate() {
                    *target = span[(first + k as isize * row_stride) as usize];
                }
            }
            filled += take;
            // Next row: carry the multi-index.
            index[ndim - 1] += take;
            let mut axis = ndim - 1;
            while axis > 0 && index[axis] == self.shape[axis] {
                index[axis] = 0;
                axis -= 1;
                index[axis] += 1;
            }
        }
    }
}
