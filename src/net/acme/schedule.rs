//! When to renew, and how long to wait after a failure. Pure, so every
//! branch is unit-tested (the CA in the tests predates renewal
//! information).

use std::time::{Duration, SystemTime};

/// The first retry after a failed order; each further failure doubles it.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// Let's Encrypt allows 5 failed validations per host and hour: past the
/// first few, retries are spaced out to a few a day.
const LONGEST_RETRY: Duration = Duration::from_secs(6 * 3600);

/// A certificate's validity.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The CA's suggested renewal window (ACME Renewal Information).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: SystemTime,
    pub end: SystemTime,
}

/// When to order the replacement of a certificate: a uniformly random
/// moment in the CA's window when it suggests one ("the client SHOULD
/// select a uniform random time within the suggested window",
/// RFC 9773 §4.2), else two thirds into the lifetime (Let's Encrypt's
/// advice for clients without renewal information). `random` is in [0, 1].
pub fn renew_at(lifetime: Lifetime, window: Option<Window>, random: f64) -> SystemTime {
    match window {
        Some(Window { start, end }) if end > start => {
            start
                + end
                    .duration_since(start)
                    .unwrap_or_default()
                    .mul_f64(random)
        }
        Some(Window { start, .. }) => start,
        None => {
            let total = lifetime
                .not_after
                .duration_since(lifetime.not_before)
                .unwrap_or_default();
            lifetime.not_before + total * 2 / 3
        }
    }
}

/// The wait before the next attempt after `failures` failed orders in a
/// row: one minute, doubling up to six hours, each spread by ±25 % so
/// replicas and restarts do not retry in step. `random` is in [0, 1].
pub fn retry_delay(failures: u32, random: f64) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(LONGEST_RETRY).mul_f64(0.75 + random / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ninety_days() -> Lifetime {
        let not_before = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        Lifetime {
            not_before,
            not_after: not_before + 90 * 24 * HOUR,
        }
    }

    #[test]
    fn without_renewal_information_two_thirds_of_the_lifetime() {
        let lifetime = ninety_days();
        for random in [0.0, 0.5, 1.0] {
            assert_eq!(
                renew_at(lifetime, None, random),
                lifetime.not_before + 60 * 24 * HOUR
            );
        }
    }

    #[test]
    fn a_suggested_window_is_followed_at_a_random_moment_inside_it() {
        let lifetime = ninety_days();
        // A CA asking for early renewal (a revocation coming) is obeyed,
        // even well before two thirds.
        let window = Window {
            start: lifetime.not_before + 24 * HOUR,
            end: lifetime.not_before + 26 * HOUR,
        };
        assert_eq!(renew_at(lifetime, Some(window), 0.0), window.start);
        assert_eq!(renew_at(lifetime, Some(window), 1.0), window.end);
        let middle = renew_at(lifetime, Some(window), 0.5);
        assert_eq!(middle, window.start + HOUR);
    }

    #[test]
    fn a_window_in_the_past_means_now_and_an_empty_one_its_start() {
        let lifetime = ninety_days();
        let past = Window {
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + HOUR,
        };
        assert!(renew_at(lifetime, Some(past), 0.7) < SystemTime::now());
        let empty = Window {
            start: lifetime.not_before + HOUR,
            end: lifetime.not_before,
        };
        assert_eq!(renew_at(lifetime, Some(empty), 0.3), empty.start);
    }

    #[test]
    fn retries_back_off_from_a_minute_to_six_hours_with_jitter() {
        let exact = |failures| retry_delay(failures, 0.5);
        assert_eq!(exact(1), Duration::from_secs(60));
        assert_eq!(exact(2), Duration::from_secs(120));
        assert_eq!(exact(5), Duration::from_secs(960));
        assert_eq!(exact(20), LONGEST_RETRY);
        assert_eq!(exact(u32::MAX), LONGEST_RETRY);
        assert_eq!(retry_delay(1, 0.0), Duration::from_secs(45));
        assert_eq!(retry_delay(1, 1.0), Duration::from_secs(75));
    }
}
