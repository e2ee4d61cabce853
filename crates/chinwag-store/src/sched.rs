//! How the store's threads are scheduled.
//!
//! Every operation a connection hands to the store wakes the writer if it is waiting.
//! Under Linux's default policy a thread that has slept is favoured when it wakes, so on a
//! busy core the writer preempts the thread that woke it, commits, and sleeps again: two
//! context switches for what is often a handful of operations. `SCHED_BATCH` removes
//! only that favour. The writer still gets its fair share of the core, but it runs when
//! the runtime thread waits for the network or at the end of its time slice. Setting it
//! needs no privilege; it is the same policy as `chrt --batch`.

/// Puts the calling thread under `SCHED_BATCH` (Linux); elsewhere does nothing.
#[cfg(target_os = "linux")]
pub fn yield_on_wake() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread, and `param` is a valid, initialised
    // `sched_param` that the call only reads.
    os_result(unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) })
}

#[cfg(not(target_os = "linux"))]
pub fn yield_on_wake() -> std::io::Result<()> {
    Ok(())
}

/// Lowers the calling thread's priority (nice 5), for work that can wait a little: on a
/// busy core the scheduler's weights then give it about a seventh of the core against
/// the node's two busy threads instead of a third, so it stretches out rather than stalling them. Not lower: at nice
/// 19 the thread writing idempotency records got so little of a saturated core that one
/// batch took 2.5–2.8 s, and checkpoints, which wait for it, stopped the writer for
/// 350–640 ms (docs/performance.md). Lowering a thread's own priority needs no privilege
/// (Linux: `setpriority` on a thread id sets that thread alone). Elsewhere does nothing.
#[cfg(target_os = "linux")]
pub fn background() -> std::io::Result<()> {
    // SAFETY: plain integer arguments; `who` 0 names the calling thread.
    os_result(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) })
}

/// A libc call's return code as a result: 0 is success, anything else sets `errno`.
#[cfg(target_os = "linux")]
fn os_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn background() -> std::io::Result<()> {
    Ok(())
}
