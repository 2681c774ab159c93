//! Which CPU a thread runs on, and moving a pool worker off the caller's CPU.
//!
//! On a machine whose CPUs share no cache (a VM that shows each vCPU with its own L2 and no L3),
//! Linux wakes a thread only within its last CPU's cache domain, so a worker that once landed on
//! the caller's CPU is woken there again and again, and there it cannot run before the caller
//! yields: the caller does every call alone and then waits for the worker to return. Measured on
//! a 2-vCPU VM, in 2 of 4 runs of 3000 back-to-back 1e5 float32 calls, 19-86% of the calls went
//! that way (17.7 us against 9.0 us). The kernel's load balancer moves such a thread only after
//! milliseconds, so the worker moves itself: it narrows its CPU mask to exclude the caller's CPU,
//! which migrates it at once, and widens it back, so that it is never pinned.

/// The CPU the calling thread is running on, where the OS tells.
#[cfg(target_os = "linux")]
pub(crate) fn current_cpu() -> Option<usize> {
    nix::sched::sched_getcpu().ok()
}

/// Moves the calling thread to one of its other allowed CPUs if it is running on `cpu` (the
/// caller's). Returns whether it moved.
#[cfg(target_os = "linux")]
pub(crate) fn leave(cpu: Option<usize>) -> bool {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;

    let Some(cpu) = cpu.filter(|&cpu| current_cpu() == Some(cpu)) else {
        return false;
    };
    let this_thread = Pid::from_raw(0);
    let Ok(allowed) = sched_getaffinity(this_thread) else {
        return false;
    };
    let mut elsewhere = allowed;
    if elsewhere.unset(cpu).is_err() || elsewhere == nix::sched::CpuSet::new() {
        return false; // no other CPU to go to
    }
    let moved = sched_setaffinity(this_thread, &elsewhere).is_ok();
    // Allowed everywhere again: the move is one migration, not a pinning.
    let _ = sched_setaffinity(this_thread, &allowed);
    moved
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn current_cpu() -> Option<usize> {
    None
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn leave(_cpu: Option<usize>) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use nix::sched::sched_getaffinity;
    use nix::unistd::Pid;

    #[test]
    fn a_thread_leaves_only_the_cpu_it_is_on_and_stays_unpinned() {
        std::thread::spawn(|| {
            let allowed = sched_getaffinity(Pid::from_raw(0)).expect("affinity");
            let others = (0..nix::sched::CpuSet::count())
                .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
                .count();
            assert!(!leave(None));
            let here = current_cpu().expect("sched_getcpu works on Linux");
            let moved = leave(Some(here));
            // With a second CPU allowed the thread moves off this one; alone, it cannot.
            assert_eq!(moved, others > 1);
            if moved {
                assert_ne!(current_cpu(), Some(here));
            }
            assert_eq!(
                sched_getaffinity(Pid::from_raw(0)).expect("affinity"),
                allowed
            );
        })
        .join()
        .expect("the thread ran");
    }
}
