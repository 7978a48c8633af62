//! Background work (compaction, admin queries, the profile stage, destinations) runs at a lower
//! CPU priority than ingestion.

/// Gives the calling thread a lower CPU priority (nice 10).
pub fn lower() {
    nice(10);
}

/// The lowest CPU priority (nice 19), for work that runs on many threads at once: each
/// destination has its own thread, and ten of them at nice 10 would together weigh about as much
/// as one ingestion thread; at nice 19 ten weigh about a seventh of one.
pub fn lowest() {
    nice(19);
}

fn nice(value: libc::c_int) {
    // SAFETY: setpriority on this thread only (on Linux, PRIO_PROCESS with a thread id).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, value);
    }
}
