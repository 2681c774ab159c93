//! The orthogonality penalty through the public API: every float type, strided views, the edge
//! cases and the refusals.

use l1l2_core::{bf16, f16, orthogonal_penalty, ArrayView, Error, Vectors};

/// A 3x2 matrix whose values every float type holds exactly: rows (3, 4), (0, 2), (0, 0).
/// Unit rows (0.6, 0.8), (0, 1), (0, 0): pairs |0.8|, 0, 0 over 3 pairs.
/// Columns (3, 0, 0), (4, 2, 0): unit (1, 0, 0) and (2, 1, 0) / sqrt(5); one pair, 2 / sqrt(5).
const MATRIX: [f64; 6] = [3.0, 4.0, 0.0, 2.0, 0.0, 0.0];

fn penalties<T: l1l2_core::Element>(data: &[T]) -> (f64, f64) {
    let view = ArrayView::new(data, 0, &[3, 2], &[2, 1]).unwrap();
    (
        orthogonal_penalty(&view, 1.0, Vectors::Rows).unwrap(),
        orthogonal_penalty(&view, 1.0, Vectors::Columns).unwrap(),
    )
}

fn assert_close(got: f64, expected: f64) {
    assert!((got - expected).abs() <= 1e-15, "{got} != {expected}");
}

#[test]
fn every_float_type_gives_the_same_penalty() {
    let f32s: Vec<f32> = MATRIX.iter().map(|&v| v as f32).collect();
    let f16s: Vec<f16> = MATRIX.iter().map(|&v| f16::from_f64(v)).collect();
    let bf16s: Vec<bf16> = MATRIX.iter().map(|&v| bf16::from_f64(v)).collect();
    for (rows, columns) in [
        penalties(&MATRIX),
        penalties(&f32s),
        penalties(&f16s),
        penalties(&bf16s),
    ] {
        assert_close(rows, 0.8 / 3.0);
        assert_close(columns, 2.0 / 5f64.sqrt());
    }
}

#[test]
fn a_transposed_view_swaps_the_modes() {
    let transposed = ArrayView::new(&MATRIX, 0, &[2, 3], &[1, 2]).unwrap();
    assert_close(
        orthogonal_penalty(&transposed, 0.5, Vectors::Columns).unwrap(),
        0.5 * 0.8 / 3.0,
    );
    assert_close(
        orthogonal_penalty(&transposed, 0.5, Vectors::Rows).unwrap(),
        0.5 * 2.0 / 5f64.sqrt(),
    );
}

#[test]
fn fewer_than_two_vectors_have_no_pair() {
    let row = [1.0f32, 2.0, 3.0];
    let view = ArrayView::new(&row, 0, &[1, 3], &[3, 1]).unwrap();
    assert_eq!(orthogonal_penalty(&view, 1.0, Vectors::Rows), Ok(0.0));
    let empty: [f32; 0] = [];
    let view = ArrayView::new(&empty, 0, &[0, 4], &[4, 1]).unwrap();
    assert_eq!(orthogonal_penalty(&view, 1.0, Vectors::Rows), Ok(0.0));
}

#[test]
fn refusals() {
    let data = [1.0f64, 2.0, 3.0, 4.0];
    let matrix = ArrayView::new(&data, 0, &[2, 2], &[2, 1]).unwrap();
    for factor in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            orthogonal_penalty(&matrix, factor, Vectors::Rows),
            Err(Error::InvalidArgument { name: "factor", .. })
        ));
    }
    let vector = ArrayView::from_slice(&data);
    assert_eq!(
        orthogonal_penalty(&vector, 1.0, Vectors::Rows),
        Err(Error::NotAMatrix { shape: vec![4] })
    );
    let integers = [1i32, 2, 3, 4];
    let view = ArrayView::new(&integers, 0, &[2, 2], &[2, 1]).unwrap();
    assert!(matches!(
        orthogonal_penalty(&view, 1.0, Vectors::Rows),
        Err(Error::FloatOnly { .. })
    ));
}
