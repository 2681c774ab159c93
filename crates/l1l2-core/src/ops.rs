//! The op families on one skeleton: the reduction (`sums`), the fused value-and-gradient and the
//! proximal step, each over one tensor or a list of them in one parallel region.
//!
//! Every op walks its tensors in the layout's order, cut into the same chunks, and the gradient is
//! written from inside the reduction kernel, block by block while the block is in L1: the input is
//! read from memory once, and the penalty has exactly the bits of the reduction alone.

use std::borrow::Cow;
use std::ops::Range;

use crate::accumulate::{AnyPartial, Partial};
use crate::dtype::{with_element, with_float};
use crate::element::{Float, Reduce};
use crate::kernels::{dispatch, Kernel, RunSink, Target};
use crate::layout::{Layout, NoWrite, RowWriter};
use crate::{extremes, parallel, ArrayView, ArrayViewMut, DType, Error, Sums};

/// Validated regularization factors. `None` leaves a term out; `Some(0.0)` keeps it, so NaN in
/// the data still shows (Keras' `L1(0)` and `L2(0)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Factors {
    l1: Option<f64>,
    l2: Option<f64>,
}

impl Factors {
    /// The factors of `L1(l1)` (`l2 = None`), `L2(l2)` (`l1 = None`) or both; each must be finite
    /// and non-negative.
    pub fn new(l1: Option<f64>, l2: Option<f64>) -> Result<Self, Error> {
        let check = |name, factor: Option<f64>| match factor {
            Some(value) if !(value.is_finite() && value >= 0.0) => Err(Error::InvalidArgument {
                name,
                value,
                expected: "a finite number >= 0",
            }),
            _ => Ok(factor.map(|value| value + 0.0)), // -0.0 -> 0.0
        };
        Ok(Self {
            l1: check("l1", l1)?,
            l2: check("l2", l2)?,
        })
    }

    /// The factors of `L1L2(l1, l2)`: a factor of exactly zero drops its term.
    ///
    /// ```
    /// let factors = l1l2_core::Factors::l1l2(0.5, 0.0)?;
    /// assert_eq!((factors.l1(), factors.l2()), (Some(0.5), None));
    /// # Ok::<(), l1l2_core::Error>(())
    /// ```
    pub fn l1l2(l1: f64, l2: f64) -> Result<Self, Error> {
        let factors = Self::new(Some(l1), Some(l2))?;
        Ok(Self {
            l1: factors.l1.filter(|&value| value != 0.0),
            l2: factors.l2.filter(|&value| value != 0.0),
        })
    }

    /// The L1 factor, `None` when the term is left out.
    pub fn l1(&self) -> Option<f64> {
        self.l1
    }

    /// The L2 factor, `None` when the term is left out.
    pub fn l2(&self) -> Option<f64> {
        self.l2
    }

    /// The penalty of `sums` in f64: `l1 * sum_abs + l2 * sum_squares` over the terms present.
    pub fn penalty(&self, sums: &Sums) -> f64 {
        sums.weighted(self.l1, self.l2)
    }
}

/// How a gradient reaches its destination.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Update {
    /// `g = l1 * sign(x) + 2 * l2 * x`.
    Overwrite,
    /// `g = scale * (l1 * sign(x) + 2 * l2 * x)`, e.g. a backward pass's incoming gradient;
    /// `scale` must be finite. With `scale = 1` this is [`Update::Overwrite`], bit for bit.
    Scaled {
        /// The factor of the gradient (never of the returned penalty).
        scale: f64,
    },
    /// `g += scale * (l1 * sign(x) + 2 * l2 * x)`; `scale` must be finite and multiplies the
    /// gradient only, never the penalty.
    Accumulate {
        /// E.g. `1 / batch` or a loss weight.
        scale: f64,
    },
}

/// What a reduction of `x` walks: one copy of a broadcast input, repeated, or all of it.
struct Walk<'l> {
    layout: Cow<'l, Layout>,
    copies: u64,
}

impl<'l> Walk<'l> {
    fn of(x: &'l ArrayView<'_>) -> Self {
        match x.layout().broadcast_copies() {
            Some((copies, copy)) => Self {
                layout: Cow::Owned(copy),
                copies,
            },
            None => Self {
                layout: Cow::Borrowed(x.layout()),
                copies: 1,
            },
        }
    }

