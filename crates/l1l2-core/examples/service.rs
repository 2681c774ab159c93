//! What a native service does with l1l2-core: hold model weights in memory, report their
//! regularization penalty, and run the regularizer's part of a training step (the penalty's
//! gradient added into the data gradient, then a proximal step), here for a generated model of a
//! few float32 layers.
//!
//! `cargo run --release -p l1l2-core --example service [elements per layer]`

use std::time::Instant;

use l1l2_core::{
    penalty, prox_many, sums, value_and_grad_many, ArrayView, ArrayViewMut, Factors, Update,
};

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

    // A training step: the data gradient (zeros here) plus the penalty's gradient, scaled by the
    // learning rate, for every layer in one call; then an elastic-net proximal step.
    let factors = Factors::l1l2(1e-4, 1e-3).expect("valid factors");
    let mut grads: Vec<Vec<f32>> = layers.iter().map(|w| vec![0.0; w.len()]).collect();
    let start = Instant::now();
    let views: Vec<ArrayView> = layers.iter().map(|w| ArrayView::from_slice(w)).collect();
    let mut targets: Vec<ArrayViewMut> = grads
        .iter_mut()
        .map(|g| ArrayViewMut::from_slice(g))
        .collect();
    let penalties = value_and_grad_many(
        &views,
        &mut targets,
        &factors,
        Update::Accumulate { scale: 0.1 },
    )
    .expect("matching shapes, no overlap");
    let elapsed = start.elapsed();
    println!(
        "value and gradient of every layer: {:.9e} (per-layer penalties rounded to f32) in {:.3} ms \
         (the first write of the new gradient buffers included)",
        penalties.iter().sum::<f64>(),
        elapsed.as_secs_f64() * 1e3
    );
    let mut weights = layers;
    let start = Instant::now();
    let mut targets: Vec<ArrayViewMut> = weights
        .iter_mut()
        .map(|w| ArrayViewMut::from_slice(w))
        .collect();
    prox_many(&mut targets, 0.1, &factors).expect("valid learning rate");
    let zeros = weights.iter().flatten().filter(|&&w| w == 0.0).count();
    println!(
        "proximal step (lr 0.1) in {:.3} ms: {zeros} weights now exactly zero",
        start.elapsed().as_secs_f64() * 1e3
    );
}
