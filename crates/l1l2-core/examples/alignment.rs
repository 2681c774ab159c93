//! `sums` on one thread at each start offset within a cache line, 1e7 elements of f32 and f64
//! (from RAM): `cargo run --release -p l1l2-core --example alignment`. The kernel reads from the
//! first 64-byte boundary of its input on, so no offset should stand out. Medians of 15 calls.

use std::time::Instant;

use l1l2_core::Element;

const LEN: usize = 10_000_000;

fn offsets<T: Element>(name: &str, convert: impl Fn(f64) -> T) {
    let lanes_per_line = 64 / size_of::<T>();
    let buffer: Vec<T> = (0..LEN + lanes_per_line)
        .map(|i| convert((i % 1000) as f64 * 1e-3 - 0.5))
        .collect();
    for offset in 0..lanes_per_line {
        let data = &buffer[offset..offset + LEN];
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(l1l2_core::sums(std::hint::black_box(data)));
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let line_offset = data.as_ptr() as usize % 64;
        println!(
            "{name} at {line_offset:>2} bytes past a line: {:.2} ms",
            times[7]
        );
    }
}

fn main() {
    l1l2_core::set_num_threads(1);
    println!("isa {:?}, one thread, {LEN} elements", l1l2_core::isa());
    offsets::<f32>("f32", |x| x as f32);
    offsets::<f64>("f64", |x| x);
}
