//! Background work (compaction, admin queries, the profile stage and its saver, destinations)
//! runs at a lower CPU priority than ingestion; the lake writer at the lowest.

/// Gives the calling thread a lower CPU priority (nice 10).
pub fn lower() {
    nice(10);
}

/// The lowest CPU priority (nice 19), for work that should only take what the core has left.
pub fn lowest() {
    nice(19);
}

/// For one of `threads` threads that share one kind of background work (each destination has its
/// own): a nice value at which all of them together weigh about what one thread at nice 10 does
/// (the scheduler's weight falls by 1.25× per nice step), so that ten destinations do not take
/// ten times the share of the profile stage or of ingestion.
pub fn lower_shared(threads: usize) {
    let steps = (threads.max(1) as f64).ln() / 1.25f64.ln();
    nice((10.0 + steps.round()).min(19.0) as libc::c_int);
}

fn nice(value: libc::c_int) {
    // SAFETY: setpriority on this thread only (on Linux, PRIO_PROCESS with a thread id).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, value);
    }
}
