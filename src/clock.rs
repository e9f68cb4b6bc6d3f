//! The one wall clock: seconds since the Unix epoch, as tokens and
//! sessions count time. Unit tests move it forward with `advance`
//! instead of sleeping.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    #[cfg(test)]
    let real = real + test_clock::SKEW.with(std::cell::Cell::get);
    real
}

/// Moves this thread's clock `seconds` forward (each unit test runs on a
/// thread of its own).
#[cfg(test)]
pub fn advance(seconds: u64) {
    test_clock::SKEW.with(|skew| skew.set(skew.get() + seconds));
}

#[cfg(test)]
mod test_clock {
    thread_local! {
        pub static SKEW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
}