    fn len(&self) -> usize {
        self.layout.len()
    }

    fn finish(&self, x: &ArrayView<'_>, partial: AnyPartial) -> Sums {
        let sums = finish(if self.copies > 1 {
            partial.repeat(self.copies)
        } else {
            partial
        });
        rescued(x, Some(self), sums)
    }
}

/// `sums`, or for a float64 input at the ends of f64's range the sums of a scaled pass (see
/// `extremes`) along `walk` (made from `x` when `None`).
fn rescued(x: &ArrayView<'_>, walk: Option<&Walk<'_>>, sums: Sums) -> Sums {
    if x.dtype() != DType::F64 || !extremes::needs_rescaling(sums.sum_abs, sums.sum_squares) {
        return sums;
    }
    let own_walk;
    let walk = match walk {
        Some(walk) => walk,
        None => {
            own_walk = Walk::of(x);
            &own_walk
        }
    };
    let underflow = sums.sum_squares.is_finite() && sums.sum_abs.is_finite();
    Sums::from_scaled(extremes::rescaled_sums(
        x.span::<f64>(),
        &walk.layout,
        walk.copies,
        underflow,
    ))
}

/// `sum |x|` and `sum x^2` of one tensor (small ones with no allocation and no pool).
pub(crate) fn sums_of(x: &ArrayView<'_>) -> Sums {
    let walk = Walk::of(x);
    let partial = parallel::reduce(walk.len(), x.dtype().itemsize(), &|range| {
        with_element!(x.dtype(), |T| reduce_piece::<T>(x, &walk.layout, range))
    });
    walk.finish(x, partial)
}

