//! The reduction kernels: one generic float kernel, instantiated per instruction set and chosen
//! once at run time, and one exact integer kernel.
//!
//! The float kernel keeps `LANES` independent f64 accumulators for `sum |x|` and as many for
//! `sum x^2`, in plain arrays that LLVM turns into vector registers (4 AVX2 or 2 AVX-512 registers
//! each). The lane count is the same on every instruction set, so every ISA adds the same numbers
//! in the same order and produces the same bits.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::accumulate::{Compensated, ExactPartial, FloatPartial, Partial, U192};
use crate::element::{Float, Magnitude};

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

/// Independent accumulators per sum: enough to hide the add latency on every supported ISA.
pub(crate) const LANES: usize = 16;

/// How far ahead of the step it sums the kernel asks for the input to be brought into L2 (bytes),
/// in runs of at least `PREFETCH_MIN_RUN_BYTES`.
///
/// The hardware prefetchers alone kept the kernel's loads waiting on memory beyond L2: with the
/// input in L3 or RAM, one thread read float64 at 8-10 GB/s where the C reference's plainer loop
/// read 14-21 GB/s (float64's kernel has twice the instructions per byte). Measured on 2 threads,
/// builds without and with it alternated three times (medians of 7-31 calls): `penalty` at 1e7
/// float64 1.84-2.71 -> 1.69-1.95 ms, 1e8 float64 48.4-51.6 -> 33.0-37.3 ms, 1e8 float32
/// 21.2-23.6 -> 16.3-18.0 ms; float32 `value_and_grad` at 1e7 2.14-2.72 -> 1.76-1.86 ms; 1e5-1e6
/// and float16 unchanged within the noise. 4, 8 and 16 KiB ahead did alike; prefetching a whole 4
/// KiB float32 block at once instead slowed float32 by 15-25%.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 8 << 10;

/// Runs shorter than this are not prefetched: the extra instructions cost 1e5 float32 (400 KB in
/// chunks of 52 KiB, in L2) 5-10%, and on a Zen 4 core float64 1e5 (8 chunks of 100 KB) too: one
/// thread's 4 chunks from L2 5.7 -> 5.4 us without them, and 80 such arrays in turn (from memory)
/// 22.2-22.9 -> 19.0-21.0 us a call. Full chunks (32 Ki elements, cut from tensors of 256 Ki
/// elements or more) are prefetched in float32 (128 KiB, less a lead of at most one line) and
/// float64 (256 KiB), as are float64 chunks from 120 KiB (tensors of 120 Ki elements or more)
/// and long rows of a strided layout.
const PREFETCH_MIN_RUN_BYTES: usize = 120 << 10;

/// Whether the build target itself guarantees fused multiply-add (aarch64 does, x86-64 does not).
const BASELINE_FMA: bool = cfg!(target_arch = "aarch64");

/// The instruction sets the float kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 with AVX-512F (and AVX2, FMA and F16C).
    Avx512,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// Whatever the build target guarantees (SSE2 on x86-64, NEON on aarch64).
    Baseline,
}

/// The instruction set the kernels use on this CPU, detected once.
///
/// Cached in an atomic rather than a `OnceLock`, as the thread count is (see `parallel`): a child
/// forked while another thread is detecting it must not wait for that thread.
pub fn isa() -> Isa {
    static ISA: AtomicU8 = AtomicU8::new(0);
    const ISAS: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Baseline];
    match ISA.load(Ordering::Relaxed) {
        0 => {
            let isa = detect_isa();
            let code = ISAS.iter().position(|&known| known == isa).unwrap_or(2);
            ISA.store(code as u8 + 1, Ordering::Relaxed);
            isa
        }
        code => ISAS[usize::from(code - 1)],
    }
}

