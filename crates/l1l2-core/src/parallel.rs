//! Deterministic parallel reduction and the thread pool behind it.
//!
//! The input is cut into chunks of at most `CHUNK` elements whose boundaries depend on the length
//! only (see [`Chunking`]: a multiple of 8 chunks of nearly equal length, so that two, four or
//! eight threads can split it evenly). Chunk partials are merged along a fixed binary tree (split at the
//! middle chunk). For a parallel
//! run the tree is cut at depth `SPLIT_DEPTH` into at most 128 subtrees, and those into one
//! contiguous share per thread; each thread takes the pieces of its own share first (so a call
//! on the same array finds each thread's share still in its core's cache), then helps with the
//! others'. Each piece's partial lands in its own slot, and the top of the tree is then merged
//! from the slots in the fixed order. Who computed which piece never changes the bits, so the
//! result is identical for any thread count, and the serial path is the same tree walked by one
//! thread.
//!
//! A call runs in parallel when its work pays for the hand-over, which depends on whether the
//! workers are awake: from [`PARALLEL_MIN_BYTES`] while they linger after a recent call, from
//! [`PARALLEL_MIN_BYTES_ASLEEP`] while they sleep (the call wakes them, which costs the caller a
//! system call, and they come 15-70 us later). A run of mid-sized calls that find the workers
//! asleep wakes them from its second call on (see `wake_if_calls_follow`).
//!
//! The calling thread works too (a pool of `n - 1` workers serves `n` threads), and it hands work
//! only to workers that offer help: lingering, on a CPU of their own. It claims each such offer
//! (the worker then keeps its CPU until it has run the job) at the start and between its own
//! tasks, so workers woken by the call join it as they come, and a call never waits for a worker
//! that is not running: one whose CPU another program's threads hold (a framework's OpenMP team
//! spinning after its own work) or that the OS put on the caller's CPU. When its pieces are done,
//! the caller waits for the workers it recruited without sleeping (a short spin, then yielding
//! its CPU), which spares it a wake-up of its own (on virtual machines, ~10 us).
//! After a call each worker stays awake for up to [`linger`] (500 us unless `L1L2_LINGER_US` says
//! otherwise; 0 turns it off) until the next call starts: a call that follows within that time
//! finds its workers running on their own CPUs instead of paying their wake-up. A lingering
//! worker yields its CPU every 2 us, so other runnable threads (a framework's own) get it first;
//! longer idle spells cost no CPU: the workers then sleep in the pool. A worker recruited but too
//! late to take any piece of two calls in a row (preempted on the caller's CPU, it waits there
//! while the caller does all the work) does not linger after that call but sleeps in the pool,
//! so that the next call's wake-up lets the OS place it on an idle CPU; again after 4, 8, 16, ..
//! such calls. A worker woken or recruited on the caller's CPU moves itself to another one (see
//! `placement`).
//!
//! The pool is ours, not rayon's global one: built lazily on the first large input, sized by
//! `set_num_threads`, else `L1L2_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the CPU count.
//! A rayon pool's threads do not exist in a child created by `fork()` (and rayon's global pool then
//! hangs, rayon#708), so the pool remembers the process id that built it; a child finds a foreign
//! id, leaks the parent's pool (dropping it would wait on threads that are not there) and builds its
//! own. If a parent thread held the pool lock at the moment of the fork, the child cannot take the
//! lock and runs serially instead: correct, never hung.
//! When the caller is already on a rayon worker thread (a Rust service with its own pool), the
//! reduction runs in the caller's pool.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::accumulate::Partial;
use crate::placement;

/// Elements per chunk of a large tensor, and the most a chunk holds: the unit of work and of
/// determinism. 32 Ki elements (64-256 KiB) keeps the per-chunk cost far above a rayon task's and
/// the partials' count small.
pub const CHUNK: usize = 1 << 15;

/// The fewest elements in a chunk of a tensor of more than `CHUNK` elements (32-64 KiB of float32
/// or float64: a kernel call and a merge per chunk stay under 1% of its time).
const MIN_CHUNK: usize = 1 << 13;

/// A tensor of more than `CHUNK` elements is cut into a multiple of `FEW_CHUNKS` chunks, so that
/// two, four or eight threads split it evenly by whole chunks.
const FEW_CHUNKS: usize = 8;

/// Chunk boundaries are a multiple of this: the kernel's block for narrow types (64 steps of 16
/// lanes), so that no chunk but the last ends in a partial block.
const CHUNK_STEP: usize = 1 << 10;

/// How a tensor of `len` elements is cut into chunks: a function of the length alone, so the
/// chunk boundaries (and with them the bits) never depend on threads or timing.
///
/// A tensor of at most `CHUNK` elements is one chunk (the small-call path). A larger one is cut
/// into `count` chunks, the fewest multiple of `FEW_CHUNKS` whose chunks hold at most `CHUNK`
/// elements (fewer if they would hold under `MIN_CHUNK`); its blocks of `CHUNK_STEP` are dealt
/// out so that the chunks differ by at most one block. (Chunks of one rounded length with a short
/// last one, as before, left two threads 53,248 and 46,752 elements of a 1e5 tensor, 55% and 45%
/// of 3e5, and the longer share set the call's time.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    len: usize,
    count: usize,
    /// The blocks of `CHUNK_STEP` elements every chunk has, and how many chunks have one more.
    blocks_each: usize,
    extra: usize,
}

impl Chunking {
    /// The chunks of a tensor of `len` elements.
    pub fn of(len: usize) -> Self {
        if len <= CHUNK {
            return Self {
                len,
                count: 1,
                blocks_each: 0,
                extra: 0,
            };
        }
        let blocks = len.div_ceil(CHUNK_STEP);
        let count = len
            .div_ceil(CHUNK)
            .next_multiple_of(FEW_CHUNKS)
            .min(blocks / (MIN_CHUNK / CHUNK_STEP))
            .max(1);
        Self {
            len,
            count,
            blocks_each: blocks / count,
            extra: blocks % count,
        }
    }

    /// The number of chunks (an empty tensor has one, empty).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The first element of chunk `index` (`len` for `index == count`): chunk `i` holds
    /// `blocks_each` blocks, plus one for the `extra` chunks spread evenly among them.
    fn start(&self, index: usize) -> usize {
        if index >= self.count {
            return self.len;
        }
        // `index * extra < count * count`: no overflow below 2^32 chunks (2^47 elements).
        let blocks = index * self.blocks_each + index * self.extra / self.count;
        (blocks * CHUNK_STEP).min(self.len)
    }

    /// The elements of the chunks `chunks`.
    pub fn elements(&self, chunks: Range<usize>) -> Range<usize> {
        self.start(chunks.start)..self.start(chunks.end)
    }
}

/// Calls of fewer bytes of work (read plus written) run on the calling thread while the pool's
/// workers are awake (lingering after a recent call, see [`linger`]): below this, handing half of
/// the work to a second thread does not win back what the hand-over costs.
///
/// From `benches/threshold.py` (recorded in `benches/results/threshold/`), workers awake: two
/// threads beat one by 1.10x from 370,724 bytes of work (92,681 float32 elements) for the float32
/// penalty and `value_and_grad` (0.85x the time of one thread), and took 0.95-0.96x the time of
/// one thread at that size for `prox_` and the float64 penalty; one size step below (262 KB) the
/// float32 penalty took 0.95x. An earlier 384 KiB trial looked slower in
/// `benches/compare.py` (16 us for the 1e5 float32 penalty against 10.6-12 us on one thread), but
/// that figure came from samples of ~100 calls (its sample length was calibrated from one slow
/// call), dominated by each sample's first calls after a pause; with samples of the intended
/// length the 1e5 float32 penalty took 10.1-10.2 us parallel against 11.2-11.5 us on one thread.
/// (float64 `value_and_grad` and `prox_` reach it at 23 Ki elements: one chunk, which always runs
/// on the calling thread.) Those figures are from an Intel Xeon; on an AMD EPYC Zen 4
/// (`threshold_zen4.md`) two threads beat one by 1.14-1.35x at every op's smallest measured size,
/// 46,340 elements (185 KB of work for the float32 penalty), and by 1.39-1.64x at 92,681: this
/// threshold leaves some of that gain for the float32 penalty from 46 to 92 Ki elements, where
/// the Xeon's two threads took 0.95-1.04x the time of one.
pub const PARALLEL_MIN_BYTES: usize = 362 << 10;