/// `sum |x|` and `sum x^2` of each tensor, in one parallel region; each has the bits of
/// [`ArrayView::sums`] of that tensor alone.
pub fn sums_many(xs: &[ArrayView<'_>]) -> Vec<Sums> {
    let walks: Vec<Walk<'_>> = xs.iter().map(Walk::of).collect();
    let lens: Vec<usize> = walks.iter().map(Walk::len).collect();
    let bytes = xs
        .iter()
        .zip(&lens)
        .map(|(x, len)| len * x.dtype().itemsize())
        .sum();
    parallel::reduce_many(&lens, bytes, &|index, range| {
        let x = &xs[index];
        with_element!(x.dtype(), |T| reduce_piece::<T>(
            x,
            &walks[index].layout,
            range
        ))
    })
    .into_iter()
    .zip(xs.iter().zip(&walks))
    .map(|(partial, (x, walk))| walk.finish(x, partial))
    .collect()
}

/// The fused value and gradient: writes the gradient of `factors`' penalty at `x` into `g` (or
/// adds it, see [`Update`]) and returns the penalty, rounded to `x`'s dtype (exactly the bits of
/// `x.dtype().round_result(factors.penalty(&x.sums()))`). One pass: `x` is read once and `g`
/// written once (and read once when accumulating).
///
/// The gradient of `|x|` at 0 is 0 (as in PyTorch and TensorFlow; JAX uses 1; at -0.0 the
/// gradient is -0.0), NaN stays NaN, and a term that `factors` leaves out contributes nothing.
/// Each value is computed in f64 with fused multiply-adds and rounded once to the dtype. (Which
/// NaN payload a NaN penalty carries is not specified.)
///
/// ```
/// use l1l2_core::{value_and_grad, ArrayView, ArrayViewMut, Factors, Update};
/// let w = [0.5f32, -2.0, 0.0];
/// let mut g = [0.0f32; 3];
/// let factors = Factors::l1l2(0.1, 0.25)?;
/// let value = value_and_grad(&ArrayView::from_slice(&w), &mut ArrayViewMut::from_slice(&mut g),
///                            &factors, Update::Overwrite)?;
/// assert_eq!(value, (0.1f64 * 2.5 + 0.25 * 4.25) as f32 as f64);
/// assert_eq!(g, [0.1 + 0.25, -0.1 - 1.0, 0.0]);
/// # Ok::<(), l1l2_core::Error>(())
/// ```
pub fn value_and_grad(
    x: &ArrayView<'_>,
    g: &mut ArrayViewMut<'_>,
    factors: &Factors,
    update: Update,
) -> Result<f64, Error> {
    let values = value_and_grad_all(
        std::slice::from_ref(x),
        std::slice::from_mut(g),
        factors,
        update,
    )
    .map_err(|error| error.root().clone())?;
    Ok(values[0])
}

/// [`value_and_grad`] of every `xs[i]` into `gs[i]` in one parallel region; the penalties, each
/// rounded to its tensor's dtype, have the bits of the single calls. Every argument is checked
/// before anything is written (no destination may share memory with an input or another
/// destination), so an error leaves every buffer untouched.
pub fn value_and_grad_many(
    xs: &[ArrayView<'_>],
    gs: &mut [ArrayViewMut<'_>],
    factors: &Factors,
    update: Update,
) -> Result<Vec<f64>, Error> {
    value_and_grad_all(xs, gs, factors, update)
}

/// The proximal operator of `lr * (l1 * |x| + l2 * x^2)`, in place:
/// `x <- sign(x) * max(|x| - lr * l1, 0) / (1 + 2 * lr * l2)`, the same as jaxopt's
/// `prox_elastic_net(x, (l1, 2 * l2 / l1), scaling=lr)`; `l1 = 0` is plain shrinkage. Absent
/// factors count as 0. `lr` must be finite and non-negative. Computed in f64 (`|x| - lr * l1` and
/// `1 + 2 * lr * l2` as fused multiply-adds) and rounded once to the dtype.
pub fn prox(x: &mut ArrayViewMut<'_>, lr: f64, factors: &Factors) -> Result<(), Error> {
    prox_many(std::slice::from_mut(x), lr, factors).map_err(|error| error.root().clone())
}

/// [`prox`] of every tensor in one parallel region; all are checked before any is written (no
/// two may share memory).
pub fn prox_many(xs: &mut [ArrayViewMut<'_>], lr: f64, factors: &Factors) -> Result<(), Error> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::InvalidArgument {
            name: "lr",
            value: lr,
            expected: "a finite number >= 0",
        });
    }
    for (index, x) in xs.iter().enumerate() {
        check_float(x.dtype()).map_err(|error| error.in_list(index))?;
    }
    let ranges: Vec<Range<usize>> = xs.iter().map(ArrayViewMut::byte_range).collect();
    check_disjoint(&[], &ranges)?;
    let math = ProxMath::new(lr, factors);
    let xs: &[ArrayViewMut<'_>] = xs;
    let lens: Vec<usize> = xs.iter().map(ArrayViewMut::len).collect();
    let bytes = xs.iter().map(|x| 2 * x.len() * x.dtype().itemsize()).sum();
    parallel::reduce_many(&lens, bytes, &|index, range| {
        let x = &xs[index];
        with_float!(x.dtype(), |T| prox_range::<T>(x, range, &math), ())
    });
    Ok(())
}

fn value_and_grad_all(
    xs: &[ArrayView<'_>],
    gs: &mut [ArrayViewMut<'_>],
    factors: &Factors,
    update: Update,
) -> Result<Vec<f64>, Error> {
    let (scale, accumulate) = match update {
        Update::Overwrite => (None, false),
        Update::Scaled { scale } => (Some(scale), false),
        Update::Accumulate { scale } => (Some(scale), true),
    };
    if let Some(scale) = scale.filter(|scale| !scale.is_finite()) {
        return Err(Error::InvalidArgument {
            name: "scale",
            value: scale,
            expected: "a finite number",
        });
    }
    if xs.len() != gs.len() {
        return Err(Error::LengthMismatch {
            sources: xs.len(),
            destinations: gs.len(),
        });
    }
    let mut plans = Vec::with_capacity(xs.len());
    for (index, (x, g)) in xs.iter().zip(gs.iter()).enumerate() {
        plans.push(plan(x, g).map_err(|error| error.in_list(index))?);
    }
    let sources: Vec<Range<usize>> = xs.iter().map(ArrayView::byte_range).collect();
    let dests: Vec<Range<usize>> = gs.iter().map(ArrayViewMut::byte_range).collect();
    check_disjoint(&sources, &dests)?;

    let math = GradMath::new(factors, scale, accumulate);
    let gs: &[ArrayViewMut<'_>] = gs;
    let lens: Vec<usize> = xs.iter().map(ArrayView::len).collect();
    let factor = if accumulate { 3 } else { 2 };
    let bytes = xs
        .iter()
        .map(|x| factor * x.len() * x.dtype().itemsize())
        .sum();
    let partials = parallel::reduce_many(&lens, bytes, &|index, range| {
        let (x, g, plan) = (&xs[index], &gs[index], &plans[index]);
        with_float!(
            x.dtype(),
            |T| grad_piece::<T>(x, g, plan, range, &math),
            AnyPartial::Empty
        )
    });
    Ok(partials
        .into_iter()
        .zip(xs)
        .zip(&plans)
        .map(|((partial, x), plan)| {
            // A broadcast input's penalty comes from one copy, repeated (see `Walk`): the bits
            // of `penalty(x)`, which the gradient's own walk would not give.
            let sums = if plan.reduce {
                rescued(x, None, finish(partial))
            } else {
                sums_of(x)
            };
            x.dtype().round_result(factors.penalty(&sums))
        })
        .collect())
}

/// How one tensor's gradient is written: the layout of `x` with `g`'s strides carried along, and
/// whether it walks `x` exactly as `x`'s own layout does (then the gradient is written from inside
/// the reduction; otherwise in a second walk of the piece, which reads `x` twice).
struct Plan {
    paired: Layout,
    fused: bool,
    /// Whether the gradient's walk also sums `x` (not for a broadcast `x`, summed apart).
    reduce: bool,
}

fn plan(x: &ArrayView<'_>, g: &ArrayViewMut<'_>) -> Result<Plan, Error> {
    check_float(x.dtype())?;
    if g.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            source: x.dtype(),
            destination: g.dtype(),
        });
    }
    if g.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            source: x.shape().to_vec(),
            destination: g.shape().to_vec(),
        });
    }
    // The same strides map every index to the same offset in both: when they make one contiguous
    // row, element `k` of the row is element `k` of the destination's row.
    let same_strides = x.strides() == g.strides();
    if let Some(paired) = same_strides
        .then(|| x.layout().with_contiguous_dest(g.layout()))
        .flatten()
    {
        return Ok(Plan {
            paired,
            fused: true,
            reduce: true,
        });
    }
    let paired = Layout::paired(
        x.span_len(),
        x.offset(),
        x.shape(),
        x.strides(),
        g.offset(),
        g.strides(),
    )?;
    let reduce = !x.layout().is_broadcast();
    let fused = reduce && paired.same_walk(x.layout());
    Ok(Plan {
        paired,
        fused,
        reduce,
    })
}

