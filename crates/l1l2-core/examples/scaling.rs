//! Thread scaling of `sums` next to the read probe, at a few sizes, for f32 and f64:
//! `cargo run --release -p l1l2-core --example scaling`. Medians of 41 back-to-back calls.

use std::time::Instant;

use l1l2_core::Element;

fn median(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..41)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[20]
}

fn scaling<T: Element>(name: &str, convert: impl Fn(f64) -> T) {
    for len in [100_000usize, 1_000_000, 10_000_000, 100_000_000] {
        let data: Vec<T> = (0..len)
            .map(|i| convert((i % 1000) as f64 * 1e-3 - 0.5))
            .collect();
        let words: Vec<u64> = (0..(len * size_of::<T>() / 8) as u64).collect();
        let mut line = format!("{name} {len:>10}");
        for threads in [1, 2] {
            l1l2_core::set_num_threads(threads);
            let sums = median(|| {
                std::hint::black_box(l1l2_core::sums(std::hint::black_box(&data)));
            });
            let probe = median(|| {
                std::hint::black_box(l1l2_core::probe::read_probe(std::hint::black_box(&words)));
            });
            line += &format!("  {threads}t: sums {sums:9.1} us probe {probe:9.1} us");
        }
        println!("{line}");
    }
    l1l2_core::set_num_threads(0);
}

fn main() {
    scaling("f32", |x| x as f32);
    scaling("f64", |x| x);
}
