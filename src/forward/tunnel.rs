//! Upgraded connections (WebSocket): bytes copied both ways between the
//! client and the upstream until either ends, or until neither has sent a
//! byte for `timeouts.websocket_idle`. Without that deadline a peer that
//! vanished without closing (a laptop's lid shut, a NAT entry dropped)
//! held two connections forever. RustDesk's documented nginx config gives
//! its `/ws/id` and `/ws/relay` locations a 120 s read timeout (hence the
//! default), and nginx closes a WebSocket whose upstream is silent for
//! 60 s unless told otherwise
//! (<https://nginx.org/en/docs/http/websocket.html>).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::io::InspectReader;

/// Tunnels `client` to `upstream` once both upgrades complete; `open`
/// counts the tunnels. `idle` of zero never closes a silent tunnel.
pub async fn run(client: OnUpgrade, upstream: OnUpgrade, open: Gauge, idle: Duration) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    open.inc();
    let opened = Instant::now();
    let last_read = AtomicU64::new(0);
    // Every byte that crosses the tunnel is read from one side.
    let noted = |data: &[u8]| {
        if !data.is_empty() {
            let since = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            last_read.store(since, Ordering::Relaxed);
        }
    };
    let mut client = InspectReader::new(TokioIo::new(client), noted);
    let mut upstream = InspectReader::new(TokioIo::new(upstream), noted);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, "upgraded connection closed with an error");
            }
        }
        () = silence(idle, opened, &last_read), if !idle.is_zero() => {
            tracing::debug!(?idle, "upgraded connection closed: no data either way");
        }
    }
    open.dec();
}

/// Completes once `idle` has passed since the last byte read from either
/// side (`last_read`: milliseconds after `opened`).
async fn silence(idle: Duration, opened: Instant, last_read: &AtomicU64) {
    loop {
        let deadline = opened + Duration::from_millis(last_read.load(Ordering::Relaxed)) + idle;
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