fn check_float(dtype: DType) -> Result<(), Error> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::NotFloat { dtype })
    }
}

/// Rejects any destination that shares an address with a source or another destination.
fn check_disjoint(sources: &[Range<usize>], dests: &[Range<usize>]) -> Result<(), Error> {
    let mut ranges: Vec<(usize, usize, bool, usize)> = Vec::new();
    for (is_dest, list) in [(false, sources), (true, dests)] {
        for (index, range) in list.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            ranges.push((range.start, range.end, is_dest, index));
        }
    }
    ranges.sort_unstable_by_key(|&(start, ..)| start);
    // Sorted by start: any overlap shows when its later-starting range comes up.
    let mut dest_end: Option<(usize, usize)> = None;
    let mut source_end: Option<(usize, usize)> = None;
    for (start, end, is_dest, index) in ranges {
        let name = |is_dest: bool, index: usize| {
            let kind = if is_dest { "destination" } else { "input" };
            if dests.len() <= 1 && sources.len() <= 1 {
                kind.to_string()
            } else {
                format!("{kind} {index}")
            }
        };
        if let Some((other_end, other)) = dest_end.filter(|&(other_end, _)| start < other_end) {
            let _ = other_end;
            return Err(Error::Overlap {
                what: format!("{} and {}", name(true, other), name(is_dest, index)),
            });
        }
        if let Some((_, other)) = source_end.filter(|&(other_end, _)| is_dest && start < other_end)
        {
            return Err(Error::Overlap {
                what: format!("{} and {}", name(false, other), name(true, index)),
            });
        }
        let slot = if is_dest {
            &mut dest_end
        } else {
            &mut source_end
        };
        if slot.is_none_or(|(other_end, _)| end > other_end) {
            *slot = Some((end, index));
        }
    }
    Ok(())
}

