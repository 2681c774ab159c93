//! Keras' `OrthogonalRegularizer` penalty: how far the rows (or the columns) of a matrix are from
//! being orthogonal to each other.
//!
//! Every vector is scaled to unit L2 norm (an all-zero vector stays zero), and the penalty is
//! `factor` times the mean, over the `m * (m - 1) / 2` unordered pairs of the `m` vectors, of the
//! absolute dot product of the pair: the mean of the off-diagonal entries of the Gram matrix of the
//! unit vectors, in absolute value.
//!
//! Values are widened to f64 and everything is computed in f64. The norm of each vector is taken
//! after dividing it by its largest magnitude, so that neither the squares of tiny values
//! underflow nor those of huge values overflow: the penalty depends on the directions only, at any
//! scale. With fewer than two vectors there is no pair, and the penalty is 0 (Keras divides by
//! zero pairs and returns NaN). A NaN or an infinity in the matrix gives NaN.
//!
//! The pairs are summed with the library's deterministic parallel reduction (over the `m * m`
//! ordered index pairs, of which those with `i < j` count): the same bits for any thread count.

use std::ops::Range;

use crate::accumulate::Partial;
use crate::dtype::with_float;
use crate::element::Float;
use crate::{parallel, ArrayView, Error};

/// Which vectors of a matrix are to be orthogonal to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    /// The rows (Keras' `mode="rows"`).
    Rows,
    /// The columns (Keras' `mode="columns"`).
    Columns,
}

/// Keras' `OrthogonalRegularizer(factor, mode)` penalty of a float matrix, in f64 (see the module
/// documentation). Refuses a `factor` that is negative or not finite, an input that is not a
/// matrix, and integer or bool inputs.
///
/// ```
/// use l1l2_core::{orthogonal_penalty, ArrayView, Vectors};
/// // Rows (1, 0) and (1, 1): unit vectors at 45 degrees, one pair, |cos| = 1/sqrt(2).
/// let matrix = [1.0f64, 0.0, 1.0, 1.0];
/// let view = ArrayView::new(&matrix, 0, &[2, 2], &[2, 1])?;
/// let value = orthogonal_penalty(&view, 0.5, Vectors::Rows)?;
/// assert!((value - 0.5 / 2f64.sqrt()).abs() < 1e-15);
/// // Columns (1, 1) and (0, 1): the same angle.
/// assert!((orthogonal_penalty(&view, 0.5, Vectors::Columns)? - value).abs() < 1e-15);
/// # Ok::<(), l1l2_core::Error>(())
/// ```
pub fn orthogonal_penalty(x: &ArrayView<'_>, factor: f64, vectors: Vectors) -> Result<f64, Error> {
    if !(factor.is_finite() && factor >= 0.0) {
        return Err(Error::InvalidArgument {
            name: "factor",
            value: factor,
            expected: "finite and >= 0",
        });
    }
    let &[rows, columns] = x.shape() else {
        return Err(Error::NotAMatrix {
            shape: x.shape().to_vec(),
        });
    };
    let strides = x.strides();
    let matrix = match vectors {
        Vectors::Rows => Matrix {
            count: rows,
            len: columns,
            vector_stride: strides[0],
            element_stride: strides[1],
        },
        Vectors::Columns => Matrix {
            count: columns,
            len: rows,
            vector_stride: strides[1],
            element_stride: strides[0],
        },
    };
    let dtype = x.dtype();
    let units = with_float!(
        dtype,
        |T| unit_vectors::<T>(x, &matrix),
        return Err(Error::FloatOnly {
            operation: "the orthogonality penalty",
            dtype,
        })
    );
    let mean = mean_absolute_dot(&units, matrix.count, matrix.len)?;
    Ok(factor * mean)
}

/// The vectors of a strided matrix: `count` vectors of `len` elements; element `j` of vector `i`
/// is at `vector_stride * i + element_stride * j` from the view's first element.
struct Matrix {
    count: usize,
    len: usize,
    vector_stride: isize,
    element_stride: isize,
}

/// The vectors of `x`, each scaled to unit norm, widened to f64, one after the other.
fn unit_vectors<T: Float>(x: &ArrayView<'_>, matrix: &Matrix) -> Vec<f64> {
    let span = x.span::<T>();
    let first = x.offset() as isize;
    let mut units = Vec::with_capacity(matrix.count * matrix.len);
    for vector in 0..matrix.count {
        let start = units.len();
        let origin = first + vector as isize * matrix.vector_stride;
        // In bounds: the view's constructor checked every element its shape and strides address.
        units.extend((0..matrix.len).map(|element| {
            span[(origin + element as isize * matrix.element_stride) as usize].widen()
        }));
        scale_to_unit_norm(&mut units[start..]);
    }
    units
}

