//! Accepting connections: a bounded accept loop (one semaphore permit per
//! connection), the HTTPS worker threads, the TLS handshake under a
//! deadline, HTTP/1.1 or HTTP/2 by ALPN, and graceful shutdown.
//!
//! Shutdown is one mechanism used by every listener: a `watch` channel
//! flips, the accept loops stop, and hyper-util's `GracefulShutdown` asks
//! every watched connection to finish its in-flight requests, bounded by
//! the configured grace period.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::deadline::{Activity, ClientIo, Deadlines, InFlight, Tracked};
use super::http::http_builder;
use super::settings::{Limits, Timeouts};
use crate::pipeline::{Client, Gateway};
use crate::Body;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections the kernel queues per worker before they are accepted.
const LISTEN_BACKLOG: i32 = 1024;

/// A listener's connections, drained together on shutdown.
pub struct OpenConnections {
    graceful: GracefulShutdown,
}

impl Default for OpenConnections {
    fn default() -> Self {
        OpenConnections {
            graceful: GracefulShutdown::new(),
        }
    }
}

impl OpenConnections {
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
/// with one of `permits`, which bound how many are open at once; the
/// connection holds its permit until it is dropped.
pub(super) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    connections: &OpenConnections,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
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
        tokio::spawn(serve(stream, peer, connections.graceful.watcher(), permit));
    }
}

/// Binds `count` sockets to `addr` with `SO_REUSEPORT`, one per worker
/// thread: the kernel spreads new connections across them, as with
/// nginx's `reuseport` workers.
pub fn bind_workers(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    // A plain bind first, so that a second gateway on the same port fails
    // with "address in use" instead of silently joining this one's group.
    // It also resolves port 0 to the one port every worker then shares.
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    (0..count)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket.into())
        })
        .collect()
}

/// The HTTPS side of the gateway, before it runs.
pub struct TlsListener {
    pub acceptor: TlsAcceptor,
    pub gateway: Arc<Gateway>,
    pub handshake_failures: Counter,
}

/// The worker threads serving HTTPS.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TlsListener {
    /// Starts one worker thread per listener. Each runs a single-threaded
    /// runtime that serves its connections from handshake to upstream
    /// response with its own upstream connections, so a request never
    /// crosses threads: on the multi-threaded scheduler the hand-offs
    /// between threads cost more than the proxying.
    /// The workers accept until `shutdown` flips, then drain.
    pub fn start(
        self,
        listeners: Vec<std::net::TcpListener>,
        timeouts: &Timeouts,
        limits: &Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Workers, crate::StartError> {
        let builder = http_builder(limits);
        let http1 = Arc::new(builder.clone().http1_only());
        let http2 = Arc::new(builder.http2_only());
        // Each worker has permits of its own, as nginx's worker_connections:
        // a permit shared by all and taken before `accept` could wait on
        // one worker's socket while a connection waited on another's.
        let per_worker = limits.max_connections.div_ceil(listeners.len().max(1));
        let mut threads = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(crate::StartError::Workers)?;
            runtime.spawn(crate::ops::memory::collect_periodically());
            let listener = {
                let _entered = runtime.enter();
                TcpListener::from_std(listener).map_err(crate::StartError::Workers)?
            };
            let worker = Worker {
                acceptor: self.acceptor.clone(),
                gateway: self.gateway.for_worker(),
                handshake_failures: self.handshake_failures.clone(),
                http1: http1.clone(),
                http2: http2.clone(),
                handshake_timeout: timeouts.tls_handshake,
                deadlines: Deadlines {
                    header_read: timeouts.header_read,
                    client_idle: timeouts.client_idle,
                },
                grace: timeouts.shutdown_grace,
            };
            let shutdown = shutdown.clone();
            let permits = Arc::new(Semaphore::new(per_worker));
            let thread = std::thread::Builder::new()
                .name(format!("authgate-worker-{index}"))
                .spawn(move || runtime.block_on(worker.run(listener, permits, shutdown)))
                .map_err(crate::StartError::Workers)?;
            threads.push(thread);
        }
        Ok(Workers { threads })
    }
}

impl Workers {
    /// Waits until every worker has drained its connections.
    pub async fn finished(self) {
        let joined = tokio::task::spawn_blocking(move || {
            self.threads
                .into_iter()
                .map(|t| t.join())
                .filter(Result::is_err)
                .count()
        })
        .await;
        if !matches!(joined, Ok(0)) {
            tracing::error!("a worker thread panicked");
        }
    }
}

/// One worker thread's share of the HTTPS listener.
struct Worker {
    acceptor: TlsAcceptor,
    gateway: Arc<Gateway>,
    handshake_failures: Counter,
    http1: Arc<auto::Builder<TokioExecutor>>,
    http2: Arc<auto::Builder<TokioExecutor>>,
    handshake_timeout: Duration,
    deadlines: Deadlines,
    grace: Duration,
}

impl Worker {
    async fn run(
        self,
        listener: TcpListener,
        permits: Arc<Semaphore>,
        shutdown: watch::Receiver<bool>,
    ) {
        let connections = OpenConnections::default();
        let grace = self.grace;
        let worker = Arc::new(self);
        accept_loop(
            listener,
            permits,
            shutdown,
            &connections,
            |tcp, peer, watcher, permit| worker.clone().serve(tcp, peer, watcher, permit),
        )
        .await;
        connections.drain(grace).await;
    }

    async fn serve(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        watcher: Watcher,
        permit: OwnedSemaphorePermit,
    ) {
        let tls =
            match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    self.handshake_failures.inc();
                    return tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    self.handshake_failures.inc();
                    return tracing::debug!(%peer, "TLS handshake timed out");
                }
            };
        let alpn = tls.get_ref().1.alpn_protocol();
        if alpn == Some(super::tls::ACME_TLS_ALPN) {
            // A CA's validation: it has seen the certificate and closes.
            return;
        }
        // ALPN already chose the protocol, so no detection read (which has
        // no deadline, hyper issue 3962) is needed.
        let http2 = alpn == Some(b"h2");
        let gateway = self.gateway.clone();
        let client = Client::new(peer, http2);
        let activity = Activity::new();
        let io = TokioIo::new(ClientIo::new(
            tls,
            activity.clone(),
            self.deadlines,
            http2,
            permit,
        ));
        let ended = if http2 {
            // hyper spawns a task per HTTP/2 request and moves the request's
            // future (~2.4 KB) on the way in; boxed, only a pointer moves.
            // HTTP/1.1 keeps a request's future in place: a box would only
            // add an allocation.
            let service = service_fn(move |req| {
                let in_flight = activity.request();
                Box::pin(tracked(
                    gateway.clone().handle(req, client.clone()),
                    in_flight,
                ))
            });
            let connection = self.http2.serve_connection_with_upgrades(io, service);
            watcher.watch(connection.into_owned()).await
        } else {
            let service = service_fn(move |req| {
                let in_flight = activity.request();
                tracked(gateway.clone().handle(req, client.clone()), in_flight)
            });
            let connection = self.http1.serve_connection_with_upgrades(io, service);
            watcher.watch(connection.into_owned()).await
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// The response to a request, its body keeping the request in flight for
/// the connection's deadlines; a switch of protocols hands the connection
/// to the tunnel.
async fn tracked(
    answered: impl Future<Output = Result<http::Response<Body>, Infallible>>,
    in_flight: InFlight,
) -> Result<http::Response<Tracked>, Infallible> {
    let response = answered.await?;
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        in_flight.upgraded();
    }
    Ok(response.map(|body| Tracked::new(body, in_flight)))
}