fn finish(partial: AnyPartial) -> Sums {
    let (sum_abs, sum_squares) = partial.finish();
    Sums::new(sum_abs, sum_squares)
}

/// The partial of the flat range `range` of `x`, walked along `layout`.
pub(crate) fn reduce_piece<T: Reduce>(
    x: &ArrayView<'_>,
    layout: &Layout,
    range: Range<usize>,
) -> AnyPartial {
    layout
        .reduce_range::<T, NoWrite>(x.span::<T>(), range, &NoWrite)
        .into()
}

fn grad_piece<T: Float + Reduce>(
    x: &ArrayView<'_>,
    g: &ArrayViewMut<'_>,
    plan: &Plan,
    range: Range<usize>,
    math: &GradMath,
) -> AnyPartial {
    let writer = GradWriter {
        base: g.base::<T>(),
        math: *math,
    };
    let span = x.span::<T>();
    if plan.fused {
        return plan.paired.reduce_range(span, range, &writer).into();
    }
    let partial = if plan.reduce {
        x.layout().reduce_range(span, range.clone(), &NoWrite)
    } else {
        T::Partial::default()
    };
    let (stride, dest_stride) = (plan.paired.row_stride(), plan.paired.row_dest());
    plan.paired
        .for_each_row_piece(range, |first, count, dest_first| {
            if stride == 0 {
                // A broadcast row: one source element for the whole piece.
                let run = &span[first..=first];
                for j in 0..count as isize {
                    writer.row(dest_first + j * dest_stride, 1, 1).visit(0, run);
                }
                return;
            }
            let run = &span[first..=first + (count - 1) * stride];
            writer.row(dest_first, dest_stride, stride).visit(0, run);
        });
    partial.into()
}

/// The gradient of the penalty, element by element: `l1 * sign(x) + l2_twice * x` over the terms
/// present. A `scale` is folded into the factors first (`l1` and `l2_twice` are then
/// `scale * l1` and `scale * 2 * l2`, each rounded once), so that a gradient whose scaled value is
/// finite never overflows on the way.
#[derive(Clone, Copy, Debug)]
struct GradMath {
    l1: Option<f64>,
    l2_twice: Option<f64>,
    accumulate: bool,
}

impl GradMath {
    fn new(factors: &Factors, scale: Option<f64>, accumulate: bool) -> Self {
        let scaled = |factor: f64| scale.map_or(factor, |scale| scale * factor);
        Self {
            l1: factors.l1.map(scaled),
            l2_twice: factors.l2.map(|l2| scaled(2.0 * l2)),
            accumulate,
        }
    }
}

/// `l1 * sign(x)`: `l1` with its sign flipped for negative `x` (a bit operation: `l1` may be
/// negative when a negative `scale` is folded in), a zero with the product's sign at ±0 (as
/// `l1 * x` there); NaN for NaN when `NAN` (callers whose
/// other term already propagates NaN skip that check). Each case costs one compare and one blend
/// in the vectorised loop. The zero's sign is taken from the flipped `l1` (it is the product's
/// sign) rather than computed apart: one bit operation less per vector, float32
/// `value_and_grad` on one thread from cache 30.4-30.9 -> 29.0-29.1 us at 1e5 (Zen 4).
#[inline(always)]
fn l1_sign<const NAN: bool>(l1: f64, x: f64) -> f64 {
    const SIGN: u64 = 1 << 63;
    // ±0 tested on the bits: a float compare of a widened f32 would be folded into a compare of
    // the f32, and the mixed widths make LLVM vectorise the whole loop 4 lanes wide.
    let flipped = l1.to_bits() ^ (x.to_bits() & SIGN);
    let signed = if x.to_bits() << 1 == 0 {
        f64::from_bits(flipped & SIGN) // ±0: the zero of `l1 * ±0`, whose sign `flipped` has
    } else {
        f64::from_bits(flipped)
    };
    if NAN && x.is_nan() {
        x
    } else {
        signed
    }
}

