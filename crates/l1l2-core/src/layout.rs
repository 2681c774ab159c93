//! Strided layouts: validated against the buffer once, normalised so that the innermost dimension
//! has the smallest stride, then walked in place (never copied).
//!
//! A layout may carry a second operand, the destination of an elementwise op: its strides follow
//! the source's dimensions through the same normalisation, so that one walk reads the source and
//! writes the destination.

use std::ops::Range;

use crate::dims::Dims;
use crate::element::Reduce;
use crate::kernels::RunSink;
use crate::Error;

/// Rows at least this long with a stride in `LANE_STRIDES` go straight to the SIMD kernel, and so
/// does a layout that is one row (a small 1-D tensor); shorter rows and other strides are
/// gathered into a stack buffer first, so the kernel sees long runs.
const DIRECT_MIN_LEN: usize = 64;
/// Row strides the kernel reads in place by dropping lanes: a stride of 2 or 4 costs 2x or 4x the
/// contiguous work per element, still less than a gather (larger strides are gathered).
const LANE_STRIDES: [usize; 3] = [1, 2, 4];
/// Elements gathered per kernel call (at most 16 KiB on the stack).
const GATHER_LEN: usize = 2048;
/// The buffer for ranges of at most this many elements (small tensors).
const SMALL_GATHER_LEN: usize = 256;

/// A value placed at a 64-byte boundary.
#[repr(align(64))]
struct LineAligned<T>(T);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Dim {
    len: usize,
    /// In elements, non-negative after normalisation.
    stride: usize,
    /// The destination's stride along this dimension, in elements (0 without a destination).
    dest: isize,
}

/// A normalised layout: `outer` dimensions (outermost first) over rows of `row_len` elements
/// `row_stride` apart, starting at `offset`; the destination's matching element starts at
/// `dest_offset`, its rows `row_dest` apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    offset: usize,
    outer: Dims<Dim>,
    row_len: usize,
    row_stride: usize,
    dest_offset: isize,
    row_dest: isize,
    len: usize,
}

/// Where a walk writes: for each piece of a row, the sink that receives its source elements.
pub(crate) trait RowWriter<T>: Sync {
    type Sink<'s>: RunSink<T>
    where
        Self: 's;
    /// The sink of a piece whose first element goes to destination index `dest_first`, the next
    /// ones `dest_stride` apart, read as a run with step `step` (only every `step`-th element of
    /// the run belongs to the piece).
    fn row(&self, dest_first: isize, dest_stride: isize, step: usize) -> Self::Sink<'_>;
}

/// The writer of a plain reduction.
pub(crate) struct NoWrite;

impl<T> RowWriter<T> for NoWrite {
    type Sink<'s> = crate::kernels::NoSink;
    #[inline(always)]
    fn row(&self, _: isize, _: isize, _: usize) -> crate::kernels::NoSink {
        crate::kernels::NoSink
    }
}

