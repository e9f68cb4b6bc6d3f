//! How long a client connection may hold its place (and its permit of
//! `limits.max_connections`) without doing its part:
//! - until its first complete request: `timeouts.header_read`, HTTP/2's
//!   preface included (hyper bounds neither the wait for the preface nor
//!   hyper-util's protocol detection, hyper issue 3962);
//! - idle, no request in flight: `timeouts.client_idle` (HTTP/1.1 between
//!   requests, HTTP/2 with no open stream);
//! - an HTTP/1.1 request head begun on an idle connection:
//!   `timeouts.header_read` from its first byte (slowloris).
//!
//! A request is in flight from its head until its response body is sent to
//! the end ([`Tracked`]). An upgraded connection (WebSocket) leaves these
//! rules for the tunnel's own idle deadline, and keeps its permit: the
//! permit lives in the connection's I/O ([`ClientIo`]), which the tunnel
//! owns once upgraded.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use crate::{Body, BoxError};

/// What the requests of one connection tell its I/O.
pub(super) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Requests received so far.
    received: AtomicU64,
    /// Milliseconds after `opened` when the last request in flight ended.
    idle_since: AtomicU64,
    upgraded: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
        })
    }

    /// A request's head arrived; it is in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.received.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight.
pub(super) struct InFlight(Arc<Activity>);

impl InFlight {
    /// The connection now carries a tunnel, which has deadlines of its own.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let since = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            activity.idle_since.store(since, Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request in flight until it is sent (or
/// dropped).
pub(super) struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl Tracked {
    pub fn new(body: Body, in_flight: InFlight) -> Tracked {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The deadlines a connection's I/O enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadlines {
    pub header_read: Duration,
    pub client_idle: Duration,
}

/// A client connection's I/O: enforces [`Deadlines`] on its reads, and
/// holds the connection's permit for as long as it exists.
pub(super) struct ClientIo<T> {
    inner: T,
    activity: Arc<Activity>,
    deadlines: Deadlines,
    http2: bool,
    /// When bytes of an HTTP/1.1 request head arrived on an idle
    /// connection, and how many requests had been received then.
    head_started: Option<(Instant, u64)>,
    timer: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
    _permit: OwnedSemaphorePermit,
}

impl<T> ClientIo<T> {
    pub fn new(
        inner: T,
        activity: Arc<Activity>,
        deadlines: Deadlines,
        http2: bool,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let first = activity.opened + deadlines.header_read;
        ClientIo {
            inner,
            activity,
            deadlines,
            http2,
            head_started: None,
            timer: Box::pin(tokio::time::sleep_until(first)),
            armed_for: Some(first),
            _permit: permit,
        }
    }

    /// When the connection must have made progress by; `None` while a
    /// request is in flight or the connection is upgraded.
    fn deadline(&mut self) -> Option<Instant> {
        let activity = &self.activity;
        if activity.upgraded.load(Ordering::Relaxed)
            || activity.in_flight.load(Ordering::Relaxed) > 0
        {
            return None;
        }
        let received = activity.received.load(Ordering::Relaxed);
        if received == 0 {
            return Some(activity.opened + self.deadlines.header_read);
        }
        match self.head_started {
            Some((started, at)) if at == received => Some(started + self.deadlines.header_read),
            _ => {
                let idle_since = activity.idle_since.load(Ordering::Relaxed);
                Some(
                    activity.opened
                        + Duration::from_millis(idle_since)
                        + self.deadlines.client_idle,
                )
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let activity = &this.activity;
                let received = activity.received.load(Ordering::Relaxed);
                let idle = activity.in_flight.load(Ordering::Relaxed) == 0;
                let counted = this.head_started.is_some_and(|(_, at)| at == received);
                if !this.http2 && idle && received > 0 && !counted {
                    this.head_started = Some((Instant::now(), received));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(deadline) = this.deadline() else {
                    return Poll::Pending;
                };
                // The timer is moved only when the deadline comes sooner:
                // the idle deadline moves later with every request, and
                // re-arming for each would cost a timer update a request.
                // One that fires early is re-armed for the deadline then.
                if this.armed_for.is_none_or(|armed| deadline < armed) {
                    this.timer.as_mut().reset(deadline);
                    this.armed_for = Some(deadline);
                }
                while this.timer.as_mut().poll(cx).is_ready() {
                    if Instant::now() >= deadline {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client sent no complete request in time, or stayed idle too long",
                        )));
                    }
                    this.timer.as_mut().reset(deadline);
                    this.armed_for = Some(deadline);
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