impl GradMath {
    /// Writes (or adds) the gradient at `xs` into `gs`: one loop per combination of terms, so
    /// that each vectorises. Each term is one fused multiply-add, rounded once in f64.
    #[inline(always)]
    fn apply<T: Float>(&self, xs: &[T], gs: &mut [T]) {
        match (self.l1, self.l2_twice) {
            // `l2 * x` is NaN for NaN x, whatever the other term is.
            (Some(l1), Some(l2)) => self.update(xs, gs, |x| l2.mul_add(x, l1_sign::<false>(l1, x))),
            (Some(l1), None) => self.update(xs, gs, |x| l1_sign::<true>(l1, x)),
            (None, Some(l2)) => self.update(xs, gs, |x| l2 * x),
            (None, None) => self.update(xs, gs, |_| 0.0),
        }
    }

    #[inline(always)]
    fn update<T: Float>(&self, xs: &[T], gs: &mut [T], term: impl Fn(f64) -> f64) {
        if self.accumulate {
            for (g, x) in gs.iter_mut().zip(xs) {
                *g = T::narrow(g.widen() + term(x.widen()));
            }
        } else {
            for (g, x) in gs.iter_mut().zip(xs) {
                *g = T::narrow(term(x.widen()));
            }
        }
    }
}

/// Writes gradients into a destination tensor; shared by the threads of one call.
struct GradWriter<T> {
    /// The first element of the destination's span.
    base: *mut T,
    math: GradMath,
}

// SAFETY: the threads of one call write disjoint elements: every flat index belongs to one piece,
// the destination's layout is one-to-one (`ArrayViewMut` checks it) and no destination shares
// memory with a source or another destination (`check_disjoint`).
unsafe impl<T> Sync for GradWriter<T> {}

impl<T: Float> RowWriter<T> for GradWriter<T> {
    type Sink<'s>
        = GradRow<'s, T>
    where
        Self: 's;

    #[inline(always)]
    fn row(&self, dest_first: isize, dest_stride: isize, step: usize) -> GradRow<'_, T> {
        GradRow {
            dest: self.base.wrapping_offset(dest_first),
            stride: dest_stride,
            step,
            math: &self.math,
        }
    }
}

/// The destination of one row piece: element `j` of the piece goes to `dest + j * stride`.
struct GradRow<'w, T> {
    dest: *mut T,
    stride: isize,
    step: usize,
    math: &'w GradMath,
}

impl<T: Float> RunSink<T> for GradRow<'_, T> {
    #[inline(always)]
    fn visit(&mut self, start: usize, values: &[T]) {
        if self.step == 1 && self.stride == 1 {
            // SAFETY: elements `start..start + values.len()` of this piece are in the destination's
            // span (its layout was validated with the source's shape); no other thread and no
            // source touches them (see `GradWriter`'s Sync).
            let gs = unsafe { std::slice::from_raw_parts_mut(self.dest.add(start), values.len()) };
            return self.math.apply(values, gs);
        }
        // The run's element `i` belongs to the piece when `i % step == 0`, as element `i / step`.
        let skip = (self.step - start % self.step) % self.step;
        for k in (skip..values.len()).step_by(self.step) {
            let j = ((start + k) / self.step) as isize;
            // SAFETY: as above, for the piece's element `j`.
            let g = unsafe { &mut *self.dest.offset(j * self.stride) };
            self.math
                .apply(std::slice::from_ref(&values[k]), std::slice::from_mut(g));
        }
    }
}

/// The proximal step, element by element.
#[derive(Clone, Copy, Debug)]
struct ProxMath {
    lr: f64,
    l1: f64,
    /// `1 + 2 * lr * l2`, rounded once.
    denominator: f64,
    /// float64 divides (instead of correcting the product with the reciprocal, see `apply`).
    divide: bool,
}

/// float64 tensors larger than this are divided (see `ProxMath::apply`): streamed from memory
/// in place, the division's loop took 0.75-0.79x the time of the corrected product's (6e6-2e7
/// elements on one thread), while up to 4e6 elements (32 MB) the product took 0.66-0.68x and
/// from cache (1e5) 0.36x. 16 MiB leaves room for machines with smaller caches.
const CORRECTED_QUOTIENT_MAX_BYTES: usize = 16 << 20;

