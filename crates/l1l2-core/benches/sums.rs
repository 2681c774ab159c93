//! Criterion benches of the core: contiguous and strided, per dtype, cache-resident to RAM-sized.
//! `cargo bench -p l1l2-core` (set L1L2_NUM_THREADS=1 for the single-thread figures).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use l1l2_core::{bf16, f16, sums, ArrayView, Element};

fn data<T: Element>(len: usize, convert: impl Fn(f64) -> T) -> Vec<T> {
    let mut state = 42u64;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            convert((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        })
        .collect()
}

fn bench_dtype<T: Element>(c: &mut Criterion, name: &str, convert: impl Fn(f64) -> T + Copy) {
    let mut group = c.benchmark_group(format!("sums/{name}"));
    for len in [1_000usize, 100_000, 10_000_000] {
        let values = data(len, convert);
        group.throughput(Throughput::Bytes((len * std::mem::size_of::<T>()) as u64));
        group.bench_with_input(BenchmarkId::new("contiguous", len), &values, |b, v| {
            b.iter(|| sums(black_box(v)))
        });
        let strided = ArrayView::new(&values, 0, &[len / 2], &[2]).unwrap();
        group.bench_with_input(BenchmarkId::new("every_other", len), &strided, |b, v| {
            b.iter(|| black_box(v).sums())
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_dtype(c, "f32", |x| x as f32);
    bench_dtype(c, "f64", |x| x);
    bench_dtype(c, "f16", f16::from_f64);
    bench_dtype(c, "bf16", bf16::from_f64);
}

criterion_group! {
    name = group;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = benches
}
criterion_main!(group);
