//! The plain-HTTP listeners: the port-80 redirect to https and the admin
//! (metrics) listener, each answering every request itself.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::listener::{accept_loop, OpenConnections};
use super::settings::{Limits, Timeouts};
use crate::config::PublicUrl;
use crate::pages;

/// A plain-HTTP/1.1 listener answering every request with `answer`: the
/// port-80 redirect and the admin (metrics) listener.
pub async fn run_plain<F, A>(
    listener: TcpListener,
    timeouts: &Timeouts,
    limits: &Limits,
    shutdown: watch::Receiver<bool>,
    connections: &OpenConnections,
    answer: F,
) where
    F: Fn(Request<Incoming>) -> A + Send + Sync + 'static,
    A: Future<Output = Response<crate::Body>> + Send + 'static,
{
    let answer = Arc::new(answer);
    let header_read = timeouts.header_read;
    accept_loop(
        listener,
        Arc::new(Semaphore::new(limits.max_connections)),
        shutdown,
        connections,
        |tcp, peer, watcher, permit| {
            let answer = answer.clone();
            async move {
                let service = service_fn(move |req| {
                    let response = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(response.await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read)
                    .serve_connection(TokioIo::new(tcp), service);
                if let Err(e) = watcher.watch(connection).await {
                    tracing::debug!(%peer, error = %e, "plain connection ended with an error");
                }
                drop(permit);
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
    pages::redirect(StatusCode::PERMANENT_REDIRECT, &format!("{origin}{path}"))
}
