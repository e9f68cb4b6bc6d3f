//! The process's allocator, and handing freed memory back to the system
//! after a burst of connections.
//!
//! mimalloc (its v3 design) instead of glibc's malloc: every HTTP/2 request
//! spawned a task of ~2.7 KB (before its future was boxed, `server.rs`),
//! above glibc's per-thread cache, so each one went through glibc's shared
//! bins and consolidated its fast bins first.
//! Measured in issue 5 (authgate's CPU time per signed-in request, mean of
//! two rounds): HTTP/2 26.2 -> 23.9 µs at 512 connections and 20.0 -> 19.2
//! at 64; HTTP/1.1 21.7 -> 20.9 and 17.2 -> 16.9; RSS unchanged idle
//! (12 MiB) and with 1,000 idle TLS connections (49 MiB).
//! It sits in the library so that tests and benchmarks run on it too.

use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}
