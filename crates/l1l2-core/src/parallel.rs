//! Deterministic parallel reduction and the thread pool behind it.
//!
//! The input is cut into chunks of `CHUNK` elements whose boundaries depend on the length only.
//! Chunk partials are merged along a fixed binary tree (split at the middle chunk), whether the two
//! halves of a node ran on two threads or one after the other; so the result is bit-identical for
//! any thread count, and the serial path is the same tree walked by one thread.
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

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::accumulate::Partial;

/// Elements per chunk: the unit of work and of determinism. 32 Ki elements (64-256 KiB) keeps the
/// per-chunk cost far above a rayon task's and the partials' count small.
pub const CHUNK: usize = 1 << 15;

/// Inputs shorter than this run on the calling thread: waking a second thread costs more than
/// it saves below ~256 KiB of f32.
pub const PARALLEL_MIN_LEN: usize = 1 << 16;

/// Reduces `0..len` with `leaf` over chunks, in parallel when that pays, always along the same tree.
pub(crate) fn reduce<P, F>(len: usize, leaf: &F) -> P
where
    P: Partial,
    F: Fn(Range<usize>) -> P + Sync,
{
    if len <= CHUNK {
        return leaf(0..len);
    }
    let chunks = len.div_ceil(CHUNK);
    let node = Node { len, leaf };
    if len < PARALLEL_MIN_LEN {
        return node.reduce(0..chunks, false);
    }
    if rayon::current_thread_index().is_some() {
        return node.reduce(0..chunks, true); // inside a caller's pool: use it
    }
    match pool() {
        Some(pool) => pool.install(|| node.reduce(0..chunks, true)),
        None => node.reduce(0..chunks, false),
    }
}

struct Node<'a, F> {
    len: usize,
    leaf: &'a F,
}

impl<F> Node<'_, F> {
    fn reduce<P>(&self, chunks: Range<usize>, parallel: bool) -> P
    where
        P: Partial,
        F: Fn(Range<usize>) -> P + Sync,
    {
        if chunks.len() == 1 {
            let start = chunks.start * CHUNK;
            return (self.leaf)(start..self.len.min(start + CHUNK));
        }
        let middle = chunks.start + chunks.len() / 2;
        let (left, right) = if parallel {
            rayon::join(
                || self.reduce(chunks.start..middle, true),
                || self.reduce(middle..chunks.end, true),
            )
        } else {
            (
                self.reduce(chunks.start..middle, false),
                self.reduce(middle..chunks.end, false),
            )
        };
        left.merge(right)
    }
}

/// 0 = not set: use the environment or the CPU count.
static REQUESTED_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The process that built the pool in `POOL` (0 = none yet).
static POOL_PID: AtomicU32 = AtomicU32::new(0);
static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

/// Sets the number of threads large inputs are reduced with; `0` restores the default (see the
/// module docs). Takes effect on the next call; results do not depend on it.
pub fn set_num_threads(threads: usize) {
    REQUESTED_THREADS.store(threads, Ordering::Relaxed);
}

/// The number of threads the next large reduction will use (1 = serial).
pub fn num_threads() -> usize {
    match REQUESTED_THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// The default thread count, read from the environment once per process.
fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        ["L1L2_NUM_THREADS", "RAYON_NUM_THREADS"]
            .iter()
            .filter_map(|name| std::env::var(name).ok())
            .find_map(|value| parse_thread_count(&value))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Parses a thread-count setting the way the environment variables are read: a positive integer,
/// or `None` for anything else (which the library treats as "not set").
pub fn parse_thread_count(value: &str) -> Option<usize> {
    value.trim().parse::<usize>().ok().filter(|&n| n > 0)
}

/// The pool for this process at the requested size; `None` means run serially (one thread wanted,
/// the pool could not be built, or a fork left the lock held).
fn pool() -> Option<Arc<ThreadPool>> {
    let threads = num_threads();
    if threads <= 1 {
        return None;
    }
    let pid = std::process::id();
    let mut slot = lock_pool(pid)?;
    if POOL_PID.load(Ordering::Acquire) != pid {
        // Forked child (or first use): the threads behind the old pool do not exist here.
        if let Some(parents) = slot.take() {
            std::mem::forget(parents);
        }
        POOL_PID.store(pid, Ordering::Release);
    }
    if let Some(pool) = slot
        .as_ref()
        .filter(|pool| pool.current_num_threads() == threads)
    {
        return Some(Arc::clone(pool));
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("l1l2-{i}"))
            .build()
            .ok()?,
    );
    *slot = Some(Arc::clone(&pool)); // a pool of the old size ends once its last user returns
    Some(pool)
}

fn lock_pool(pid: u32) -> Option<MutexGuard<'static, Option<Arc<ThreadPool>>>> {
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
            PARALLEL_MIN_LEN * 3 + 1,
        ] {
            assert_eq!(reduce(len, &count_leaf).abs, len as u128, "len {len}");
        }
    }

    #[test]
    fn thread_count_parsing() {
        assert_eq!(parse_thread_count(" 3 "), Some(3));
        assert_eq!(parse_thread_count("0"), None);
        assert_eq!(parse_thread_count("-1"), None);
        assert_eq!(parse_thread_count("many"), None);
    }
}