/// The best ISA the CPU has, capped by `L1L2_MAX_ISA` (`avx2` or `baseline`; other values are
/// ignored) or `L1L2_FORCE_BASELINE` (any value but empty or `0`), so that tests can run every
/// kernel on one machine.
fn detect_isa() -> Isa {
    let forced =
        std::env::var("L1L2_FORCE_BASELINE").is_ok_and(|value| !matches!(value.trim(), "" | "0"));
    let cap = match std::env::var("L1L2_MAX_ISA").as_deref() {
        _ if forced => Isa::Baseline,
        Ok("baseline") => Isa::Baseline,
        Ok("avx2") => Isa::Avx2,
        _ => Isa::Avx512,
    };
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if avx2 && is_x86_feature_detected!("avx512f") && cap == Isa::Avx512 {
            return Isa::Avx512;
        }
        if avx2 && cap != Isa::Baseline {
            return Isa::Avx2;
        }
    }
    let _ = cap; // only x86-64 has ISAs to cap
    Isa::Baseline
}

/// What an instruction set offers the generic kernels, as a type: each kernel is instantiated
/// once per `Target` and run inside a wrapper compiled with that target's features.
pub(crate) trait Target: Copy + 'static {
    /// Fused multiply-add is an instruction (not a library call).
    const FMA: bool;
    /// F16C's `vcvtph2ps` widens 8 f16 values at once.
    const F16C: bool;
}

/// Whatever the build target guarantees.
#[derive(Clone, Copy)]
pub(crate) struct Baseline;

impl Target for Baseline {
    const FMA: bool = BASELINE_FMA;
    const F16C: bool = false;
}

/// A computation generic over the instruction set. `run` must be `#[inline(always)]`, so that
/// its body (and everything it inlines) is compiled inside the wrapper with that ISA's features.
pub(crate) trait Kernel {
    type Output;
    fn run<I: Target>(self) -> Self::Output;
}

/// Runs `kernel` on the best instruction set of this CPU: the one dispatch of every op family.
#[inline]
pub(crate) fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only after detecting avx512f, avx2, fma and f16c.
        Isa::Avx512 => unsafe { x86_64::run_avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only after detecting avx2, fma and f16c.
        Isa::Avx2 => unsafe { x86_64::run_avx2(kernel) },
        _ => kernel.run::<Baseline>(),
    }
}

/// Receives every element of a run the kernel reads, block by block while the block is in L1:
/// `visit(start, values)` gets the run's elements `start..start + values.len()`. The gradient
/// ops write their output here, so the input is read from memory once.
pub(crate) trait RunSink<T> {
    fn visit(&mut self, start: usize, values: &[T]);
}

/// The sink of a plain reduction.
pub(crate) struct NoSink;

impl<T> RunSink<T> for NoSink {
    #[inline(always)]
    fn visit(&mut self, _start: usize, _values: &[T]) {}
}

/// `sum |x|` and `sum x^2` of the elements `run[0], run[step], run[2 * step], ..` (`step` divides
/// `LANES`), on the best instruction set of this CPU, handing every block read to `sink`.
///
/// The kernel puts consecutive elements into consecutive lanes, so with `step` dividing `LANES`
/// the wanted elements are exactly those of every `step`-th lane: the kernel reads the whole run at
/// full vector speed and the other lanes are dropped at the end. For `x[::2]` that costs twice the
/// work per element of a contiguous run, far less than gathering element by element.
#[inline]
pub(crate) fn float_sums<T: Float, S: RunSink<T>>(
    run: &[T],
    step: usize,
    sink: &mut S,
) -> FloatPartial {
    dispatch(FloatSums { run, step, sink })
}

struct FloatSums<'a, T, S> {
    run: &'a [T],
    step: usize,
    sink: &'a mut S,
}

impl<T: Float, S: RunSink<T>> Kernel for FloatSums<'_, T, S> {
    type Output = FloatPartial;
    #[inline(always)]
    fn run<I: Target>(self) -> FloatPartial {
        // One instance per step: with the step a constant the compiler keeps the lane totals in
        // registers (measured: 1.3-1.7x fewer instructions for contiguous f64 than a variable step).
        match self.step {
            1 => float_sums_generic::<T, I, S, 1>(self.run, self.sink),
            2 => float_sums_generic::<T, I, S, 2>(self.run, self.sink),
            4 => float_sums_generic::<T, I, S, 4>(self.run, self.sink),
            step => unreachable!("the kernel's step {step} does not divide its lanes"),
        }
    }
}

