//! Handing freed memory back to the system after a burst of connections.
//! The binary (and the benchmarks) allocate with mimalloc; why, and what
//! it saved, is in `docs/performance.md`.

use std::time::Duration;

/// How often freed memory is handed back.
const COLLECT_EVERY: Duration = Duration::from_secs(10);

/// Collects the calling thread's heap now and then; runs until its runtime
/// stops, so every runtime that serves connections runs one.
/// mimalloc hands a freed page back only after it has been free a while,
/// and looks only when the thread owning it allocates again: a gateway gone
/// quiet after a burst of 512 connections stayed at 65 MiB. A forced
/// collection returns it (43 MiB within one period; glibc with
/// `malloc_trim` came to 38).
pub async fn collect_periodically() {
    let mut ticks = tokio::time::interval(COLLECT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // SAFETY: mi_collect takes no pointers; it tidies the calling
        // thread's heap and the shared arenas under mimalloc's own locks.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(true)
        };
    }
}
