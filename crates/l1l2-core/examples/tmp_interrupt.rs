use std::time::Instant;
fn main() {
    let x: Vec<f32> = (0..1_000_000).map(|i| (i as f32 * 0.001).sin()).collect();
    for round in 0..3 {
        let mut best = [f64::MAX; 2];
        let mut med = [vec![], vec![]];
        for _ in 0..200 {
            let t = Instant::now();
            std::hint::black_box(l1l2_core::sums(&x));
            let a = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            std::hint::black_box(l1l2_core::parallel::interruptible(
                || false,
                || l1l2_core::sums(&x),
            ));
            let b = t.elapsed().as_secs_f64() * 1e6;
            best[0] = best[0].min(a);
            best[1] = best[1].min(b);
            med[0].push(a);
            med[1].push(b);
        }
        for m in med.iter_mut() {
            m.sort_by(|a, b| a.partial_cmp(b).unwrap());
        }
        println!(
            "round {round}: plain best {:.1} med {:.1}; interruptible best {:.1} med {:.1}",
            best[0], med[0][100], best[1], med[1][100]
        );
    }
}
