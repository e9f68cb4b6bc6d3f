//! hyper's settings for client connections, HTTP/1.1 and HTTP/2.

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use super::settings::Limits;

/// HTTP/2 streams a client may reset before we stop accepting new ones
/// (rapid reset, RUSTSEC-2024-0003), and resets we may send on errors.
const MAX_PENDING_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// hyper's settings for the connections browsers open, HTTP/1.1 and
/// HTTP/2 (public for the benchmark's `hyper-alone`, which serves with the
/// very same).
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The connection's own deadlines (`deadline.rs`) bound a request
        // head, telling idle time from a slow head, which hyper's timer
        // cannot; that timer, armed and dropped for every request, cost
        // each one a timer entry and a clock read.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
    builder
}
