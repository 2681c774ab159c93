//! Mergeable partial sums (`SumsPartial`): the same bits for any address, layout and thread
//! count; merged chunks within the accuracy of the single call; float64 at the ends of the range;
//! the byte encoding and its validation.

use l1l2_core::{set_num_threads, ArrayView, DType, Error, Factors, SumsPartial};

/// Deterministic pseudo-random values in [-1, 1) (a 64-bit LCG).
fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// The partial of `data` merged from pieces of `piece` elements, left to right.
fn merged<T: l1l2_core::Element>(data: &[T], piece: usize) -> SumsPartial {
    data.chunks(piece)
        .map(|chunk| SumsPartial::of(&ArrayView::from_slice(chunk)))
        .fold(SumsPartial::empty(), |total, next| {
            total.merge(&next).expect("one dtype")
        })
}

#[test]
fn bits_do_not_depend_on_the_address() {
    let data = values(100_003, 1);
    // The same values at every offset from a 64-byte boundary.
    let mut buffer = vec![0.0f64; data.len() + 16];
    let reference = {
        let start = buffer.as_ptr().align_offset(64);
        buffer[start..start + data.len()].copy_from_slice(&data);
        SumsPartial::of(&ArrayView::from_slice(&buffer[start..start + data.len()])).to_bytes()
    };
    for shift in 0..8 {
        buffer[shift..shift + data.len()].copy_from_slice(&data);
        let partial = SumsPartial::of(&ArrayView::from_slice(&buffer[shift..shift + data.len()]));
        assert_eq!(partial.to_bytes(), reference, "offset of {shift} elements");
    }
}

#[test]
fn bits_do_not_depend_on_the_layout_or_the_threads() {
    // A 300 x 500 matrix in C order and the same matrix stored in Fortran order.
    let (rows, cols) = (300, 500);
    let c_order: Vec<f32> = values(rows * cols, 2).iter().map(|&v| v as f32).collect();
    let mut f_order = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            f_order[i + j * rows] = c_order[i * cols + j];
        }
    }
    let c_view = ArrayView::new(&c_order, 0, &[rows, cols], &[cols as isize, 1]).unwrap();
    let f_view = ArrayView::new(&f_order, 0, &[rows, cols], &[1, rows as isize]).unwrap();
    let reference = SumsPartial::of(&c_view).to_bytes();
    for threads in [1, 2, 3, 8] {
        set_num_threads(threads);
        assert_eq!(SumsPartial::of(&c_view).to_bytes(), reference);
        assert_eq!(SumsPartial::of(&f_view).to_bytes(), reference);
    }
    set_num_threads(0);
    // A broadcast row has the bits of the same values written out.
    let row: Vec<f32> = c_order[..cols].to_vec();
    let repeated: Vec<f32> = row.iter().copied().cycle().take(rows * cols).collect();
    let broadcast = ArrayView::new(&row, 0, &[rows, cols], &[0, 1]).unwrap();
    assert_eq!(
        SumsPartial::of(&broadcast).to_bytes(),
        SumsPartial::of(&ArrayView::from_slice(&repeated)).to_bytes()
    );
}

#[test]
fn merged_pieces_match_the_single_call_within_its_bound() {
    let data = values(200_000, 3);
    let whole = ArrayView::from_slice(&data).sums();
    for piece in [1_000, 32_768, 50_001] {
        let sums = merged(&data, piece).sums();
        // Both are within a few ulp of the exact sums (the single call's bound).
        for (got, want) in [
            (sums.sum_abs, whole.sum_abs),
            (sums.sum_squares, whole.sum_squares),
        ] {
            assert!(
                (got - want).abs() <= 4.0 * f64::EPSILON * want,
                "{got} {want}"
            );
        }
    }
    // Integers are exact, however they are cut.
    let ints: Vec<i64> = (0..10_000).map(|i| (i - 5_000) * 1_000_003).collect();
    let exact = merged(&ints, 777).sums();
    let abs: i128 = ints.iter().map(|&v| i128::from(v).abs()).sum();
    let squares: i128 = ints.iter().map(|&v| i128::from(v) * i128::from(v)).sum();
    assert_eq!(exact.sum_abs, abs as f64);
    assert_eq!(exact.sum_squares, squares as f64);
}

#[test]
fn float64_extremes_survive_merging() {
    let factors = Factors::l1l2(1e-300, 1e-300).unwrap();
    // Huge values: the squares overflow in every piece, the penalty does not.
    let huge: Vec<f64> = values(10_000, 4).iter().map(|v| v * 1e200).collect();
    let single = ArrayView::from_slice(&huge).penalty(1e-300, 1e-300);
    assert!(single.is_finite());
    for piece in [100, 3_333, 10_000] {
        let got = merged(&huge, piece).penalty(&factors);
        assert!(
            (got - single).abs() <= 4.0 * f64::EPSILON * single,
            "{got} {single}"
        );
    }
    // Tiny values: every square underflows f64.
    let tiny: Vec<f64> = values(10_000, 5).iter().map(|v| v * 1e-200).collect();
    let single = ArrayView::from_slice(&tiny).sums();
    let factors = Factors::l1l2(0.0, 1e300).unwrap();
    for piece in [100, 10_000] {
        let got = merged(&tiny, piece).penalty(&factors);
        let want = factors.penalty(&single);
        assert!(want > 0.0 && (got - want).abs() <= 4.0 * f64::EPSILON * want);
    }
    // Pieces that fit f64 alone but whose sum overflows: rescaled on merging.
    let big = vec![f64::MAX / 2.0; 6];
    let got = merged(&big, 2).sums();
    assert_eq!(got.sum_abs, f64::INFINITY);
    let penalty = merged(&big, 2).penalty(&Factors::l1l2(0.25, 0.0).unwrap());
    assert_eq!(penalty, f64::MAX * 0.75); // both rounded once from 0.75 * MAX
                                          // Tiny pieces merged with ordinary ones, and with huge ones, in every order.
    let mixed = [tiny[..50].to_vec(), vec![0.5, -0.25], huge[..3].to_vec()];
    for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1]] {
        let all: Vec<f64> = order.iter().flat_map(|&i| mixed[i].clone()).collect();
        let single = ArrayView::from_slice(&all).penalty(1e-300, 1e-300);
        let got = order
            .iter()
            .map(|&i| SumsPartial::of(&ArrayView::from_slice(&mixed[i])))
            .fold(SumsPartial::empty(), |a, b| a.merge(&b).unwrap())
            .penalty(&Factors::l1l2(1e-300, 1e-300).unwrap());
        assert!((got - single).abs() <= 4.0 * f64::EPSILON * single);
    }
}

