//! Operating the gateway: Prometheus metrics, logs, the admin listener
//! (metrics and sessions), the container's health probe, the `check`
//! doctor, and the allocator's housekeeping.

pub mod admin;
pub mod check;
pub mod health;
pub mod logging;
pub(crate) mod memory;
pub mod metrics;
