//! What a native service does with l1l2-core: hold model weights in memory and report their
//! regularization penalty, here for a generated model of a few float32 layers.
//!
//! `cargo run --release -p l1l2-core --example service [elements per layer]`

use std::time::Instant;

use l1l2_core::{penalty, sums, ArrayView};

fn main() {
    let per_layer: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(10_000_000);
    // Deterministic pseudo-random weights in [-0.1, 0.1).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let layers: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            (0..per_layer)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                })
                .collect()
        })
        .collect();

    let start = Instant::now();
    let total: f64 = layers.iter().map(|w| penalty(w, 1e-4, 1e-3)).sum();
    let elapsed = start.elapsed();
    let bytes = 3 * per_layer * std::mem::size_of::<f32>();
    println!(
        "penalty of {} weights: {total:.9e} in {:.3} ms ({:.1} GB/s, {} threads, {:?})",
        3 * per_layer,
        elapsed.as_secs_f64() * 1e3,
        bytes as f64 / elapsed.as_secs_f64() / 1e9,
        l1l2_core::num_threads(),
        l1l2_core::isa(),
    );

    // A strided view: every other column of the first layer seen as a matrix of 1000 columns.
    let rows = per_layer / 1000;
    let view = ArrayView::new(&layers[0], 0, &[rows, 500], &[1000, 2]).expect("in bounds");
    let s = view.sums();
    println!(
        "every other column of layer 0: sum|w| = {:.6}, sum w^2 = {:.6}",
        s.sum_abs, s.sum_squares
    );
    let whole = sums(&layers[0]);
    println!(
        "whole layer 0:                 sum|w| = {:.6}, sum w^2 = {:.6}",
        whole.sum_abs, whole.sum_squares
    );
}