#[test]
fn encoding_round_trips_and_rejects_garbage() {
    let partials = [
        SumsPartial::empty(),
        SumsPartial::of(&ArrayView::from_slice(&[1.5f32, -2.0])),
        SumsPartial::of(&ArrayView::from_slice(&[1e-200f64, 3e-201])),
        SumsPartial::of(&ArrayView::from_slice(&[i64::MIN, 7])),
        SumsPartial::of(&ArrayView::from_slice(&[true, false])),
    ];
    for partial in partials {
        let bytes = partial.to_bytes();
        assert_eq!(SumsPartial::from_bytes(&bytes), Ok(partial));
        // Every truncation and one byte more are refused.
        for cut in 0..bytes.len() {
            assert!(matches!(
                SumsPartial::from_bytes(&bytes[..cut]),
                Err(Error::InvalidPartial { .. })
            ));
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SumsPartial::from_bytes(&longer).is_err());
    }
    let good = SumsPartial::of(&ArrayView::from_slice(&[1.0f64])).to_bytes();
    let corrupt = |index: usize, value: u8| {
        let mut bytes = good.clone();
        bytes[index] = value;
        SumsPartial::from_bytes(&bytes)
    };
    assert!(corrupt(0, b'X').is_err()); // magic
    assert!(corrupt(4, 2).is_err()); // version
    assert!(corrupt(5, 99).is_err()); // dtype code
    assert!(corrupt(5, 5).is_err()); // an integer dtype with a float body
    assert!(corrupt(6, 7).is_err()); // scale
    assert!(corrupt(15, 0xbf).is_err()); // a negative sum (the sign bit of abs.hi)
                                         // Merging what cannot be pieces of one array.
    let f32_partial = SumsPartial::of(&ArrayView::from_slice(&[1.0f32]));
    let f64_partial = SumsPartial::of(&ArrayView::from_slice(&[1.0f64]));
    assert_eq!(
        f32_partial.merge(&f64_partial),
        Err(Error::MixedDTypes {
            first: DType::F32,
            second: DType::F64
        })
    );
    let mut max = vec![0u8; 46];
    max[..6].copy_from_slice(&[b'L', b'1', b'L', b'2', 1, 8]);
    max[6..].fill(0xff);
    let max = SumsPartial::from_bytes(&max).unwrap();
    assert!(matches!(max.merge(&max), Err(Error::InvalidPartial { .. })));
}

/// The elements a strided view addresses, in C order (the reference the partial must match).
fn c_order_copy(data: &[f32], offset: usize, shape: &[usize], strides: &[isize]) -> Vec<f32> {
    let len: usize = shape.iter().product();
    let mut out = Vec::with_capacity(len);
    for flat in 0..len {
        let (mut rest, mut at) = (flat, offset as isize);
        for (&dim, &stride) in shape.iter().zip(strides).rev() {
            at += (rest % dim) as isize * stride;
            rest /= dim;
        }
        out.push(data[at as usize]);
    }
    out
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 64, failure_persistence: None, ..Default::default()
    })]

    /// Any strided view (transposed, reversed, stepped, broadcast) has the partial of its values
    /// written out in C order.
    #[test]
    fn any_layout_has_the_partial_of_its_c_order_values(
        shape in proptest::collection::vec(1usize..40, 0..4),
        order_seed in 0u64..1000,
        reverse in proptest::collection::vec(proptest::bool::ANY, 4),
        step in proptest::collection::vec(0usize..3, 4),
    ) {
        // Lay `shape` out over a buffer in a shuffled axis order, each axis with a step of 0
        // (broadcast), 1 or 2 and possibly reversed.
        let ndim = shape.len();
        let mut axes: Vec<usize> = (0..ndim).collect();
        axes.rotate_left(order_seed as usize % ndim.max(1));
        if order_seed % 2 == 1 {
            axes.reverse();
        }
        let mut strides = vec![0isize; ndim];
        let mut extent = 1usize;
        for &axis in axes.iter().rev() {
            let step = step[axis];
            strides[axis] = (extent * step) as isize;
            extent += (shape[axis] - 1) * extent * step;
        }
        let mut offset = 0usize;
        for axis in 0..ndim {
            if reverse[axis] && strides[axis] != 0 {
                offset += (shape[axis] - 1) * strides[axis] as usize;
                strides[axis] = -strides[axis];
            }
        }
        let data: Vec<f32> = values(extent + 3, order_seed).iter().map(|&v| v as f32).collect();
        let view = ArrayView::new(&data, offset, &shape, &strides).unwrap();
        let written = c_order_copy(&data, offset, &shape, &strides);
        proptest::prop_assert_eq!(
            SumsPartial::of(&view).to_bytes(),
            SumsPartial::of(&ArrayView::from_slice(&written)).to_bytes()
        );
    }
}
