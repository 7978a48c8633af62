//! Background work (compaction, admin queries, the profile stage) runs at a lower CPU priority
//! than ingestion.

/// Gives the calling thread a lower CPU priority (nice 10).
pub fn lower() {
    // SAFETY: setpriority on this thread only (on Linux, PRIO_PROCESS with a thread id).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
