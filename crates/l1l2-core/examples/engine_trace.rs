//! Where the time of a parallel call goes: for each call, when the pool's worker started and ended
//! its pieces (its wake-up latency), how the pieces were split between the caller and the
//! workers, and how long the caller waited for them after its own pieces.
//!
//! `cargo run --release -p l1l2-core --features probe --example engine_trace -- [gap_us] [calls]
//! [sizes]`
//!
//! `gap_us` (default 0) is a pause between calls: 0 is the benchmark pattern (back-to-back
//! calls), a few hundred us or more the pattern of a training step (the worker has gone to sleep).
//! `sizes` (comma-separated element counts) defaults to 1e5, 3e5, 1e6, 3e6 and 1e7. A fourth
//! argument `cpus` also reads, after each call (outside the timing, which adds some 20 us between
//! calls), the CPU the caller and the worker last ran on (Linux `/proc`): whether a late worker
//! had been put on the caller's CPU.
//! `GAP_SPIN=1` in the environment spends the gap spinning, as a Python loop's own work between
//! calls would, instead of sleeping (the caller's CPU then stays busy).
//! `MIN_BYTES=n` in the environment makes every call of at least `n` bytes run in parallel,
//! whether the workers are awake or not (`MIN_BYTES=1` traces sizes under the threshold).
//! Prints, per dtype and size, quantiles over the calls (min, 25%, median, 75%, 90%, max) in us,
//! and the load average at the start and end (the figures mean little on a loaded machine).

use std::time::{Duration, Instant};

use l1l2_core::parallel::trace::{self, CallTrace};
use l1l2_core::Element;

const SIZES: [usize; 5] = [100_000, 300_000, 1_000_000, 3_000_000, 10_000_000];

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|line| {
            line.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// "min p25 p50 p75 p90 max" of `values` (us).
fn quantiles(mut values: Vec<f64>) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    let iqr = (at(0.75) - at(0.25)) / at(0.5) * 100.0;
    format!(
        "{:8.1} {:8.1} {:8.1} {:8.1} {:8.1} {:8.1}  (IQR {iqr:3.0}%)",
        at(0.0),
        at(0.25),
        at(0.5),
        at(0.75),
        at(0.9),
        at(1.0)
    )
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// The caller's span and the first worker's span of a call (a 2-thread pool has one worker).
fn spans(call: &CallTrace) -> (Option<&trace::Span>, Option<&trace::Span>) {
    let caller = call.spans.iter().find(|span| !span.worker);
    let worker = call.spans.iter().find(|span| span.worker);
    (caller, worker)
}

/// The CPU a thread of this process last ran on (`/proc/self/task/<tid>/stat`, field 39).
fn last_cpu(task: &str) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{task}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(36)?.parse().ok()
}

/// The task ids of this thread and of the pool's first worker (named `l1l2-0`).
fn caller_and_worker_tasks() -> Option<(String, String)> {
    let caller = std::fs::read_link("/proc/thread-self").ok()?;
    let caller = caller.file_name()?.to_string_lossy().into_owned();
    let worker = std::fs::read_dir("/proc/self/task")
        .ok()?
        .find_map(|entry| {
            let task = entry.ok()?.file_name().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(format!("/proc/self/task/{task}/comm")).ok()?;
            (name.trim() == "l1l2-0").then_some(task)
        })?;
    Some((caller, worker))
}