/// The one float kernel. `#[inline(always)]` so that each per-ISA wrapper compiles its own copy
/// with that wrapper's target features. Fused multiply-add is used only where it gives the same
/// bits as multiply-then-add (see `Float::EXACT_SQUARES`).
///
/// The lanes start at the run's first step-aligned element (see `lead`): a vector load that spans
/// two cache lines halves one core's streaming rate, and numpy puts large arrays 16 bytes past a
/// line. The elements before it are added one by one, compensated. So the bits depend on the
/// data and on its address modulo 64 bytes, never on threads, timing or the sink.
#[inline(always)]
fn float_sums_generic<T: Float, I: Target, S: RunSink<T>, const STEP: usize>(
    run: &[T],
    sink: &mut S,
) -> FloatPartial {
    let step = STEP;
    let (head, body) = run.split_at(lead(run));
    let mut total = FloatPartial::default();
    for value in head.iter().step_by(step) {
        let x = value.widen_abs();
        total.abs.add(x);
        total.squares.add(x * x);
    }
    sink.visit(0, head);
    // The body's element `j` is the run's `j + head.len()`: the wanted ones are in the lanes
    // `first, first + step, ..`.
    // `step` is a power of two dividing `LANES` (1, 2 or 4): masks instead of divisions, which
    // cost a short run more than its additions.
    debug_assert!(step.is_power_of_two() && LANES % step == 0);
    let mask = step - 1;
    let first = step.wrapping_sub(head.len()) & mask;
    let body_sums = if cfg!(target_arch = "x86_64") && size_of_val(body) >= PREFETCH_MIN_RUN_BYTES {
        aligned_sums::<T, I, S, true>(body, step, first, head.len(), sink)
    } else {
        aligned_sums::<T, I, S, false>(body, step, first, head.len(), sink)
    };
    total.merge(body_sums)
}

/// How many leading elements of `run` come before its first step-aligned address (at most
/// `run.len()`, less than `LANES`). f32 and f64 steps align to a 64-byte line, narrower steps to
/// their own size.
#[inline(always)]
fn lead<T>(run: &[T]) -> usize {
    let align = (LANES * size_of::<T>()).min(64);
    // `usize::MAX` when no offset aligns the pointer: then the lanes start at the first element.
    let lead = run.as_ptr().align_offset(align);
    if lead < LANES {
        lead.min(run.len())
    } else {
        0
    }
}

/// `LANES` plain f64 sums per quantity, element `j` in lane `j % LANES`, folded into compensated
/// per-lane totals every `STEPS_PER_FOLD` steps (added in sequence, or as a pairwise tree for
/// `T::PAIRWISE`) and combined as a tree; only the lanes
/// `first, first + step, ..` count. `sink` sees each block right after it is summed; `offset` is
/// the index of `run[0]` in the sink's run.
#[inline(always)]
fn aligned_sums<T: Float, I: Target, S: RunSink<T>, const PREFETCH: bool>(
    run: &[T],
    step: usize,
    first: usize,
    offset: usize,
    sink: &mut S,
) -> FloatPartial {
    let mut abs_total = [Compensated::default(); LANES];
    let mut squares_total = [Compensated::default(); LANES];

    // 1.0 where the optimiser cannot see it, which would turn `add_on_fma` back into an add.
    let one = std::hint::black_box(1.0f64);
    let block_len = LANES * T::STEPS_PER_FOLD;
    let blocks = run.chunks_exact(block_len);
    let tail = blocks.remainder();
    for (index, block) in blocks.enumerate() {
        let (abs, squares) = if T::PAIRWISE {
            pairwise_sums::<T, I, PREFETCH>(block, one)
        } else {
            lane_sums::<T, I, PREFETCH>(block)
        };
        fold::<I>(one, &abs, &squares, &mut abs_total, &mut squares_total);
        sink.visit(offset + index * block_len, block);
    }
    // The tail (< LANES * STEPS_PER_FOLD elements): its whole steps in groups of PLAIN_STEPS,
    // then the last < LANES elements into the first lanes of the last group, or of a group of
    // their own if that one is full: no lane adds more than PLAIN_STEPS terms plainly.
    let rest = tail.chunks_exact(LANES).remainder();
    let whole = &tail[..tail.len() - rest.len()];
    let group_len = LANES * T::PLAIN_STEPS;
    let last_group = whole.len().saturating_sub(1) / group_len * group_len;
    for group in whole[..last_group].chunks_exact(group_len) {
        let (abs, squares) = lane_sums::<T, I, false>(group);
        fold::<I>(one, &abs, &squares, &mut abs_total, &mut squares_total);
    }
    let (mut abs, mut squares) = lane_sums::<T, I, false>(&whole[last_group..]);
    if whole.len() - last_group == group_len && !rest.is_empty() {
        fold::<I>(one, &abs, &squares, &mut abs_total, &mut squares_total);
        (abs, squares) = ([0.0; LANES], [0.0; LANES]);
    }
    let (last_abs, last_squares) = (&mut abs[..rest.len()], &mut squares[..rest.len()]);
    for ((value, abs), squares) in rest.iter().zip(last_abs).zip(last_squares) {
        let x = value.widen_abs();
        *abs += x;
        *squares = square_add::<T, I>(x, *squares);
    }
    fold::<I>(one, &abs, &squares, &mut abs_total, &mut squares_total);
    sink.visit(offset + run.len() - tail.len(), tail);

    combine_lanes(abs_total, squares_total, step, first)
}