/// Calls of fewer bytes of work run on the calling thread while the workers sleep: a sleeping
/// worker takes 15-70 us to wake, and waking it costs the caller a system call, so a call that
/// one thread finishes sooner pays for a wake-up that brings it nothing.
///
/// From `benches/threshold.py --asleep` (each call 2 ms after the last, the linger long over), on
/// the Intel Xeon VM and before calls recruited only running workers (a call then also waited for
/// the worker it had woken): two threads beat one by 1.10x from 2.1 MB of work for the penalty,
/// 3.0 MB for `value_and_grad` and 4.2 MB for `prox_`, in float32 and float64 alike; at 65,536
/// elements they took 2.1-3.8x the time of one. On the Zen 4 VM with this engine
/// (`threshold_asleep_zen4.md`, one run), two threads against one took 1.34-2.00x the time under
/// 1 MB of work, 0.86-2.04x from 1 to 3 MB, 0.75-1.37x from 3 to 6 MB and 0.53-1.19x above
/// (float64 `prox_` the worst); the previous engine, which handed the sleeping worker a job at
/// once and then waited for it, in the same minutes: 1.56-4.41x, 0.89-2.26x, 0.68-1.07x and
/// 0.58-0.90x. Kept at 3 MiB, where the ops split both ways; from 3 MB up this engine's woken
/// worker joins a call only once the caller recruits it between its tasks, which those figures
/// suggest costs it some calls.
pub const PARALLEL_MIN_BYTES_ASLEEP: usize = 3 << 20;

/// Whether a call of `bytes` of work runs in parallel: from `PARALLEL_MIN_BYTES` with the workers
/// awake, from `PARALLEL_MIN_BYTES_ASLEEP` without.
fn parallel_pays(bytes: usize) -> bool {
    #[cfg(feature = "probe")]
    if let Some(measured) = std::num::NonZeroUsize::new(MEASURED_MIN_BYTES.load(Ordering::Relaxed))
    {
        return bytes >= measured.get();
    }
    bytes >= PARALLEL_MIN_BYTES_ASLEEP || (bytes >= PARALLEL_MIN_BYTES && workers_awake())
}

/// Whether a parallel call would find its workers running: lingering after a call of our pool,
/// or the caller's own rayon pool.
fn workers_awake() -> bool {
    LINGERING.load(Ordering::Relaxed) > 0 || rayon::current_thread_index().is_some()
}

/// Workers of our pool lingering after a call, or about to (see `wake_workers`).
static LINGERING: AtomicUsize = AtomicUsize::new(0);

#[cfg(feature = "probe")]
static MEASURED_MIN_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Makes every call of at least `bytes` of work run in parallel, whether the workers are awake or
/// not (`0` restores the thresholds above), for the benchmark that measures where a second thread
/// starts to pay (`benches/threshold.py`). Results do not depend on it.
#[cfg(feature = "probe")]
pub fn set_min_bytes_for_measurement(bytes: usize) {
    MEASURED_MIN_BYTES.store(bytes, Ordering::Relaxed);
}

/// How deep the chunk tree is cut for a parallel run: at most 128 pieces per tensor, enough to
/// balance the threads (a piece is at most 1/128 of the input) with few slots.
const SPLIT_DEPTH: u32 = 7;

/// How long the caller waits for the workers' last pieces before it blocks: spinning at first,
/// then yielding its CPU (see `spread`).
const SPIN: Duration = Duration::from_micros(5);
const WAIT: Duration = Duration::from_micros(200);

/// How long a worker stays awake after a call by default, waiting on its CPU for the next one
/// before it goes back to the pool to sleep (OpenMP runtimes do the same). A sleeping worker is
/// woken by the OS onto a CPU of its choosing, often the caller's own, where it cannot run before
/// the caller has done all the work alone; an awake one keeps its CPU and joins the next call at
/// once. 500 us: calls 50-200 us apart took 0.45-0.75x the time, while a training step that runs
/// its own 2-thread ops between calls lost 3-4% (benches/ab_builds.py; see the README).
const DEFAULT_LINGER_US: u64 = 500;

/// How long a lingering worker spins between two yields of its CPU. A yield is a system call of
/// 0.6 us on a 2-vCPU KVM guest (Zen 4) even when no other thread wants the CPU, so a worker that
/// yielded on every idle turn was inside one when most calls came: in the engine trace (float32
/// 1e5 back to back, two runs each way, alternated) its start went from 0.75-0.8 to 0.5 us after
/// the call entered the pool, the call from 7.3-7.4 to 7.0-7.1 us. Another thread that wants the
/// CPU waits at most this long for it, beyond what the OS's own preemption gives it.
const YIELD_EVERY: Duration = Duration::from_micros(2);

/// How long a worker spins, offering help, after a call's job before its first yield: calls
/// that come one after another (a loop over tensors, 1-5 us apart from Python) then find it
/// offering, not inside a yield, which would leave it out of the call until the caller's next
/// task. Builds alternated (`benches/ab_builds.py`, 3 processes each, 1e5 and 1e6, float32 and
/// float64, back to back and 300 us apart) took 0.76-1.04x the time of the previous engine, which
/// handed every call's jobs to all workers; with a 2 us spin here (another run, the VM slower)
/// the 1e5 calls back to back took 1.01-1.40x.
const SPIN_AFTER_JOB: Duration = Duration::from_micros(20);

/// The linger: `L1L2_LINGER_US` microseconds (at most 100 ms; 0 turns it off), else 500 us; read
/// once per process and cached in an atomic, as the thread count is.
pub fn linger() -> Duration {
    static LINGER_US: AtomicU64 = AtomicU64::new(u64::MAX);
    let cached = LINGER_US.load(Ordering::Relaxed);
    let micros = if cached == u64::MAX {
        let micros = std::env::var("L1L2_LINGER_US")
            .ok()
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map_or(DEFAULT_LINGER_US, |micros| micros.min(100_000));
        LINGER_US.store(micros, Ordering::Relaxed);
        micros
    } else {
        cached
    };
    Duration::from_micros(micros)
}

/// Bumped to send every lingering worker back to sleep in the pool (see `spread`). Idle workers
/// read it on every turn of their wait, so it sits alone on its cache-line pair: beside the pool's
/// lock and the call counters, every call's writes to those took the line from the workers, and
/// their next read took it back.
static RELOCATIONS: Alone<AtomicUsize> = Alone(AtomicUsize::new(0));

/// A value alone on its cache-line pair (x86 fetches lines in pairs).
#[repr(align(128))]
struct Alone<T>(T);

impl<T> std::ops::Deref for Alone<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Reduces `0..len` with `leaf` over chunks, in parallel when that pays, always along the same
/// tree. `element_size` (bytes) sizes the work for the parallel threshold.
pub(crate) fn reduce<P, F>(len: usize, element_size: usize, leaf: &F) -> P
where
    P: Partial,
    F: Fn(Range<usize>) -> P + Sync,
{
    if len <= CHUNK {
        return leaf(0..len); // the small-call path: no allocation, no pool
    }
    reduce_many(&[len], len.saturating_mul(element_size), &|_, range| {
        leaf(range)
    })
    .pop()
    .unwrap_or_default()
}

/// One cut of a tensor's chunk tree, and the slot its partial lands in.
struct Piece<P> {
    tensor: usize,
    chunks: Range<usize>,
    partial: OnceLock<P>,
}

/// A run of consecutive pieces, the unit handed to a thread.
struct Task {
    pieces: Range<usize>,
    elements: usize,
}