impl ProxMath {
    fn new(lr: f64, factors: &Factors) -> Self {
        let denominator = (2.0 * lr).mul_add(factors.l2.unwrap_or(0.0), 1.0);
        Self {
            lr,
            l1: factors.l1.unwrap_or(0.0),
            denominator,
            // `denominator >= 1` (its factors are not negative); a huge one would make the
            // reciprocal subnormal.
            divide: denominator >= 2f64.powi(512),
        }
    }

    /// The math for one tensor of `bytes`: large float64 tensors divide.
    fn for_tensor(&self, bytes: usize) -> Self {
        Self {
            divide: self.divide || bytes > CORRECTED_QUOTIENT_MAX_BYTES,
            ..*self
        }
    }

    /// Division costs 8-16 times a multiply and is what limits this loop in cache. For f16, bf16
    /// and f32 the product with the reciprocal (one more f64 rounding, 2^-53 relative) rounds to
    /// the same values except within 2^-52 of a tie. f64 corrects that product once with the
    /// remainder (Markstein): `q + (kept - q * d) / d`, the remainder exact by a fused
    /// multiply-add. That is the correctly rounded quotient unless it is subnormal (then the
    /// remainder may round and the quotient be one subnormal step off; 14 of 3e7 random values
    /// over the whole range), at a third of a division's time (float64 1e5 `prox_` from cache
    /// on one thread: 65.7 -> 23.9 us); tensors over `CORRECTED_QUOTIENT_MAX_BYTES` divide.
    #[inline(always)]
    fn apply<T: Float>(&self, xs: &mut [T]) {
        let reciprocal = 1.0 / self.denominator;
        if T::EXACT_SQUARES || self.divide {
            for value in xs {
                let (kept, x) = self.kept(*value);
                let scaled = if T::EXACT_SQUARES {
                    kept * reciprocal
                } else {
                    kept / self.denominator
                };
                *value = T::narrow(scaled.copysign(x));
            }
            return;
        }
        for value in xs {
            let (kept, x) = self.kept(*value);
            let first = kept * reciprocal;
            let remainder = (-first).mul_add(self.denominator, kept);
            let corrected = remainder.mul_add(reciprocal, first);
            // An infinite `kept` leaves a NaN remainder (inf - inf): its product stands.
            let quotient = if corrected.is_nan() { first } else { corrected };
            *value = T::narrow(quotient.copysign(x));
        }
    }

    /// `(max(|x| - lr * l1, 0), x)` of an element, the difference rounded once (NaN stays NaN).
    #[inline(always)]
    fn kept<T: Float>(&self, value: T) -> (f64, f64) {
        let x = value.widen();
        let shrunk = (-self.lr).mul_add(self.l1, x.abs());
        (if shrunk < 0.0 { 0.0 } else { shrunk }, x)
    }
}

/// The prox step over a contiguous run, on the best ISA (for its fused multiply-adds).
struct ProxRun<'a, T> {
    values: &'a mut [T],
    math: &'a ProxMath,
}

impl<T: Float> Kernel for ProxRun<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<I: Target>(self) {
        self.math.apply(self.values);
    }
}

fn prox_range<T: Float>(x: &ArrayViewMut<'_>, range: Range<usize>, math: &ProxMath) {
    let math = &math.for_tensor(x.len() * size_of::<T>());
    let base = x.base::<T>();
    let stride = x.layout().row_stride();
    x.layout().for_each_row_piece(range, |first, count, _| {
        if stride == 1 {
            // SAFETY: the piece's `count` elements from `first` are in the view's span, which the
            // view borrows exclusively; no other thread's piece shares an address (the layout is
            // one-to-one, pieces are disjoint).
            let values = unsafe { std::slice::from_raw_parts_mut(base.add(first), count) };
            return dispatch(ProxRun { values, math });
        }
        for j in 0..count {
            // SAFETY: as above, for the piece's element `j`.
            let value = unsafe { &mut *base.add(first + j * stride) };
            math.apply(std::slice::from_mut(value));
        }
    });
}
