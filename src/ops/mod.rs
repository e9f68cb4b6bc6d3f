//! Operating the gateway: Prometheus metrics, logs, the container's
//! health probe, the `check` doctor, and the allocator's housekeeping.

pub mod check;
pub mod health;
pub mod logging;
pub(crate) mod memory;
pub mod metrics;
