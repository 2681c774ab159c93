//! Strided layouts: validated against the buffer once, normalised so that the innermost dimension
//! has the smallest stride, then walked in place (never copied).

use std::ops::Range;

use crate::accumulate::Partial;
use crate::element::Element;
use crate::Error;

/// Rows at least this long with a stride in `LANE_STRIDES` go straight to the SIMD kernel; shorter
/// rows and other strides are gathered into a stack buffer first, so the kernel sees long runs.
const DIRECT_MIN_LEN: usize = 64;
/// Row strides the kernel reads in place by dropping lanes: a stride of 2 or 4 costs 2x or 4x the
/// contiguous work per element, still less than a gather (larger strides are gathered).
const LANE_STRIDES: [usize; 3] = [1, 2, 4];
/// Elements gathered per kernel call (at most 16 KiB on the stack).
const GATHER_LEN: usize = 2048;

/// A value placed at a 64-byte boundary.
#[repr(align(64))]
struct LineAligned<T>(T);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dim {
    len: usize,
    /// In elements, non-negative after normalisation.
    stride: usize,
}

/// A normalised layout: `outer` dimensions (outermost first) over rows of `row_len` elements
/// `row_stride` apart, starting at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    offset: usize,
    outer: Vec<Dim>,
    row_len: usize,
    row_stride: usize,
    len: usize,
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
        let mut start = i128::try_from(offset).map_err(|_| Error::TooLarge)?;
        let mut end = start; // last addressed element
        let mut dims = Vec::with_capacity(shape.len());
        for (&dim_len, &stride) in shape.iter().zip(strides) {
            if dim_len == 1 {
                continue;
            }
            let reach = (dim_len as i128 - 1) * stride as i128;
            if stride < 0 {
                start += reach;
            } else {
                end += reach;
            }
            dims.push(Dim {
                len: dim_len,
                stride: stride.unsigned_abs(),
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
        dims.sort_by_key(|dim| (dim.stride != 0, std::cmp::Reverse(dim.stride)));
        let mut merged: Vec<Dim> = Vec::with_capacity(dims.len());
        for dim in dims {
            match merged.last_mut() {
                Some(last) if last.stride == dim.stride * dim.len && dim.stride != 0 => {
                    last.len *= dim.len;
                    last.stride = dim.stride;
                }
                _ => merged.push(dim),
            }
        }
        let row = merged.pop().unwrap_or(Dim { len: 1, stride: 1 });
        Ok(Self {
            offset: start as usize,
            outer: merged,
            row_len: row.len,
            row_stride: row.stride,
            len,
        })
    }

    pub(crate) fn contiguous(offset: usize, len: usize) -> Self {
        Self {
            offset,
            outer: Vec::new(),
            row_len: len,
            row_stride: 1,
            len,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Calls `visit(first, count)` for each row piece covering the flat range `range` (in the
    /// normalised order), `first` being the buffer index of the piece's first element.
    fn for_each_row_piece(&self, range: Range<usize>, mut visit: impl FnMut(usize, usize)) {
        if range.is_empty() {
            return;
        }
        let row = range.start / self.row_len;
        let mut column = range.start % self.row_len;
        // Mixed-radix digits of `row` over the outer dimensions, innermost last.
        let mut index = vec![0usize; self.outer.len()];
        let mut rest = row;
        for (digit, dim) in index.iter_mut().zip(&self.outer).rev() {
            *digit = rest % dim.len;
            rest /= dim.len;
        }
        let mut row_start = self.offset
            + index
                .iter()
                .zip(&self.outer)
                .map(|(i, dim)| i * dim.stride)
                .sum::<usize>();
        let mut position = range.start;
        while position < range.end {
            let count = (self.row_len - column).min(range.end - position);
            visit(row_start + column * self.row_stride, count);
            position += count;
            column = 0;
            // Advance the odometer.
            for (digit, dim) in index.iter_mut().zip(&self.outer).rev() {
                *digit += 1;
                row_start += dim.stride;
                if *digit < dim.len {
                    break;
                }
                row_start -= dim.len * dim.stride;
                *digit = 0;
            }
        }
    }

    /// The partial sums of the flat range `range`, read in place from `data`.
    pub(crate) fn reduce_range<T: Element>(&self, data: &[T], range: Range<usize>) -> T::Partial {
        let mut total = T::Partial::default();
        let stride = self.row_stride;
        if LANE_STRIDES.contains(&stride) && self.row_len >= DIRECT_MIN_LEN {
            // Long rows of small stride: the kernel reads each row's span in place and keeps
            // every `stride`-th lane (see `kernels::float_sums`).
            self.for_each_row_piece(range, |first, count| {
                let span = &data[first..=first + (count - 1) * stride];
                total = total.merge(T::reduce_run(span, stride));
            });
            return total;
        }
        // Cache-line aligned wherever the stack of the thread at hand puts it: the kernel's lanes
        // start at the first aligned element, so a buffer at another offset would change the bits.
        let mut gathered = LineAligned([T::default(); GATHER_LEN]);
        let buffer = &mut gathered.0;
        let mut filled = 0;
        self.for_each_row_piece(range, |mut first, mut count| {
            while count > 0 {
                let take = count.min(GATHER_LEN - filled);
                let targets = &mut buffer[filled..filled + take];
                if stride == 0 {
                    targets.fill(data[first]); // a broadcast row repeats one element
                } else {
                    let sources = data[first..=first + (take - 1) * stride].iter();
                    for (target, &source) in targets.iter_mut().zip(sources.step_by(stride)) {
                        *target = source;
                    }
                }
                filled += take;
                first += take * stride;
                count -= take;
                if filled == GATHER_LEN {
                    total = total.merge(T::reduce_run(buffer, 1));
                    filled = 0;
                }
            }
        });
        total.merge(T::reduce_run(&buffer[..filled], 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visited(layout: &Layout, range: Range<usize>) -> Vec<usize> {
        let mut out = Vec::new();
        let step = layout.row_stride;
        layout.for_each_row_piece(range, |first, count| {
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