/// Adds one block's plain lane sums into the compensated per-lane totals. A function that is
/// always inlined, not a closure: the totals must stay in registers.
#[inline(always)]
fn fold<I: Target>(
    one: f64,
    abs: &[f64; LANES],
    squares: &[f64; LANES],
    abs_total: &mut [Compensated; LANES],
    squares_total: &mut [Compensated; LANES],
) {
    let carry = |error, lo| add_on_fma::<I>(error, lo, one);
    for lane in 0..LANES {
        abs_total[lane].add_carrying(abs[lane], carry);
        squares_total[lane].add_carrying(squares[lane], carry);
    }
}

/// Plain per-lane sums of `|x|` and `x^2` over whole steps of `LANES` elements, prefetching
/// `PREFETCH_AHEAD` bytes ahead when `PREFETCH`.
#[inline(always)]
fn lane_sums<T: Float, I: Target, const PREFETCH: bool>(steps: &[T]) -> LaneSums {
    let mut abs = [0.0f64; LANES];
    let mut squares = [0.0f64; LANES];
    for step in steps.chunks_exact(LANES) {
        if PREFETCH {
            prefetch_ahead(step);
        }
        let widened = T::widen_abs_step::<I>(step);
        for lane in 0..LANES {
            let x = widened[lane];
            abs[lane] += x;
            squares[lane] = square_add::<T, I>(x, squares[lane]);
        }
    }
    (abs, squares)
}

/// The lane sums of one block of 8 steps as a pairwise tree: each lane adds its 8 terms in three
/// levels of additions (7 in all), whose error bound is that of 4 terms added in sequence. The
/// first level adds on the add pipes, the upper two on the multiply pipes (see `add_on_fma`), so
/// that neither kind of pipe waits for the other.
#[inline(always)]
fn pairwise_sums<T: Float, I: Target, const PREFETCH: bool>(block: &[T], one: f64) -> LaneSums {
    const { assert!(!T::PAIRWISE || T::STEPS_PER_FOLD == 8) };
    let (first, second) = block.split_at(4 * LANES);
    add_lanes::<I>(
        quad_sums::<T, I, PREFETCH>(first, one),
        quad_sums::<T, I, PREFETCH>(second, one),
        one,
    )
}

/// `(x0 + x1) + (x2 + x3)` lane by lane, for `|x|` and `x^2`, over 4 steps.
#[inline(always)]
fn quad_sums<T: Float, I: Target, const PREFETCH: bool>(steps: &[T], one: f64) -> LaneSums {
    let (first, second) = steps.split_at(2 * LANES);
    add_lanes::<I>(
        pair_sums::<T, I, PREFETCH>(first),
        pair_sums::<T, I, PREFETCH>(second),
        one,
    )
}