fn trace_size<T: Element>(
    name: &str,
    convert: impl Fn(f64) -> T,
    len: usize,
    calls: usize,
    gap: Duration,
    cpus: bool,
) {
    let data: Vec<T> = (0..len)
        .map(|i| convert((i % 1000) as f64 * 1e-3 - 0.5))
        .collect();
    for _ in 0..20 {
        std::hint::black_box(l1l2_core::sums(&data)); // warm the pool and the caches
    }
    trace::take();
    trace::take_relocated();
    trace::take_moved();
    let tasks = caller_and_worker_tasks().filter(|_| cpus);
    let mut same_cpu = Vec::new();
    trace::record(true);
    let mut totals = Vec::new();
    for _ in 0..calls {
        if !gap.is_zero() {
            if std::env::var_os("GAP_SPIN").is_some() {
                let end = Instant::now() + gap;
                while Instant::now() < end {}
            } else {
                std::thread::sleep(gap);
            }
        }
        let start = Instant::now();
        std::hint::black_box(l1l2_core::sums(std::hint::black_box(&data)));
        totals.push(start.elapsed().as_secs_f64() * 1e6);
        if let Some((caller, worker)) = &tasks {
            same_cpu.push(last_cpu(caller).is_some() && last_cpu(caller) == last_cpu(worker));
        }
    }
    trace::record(false);
    let traced = trace::take();
    println!(
        "{name} {len:>10} ({} KiB), {calls} calls, gap {} us",
        len * size_of::<T>() / 1024,
        gap.as_micros()
    );
    println!(
        "  {:34}{:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "us", "min", "p25", "p50", "p75", "p90", "max"
    );
    println!("  {:34}{}", "call (caller's clock)", quantiles(totals));
    if traced.is_empty() {
        println!("  serial: below the parallel threshold, no pool involved");
        return;
    }
    let mut wake = Vec::new();
    let mut caller_busy = Vec::new();
    let mut worker_busy = Vec::new();
    let mut caller_wait = Vec::new();
    let mut scope_exit = Vec::new();
    let mut worker_share = Vec::new();
    let mut idle_worker = 0;
    let mut late_on_callers_cpu = [0, 0]; // [late, on time] calls whose worker shared the CPU
    for (index, call) in traced.iter().enumerate() {
        let (Some(caller), worker) = spans(call) else {
            continue;
        };
        caller_busy.push(us(caller.end_ns - caller.start_ns));
        caller_wait.push(us(call.end_ns.saturating_sub(caller.end_ns)));
        scope_exit.push(us(call.end_ns.saturating_sub(call.caller_waited_ns)));
        if let Some(worker) = worker {
            wake.push(us(worker.start_ns));
            worker_busy.push(us(worker.end_ns - worker.start_ns));
            let pieces = (caller.pieces + worker.pieces).max(1);
            worker_share.push(100.0 * worker.pieces as f64 / pieces as f64);
            if worker.pieces == 0 {
                idle_worker += 1;
            }
            if same_cpu.get(index) == Some(&true) {
                late_on_callers_cpu[usize::from(worker.pieces != 0)] += 1;
            }
        }
    }
    println!(
        "  {:34}{}",
        "worker start (wake-up latency)",
        quantiles(wake)
    );
    println!("  {:34}{}", "caller's pieces", quantiles(caller_busy));
    println!("  {:34}{}", "worker's pieces", quantiles(worker_busy));
    println!(
        "  {:34}{}",
        "caller waits after its pieces",
        quantiles(caller_wait)
    );
    println!(
        "  {:34}{}",
        "leaving the pool after the wait",
        quantiles(scope_exit)
    );
    println!(
        "  {:34}{}",
        "worker's share of pieces (%)",
        quantiles(worker_share)
    );
    println!(
        "  calls where the worker came too late to take a piece: {idle_worker} of {}; late \
         workers were left to sleep in the pool instead of lingering {} times; a worker moved off \
         the caller's CPU {} times",
        traced.len(),
        trace::take_relocated(),
        trace::take_moved()
    );
    if !same_cpu.is_empty() {
        println!(
            "  worker last ran on the caller's CPU: {} of the late calls, {} of the others",
            late_on_callers_cpu[0], late_on_callers_cpu[1]
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gap = Duration::from_micros(args.next().and_then(|a| a.parse().ok()).unwrap_or(0));
    let calls: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(400);
    let sizes: Vec<usize> = args.next().map_or(SIZES.to_vec(), |list| {
        list.split(',')
            .filter_map(|size| size.parse::<f64>().ok())
            .map(|size| size as usize)
            .collect()
    });
    let cpus = args.next().is_some_and(|arg| arg == "cpus");
    if let Some(bytes) = std::env::var("MIN_BYTES").ok().and_then(|v| v.parse().ok()) {
        l1l2_core::parallel::set_min_bytes_for_measurement(bytes);
    }
    println!(
        "threads {}, load average at start {}",
        l1l2_core::num_threads(),
        load_average()
    );
    for len in sizes {
        let calls = if len >= 10_000_000 { calls / 4 } else { calls };
        trace_size("f32", |x| x as f32, len, calls, gap, cpus);
        trace_size("f64", |x| x, len, calls, gap, cpus);
    }
    println!("load average at end {}", load_average());
}