/// Divides `vector` by its L2 norm; a zero vector stays zero, a NaN or infinity gives NaN.
fn scale_to_unit_norm(vector: &mut [f64]) {
    // The largest magnitude first (NaN sticks): dividing by it keeps the squares in range.
    let largest = vector.iter().fold(0.0f64, |largest, &value| {
        if value.abs() > largest || value.is_nan() {
            value.abs()
        } else {
            largest
        }
    });
    if largest == 0.0 {
        return;
    }
    for value in vector.iter_mut() {
        *value /= largest; // an infinite largest makes its own entry NaN
    }
    let norm = dot(vector, vector).sqrt(); // >= 1: the largest entry is now +-1
    for value in vector.iter_mut() {
        *value /= norm;
    }
}

/// The mean of `|u_i . u_j|` over the pairs `i < j` of the `count` vectors of `len` elements in
/// `units`; 0 for fewer than two vectors or vectors of no element.
fn mean_absolute_dot(units: &[f64], count: usize, len: usize) -> Result<f64, Error> {
    if count < 2 || len == 0 {
        return Ok(0.0); // no pair, or only empty (zero) vectors: every dot product is 0
    }
    let index_pairs = count.checked_mul(count).ok_or(Error::TooLarge)?;
    // An index pair reads two vectors, and half of the index pairs count: `len` f64s of work each.
    let work_per_index = len.max(1).saturating_mul(size_of::<f64>());
    let total = parallel::reduce(index_pairs, work_per_index, &|indices| {
        PairSum(sum_of_pairs(units, count, len, indices))
    });
    let pairs = count as f64 * (count - 1) as f64 / 2.0;
    Ok(total.0 / pairs)
}

/// `sum |u_i . u_j|` over the ordered index pairs `i * count + j` in `indices` with `i < j`.
fn sum_of_pairs(units: &[f64], count: usize, len: usize, indices: Range<usize>) -> f64 {
    let vector = |index: usize| &units[index * len..(index + 1) * len];
    let mut total = 0.0;
    let mut start = indices.start;
    while start < indices.end {
        let i = start / count;
        let row_end = ((i + 1) * count).min(indices.end);
        let first_j = (start - i * count).max(i + 1);
        for j in first_j..row_end - i * count {
            total += dot(vector(i), vector(j)).abs();
        }
        start = row_end;
    }
    total
}

/// A partial sum of `|u_i . u_j|`, merged along the reduction's fixed tree.
#[derive(Clone, Copy, Debug, Default)]
struct PairSum(f64);

impl Partial for PairSum {
    fn merge(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    fn repeat(self, copies: u64) -> Self {
        Self(self.0 * copies as f64) // not used: the pairs are never a broadcast view
    }

    fn finish(self) -> (f64, f64) {
        (self.0, 0.0)
    }
}

/// Lanes of independent partial sums in `dot`: enough for the compiler to vectorise it.
const DOT_LANES: usize = 8;

/// `sum a[i] * b[i]` in f64, in a fixed order (lane sums, then the tail).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0.0f64; DOT_LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let tail: f64 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..DOT_LANES {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_and_huge_vectors_keep_their_direction() {
        for scale in [1e-300, 1.0, 1e300] {
            let mut vector = [3.0 * scale, 4.0 * scale];
            scale_to_unit_norm(&mut vector);
            assert!((vector[0] - 0.6).abs() < 1e-15 && (vector[1] - 0.8).abs() < 1e-15);
        }
    }

    #[test]
    fn zero_and_non_finite_vectors() {
        let mut zero = [0.0, -0.0];
        scale_to_unit_norm(&mut zero);
        assert_eq!(zero, [0.0, 0.0]);
        for bad in [f64::NAN, f64::INFINITY] {
            let mut vector = [1.0, bad, 2.0];
            scale_to_unit_norm(&mut vector);
            assert!(vector.iter().any(|value| value.is_nan()));
        }
    }

    #[test]
    fn every_pair_counts_once_whatever_the_pieces() {
        // Vectors of one element: u_i . u_j = s_i * s_j with signs s; |.| = 1 for every pair.
        let count = 7;
        let units: Vec<f64> = (0..count)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let whole = sum_of_pairs(&units, count, 1, 0..count * count);
        assert_eq!(whole, 21.0);
        let pieces: f64 = [0..5, 5..17, 17..18, 18..49]
            .into_iter()
            .map(|piece| sum_of_pairs(&units, count, 1, piece))
            .sum();
        assert_eq!(pieces, 21.0);
    }

    #[test]
    fn dot_covers_the_lanes_and_the_tail() {
        let a: Vec<f64> = (1..=19).map(f64::from).collect();
        let expected: f64 = (1..=19).map(|i| f64::from(i * i)).sum();
        assert_eq!(dot(&a, &a), expected);
    }
}