/// `x0 + x1` lane by lane, for `|x|` and `x^2`, over 2 steps.
#[inline(always)]
fn pair_sums<T: Float, I: Target, const PREFETCH: bool>(pair: &[T]) -> LaneSums {
    if PREFETCH {
        prefetch_ahead(pair);
    }
    let (first, second) = pair.split_at(LANES);
    let x = T::widen_abs_step::<I>(first);
    let y = T::widen_abs_step::<I>(second);
    let abs = std::array::from_fn(|lane| x[lane] + y[lane]);
    let squares = std::array::from_fn(|lane| x[lane] * x[lane] + y[lane] * y[lane]);
    (abs, squares)
}

/// Per-lane sums of `|x|` and of `x^2`.
type LaneSums = ([f64; LANES], [f64; LANES]);

/// Lane-wise sums of two sets of lane sums, on the multiply pipes where FMA is an instruction.
#[inline(always)]
fn add_lanes<I: Target>(
    (mut abs, mut squares): LaneSums,
    (more_abs, more_squares): LaneSums,
    one: f64,
) -> LaneSums {
    for lane in 0..LANES {
        abs[lane] = add_on_fma::<I>(more_abs[lane], abs[lane], one);
        squares[lane] = add_on_fma::<I>(more_squares[lane], squares[lane], one);
    }
    (abs, squares)
}

/// Prefetches the lines `PREFETCH_AHEAD` bytes past `step` (one per 64 bytes of it). Past the
/// end of the run they fetch the next chunk's lines, or lines nobody reads.
#[inline(always)]
fn prefetch_ahead<T>(step: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let ahead = step.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD);
        for line in (0..size_of_val(step)).step_by(64) {
            x86_64::prefetch(ahead.wrapping_add(line));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = step;
}

/// `acc + x`, as a fused multiply-add by `one` (1.0, hidden from the optimiser) where FMA is an
/// instruction: the same single rounding, so the same bits on every ISA, but on the multiply
/// pipes rather than the add pipes. The float64 kernel has about twice as many additions as
/// multiplies; moving the upper levels of its tree and the fold's error term there took a quarter
/// off a one-thread call from cache on Zen 4 (5e4 elements: 8.1 -> 6.0 µs). Adding the tree's
/// top level plainly instead doubled the time: LLVM then vectorised the tree across lanes.
#[inline(always)]
fn add_on_fma<I: Target>(x: f64, acc: f64, one: f64) -> f64 {
    if I::FMA {
        x.mul_add(one, acc)
    } else {
        acc + x
    }
}

/// `acc + x * x`, fused where that is both available and bit-identical.
#[inline(always)]
fn square_add<T: Float, I: Target>(x: f64, acc: f64) -> f64 {
    if I::FMA && T::EXACT_SQUARES {
        x.mul_add(x, acc)
    } else {
        acc + x * x
    }
}

/// Pairwise (tree) combination of the lanes `first, first + step, ..`, in a fixed order.
#[inline(always)]
fn combine_lanes(
    mut abs: [Compensated; LANES],
    mut squares: [Compensated; LANES],
    step: usize,
    first: usize,
) -> FloatPartial {
    debug_assert!(step.is_power_of_two() && LANES % step == 0 && first < step);
    for lane in (0..LANES).filter(|lane| lane & (step - 1) != first) {
        abs[lane] = Compensated::default();
        squares[lane] = Compensated::default();
    }
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            abs[lane] = abs[lane].merge(abs[lane + width]);
            squares[lane] = squares[lane].merge(squares[lane + width]);
        }
        width /= 2;
    }
    FloatPartial {
        abs: abs[0],
        squares: squares[0],
    }
}

/// Exact sums of an integer or bool run: a square of a 64-bit value needs up to 128 bits, so the
/// running sum of squares carries into a 192-bit accumulator.
pub(crate) fn exact_sums<T: Magnitude>(run: &[T], step: usize) -> ExactPartial {
    // Not vectorised: integer inputs are rare, and exact 192-bit sums do not fit SIMD lanes.
    let mut abs: u128 = 0;
    let mut squares = U192::default();
    for value in run.iter().step_by(step) {
        let magnitude = value.magnitude();
        abs += u128::from(magnitude);
        squares.add(u128::from(magnitude) * u128::from(magnitude));
    }
    ExactPartial { abs, squares }
}
