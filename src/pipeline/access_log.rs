//! The access log: one line and the route's metrics per request.

use std::net::SocketAddr;
use std::time::Instant;

use http::{Method, StatusCode, Uri};

use crate::ops::logging::ACCESS;
use crate::ops::metrics::RouteMetrics;

/// What the per-request log line and metrics need of a request.
pub(super) struct Seen<'a> {
    pub method: Method,
    /// Only its path is logged: queries can carry codes and tokens.
    pub uri: Uri,
    pub started: Instant,
    pub id: &'a str,
    pub peer: SocketAddr,
}

impl Seen<'_> {
    /// Logs the request and records it in `route`'s metrics; latency is
    /// the time to response headers.
    pub fn done(&self, route: &RouteMetrics, status: StatusCode) {
        let latency = self.started.elapsed();
        tracing::info!(
            target: ACCESS,
            method = %self.method,
            path = self.uri.path(),
            route = &*route.route,
            status = status.as_u16(),
            latency_ms = latency.as_secs_f64() * 1000.0,
            request_id = self.id,
            peer = %self.peer.ip(),
            "request"
        );
        route.record(status.as_u16(), latency);
    }
}