impl Layout {
    /// Checks that every element the layout addresses lies in `0..buffer_len` and normalises it:
    /// unit dimensions dropped, negative strides flipped (the sum does not depend on order),
    /// dimensions sorted by stride with broadcast (zero-stride) ones outermost, contiguous
    /// neighbours merged.
    pub(crate) fn new(
        buffer_len: usize,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self, Error> {
        Self::build(buffer_len, offset, shape, strides, None)
    }

    /// The layout of `shape` over the source's `strides` (as [`Layout::new`]) with the
    /// destination's `dest_strides` (starting at `dest_offset`) carried through the normalisation.
    /// Dimensions merge only where both operands merge, so the walk may differ from the source's
    /// own layout (see [`Layout::same_walk`]).
    pub(crate) fn paired(
        buffer_len: usize,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
        dest_offset: usize,
        dest_strides: &[isize],
    ) -> Result<Self, Error> {
        Self::build(
            buffer_len,
            offset,
            shape,
            strides,
            Some((dest_offset, dest_strides)),
        )
    }

    fn build(
        buffer_len: usize,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
        dest: Option<(usize, &[isize])>,
    ) -> Result<Self, Error> {
        if shape.len() != strides.len() {
            return Err(Error::ShapeStridesMismatch {
                shape_len: shape.len(),
                strides_len: strides.len(),
            });
        }
        let len = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .ok_or(Error::TooLarge)?;
        if len == 0 {
            return Ok(Self::contiguous(0, 0));
        }
        let (dest_offset, dest_strides) = dest.unwrap_or((0, &[]));
        let mut start = i128::try_from(offset).map_err(|_| Error::TooLarge)?;
        let mut dest_start = dest_offset as i128;
        let mut end = start; // last addressed element
        let mut dims: Dims<Dim> = Dims::new();
        for (axis, (&dim_len, &stride)) in shape.iter().zip(strides).enumerate() {
            if dim_len == 1 {
                continue;
            }
            let dest_stride = dest_strides.get(axis).copied().unwrap_or(0);
            let reach = (dim_len as i128 - 1) * stride as i128;
            // A flipped dimension is walked from its last element: the destination follows.
            let dest = if stride < 0 {
                start += reach;
                dest_start += (dim_len as i128 - 1) * dest_stride as i128;
                -dest_stride
            } else {
                end += reach;
                dest_stride
            };
            dims.push(Dim {
                len: dim_len,
                stride: stride.unsigned_abs(),
                dest,
            });
        }
        if start < 0 || end >= buffer_len as i128 {
            return Err(Error::OutOfBounds {
                first: start,
                last: end,
                buffer_len,
            });
        }
        // Broadcast dimensions first, then by decreasing stride: the innermost stride is smallest.
        // The sort is stable, so a paired layout orders its dimensions as the source's own does.
        dims.sort_by_key(|dim| (dim.stride != 0, std::cmp::Reverse(dim.stride)));
        let mut merged: Dims<Dim> = Dims::new();
        for &dim in dims.iter() {
            match merged.last_mut() {
                Some(last)
                    if last.stride == dim.stride * dim.len
                        && dim.stride != 0
                        && last.dest == dim.dest * dim.len as isize =>
                {
                    last.len *= dim.len;
                    last.stride = dim.stride;
                    last.dest = dim.dest;
                }
                _ => merged.push(dim),
            }
        }
        let row = merged.pop().unwrap_or(Dim {
            len: 1,
            stride: 1,
            dest: 0,
        });
        Ok(Self {
            offset: start as usize,
            outer: merged,
            row_len: row.len,
            row_stride: row.stride,
            dest_offset: isize::try_from(dest_start).map_err(|_| Error::TooLarge)?,
            row_dest: row.dest,
            len,
        })
    }

    pub(crate) fn contiguous(offset: usize, len: usize) -> Self {
        Self {
            offset,
            outer: Dims::new(),
            row_len: len,
            row_stride: 1,
            dest_offset: 0,
            row_dest: 0,
            len,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// `self` (one contiguous row) paired with a destination of the same strides that is one
    /// contiguous row too: the common case of a training step, without a normalisation.
    pub(crate) fn with_contiguous_dest(&self, dest: &Layout) -> Option<Self> {
        let single_row = |layout: &Layout| layout.outer.is_empty() && layout.row_stride == 1;
        (single_row(self) && single_row(dest) && self.len == dest.len).then(|| Self {
            dest_offset: dest.offset as isize,
            row_dest: 1,
            ..self.clone()
        })
    }

    /// Whether `self` (a paired layout) walks the source exactly as `own` (the source's own
    /// layout) does: then a reduction over it gives the bits of the source's own reduction.
    pub(crate) fn same_walk(&self, own: &Layout) -> bool {
        self.offset == own.offset
            && self.row_len == own.row_len
            && self.row_stride == own.row_stride
            && self.outer.len() == own.outer.len()
            && self
                .outer
                .iter()
                .zip(&own.outer)
                .all(|(a, b)| (a.len, a.stride) == (b.len, b.stride))
    }

    /// The lowest and one past the highest element index the layout addresses (empty for an
    /// empty layout).
    pub(crate) fn extent(&self) -> Range<usize> {
        if self.len == 0 {
            return 0..0;
        }
        let reach: usize = self
            .outer
            .iter()
            .map(|dim| (dim.len - 1) * dim.stride)
            .sum::<usize>()
            + (self.row_len - 1) * self.row_stride;
        self.offset..self.offset + reach + 1
    }

    /// Whether every element has an address of its own (no broadcast dimension, and no two index
    /// tuples landing on one address): the condition for writing through the layout. Sufficient
    /// rather than exact: each stride must exceed the reach of all the dimensions inside it.
    pub(crate) fn check_one_to_one(&self) -> Result<(), Error> {
        if self.len <= 1 {
            return Ok(());
        }
        if self.row_stride == 0 || self.outer.iter().any(|dim| dim.stride == 0) {
            return Err(Error::BroadcastDestination);
        }
        let mut reach = (self.row_len - 1) * self.row_stride;
        for dim in self.outer.iter().rev() {
            if dim.stride <= reach {
                return Err(Error::SelfOverlappingDestination);
            }
            reach += (dim.len - 1) * dim.stride;
        }
        Ok(())
    }

    /// Calls `visit(first, count, dest_first)` for each row piece covering the flat range `range`
    /// (in the normalised order), `first` being the buffer index of the piece's first element and
    /// `dest_first` that of its destination element.
    pub(crate) fn for_each_row_piece(
        &self,
        range: Range<usize>,
        mut visit: impl FnMut(usize, usize, isize),
    ) {
        if range.is_empty() {
            return;
        }
        let row = range.start / self.row_len;
        let mut column = range.start % self.row_len;
        // Mixed-radix digits of `row` over the outer dimensions, innermost last.
        let mut index: Dims<usize> = self.outer.iter().map(|_| 0).collect();
        let mut rest = row;
        for (digit, dim) in index.iter_mut().zip(&self.outer).rev() {
            *digit = rest % dim.len;
            rest /= dim.len;
        }
        let mut row_start = self.offset;
        let mut dest_row_start = self.dest_offset;
        for (&i, dim) in index.iter().zip(&self.outer) {
            row_start += i * dim.stride;
            dest_row_start += i as isize * dim.dest;
        }
        let mut position = range.start;
        while position < range.end {
            let count = (self.row_len - column).min(range.end - position);
            visit(
                row_start + column * self.row_stride,
                count,
                dest_row_start + column as isize * self.row_dest,
            );
            position += count;
            column = 0;
            // Advance the odometer.
            for (digit, dim) in index.iter_mut().zip(&self.outer).rev() {
                *digit += 1;
                row_start += dim.stride;
                dest_row_start += dim.dest;
                if *digit < dim.len {
                    break;
                }
                row_start -= dim.len * dim.stride;
                dest_row_start -= dim.len as isize * dim.dest;
                *digit = 0;
            }
        }
    }

    /// Whether some dimension is broadcast (has stride 0 and more than one element).
    pub(crate) fn is_broadcast(&self) -> bool {
        self.len > 1 && (self.row_stride == 0 || self.outer.iter().any(|dim| dim.stride == 0))
    }

    /// For a layout with broadcast (zero-stride) dimensions: how many times it repeats one copy,
    /// and the layout of that copy (the same elements in the same order, broadcast dimensions left
    /// out). `None` when nothing is broadcast. A reduction over the copy, repeated, costs the
    /// copy's length rather than the view's: `np.broadcast_to(x, (10**12,))` takes no longer
    /// than `x`.
    pub(crate) fn broadcast_copies(&self) -> Option<(u64, Layout)> {
        if self.len == 0 {
            return None;
        }
        let mut copies: u64 = 1;
        let mut outer: Dims<Dim> = Dims::new();
        for dim in self.outer.iter() {
            if dim.stride == 0 {
                copies *= dim.len as u64;
            } else {
                outer.push(*dim);
            }
        }
        let (row_len, row_stride) = if self.row_stride == 0 {
            copies *= self.row_len as u64;
            // The innermost remaining dimension becomes the row (or a single element).
            outer.pop().map_or((1, 1), |dim| (dim.len, dim.stride))
        } else {
            (self.row_len, self.row_stride)
        };
        (copies > 1).then(|| {
            let copy = Layout {
                offset: self.offset,
                outer,
                row_len,
                row_stride,
                dest_offset: 0,
                row_dest: 0,
                len: self.len / copies as usize,
            };
            (copies, copy)
        })
    }

    /// The stride of the destination along rows.
    pub(crate) fn row_dest(&self) -> isize {
        self.row_dest
    }

    /// The stride of the source along rows.
    pub(crate) fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// The partial sums of the flat range `range`, read in place from `data`; `writer` sees every
    /// element once, while it is in L1.
    pub(crate) fn reduce_range<T: Reduce, W: RowWriter<T>>(
        &self,
        data: &[T],
        range: Range<usize>,
        writer: &W,
    ) -> T::Partial {
        use crate::accumulate::Partial;
        let mut total = T::Partial::default();
        let stride = self.row_stride;
        let row_dest = self.row_dest;
        let long_rows = self.row_len >= DIRECT_MIN_LEN || self.outer.is_empty();
        if LANE_STRIDES.contains(&stride) && long_rows {
            // Long rows (or a single row) of small stride: the kernel reads each row's span in
            // place and keeps every `stride`-th lane (see `kernels::float_sums`).
            self.for_each_row_piece(range, |first, count, dest_first| {
                let span = &data[first..=first + (count - 1) * stride];
                let mut sink = writer.row(dest_first, row_dest, stride);
                total = total.merge(T::reduce_run(span, stride, &mut sink));
            });
            return total;
        }
        // A range that fits a small buffer never fills a large one either, so it gathers into the
        // small one with the same bits and without initialising 16 KiB of stack.
        if range.len() <= SMALL_GATHER_LEN {
            self.gather_range::<T, W, SMALL_GATHER_LEN>(data, range, writer)
        } else {
            self.gather_range::<T, W, GATHER_LEN>(data, range, writer)
        }
    }

    /// `reduce_range` for rows the kernel cannot read in place: gathered `N` at a time.
    fn gather_range<T: Reduce, W: RowWriter<T>, const N: usize>(
        &self,
        data: &[T],
        range: Range<usize>,
        writer: &W,
    ) -> T::Partial {
        use crate::accumulate::Partial;
        let (stride, row_dest) = (self.row_stride, self.row_dest);
        let mut total = T::Partial::default();
        // Cache-line aligned wherever the stack of the thread at hand puts it: the kernel's lanes
        // start at the first aligned element, so a buffer at another offset would change the bits.
        let mut gathered = LineAligned([T::default(); N]);
        let buffer = &mut gathered.0;
        let mut filled = 0;
        self.for_each_row_piece(range, |mut first, mut count, mut dest_first| {
            while count > 0 {
                let take = count.min(N - filled);
                let targets = &mut buffer[filled..filled + take];
                if stride == 0 {
                    targets.fill(data[first]); // a broadcast row repeats one element
                } else {
                    let sources = data[first..=first + (take - 1) * stride].iter();
                    for (target, &source) in targets.iter_mut().zip(sources.step_by(stride)) {
                        *target = source;
                    }
                }
                // The gathered values are in L1: write their destinations now.
                writer.row(dest_first, row_dest, 1).visit(0, targets);
                filled += take;
                first += take * stride;
                dest_first += take as isize * row_dest;
                count -= take;
                if filled == N {
                    total = total.merge(T::reduce_run(buffer, 1, &mut crate::kernels::NoSink));
                    filled = 0;
                }
            }
        });
        total.merge(T::reduce_run(
            &buffer[..filled],
            1,
            &mut crate::kernels::NoSink,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visited(layout: &Layout, range: Range<usize>) -> Vec<usize> {
        let mut out = Vec::new();
        let step = layout.row_stride;
        layout.for_each_row_piece(range, |first, count, _| {
            out.extend((0..count).map(|i| first + i * step));
        });
        out
    }

    #[test]
    fn c_order_merges_to_one_row() {
        let layout = Layout::new(24, 0, &[2, 3, 4], &[12, 4, 1]).unwrap();
        assert_eq!(layout, Layout::contiguous(0, 24));
    }

    #[test]
    fn fortran_order_and_reversed_strides_are_normalised() {
        let fortran = Layout::new(24, 0, &[2, 3, 4], &[1, 2, 6]).unwrap();
        assert_eq!(fortran, Layout::contiguous(0, 24));
        // x[::-1] of 10 elements: the view starts at index 9 with stride -1.
        let reversed = Layout::new(10, 9, &[10], &[-1]).unwrap();
        assert_eq!(reversed, Layout::contiguous(0, 10));
    }

    #[test]
    fn every_element_is_visited_once_for_any_split() {
        // A 3-D view with a gap, a negative stride and a broadcast dimension.
        let layout = Layout::new(200, 100, &[3, 4, 5], &[0, -20, 3]).unwrap();
        let mut expected: Vec<usize> = Vec::new();
        for _ in 0..3 {
            for j in 0..4 {
                for k in 0..5 {
                    expected.push((100 - 20 * j + 3 * k) as usize);
                }
            }
        }
        expected.sort();
        for split in [0, 1, 7, 30, 59, 60] {
            let mut got = visited(&layout, 0..split);
            got.extend(visited(&layout, split..60));
            got.sort();
            assert_eq!(got, expected, "split {split}");
        }
    }

    #[test]
    fn paired_layouts_follow_the_source() {
        // A C-order source with an F-order destination: nothing merges, the walk differs.
        let own = Layout::new(6, 0, &[2, 3], &[3, 1]).unwrap();
        let paired = Layout::paired(6, 0, &[2, 3], &[3, 1], 0, &[1, 2]).unwrap();
        assert!(!paired.same_walk(&own));
        // A reversed source with a forward destination: flipped together.
        let own = Layout::new(10, 9, &[10], &[-1]).unwrap();
        let paired = Layout::paired(10, 9, &[10], &[-1], 0, &[1]).unwrap();
        assert!(paired.same_walk(&own));
        let mut pairs = Vec::new();
        paired.for_each_row_piece(0..10, |first, count, dest| {
            pairs.extend((0..count).map(|i| (first + i, dest - i as isize)));
        });
        assert_eq!(pairs[0], (0, 9));
        assert_eq!(pairs[9], (9, 0));
    }

    #[test]
    fn broadcast_dimensions_become_copies() {
        // A (3, 4, 5) view of a (4,) row repeated over the first and last axes.
        let layout = Layout::new(4, 0, &[3, 4, 5], &[0, 1, 0]).unwrap();
        let (copies, copy) = layout.broadcast_copies().unwrap();
        assert_eq!(copies, 15);
        assert_eq!(visited(&copy, 0..copy.len()), vec![0, 1, 2, 3]);
        // Everything broadcast: one element.
        let scalar = Layout::new(1, 0, &[7, 9], &[0, 0]).unwrap();
        let (copies, copy) = scalar.broadcast_copies().unwrap();
        assert_eq!((copies, visited(&copy, 0..copy.len())), (63, vec![0]));
        // A broadcast row over strided rows.
        let rows = Layout::new(20, 0, &[2, 6], &[10, 0]).unwrap();
        let (copies, copy) = rows.broadcast_copies().unwrap();
        assert_eq!((copies, visited(&copy, 0..copy.len())), (6, vec![0, 10]));
        assert!(Layout::new(8, 0, &[2, 4], &[4, 1])
            .unwrap()
            .broadcast_copies()
            .is_none());
    }

    #[test]
    fn destinations_must_be_one_to_one() {
        let ok = Layout::new(24, 0, &[2, 3, 4], &[1, 2, 6]).unwrap();
        assert!(ok.check_one_to_one().is_ok());
        let broadcast = Layout::new(4, 0, &[3, 4], &[0, 1]).unwrap();
        assert_eq!(
            broadcast.check_one_to_one(),
            Err(Error::BroadcastDestination)
        );
        let overlapping = Layout::new(10, 0, &[3, 3], &[1, 1]).unwrap();
        assert_eq!(
            overlapping.check_one_to_one(),
            Err(Error::SelfOverlappingDestination)
        );
    }

    #[test]
    fn out_of_bounds_and_mismatched_layouts_are_errors() {
        assert!(matches!(
            Layout::new(10, 0, &[11], &[1]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            Layout::new(10, 0, &[5], &[-1]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            Layout::new(10, 0, &[5], &[1, 1]),
            Err(Error::ShapeStridesMismatch { .. })
        ));
        assert!(matches!(
            Layout::new(10, 0, &[usize::MAX, 2], &[0, 0]),
            Err(Error::TooLarge)
        ));
        // An empty view addresses nothing, wherever it points.
        assert_eq!(Layout::new(0, 5, &[0, 3], &[1, 1]).unwrap().len(), 0);
    }
}
