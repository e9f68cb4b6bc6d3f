//! The server's settings: how long each step of a connection may take,
//! and how much a client may open or send.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "humantime_serde")]
    pub tls_handshake: Duration,
    /// Until a connection's first complete request, and for a request head
    /// begun on an idle connection.
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// A client connection with no request in flight.
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_response: Duration,
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    #[serde(with = "humantime_serde")]
    pub websocket_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tls_handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(30),
            // nginx's keepalive_timeout.
            client_idle: Duration::from_secs(75),
            connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            idle: Duration::from_secs(120),
            // RustDesk's nginx guide: 120 s for /ws/id and /ws/relay.
            websocket_idle: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// Threads serving client connections; 0 means one per CPU core.
    pub workers: usize,
}

impl Limits {
    /// The number of worker threads: as configured, or one per CPU core
    /// the process may use (cgroup quotas included).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            workers: 0,
        }
    }
}