/// Reduces every tensor `0..lens[t]` with `leaf(t, range)`, each along its own fixed tree (so each
/// result has the bits of `reduce` on that tensor alone), all in one parallel region when `bytes`
/// (the work: bytes read and written) reaches the threshold (`PARALLEL_MIN_BYTES` with the
/// workers awake, `PARALLEL_MIN_BYTES_ASLEEP` without).
///
/// Large tensors are cut into the subtrees of their tree at `SPLIT_DEPTH`; consecutive small
/// ones are grouped into tasks of at least `MIN_CHUNK` elements, so that a list of a thousand small
/// tensors costs a few hundred counter increments rather than a thousand.
pub(crate) fn reduce_many<P, F>(lens: &[usize], bytes: usize, leaf: &F) -> Vec<P>
where
    P: Partial,
    F: Fn(usize, Range<usize>) -> P + Sync,
{
    let parallel = parallel_pays(bytes);
    let interrupt = Interrupt::for_this_call(parallel);
    let leaf = &|tensor: usize, range: Range<usize>| {
        if interrupt.stopped() {
            return P::default(); // the call is abandoned: its result is never used
        }
        leaf(tensor, range)
    };
    let tree = |tensor: usize| Tree::new(lens[tensor], move |range| leaf(tensor, range));
    // A single chunk cannot be shared: handing it out would only add the hand-over.
    let one_chunk = lens.len() == 1 && Chunking::of(lens[0]).count() == 1;
    if !parallel || one_chunk {
        let partials = (0..lens.len())
            .map(|tensor| tree(tensor).reduce(0..Chunking::of(lens[tensor]).count()))
            .collect();
        if !parallel && !one_chunk && bytes >= PARALLEL_MIN_BYTES {
            wake_if_calls_follow(); // serial only because the workers slept
        }
        return partials;
    }
    // A tree of `n` chunks cut at SPLIT_DEPTH has min(n, 2^SPLIT_DEPTH) pieces. Few allocations:
    // malloc and free took ~10% of the caller's time in a two-thread call of 33,000 float32.
    let piece_count = lens
        .iter()
        .map(|&len| Chunking::of(len).count().min(1 << SPLIT_DEPTH))
        .sum();
    let mut pieces = Vec::with_capacity(piece_count);
    for (tensor, &len) in lens.iter().enumerate() {
        walk(0..Chunking::of(len).count(), SPLIT_DEPTH, &mut |chunks| {
            let partial = OnceLock::new();
            pieces.push(Piece {
                tensor,
                chunks,
                partial,
            });
        });
    }
    // Tasks: runs of consecutive pieces of at least MIN_CHUNK elements each (a piece of a tensor
    // of several chunks is one already, but for its last chunk).
    let mut tasks = Vec::with_capacity(pieces.len());
    let mut start = 0;
    let mut elements = 0;
    for (index, piece) in pieces.iter().enumerate() {
        let chunking = Chunking::of(lens[piece.tensor]);
        elements += chunking.elements(piece.chunks.clone()).len().max(1);
        if elements >= MIN_CHUNK || index + 1 == pieces.len() {
            let pieces = start..index + 1;
            tasks.push(Task { pieces, elements });
            start = index + 1;
            elements = 0;
        }
    }
    let shares = OnceLock::new();
    spread(&|seat: Seat| {
        let task_elements = tasks.iter().map(|task| task.elements);
        let Some(shares) =
            built_by_caller(&shares, seat, || Shares::new(task_elements, seat.seats))
        else {
            return 0; // the caller takes every share
        };
        shares.claim(seat.seat, |task| {
            let task = &tasks[task];
            for piece in &pieces[task.pieces.clone()] {
                let reduce = || tree(piece.tensor).reduce(piece.chunks.clone());
                piece.partial.get_or_init(reduce);
            }
            seat.between_tasks();
            task.pieces.len()
        })
    });
    // Every piece is done by now; `get_or_init` keeps this total even if one were not.
    let mut index = 0;
    (0..lens.len())
        .map(|tensor| {
            merge_walk(
                0..Chunking::of(lens[tensor]).count(),
                SPLIT_DEPTH,
                &mut |chunks| {
                    let piece = &pieces[index];
                    debug_assert!(piece.tensor == tensor && piece.chunks == chunks);
                    let partial = *piece.partial.get_or_init(|| tree(tensor).reduce(chunks));
                    index += 1;
                    partial
                },
            )
        })
        .collect()
}

/// A thread's place in a parallel call: seat `seat` of `seats`, and whether it is the calling
/// thread (seat 0 in our pool; in a caller's own rayon pool, the seat of its worker index).
/// `recruit`, the caller's in our pool: hands work to the workers that have come to offer help
/// since the call started (see `spread`), run between the caller's tasks.
#[derive(Clone, Copy)]
struct Seat<'a> {
    seat: usize,
    seats: usize,
    caller: bool,
    recruit: Option<&'a dyn Fn()>,
}

impl<'a> Seat<'a> {
    fn new(seat: usize, seats: usize, worker: bool) -> Self {
        let caller = !worker;
        Self {
            seat,
            seats,
            caller,
            recruit: None,
        }
    }

    fn recruiting(self, recruit: Option<&'a dyn Fn()>) -> Self {
        Self { recruit, ..self }
    }

    /// Called by the seat's thread after each of its tasks.
    fn between_tasks(&self) {
        if let Some(recruit) = self.recruit {
            recruit();
        }
    }
}

/// What the caller builds for a call once it has handed the workers their jobs (so that their
/// start does not wait for it), and the workers only read: `cell` set by the caller with `build`;
/// a worker that arrives first spins for it (then yields its CPU) instead of blocking in the
/// `OnceLock`, since a blocked worker waits for the OS to wake it (5-50 us on a VM). `None` for a
/// worker that did not see it within `WAIT`: it leaves the call to the others.
fn built_by_caller<'c, T>(
    cell: &'c OnceLock<T>,
    seat: Seat<'_>,
    build: impl FnOnce() -> T,
) -> Option<&'c T> {
    if seat.caller {
        return Some(cell.get_or_init(build)); // the one thread that initialises: never blocks
    }
    let start = Instant::now();
    loop {
        if let Some(built) = cell.get() {
            return Some(built);
        }
        match start.elapsed() {
            waited if waited < SPIN => std::hint::spin_loop(),
            waited if waited < WAIT => std::thread::yield_now(),
            _ => return None,
        }
    }
}

/// The tasks of a parallel call cut into one contiguous share per seat, of about equal elements.
/// Each thread takes the tasks of its own share first, in order, then helps with the others'.
/// So when the same array is reduced again, each thread reads mostly what it read last time,
/// still in its own core's cache, while a thread that comes late finds its share done by the
/// others. (With a shared counter, which handed each thread other tasks on every call, 1e6
/// float32 calls took 1.0-2.3x as long: `benches/ab_builds.py`.)
struct Shares {
    /// One per seat, in task order.
    shares: Vec<Share>,
}

/// One seat's share: the tasks from `next` (its next task) to `end`. Alone on its cache line
/// (and the adjacent one, which x86 prefetches in pairs): each share's counter is taken from by
/// its own thread, and counters sharing a line would bounce it between the cores on every task
/// (measured: 2e5 float64 `value_and_grad` in 16 tasks, 1.19x).
#[repr(align(128))]
struct Share {
    next: AtomicUsize,
    end: usize,
}

impl Shares {
    /// Shares of `seats` seats over tasks of `task_elements` elements each.
    fn new(task_elements: impl Iterator<Item = usize> + Clone, seats: usize) -> Self {
        let total: usize = task_elements.clone().sum();
        let mut shares: Vec<Share> = Vec::with_capacity(seats);
        // Ends the last share before `task` and starts the next one there.
        fn start_share(shares: &mut Vec<Share>, task: usize) {
            if let Some(last) = shares.last_mut() {
                last.end = task;
            }
            let next = AtomicUsize::new(task);
            shares.push(Share { next, end: task });
        }
        start_share(&mut shares, 0);
        let (mut done, mut tasks) = (0, 0);
        for elements in task_elements {
            // A share ends before the task whose middle passes its end (in elements).
            while shares.len() < seats && (2 * done + elements) * seats > 2 * total * shares.len() {
                start_share(&mut shares, tasks);
            }
            done += elements;
            tasks += 1;
        }
        while shares.len() < seats {
            start_share(&mut shares, tasks);
        }
        if let Some(last) = shares.last_mut() {
            last.end = tasks;
        }
        Self { shares }
    }

    /// Runs `run` on every task the thread at `seat` claims, its own share first; returns the sum
    /// of what `run` returned.
    fn claim(&self, seat: usize, mut run: impl FnMut(usize) -> usize) -> usize {
        let seats = self.shares.len();
        let mut taken = 0;
        for share in (0..seats).map(|offset| &self.shares[(seat + offset) % seats]) {
            loop {
                let task = share.next.fetch_add(1, Ordering::Relaxed);
                if task >= share.end {
                    break;
                }
                taken += run(task);
            }
        }
        taken
    }

    /// Where each share starts, and where the last one ends.
    #[cfg(test)]
    fn bounds(&self) -> Vec<usize> {
        let mut bounds: Vec<usize> = self
            .shares
            .iter()
            .map(|share| share.next.load(Ordering::Relaxed))
            .collect();
        bounds.extend(self.shares.last().map(|share| share.end));
        bounds
    }
}

/// How long a call may run between two looks at its caller's interrupt check.
const INTERRUPT_PERIOD: Duration = Duration::from_millis(50);

