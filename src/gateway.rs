//! The request path, top to bottom in [`Gateway::handle`]: the gateway's
//! own endpoints, then route, then forward. Sign-in slots in between
//! routing and forwarding as the authenticate and authorize steps.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::Config;
use crate::pages;
use crate::proxy::{self, Proxy, ProxyError};
use crate::routes::Routes;
use crate::Body;

pub struct Gateway {
    routes: Routes,
    proxy: Proxy,
    /// Paths under this prefix are the gateway's own (`/oauth2/` by default).
    own_prefix: String,
    /// Set when shutdown begins, so readiness fails and load balancers stop
    /// sending new requests while in-flight ones drain.
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Arc<Gateway>, proxy::ClientError> {
        Ok(Arc::new(Gateway {
            routes: Routes::new(&config.routes),
            proxy: Proxy::new(config)?,
            own_prefix: config.gateway_prefix.clone(),
            draining: AtomicBool::new(false),
        }))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let request_id = proxy::request_id(req.headers());
        let id = request_id.to_str().unwrap_or_default().to_owned();
        let method = req.method().clone();
        // Only the path is logged: queries can carry codes and tokens.
        let path = req.uri().path().to_owned();
        let html = pages::wants_html(req.headers());

        if let Some(endpoint) = path.strip_prefix(&self.own_prefix) {
            let response = self.own_endpoint(endpoint, &method, html, &id);
            log_request(
                &method,
                &path,
                "gateway",
                response.status(),
                started,
                &id,
                peer,
            );
            return Ok(response);
        }

        let route = self.routes.find(&path);
        let response = match self
            .proxy
            .forward(req, &route.upstream, peer, &request_id)
            .await
        {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "upstream request failed");
                let problem = match e {
                    ProxyError::Connect { .. } => pages::UPSTREAM_UNREACHABLE,
                    ProxyError::Failed { .. } => pages::UPSTREAM_FAILED,
                    ProxyError::Timeout { .. } => pages::UPSTREAM_TIMEOUT,
                };
                pages::problem(problem, html, &id)
            }
        };
        log_request(
            &method,
            &path,
            &route.prefix,
            response.status(),
            started,
            &id,
            peer,
        );
        Ok(response)
    }

    /// `ping` answers while the process lives; `ready` only while it
    /// accepts new work.
    fn own_endpoint(
        &self,
        endpoint: &str,
        method: &Method,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let readable = method == Method::GET || method == Method::HEAD;
        match endpoint {
            "ping" if readable => {
                pages::json(StatusCode::OK, serde_json::json!({ "status": "ok" }))
            }
            "ready" if readable && !self.draining.load(Ordering::Relaxed) => {
                pages::json(StatusCode::OK, serde_json::json!({ "ready": true }))
            }
            "ready" if readable => pages::problem(pages::DRAINING, html, id),
            _ => pages::problem(pages::NOT_FOUND, html, id),
        }
    }
}

/// One line per request; upstream latency is the time to response headers.
fn log_request(
    method: &Method,
    path: &str,
    route: &str,
    status: StatusCode,
    started: Instant,
    request_id: &str,
    peer: SocketAddr,
) {
    tracing::info!(
        target: "authgate::access",
        method = %method,
        path,
        route,
        status = status.as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        request_id,
        peer = %peer.ip(),
        "request"
    );
}
