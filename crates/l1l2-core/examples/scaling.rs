//! Thread scaling of `sums` at a few sizes: `cargo run --release -p l1l2-core --example scaling`.

use std::time::Instant;

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

fn main() {
    for len in [100_000usize, 300_000, 1_000_000, 10_000_000] {
        let data: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
        let words: Vec<u64> = (0..len as u64 / 2).collect();
        let mut line = format!("{len:>10}");
        for threads in [1, 2] {
            l1l2_core::set_num_threads(threads);
            let sums = median(|| {
                std::hint::black_box(l1l2_core::sums(std::hint::black_box(&data)));
            });
            let probe = median(|| {
                std::hint::black_box(l1l2_core::probe::read_probe(std::hint::black_box(&words)));
            });
            line += &format!("  {threads}t: sums {sums:8.1} us probe {probe:7.1} us");
        }
        let halves = median(|| {
            let (a, b) = data.split_at(len / 2);
            std::thread::scope(|s| {
                let h = s.spawn(|| l1l2_core::sums(a));
                std::hint::black_box(l1l2_core::sums(b));
                std::hint::black_box(h.join().unwrap());
            });
        });
        println!("{line}  | std::thread halves (serial each): {halves:8.1} us");
    }
}
