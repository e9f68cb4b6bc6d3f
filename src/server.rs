//! Accepting connections: a bounded accept loop (one semaphore permit per
//! connection), the TLS handshake under a deadline, HTTP/1.1 or HTTP/2 by
//! ALPN, the plain-HTTP redirect listener, and graceful shutdown.
//!
//! Shutdown is one mechanism used by both listeners: a `watch` channel
//! flips, the accept loops stop, and hyper-util's `GracefulShutdown` asks
//! every watched connection to finish its in-flight requests, bounded by
//! the configured grace period.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, PublicUrl};
use crate::gateway::Gateway;
use crate::pages;

/// HTTP/2 streams a client may reset before we stop accepting new ones
/// (rapid reset, RUSTSEC-2024-0003), and resets we may send on errors.
const MAX_PENDING_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listener's connections, drained together on shutdown.
pub struct Connections {
    graceful: GracefulShutdown,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            graceful: GracefulShutdown::new(),
        }
    }
}

impl Connections {
    /// Waits for in-flight requests to finish, at most `grace`.
    pub async fn drain(self, grace: Duration) {
        let open = self.graceful.count();
        tokio::select! {
            () = self.graceful.shutdown() => tracing::info!(connections = open, "all connections drained"),
            () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over; closing remaining connections"),
        }
    }
}

/// Accepts until `shutdown` flips, handing each connection to `serve`
/// with a permit that bounds how many are open at once.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
    connections: &Connections,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = serve(stream, peer, connections.graceful.watcher());
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
}

/// The HTTPS listener in front of the gateway.
pub struct TlsListener {
    pub listener: TcpListener,
    pub acceptor: TlsAcceptor,
    pub gateway: Arc<Gateway>,
    pub handshake_failures: Counter,
}

impl TlsListener {
    pub async fn run(
        self,
        config: &Config,
        shutdown: watch::Receiver<bool>,
        connections: &Connections,
    ) {
        let http1 = Arc::new(http_builder(config).http1_only());
        let http2 = Arc::new(http_builder(config).http2_only());
        let handshake_timeout = config.timeouts.tls_handshake;
        let header_read = config.timeouts.header_read;
        let TlsListener {
            listener,
            acceptor,
            gateway,
            handshake_failures,
        } = self;
        accept_loop(
            listener,
            config.limits.max_connections,
            shutdown,
            connections,
            |tcp, peer, watcher| {
                let acceptor = acceptor.clone();
                let gateway = gateway.clone();
                let (http1, http2) = (http1.clone(), http2.clone());
                let handshake_failures = handshake_failures.clone();
                async move {
                    let tls =
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                handshake_failures.inc();
                                return tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                handshake_failures.inc();
                                return tracing::debug!(%peer, "TLS handshake timed out");
                            }
                        };
                    // ALPN already chose the protocol, so no detection read
                    // (which has no deadline, hyper issue 3962) is needed.
                    let builder = match tls.get_ref().1.alpn_protocol() {
                        Some(b"h2") => http2,
                        _ => http1,
                    };
                    let service = service_fn(move |req| gateway.clone().handle(req, peer));
                    let io = FirstReadDeadline::new(tls, header_read);
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            },
        )
        .await;
    }
}

/// Closes a connection whose first bytes do not arrive in time. hyper
/// bounds an HTTP/1.1 request head (`header_read_timeout`) but not the
/// wait for an HTTP/2 client's connection preface, so a client could hold
/// a connection (and its permit) open by sending nothing after TLS.
struct FirstReadDeadline<T> {
    inner: T,
    /// Dropped once a byte has arrived.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> FirstReadDeadline<T> {
    fn new(inner: T, within: Duration) -> Self {
        FirstReadDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstReadDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.deadline = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the header read timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstReadDeadline<T> {
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

fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read)
        .max_buf_size(config.limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
    builder
}

/// A plain-HTTP/1.1 listener answering every request with `answer`: the
/// port-80 redirect and the admin (metrics) listener.
pub async fn run_plain<F>(
    listener: TcpListener,
    config: &Config,
    shutdown: watch::Receiver<bool>,
    connections: &Connections,
    answer: F,
) where
    F: Fn(&Request<Incoming>) -> Response<crate::Body> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let header_read = config.timeouts.header_read;
    accept_loop(
        listener,
        config.limits.max_connections,
        shutdown,
        connections,
        |tcp, peer, watcher| {
            let answer = answer.clone();
            async move {
                let service = service_fn(move |req| {
                    let response = answer(&req);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read)
                    .serve_connection(TokioIo::new(tcp), service);
                if let Err(e) = watcher.watch(connection).await {
                    tracing::debug!(%peer, error = %e, "plain connection ended with an error");
                }
            }
        },
    )
    .await;
}

/// The port-80 listener's answer: the same path on the https `public_url`
/// with 308, which keeps the method and body (a 301/302 would turn a
/// RustDesk client's POST into a GET). Always the configured origin, never
/// the request's `Host`, so the redirect cannot be pointed elsewhere.
pub fn redirect(origin: &PublicUrl, req: &Request<Incoming>) -> Response<crate::Body> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = format!("{origin}{path}");
    let mut response = Response::new(pages::full(""));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}