thread_local! {
    /// The interrupt check installed by [`interruptible`] on this thread, and whether it has
    /// said to stop.
    static INTERRUPT_CHECK: RefCell<Option<Rc<dyn Fn() -> bool>>> = const { RefCell::new(None) };
    static INTERRUPTED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` on this thread, asking `check` every 50 ms or so (on this thread) whether to give
/// up: the Python binding checks for Ctrl-C there. Returns `None` when a check said so: the calls
/// in `work` then stopped early, and their results (and, for the in-place ops, what they had
/// written so far) are incomplete.
///
/// Calls that run on the calling thread (under `PARALLEL_MIN_BYTES`, or the workers asleep) are
/// never interrupted (they take under a millisecond); parallel ones are checked
/// between chunks of 32 Ki elements on the calling thread, and the workers stop taking chunks
/// once it has said so. The check belongs to this thread: called from a worker of the caller's own
/// rayon pool, it also covers any other l1l2 call that worker runs while it waits.
pub fn interruptible<R>(check: impl Fn() -> bool + 'static, work: impl FnOnce() -> R) -> Option<R> {
    /// Puts back what was installed before, also if `work` panics.
    struct Restore(Option<Rc<dyn Fn() -> bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INTERRUPT_CHECK.with(|slot| *slot.borrow_mut() = self.0.take());
            INTERRUPTED.with(|flag| flag.set(self.1));
        }
    }
    let previous = INTERRUPT_CHECK.with(|slot| slot.borrow_mut().replace(Rc::new(check)));
    let _restore = Restore(previous, INTERRUPTED.with(|flag| flag.replace(false)));
    let result = work();
    (!INTERRUPTED.with(Cell::get)).then_some(result)
}

/// One call's view of its caller's interrupt check.
struct Interrupt {
    /// The caller's thread and when it last asked, when the caller installed a check and the
    /// call is large enough to ask it.
    checked: Option<(std::thread::ThreadId, Mutex<Instant>)>,
    stopped: AtomicBool,
}

impl Interrupt {
    fn for_this_call(parallel: bool) -> Self {
        let installed = || INTERRUPT_CHECK.with(|slot| slot.borrow().is_some());
        Self {
            checked: (parallel && installed())
                .then(|| (std::thread::current().id(), Mutex::new(Instant::now()))),
            stopped: AtomicBool::new(false),
        }
    }

    /// Whether the call was told to stop; on the caller's thread, asks the check when it is due.
    fn stopped(&self) -> bool {
        if self.stopped.load(Ordering::Relaxed) {
            return true;
        }
        let Some((caller, last)) = &self.checked else {
            return false;
        };
        if std::thread::current().id() != *caller {
            return false;
        }
        let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.elapsed() < INTERRUPT_PERIOD {
            return false;
        }
        // Cloned out first: the check may run code (a Python signal handler) that makes calls
        // of its own, which install their own check in the slot.
        let check = INTERRUPT_CHECK.with(|slot| slot.borrow().clone());
        let stop = check.is_some_and(|check| check());
        *last = Instant::now();
        if stop {
            INTERRUPTED.with(|flag| flag.set(true));
            self.stopped.store(true, Ordering::Relaxed);
        }
        stop
    }
}

/// The chunk tree of an input of `len` elements.
struct Tree<F> {
    chunking: Chunking,
    leaf: F,
}

impl<F> Tree<F> {
    fn new(len: usize, leaf: F) -> Self {
        Self {
            chunking: Chunking::of(len),
            leaf,
        }
    }

    /// The partial of `chunks`, merged along the fixed tree.
    fn reduce<P>(&self, chunks: Range<usize>) -> P
    where
        P: Partial,
        F: Fn(Range<usize>) -> P,
    {
        merge_walk(chunks, u32::MAX, &mut |chunks| {
            (self.leaf)(self.chunking.elements(chunks))
        })
    }
}

/// Calls `visit` on the nodes of the tree over `chunks` at depth `depth` (or on leaves above it),
/// left to right. The tree splits a node at its middle chunk.
fn walk(chunks: Range<usize>, depth: u32, visit: &mut impl FnMut(Range<usize>)) {
    if depth == 0 || chunks.len() <= 1 {
        return visit(chunks);
    }
    let middle = chunks.start + chunks.len() / 2;
    walk(chunks.start..middle, depth - 1, visit);
    walk(middle..chunks.end, depth - 1, visit);
}

/// `walk`, merging the partials `visit` returns along the tree.
fn merge_walk<P: Partial>(
    chunks: Range<usize>,
    depth: u32,
    visit: &mut impl FnMut(Range<usize>) -> P,
) -> P {
    if depth == 0 || chunks.len() <= 1 {
        return visit(chunks);
    }
    let middle = chunks.start + chunks.len() / 2;
    let left = merge_walk(chunks.start..middle, depth - 1, visit);
    left.merge(merge_walk(middle..chunks.end, depth - 1, visit))
}

/// Runs `work` in `seat`, traced as the caller's share or a worker's.
fn take_seat(trace: &trace::Call, work: &impl Fn(Seat<'_>) -> usize, seat: Seat<'_>) -> usize {
    trace.span(!seat.caller, || work(seat))
}

/// Runs `work` on the calling thread and on the workers that can help now (the caller's rayon
/// pool, or ours), returning when all have returned. The one place that touches a thread pool.
/// `work` returns how many pieces it took: a call where the workers took none tells that they
/// came late.
///
/// In our pool the caller hands work only to workers that offer help (see `Offer`): running on a
/// CPU of their own, lingering after a call. It claims each offer, so that the worker keeps its CPU
/// until it has run the call's job, and hands out one job per claim, at the start and between its
/// own tasks (workers woken by this call come while it runs). A job handed to a worker that was
/// not on a CPU made the caller wait for the OS to run it: after torch's two-thread matrix
/// products (whose OpenMP workers spin on the other CPU for a while), float32 penalties of 1e5 to
/// 4e6 elements took 3.3-3.6 ms instead of 13-400 us.
fn spread(work: &(impl Fn(Seat<'_>) -> usize + Sync)) {
    let trace = trace::Call::start();
    if let Some(caller) = rayon::current_thread_index() {
        // Inside a caller's pool: use it. Waiting there steals work, it never sleeps.
        let seats = rayon::current_num_threads();
        let work = &|worker: bool| {
            let seat = rayon::current_thread_index().unwrap_or(caller) % seats;
            take_seat(&trace, work, Seat::new(seat, seats, worker))
        };
        rayon::in_place_scope(|scope| {
            for _ in 1..seats {
                scope.spawn(|_| {
                    work(true);
                });
            }
            work(false);
        });
        return trace.finish();
    }
    let Some(pool) = pool() else {
        work(Seat::new(0, 1, false));
        return trace.finish();
    };
    let helpers = pool.workers();
    let seats = helpers + 1;
    // A worker that finds itself on the caller's CPU (it could only start once the caller let it)
    // moves to another one for the next calls: see `placement`.
    let caller_cpu = placement::current_cpu();
    // The caller sits first; a worker of our pool behind it, by its index in the pool.
    let work = &|worker: bool, recruit: Option<&dyn Fn()>| {
        if worker && placement::leave(caller_cpu) {
            trace::moved();
        }
        let seat = rayon::current_thread_index().map_or(0, |index| index + 1) % seats;
        let seat = Seat::new(seat, seats, worker).recruiting(recruit);
        take_seat(&trace, work, seat)
    };
    // Counted before the wake-up below: a worker it wakes stays while this call is under way.
    let _under_way = UnderWay::start(&pool);
    // Workers that do not linger now are woken to: they offer help once they run, and a long call
    // recruits them as they come. For at least `WAIT`, so that with the linger off
    // (`L1L2_LINGER_US=0`) a worker woken for this call still stays for it.
    let missing = helpers.saturating_sub(LINGERING.load(Ordering::Acquire));
    wake_workers(&pool, missing, linger().max(WAIT), caller_cpu);
    let call = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
    let (returned, helped, spawned) = (AtomicUsize::new(0), AtomicUsize::new(0), Cell::new(0));
    pool.threads.in_place_scope(|scope| {
        let (returned, helped, pool) = (&returned, &helped, &*pool);
        let recruit = || {
            // With every worker recruited there is no one left to look for: the look would read
            // each worker's offer line, which it wrote when its job started.
            if spawned.get() == helpers {
                return;
            }
            for _ in 0..pool.claim(call) {
                spawned.set(spawned.get() + 1);
                scope.spawn(move |_| {
                    pool.start_job();
                    helped.fetch_add(work(true, None), Ordering::Relaxed);
                    returned.fetch_add(1, Ordering::Release);
                });
            }
        };
        recruit();
        work(false, Some(&recruit));
        // Blocking would cost a wake-up of its own (about 10 us on a VM). But a worker the OS
        // woke onto this CPU runs only when this thread lets it: spinning the whole time stalled
        // such calls for the full 200 us, so the wait yields after a short spin.
        let start = Instant::now();
        while returned.load(Ordering::Acquire) < spawned.get() {
            match start.elapsed() {
                waited if waited < SPIN => std::hint::spin_loop(),
                waited if waited < WAIT => std::thread::yield_now(),
                _ => break,
            }
        }
        trace.caller_waited();
    });
    pool.release(call);
    trace.finish();
    // A call whose recruited workers all came too late was most likely done by the caller alone
    // while its worker waited on the caller's own CPU (the OS put it there when waking it, and it
    // stays there while it keeps lingering). After two such calls in a row the workers do not
    // linger: they sleep in the pool, and the next call's wake-up lets the OS place them on an
    // idle CPU (a worker that slept on a timer instead was woken on the caller's CPU again: stuck
    // in 3 of 6 trace runs of 1000 calls, against 0 of 6). Again after 4, 8, 16, .. late calls,
    // so that a machine whose other CPUs are all busy pays that wake-up rarely. A call that
    // recruited nobody tells nothing.
    if spawned.get() == 0 {
        return;
    }
    let late = if helped.load(Ordering::Relaxed) == 0 {
        LATE_CALLS.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        // Written only when it changes: a store takes the line from every other core.
        if LATE_CALLS.load(Ordering::Relaxed) != 0 {
            LATE_CALLS.store(0, Ordering::Relaxed);
        }
        0
    };
    if late >= 2 && late.is_power_of_two() {
        trace::relocated();
        RELOCATIONS.fetch_add(1, Ordering::AcqRel);
    }
}

/// Our thread pool: its rayon workers, for each its `Offer`, and its calls under way.
struct Pool {
    threads: ThreadPool,
    offers: Box<[Offer]>,
    /// Parallel calls on this pool under way. A lingering worker does not leave while there is
    /// one: a call looks for offers only at its start and between its tasks, and finds none while
    /// the worker yields its CPU, so a worker could otherwise reach the end of its linger
    /// unrecruited in the middle of a long call. Seen: 1e8 float64 penalties 10 ms apart, whose
    /// tasks take ~330 us each, ran on the caller alone in 30 of 220 calls (36-47 ms instead of
    /// 20-30 ms). Per pool, so that calls on a pool built for another thread count do not keep
    /// this one's workers.
    calls_under_way: Alone<AtomicUsize>,
}

impl Pool {
    fn new(threads: ThreadPool) -> Self {
        let offers = (0..threads.current_num_threads())
            .map(|_| Offer::default())
            .collect();
        let calls_under_way = Alone(AtomicUsize::new(0));
        Self {
            threads,
            offers,
            calls_under_way,
        }
    }

    fn workers(&self) -> usize {
        self.threads.current_num_threads()
    }

    /// The offer of the calling thread, if it is one of this pool's workers.
    fn own_offer(&self) -> Option<&Offer> {
        self.offers.get(self.threads.current_thread_index()?)
    }

    /// Claims every worker that offers help for `call`; returns how many it claimed.
    fn claim(&self, call: u64) -> usize {
        // Every offer is tried (no short-circuit): each claim is a side effect.
        let mut claimed = 0;
        for offer in &self.offers {
            claimed += usize::from(offer.claim(call));
        }
        claimed
    }

    /// Gives back the claims of `call` that no job of a call used.
    fn release(&self, call: u64) {
        for offer in &self.offers {
            // A plain look first: mostly every claim was used, and the exchange would take the
            // line from a worker that is reading it.
            let state = &offer.0;
            if state.load(Ordering::Relaxed) == call {
                let _ = state.compare_exchange(call, OFFERED, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Marks the calling worker as running a call's job: a claim on it is used.
    fn start_job(&self) {
        if let Some(offer) = self.own_offer() {
            offer.0.store(BUSY, Ordering::Release);
        }
    }
}

/// Whether a worker of our pool can take a call's work at once: `IDLE` (asleep in the pool, or
/// yielding its CPU), `OFFERED` (lingering and on a CPU: looking for jobs without yielding it
/// for up to `YIELD_EVERY`), `BUSY` (running a call's job), or the id of the call that claimed it
/// (from `FIRST_CALL`): it then keeps its CPU until it has run a job or that call has released
/// it. Only the worker moves its offer between `IDLE`, `OFFERED` and `BUSY`; a call moves it from
/// `OFFERED` to its id and back. A worker preempted by the OS while it offers help can still be
/// claimed, and then delays that call: rare, as a lingering worker yields its CPU every 2 us.
/// Alone on its cache-line pair: the caller reads it between its tasks.
#[derive(Default)]
#[repr(align(128))]
struct Offer(AtomicU64);

const IDLE: u64 = 0;
const OFFERED: u64 = 1;
const BUSY: u64 = 2;
const FIRST_CALL: u64 = 3;

/// The id of the next call that looks for help in our pool.
static NEXT_CALL: AtomicU64 = AtomicU64::new(FIRST_CALL);

impl Offer {
    fn claim(&self, call: u64) -> bool {
        // A plain look first: a caller checks between every task, mostly to find nothing.
        self.0.load(Ordering::Relaxed) == OFFERED
            && (self.0)
                .compare_exchange(OFFERED, call, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    fn claimed(&self) -> bool {
        self.0.load(Ordering::Acquire) >= FIRST_CALL
    }

    /// Offers help again after a yield or a job; a claim made meanwhile stays.
    fn reopen(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                matches!(state, IDLE | BUSY).then_some(OFFERED)
            });
    }

    /// Withdraws the offer; `false` when a call claimed it first.
    fn withdraw(&self) -> bool {
        (self.0)
            .compare_exchange(OFFERED, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Hands `helpers` workers a job that keeps them awake for `linger` (see `stay_awake`), away from
/// the caller's CPU `caller_cpu`. They count as lingering from now on, not only once their job
/// starts: a call that follows at once must not wake them again.
fn wake_workers(pool: &Arc<Pool>, helpers: usize, linger: Duration, caller_cpu: Option<usize>) {
    if linger.is_zero() || helpers == 0 {
        return;
    }
    LINGERING.fetch_add(helpers, Ordering::AcqRel);
    for _ in 0..helpers {
        let own = Arc::clone(pool);
        pool.threads.spawn(move || {
            // Woken onto the caller's CPU, it would only run when the caller yields, and offer
            // its help to nobody.
            if placement::leave(caller_cpu) {
                trace::moved();
            }
            stay_awake(&own, linger);
        });
    }
}

/// Parallel calls in a row whose workers all came too late to take a piece.
static LATE_CALLS: AtomicUsize = AtomicUsize::new(0);

/// After a call that ran serially only because the workers slept: wakes them (to linger until the
/// next parallel call) when the previous such call came less than a linger ago, so that a run of
/// calls finds them awake from its third call on. Waking costs the caller ~25 us (measured on a
/// 2-vCPU VM: float32 1e5 penalties 2 ms apart took 40 us with the wake-up, 15 us without), so
/// calls that come one at a time never pay it.
fn wake_if_calls_follow() {
    // Wall-clock nanoseconds: a clock step merely wakes the workers once too often or too few.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    let last = LAST_ASLEEP_CALL.swap(now, Ordering::Relaxed);
    if now.saturating_sub(last) < linger().as_nanos() as u64 {
        wake_for_next_call();
    }
}

/// When the last call that ran serially because the workers slept ended (see
/// `wake_if_calls_follow`).
static LAST_ASLEEP_CALL: AtomicU64 = AtomicU64::new(0);

/// Wakes the workers of our pool (if it exists and none is awake or being woken) to linger until
/// the next parallel call. `wake_workers` counts them at once, so a call that follows does not
/// wake them again (two threads that come at the same instant may both wake them: the second
/// linger job a worker finds returns at once).
fn wake_for_next_call() {
    if rayon::current_thread_index().is_some() || LINGERING.load(Ordering::Relaxed) > 0 {
        return;
    }
    // The pool first: in a forked child, looking it up also clears the parent's counts.
    if let Some(pool) = pool() {
        wake_workers(&pool, pool.workers(), linger(), placement::current_cpu());
    }
}

/// Counts a call in its pool's `calls_under_way` while it lives (also if the call unwinds).
struct UnderWay<'p>(&'p AtomicUsize);

impl<'p> UnderWay<'p> {
    fn start(pool: &'p Pool) -> Self {
        pool.calls_under_way.fetch_add(1, Ordering::AcqRel);
        Self(&pool.calls_under_way)
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps a worker on its CPU until it has found no work for `linger`, running the pool's jobs
/// (the pieces of the calls that come meanwhile) from inside this one: a worker that left the
/// job at each new call and went back to the pool to find that call's pieces started them 0.9-1.3
/// µs late, and had to be handed a new linger job after every call. While idle it offers help
/// (see `Offer`) and yields its CPU every `YIELD_EVERY`, withdrawing the offer first, so that any
/// other runnable thread goes first; a claimed offer keeps it spinning until it has run a call's
/// job or that call has ended. Stays longer while a call is under way (`calls_under_way`), and
/// leaves early when the caller sends the workers to sleep (`RELOCATIONS`). The spawner counted
/// it in `LINGERING`.
fn stay_awake(pool: &Pool, linger: Duration) {
    thread_local! {
        static LINGERING_HERE: Cell<bool> = const { Cell::new(false) };
    }
    // A linger job found by one already lingering on this thread has nothing to add.
    if !LINGERING_HERE.with(|here| here.replace(true)) {
        // A worker of another pool (never the case) offers nobody anything.
        let elsewhere = Offer::default();
        let offer = pool.own_offer().unwrap_or(&elsewhere);
        let relocations = RELOCATIONS.load(Ordering::Acquire);
        let mut idle_since = Instant::now();
        let mut next_yield = idle_since + YIELD_EVERY;
        offer.reopen();
        loop {
            if let Some(rayon::Yield::Executed) = rayon::yield_now() {
                offer.reopen();
                idle_since = Instant::now();
                next_yield = idle_since + SPIN_AFTER_JOB;
                continue;
            }
            if offer.claimed() {
                std::hint::spin_loop();
                continue;
            }
            let relocated = RELOCATIONS.load(Ordering::Acquire) != relocations;
            let mut done = relocated || idle_since.elapsed() >= linger;
            if done && !relocated && pool.calls_under_way.load(Ordering::Acquire) > 0 {
                // A call under way may not have found this worker yet: stay for it.
                idle_since = Instant::now();
                done = false;
            }
            if !done && Instant::now() < next_yield {
                std::hint::spin_loop();
                continue;
            }
            // A call may have claimed the offer since the look above: then serve it first.
            if !offer.withdraw() {
                continue;
            }
            if done {
                break;
            }
            std::thread::yield_now();
            offer.reopen();
            next_yield = Instant::now() + YIELD_EVERY;
        }
        LINGERING_HERE.with(|here| here.set(false));
    }
    LINGERING.fetch_sub(1, Ordering::AcqRel);
}

/// What the `probe` feature's engine trace records of one parallel call: when each thread
/// started and ended its pieces, and how long the caller waited for the workers.
#[cfg(feature = "probe")]
pub mod trace {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Mutex, PoisonError};
    use std::time::Instant;

    /// One thread's share of a call, in nanoseconds since the call entered the pool.
    #[derive(Clone, Copy, Debug)]
    pub struct Span {
        /// A pool worker (`false`: the calling thread).
        pub worker: bool,
        /// When the thread entered its share of the call.
        pub start_ns: u64,
        /// When it found no piece left.
        pub end_ns: u64,
        /// Pieces (subtrees of the chunk tree) this thread reduced.
        pub pieces: usize,
    }

    /// One parallel call.
    #[derive(Clone, Debug, Default)]
    pub struct CallTrace {
        /// One per thread that joined the call, in the order they ended.
        pub spans: Vec<Span>,
        /// When the caller stopped its spin/yield wait (all workers back, or it gave up).
        pub caller_waited_ns: u64,
        /// When the call left the pool (every worker job returned).
        pub end_ns: u64,
    }

    static ENABLED: AtomicBool = AtomicBool::new(false);
    static CALLS: Mutex<Vec<CallTrace>> = Mutex::new(Vec::new());
    static RELOCATED: AtomicUsize = AtomicUsize::new(0);

    /// How often late workers were left to sleep in the pool instead of lingering, since the last
    /// call.
    pub fn take_relocated() -> usize {
        RELOCATED.swap(0, Ordering::Relaxed)
    }

    pub(super) fn relocated() {
        RELOCATED.fetch_add(1, Ordering::Relaxed);
    }

    static MOVED: AtomicUsize = AtomicUsize::new(0);

    /// How often a worker moved off the caller's CPU, since the last call.
    pub fn take_moved() -> usize {
        MOVED.swap(0, Ordering::Relaxed)
    }

    pub(super) fn moved() {
        MOVED.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts (or stops) recording every parallel call of this process.
    pub fn record(enabled: bool) {
        ENABLED.store(enabled, Ordering::Relaxed);
    }

    /// The calls recorded since the last `take`.
    pub fn take() -> Vec<CallTrace> {
        std::mem::take(&mut *CALLS.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) struct Call {
        origin: Option<Instant>,
        trace: Mutex<CallTrace>,
    }

    impl Call {
        pub(super) fn start() -> Self {
            Self {
                origin: ENABLED.load(Ordering::Relaxed).then(Instant::now),
                trace: Mutex::default(),
            }
        }

        fn now(&self) -> Option<u64> {
            self.origin.map(|origin| origin.elapsed().as_nanos() as u64)
        }

        pub(super) fn span(&self, worker: bool, work: impl FnOnce() -> usize) -> usize {
            let start_ns = self.now();
            let pieces = work();
            if let (Some(start_ns), Some(end_ns)) = (start_ns, self.now()) {
                let span = Span {
                    worker,
                    start_ns,
                    end_ns,
                    pieces,
                };
                self.lock().spans.push(span);
            }
            pieces
        }

        pub(super) fn caller_waited(&self) {
            if let Some(now) = self.now() {
                self.lock().caller_waited_ns = now;
            }
        }

        pub(super) fn finish(self) {
            if let Some(end_ns) = self.now() {
                let mut trace = self
                    .trace
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner);
                trace.end_ns = end_ns;
                CALLS
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(trace);
            }
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, CallTrace> {
            self.trace.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }
}

/// Without the `probe` feature the trace is nothing at all.
#[cfg(not(feature = "probe"))]
mod trace {
    pub(super) struct Call;

    impl Call {
        pub(super) fn start() -> Self {
            Self
        }
        pub(super) fn span(&self, _worker: bool, work: impl FnOnce() -> usize) -> usize {
            work()
        }
        pub(super) fn caller_waited(&self) {}
        pub(super) fn finish(self) {}
    }

    pub(super) fn relocated() {}
    pub(super) fn moved() {}
}

/// 0 = not set: use the environment or the CPU count.
static REQUESTED_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The process that built the pool in `POOL` (0 = none yet).
static POOL_PID: AtomicU32 = AtomicU32::new(0);
static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);

/// Sets the number of threads large inputs are reduced with, at most [`max_threads`] (larger
/// requests are capped); `0` restores the default (see the module docs). Takes effect on the next
/// call; results do not depend on it.
pub fn set_num_threads(threads: usize) {
    REQUESTED_THREADS.store(threads.min(max_threads()), Ordering::Relaxed);
}

/// The number of threads the next large reduction will use (1 = serial).
pub fn num_threads() -> usize {
    match REQUESTED_THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// The default thread count, read from the environment once per process (capped by
/// [`max_threads`]).
///
/// Cached in an atomic rather than a `OnceLock`: a process forked while another thread was
/// computing it would find a `OnceLock` forever "being initialised" and hang on its first call;
/// two threads computing it at once merely store the same value twice.
fn default_threads() -> usize {
    static DEFAULT: AtomicUsize = AtomicUsize::new(0);
    match DEFAULT.load(Ordering::Relaxed) {
        0 => {
            let threads = ["L1L2_NUM_THREADS", "RAYON_NUM_THREADS"]
                .iter()
                .filter_map(|name| std::env::var(name).ok())
                .find_map(|value| parse_thread_count(&value))
                .unwrap_or_else(cpu_count)
                .min(max_threads());
            DEFAULT.store(threads, Ordering::Relaxed);
            threads
        }
        threads => threads,
    }
}

/// The CPUs this process may run on (1 if unknown), cached as [`default_threads`] is.
fn cpu_count() -> usize {
    static CPUS: AtomicUsize = AtomicUsize::new(0);
    match CPUS.load(Ordering::Relaxed) {
        0 => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            CPUS.store(cpus, Ordering::Relaxed);
            cpus
        }
        cpus => cpus,
    }
}

/// The most threads a reduction uses, whatever was asked for: 4 per CPU (at least 4). More only
/// add wake-ups, and an unbounded request (`threadpool_limits(10**6)`, a mistyped environment
/// variable) would try to start that many threads.
pub fn max_threads() -> usize {
    cpu_count().saturating_mul(4).max(4)
}

/// Parses a thread-count setting the way the environment variables are read: a positive integer
/// (one too large for `usize` counts as `usize::MAX`: the cap applies), or `None` for anything
/// else (which the library treats as "not set").
pub fn parse_thread_count(value: &str) -> Option<usize> {
    match value.trim().parse::<usize>() {
        Ok(count) => Some(count).filter(|&n| n > 0),
        Err(error) if *error.kind() == std::num::IntErrorKind::PosOverflow => Some(usize::MAX),
        Err(_) => None,
    }
}

/// Builds now the process-wide state that the pool's threads would otherwise build lazily on
/// their first piece of work: crossbeam's epoch collector, behind a once-cell. A process forked
/// while a worker is inside that first initialisation inherits the cell half-built, without the
/// thread that would finish it, and its own pool's workers then wait on it forever (seen: 5 of
/// 400 trials that forked during a first large call). Call it once at startup, before any thread
/// can fork (the Python module does so at import); the pool calls it before its first build too.
pub fn init_globals() {
    let _ = crossbeam_epoch::default_collector();
}

/// The pool for this process: `num_threads() - 1` workers, the caller being the last thread.
/// `None` means run serially (one thread wanted, the pool could not be built, or a fork left the
/// lock held).
fn pool() -> Option<Arc<Pool>> {
    let workers = num_threads() - 1;
    if workers == 0 {
        return None;
    }
    init_globals();
    let pid = std::process::id();
    let mut slot = lock_pool(pid)?;
    if POOL_PID.load(Ordering::Acquire) != pid {
        // Forked child (or first use): the threads behind the old pool do not exist here.
        if let Some(parents) = slot.take() {
            std::mem::forget(parents);
        }
        // Counts of the parent's workers, which do not exist here.
        LATE_CALLS.store(0, Ordering::Release);
        LINGERING.store(0, Ordering::Release);
        POOL_PID.store(pid, Ordering::Release);
    }
    if let Some(pool) = slot.as_ref().filter(|pool| pool.workers() == workers) {
        return Some(Arc::clone(pool));
    }
    if FAILED_WORKERS.load(Ordering::Relaxed) == workers {
        return None; // this size could not be built: serial, without retrying on every call
    }
    let built = ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("l1l2-{i}"))
        .build();
    let pool = match built {
        Ok(threads) => Arc::new(Pool::new(threads)),
        Err(error) => {
            FAILED_WORKERS.store(workers, Ordering::Relaxed);
            let message = format!(
                "l1l2: could not start {workers} worker threads ({error}); running on the \
                 calling thread until the thread count changes"
            );
            // Never wait here: in a forked child the holder may not exist.
            if let Ok(mut slot) = POOL_ERROR.try_lock() {
                *slot = Some(message);
            }
            return None;
        }
    };
    *slot = Some(Arc::clone(&pool)); // a pool of the old size ends once its last user returns
    Some(pool)
}

/// Starts the thread pool now if a call that writes in place, over an input of `input_bytes`,
/// may run in parallel or wake the workers (such a call counts up to three passes over its input
/// towards `PARALLEL_MIN_BYTES`). A failure to start it is then reported by [`take_pool_error`]
/// before the call has written anything, so that a caller who turns the report into an error
/// leaves the data untouched. Inside a caller's rayon pool, or with one thread, there is nothing
/// to start.
pub fn start_pool_before_writing(input_bytes: usize) {
    if input_bytes.saturating_mul(3) >= PARALLEL_MIN_BYTES
        && rayon::current_thread_index().is_none()
    {
        let _ = pool();
    }
}

/// The worker count whose pool could not be built (0: none failed).
static FAILED_WORKERS: AtomicUsize = AtomicUsize::new(0);
/// Why the last pool could not be built, until someone takes it to report it.
static POOL_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Why the thread pool could not be started, once per failure (the calls still complete, on the
/// calling thread): for a caller that reports it, as the Python binding does with a warning.
pub fn take_pool_error() -> Option<String> {
    match POOL_ERROR.try_lock() {
        Ok(mut error) => error.take(),
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().take(),
        Err(TryLockError::WouldBlock) => None, // being written: reported on a later call
    }
}

fn lock_pool(pid: u32) -> Option<MutexGuard<'static, Option<Arc<Pool>>>> {
    match POOL.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        // Contention inside this process: wait. Otherwise the holder may be a thread that a fork
        // did not copy (or another thread building the first pool): never wait for it.
        Err(TryLockError::WouldBlock) if POOL_PID.load(Ordering::Acquire) == pid => {
            Some(POOL.lock().unwrap_or_else(PoisonError::into_inner))
        }
        Err(TryLockError::WouldBlock) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accumulate::ExactPartial;
    use std::sync::mpsc;

    /// Taken by the tests that hold the pool's worker for long or need it to themselves: the
    /// tests of this binary run concurrently and share the pool.
    static POOL_TURN: Mutex<()> = Mutex::new(());

    fn pool_turn() -> MutexGuard<'static, ()> {
        POOL_TURN.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_leaf(range: Range<usize>) -> ExactPartial {
        ExactPartial {
            abs: range.len() as u128,
            ..ExactPartial::default()
        }
    }

    #[test]
    fn chunks_cover_the_input_exactly_once() {
        for len in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            5 * CHUNK + 7,
            100_000,
            FEW_CHUNKS * CHUNK,
            PARALLEL_MIN_BYTES_ASLEEP + 1,
        ] {
            assert_eq!(reduce(len, 1, &count_leaf).abs, len as u128, "len {len}");
            assert_eq!(reduce(len, 64, &count_leaf).abs, len as u128, "len {len}");
        }
    }

    #[test]
    fn chunks_are_nearly_equal_and_aligned_to_blocks() {
        for len in [
            CHUNK + 1,
            9 * MIN_CHUNK - 1,
            73_727,
            100_000,
            300_000,
            FEW_CHUNKS * CHUNK - 1,
            FEW_CHUNKS * CHUNK,
            1_000_000,
            (1 << 30) + 5,
        ] {
            let chunking = Chunking::of(len);
            let count = chunking.count();
            let chunks: Vec<Range<usize>> =
                (0..count).map(|i| chunking.elements(i..i + 1)).collect();
            assert_eq!(chunks[0].start, 0, "len {len}");
            assert_eq!(chunks[count - 1].end, len, "len {len}");
            assert!(chunks.windows(2).all(|pair| pair[0].end == pair[1].start));
            assert!(chunks[..count - 1]
                .iter()
                .all(|chunk| chunk.end % CHUNK_STEP == 0));
            let lens: Vec<usize> = chunks.iter().map(ExactSizeIterator::len).collect();
            let (shortest, longest) = (*lens.iter().min().unwrap(), *lens.iter().max().unwrap());
            assert!(
                longest <= CHUNK && shortest >= MIN_CHUNK - CHUNK_STEP,
                "len {len}"
            );
            assert!(
                longest - shortest <= CHUNK_STEP,
                "len {len}: {shortest}..{longest}"
            );
            // A multiple of 8 chunks unless that would make them shorter than MIN_CHUNK.
            assert!(
                count % FEW_CHUNKS == 0 || count == len.div_ceil(CHUNK_STEP) / 8,
                "len {len}"
            );
            // Two seats split the elements within one block of even.
            let elements: Vec<usize> = lens.clone();
            let shares = Shares::new(elements.iter().copied(), 2);
            let first: usize = lens[..shares.bounds()[1]].iter().sum();
            assert!(
                first.abs_diff(len - first) <= 2 * CHUNK_STEP,
                "len {len}: {first}"
            );
        }
        assert_eq!(Chunking::of(CHUNK).count(), 1);
        assert_eq!(Chunking::of(0).elements(0..1), 0..0);
        assert_eq!(Chunking::of(FEW_CHUNKS * CHUNK).count(), FEW_CHUNKS);
        assert_eq!(Chunking::of(1 << 30).count(), (1 << 30) / CHUNK);
    }

    #[test]
    fn workers_wait_for_what_the_caller_builds_and_give_up_without_it() {
        let built = OnceLock::new();
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let start = Instant::now();
                let seen = built_by_caller(&built, Seat::new(1, 2, true), || 0).copied();
                (seen, start.elapsed())
            });
            assert_eq!(
                *built_by_caller(&built, Seat::new(0, 2, false), || 7).unwrap(),
                7
            );
            // The worker reads the caller's value (it never builds its own), unless this thread
            // was kept from building it for longer than WAIT (a loaded machine).
            match worker.join().unwrap() {
                (Some(seen), _) => assert_eq!(seen, 7),
                (None, waited) => assert!(waited >= WAIT),
            }
        });
        // Nothing built: a worker leaves after WAIT rather than waiting for ever.
        let never: OnceLock<u8> = OnceLock::new();
        let start = Instant::now();
        assert!(built_by_caller(&never, Seat::new(1, 2, true), || 1).is_none());
        assert!(start.elapsed() >= WAIT && never.get().is_none());
    }

    #[test]
    fn shares_split_by_elements_and_every_task_is_taken_once() {
        // Seven equal tasks and a small one (114 elements) between two seats: 64 and 50.
        let shares = Shares::new([16, 16, 16, 16, 16, 16, 16, 2].into_iter(), 2);
        assert_eq!(shares.bounds(), [0, 4, 8]);
        let tasks = [100, 1, 1, 1, 1, 1, 1, 1, 1, 50, 50];
        for seats in 1..=5 {
            let shares = Shares::new(tasks.iter().copied(), seats);
            let bounds = shares.bounds();
            assert_eq!(bounds.len(), seats + 1);
            assert!(bounds.windows(2).all(|pair| pair[0] <= pair[1]));
            assert_eq!(bounds[seats], tasks.len());
            // Seats claiming concurrently, each from its own share first.
            let taken: Vec<AtomicUsize> = tasks.iter().map(|_| AtomicUsize::new(0)).collect();
            std::thread::scope(|scope| {
                for seat in 0..seats {
                    let (shares, taken) = (&shares, &taken);
                    scope.spawn(move || {
                        shares.claim(seat, |task| taken[task].fetch_add(1, Ordering::Relaxed))
                    });
                }
            });
            assert!(taken.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        }
        // A seat alone (its partners late) takes every share, its own first.
        let shares = Shares::new([1, 1, 1, 1].into_iter(), 2);
        let mut order = Vec::new();
        shares.claim(1, |task| {
            order.push(task);
            1
        });
        assert_eq!(order, [2, 3, 0, 1]);
    }

    #[test]
    fn a_check_that_says_stop_abandons_the_call() {
        let _turn = pool_turn();
        let done = AtomicUsize::new(0);
        let slow_leaf = |range: Range<usize>| {
            std::thread::sleep(Duration::from_millis(2));
            done.fetch_add(1, Ordering::Relaxed);
            count_leaf(range)
        };
        let chunks = 400; // 800 ms of chunks on one thread; the first check comes after 50 ms
        let stopped = interruptible(|| true, || reduce(chunks * CHUNK, 8, &slow_leaf));
        assert!(stopped.is_none());
        assert!(
            done.load(Ordering::Relaxed) < chunks / 2,
            "{done:?} chunks ran"
        );
        let finished = interruptible(|| false, || reduce(20 * CHUNK, 8, &slow_leaf));
        assert_eq!(finished.map(|p| p.abs), Some((20 * CHUNK) as u128));
    }

    /// The CPU time (ns) the pool's first worker has run, from Linux's per-thread schedstat.
    #[cfg(target_os = "linux")]
    fn worker_cpu_ns() -> Option<u64> {
        std::fs::read_dir("/proc/self/task")
            .ok()?
            .find_map(|entry| {
                let task = entry.ok()?.path();
                let name = std::fs::read_to_string(task.join("comm")).ok()?;
                let stat = std::fs::read_to_string(task.join("schedstat")).ok()?;
                (name.trim() == "l1l2-0").then(|| stat.split_whitespace().next()?.parse().ok())?
            })
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn idle_workers_stop_spinning() {
        let _turn = pool_turn();
        set_num_threads(2);
        let len = 64 * CHUNK;
        assert_eq!(reduce(len, 8, &count_leaf).abs, len as u128);
        std::thread::sleep(linger() * 10); // the linger is over, the worker asleep
        let before = worker_cpu_ns().expect("the pool's worker thread l1l2-0");
        std::thread::sleep(Duration::from_millis(50));
        let burnt = worker_cpu_ns().expect("the pool's worker thread l1l2-0") - before;
        // Other tests of this binary may run calls meanwhile; each costs at most one linger.
        assert!(
            burnt < 20_000_000,
            "the idle worker ran {burnt} ns in 50 ms"
        );
        set_num_threads(0);
    }

    #[test]
    fn an_offer_is_claimed_once_and_kept_until_used_or_released() {
        let offer = Offer::default();
        assert!(!offer.claim(FIRST_CALL), "an idle worker cannot be claimed");
        offer.reopen();
        assert!(offer.claim(FIRST_CALL));
        assert!(!offer.claim(FIRST_CALL + 1), "claimed twice");
        assert!(offer.claimed());
        assert!(!offer.withdraw(), "a claimed worker yielded its CPU");
        offer.reopen();
        assert!(offer.claimed(), "reopening dropped a claim");
        // Released by its own call only.
        let pool_of = |offer: Offer| Pool {
            offers: vec![offer].into_boxed_slice(),
            ..Pool::new(
                ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a pool"),
            )
        };
        let pool = pool_of(offer);
        pool.release(FIRST_CALL + 1);
        assert!(pool.offers[0].claimed());
        pool.release(FIRST_CALL);
        assert!(!pool.offers[0].claimed());
        assert!(pool.offers[0].withdraw());
        assert_eq!(pool.claim(FIRST_CALL + 2), 0);
    }

    #[test]
    fn a_call_does_not_wait_for_a_worker_busy_elsewhere() {
        let _turn = pool_turn();
        set_num_threads(2);
        let pool = pool().expect("a pool of one worker");
        let (started, held) = (mpsc::channel(), mpsc::channel::<()>());
        let (started_tx, held_rx) = (started.0, held.1);
        let (done_tx, done_rx) = mpsc::channel();
        let own = Arc::clone(&pool);
        pool.threads.spawn(move || {
            own.start_job();
            started_tx.send(()).expect("the test waits for this");
            // Held until the call below has returned; a call that waited for this worker would
            // only return once this gives up.
            done_tx
                .send(held_rx.recv_timeout(Duration::from_secs(20)).is_ok())
                .ok();
        });
        started.1.recv().expect("the worker started");
        let len = 64 * CHUNK; // 16 MiB of work: parallel even with the workers asleep
        assert_eq!(reduce(len, 8, &count_leaf).abs, len as u128);
        held.0.send(()).expect("the worker waits");
        assert_eq!(
            done_rx.recv(),
            Ok(true),
            "the call waited for the held worker"
        );
        set_num_threads(0);
    }

    #[test]
    fn a_worker_woken_by_a_long_call_stays_until_the_call_recruits_it() {
        let _turn = pool_turn();
        set_num_threads(2);
        let len = 32 * CHUNK;
        assert_eq!(reduce(len, 8, &count_leaf).abs, len as u128);
        // The linger is over, the worker asleep.
        std::thread::sleep(linger() * 10);
        // Chunks of 2 ms each: the call's first look for help between its tasks comes after the
        // linger of the worker it woke at its start has run out.
        let on_workers = AtomicUsize::new(0);
        let slow_leaf = |range: Range<usize>| {
            let end = Instant::now() + Duration::from_millis(2);
            while Instant::now() < end {
                std::hint::spin_loop();
            }
            let name = std::thread::current().name().map(str::to_owned);
            if name.is_some_and(|name| name.starts_with("l1l2-")) {
                on_workers.fetch_add(1, Ordering::Relaxed);
            }
            count_leaf(range)
        };
        assert_eq!(reduce(len, 8, &slow_leaf).abs, len as u128);
        let on_workers = on_workers.into_inner();
        assert!(
            on_workers > 0,
            "the caller reduced all 32 chunks of the 64 ms call alone"
        );
        set_num_threads(0);
    }

    #[test]
    fn thread_count_parsing() {
        assert_eq!(parse_thread_count(" 3 "), Some(3));
        assert_eq!(parse_thread_count("0"), None);
        assert_eq!(parse_thread_count("-1"), None);
        assert_eq!(parse_thread_count("many"), None);
        assert_eq!(parse_thread_count("18446744073709551621"), Some(usize::MAX));
        assert!(max_threads() >= 4);
    }
}
