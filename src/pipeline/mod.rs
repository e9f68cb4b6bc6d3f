//! The request path, top to bottom in [`Gateway::handle`]: strip identity
//! headers, the gateway's own endpoints, the sign-in callback, route,
//! authenticate, authorize, then forward with the identity added.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::AUTHORIZATION;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::{Access, Config};
use crate::identity::IdentityHeaders;
use crate::metrics::{Metrics, RouteMetrics};
use crate::oidc::Oidc;
use crate::pages;
use crate::proxy::{self, Peer, Proxy, ProxyError};
use crate::routes::{Route, Routes};
use crate::session::{LastCookie, Sessions};
use crate::signin::{append_cookies, Authenticated, Callback, SignIn};
use crate::Body;

/// One accepted connection, shared by the requests it carries.
pub struct Connection {
    pub peer: Peer,
    pub last_cookie: LastCookie,
}

impl Connection {
    /// `http2`: whether the connection speaks HTTP/2 (else HTTP/1.1).
    pub fn new(addr: SocketAddr, http2: bool) -> Arc<Connection> {
        Arc::new(Connection {
            peer: Peer::new(addr),
            last_cookie: LastCookie::new(http2),
        })
    }
}

#[derive(Clone)]
pub struct Gateway {
    routes: Routes,
    /// Requests to the gateway's own endpoints (`route="gateway"`).
    own_metrics: RouteMetrics,
    /// Sign-in callbacks the gateway answered (`route="sign-in"`).
    signin_metrics: RouteMetrics,
    proxy: Proxy,
    identity_headers: IdentityHeaders,
    /// `None` when every route is public.
    signin: Option<SignIn>,
    /// Paths under this prefix are the gateway's own (`/oauth2/` by default).
    own_prefix: String,
    /// Set when shutdown begins, so readiness fails and load balancers stop
    /// sending new requests while in-flight ones drain.
    draining: Arc<AtomicBool>,
}

impl Gateway {
    /// `oidc` is present exactly when the configuration has sign-in.
    pub fn new(
        config: &Config,
        oidc: Option<Arc<Oidc>>,
        metrics: Metrics,
    ) -> Result<Arc<Gateway>, crate::outbound::ClientError> {
        let signin = oidc.zip(config.session.as_ref()).map(|(oidc, session)| {
            SignIn::new(
                oidc,
                Sessions::new(session),
                config.public_url.clone(),
                config.gateway_prefix.clone(),
            )
        });
        Ok(Arc::new(Gateway {
            routes: Routes::new(&config.routes, &metrics),
            own_metrics: metrics.route("gateway"),
            signin_metrics: metrics.route("sign-in"),
            proxy: Proxy::new(config, metrics.websockets_active.clone())?,
            identity_headers: IdentityHeaders::new(&config.headers),
            signin,
            own_prefix: config.gateway_prefix.clone(),
            draining: Arc::default(),
        }))
    }

    /// A copy for one worker thread: the same routes, sessions, sign-in
    /// and metrics, but a connection pool to the upstreams of its own, so
    /// that a request and its upstream connection live on one thread.
    pub fn for_worker(&self) -> Arc<Gateway> {
        Arc::new(Gateway {
            proxy: self.proxy.with_own_pool(),
            ..self.clone()
        })
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        connection: Arc<Connection>,
    ) -> Result<Response<Body>, Infallible> {
        let peer = &connection.peer;
        let started = Instant::now();
        let mut req = req.map(|b| b.map_err(|e| -> crate::BoxError { Box::new(e) }).boxed());
        let request_id = proxy::request_id(req.headers());
        let html = pages::wants_html(req.headers());
        let seen = Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            started,
            id: request_id.to_str().unwrap_or_default(),
            peer: peer.addr,
        };
        let (method, path, id) = (&seen.method, seen.uri.path(), seen.id);
        let log = |route: &RouteMetrics, status| done(&seen, route, status);

        // 1. No client speaks for the user: identity headers are ours alone.
        self.identity_headers.strip(req.headers_mut());

        // 2. The gateway's own endpoints.
        if let Some(endpoint) = path.strip_prefix(&self.own_prefix) {
            let response = self.own_endpoint(endpoint, &req, html, id);
            log(&self.own_metrics, response.status());
            return Ok(response);
        }

        // 3. The sign-in callback, unless it belongs to the console.
        if let Some(signin) = self.signin.as_ref().filter(|s| s.is_callback(path)) {
            // Boxed, as the provider calls below are (see `SignIn::renew_if_due`).
            match Box::pin(signin.callback(req, html, id)).await {
                Callback::Answered(response) => {
                    log(&self.signin_metrics, response.status());
                    return Ok(response);
                }
                // The console's own sign-in (RustDesk Pro's OIDC login):
                // its browser has no gateway session, and needs none.
                Callback::NotOurs(passed) => {
                    let route = self.routes.find(path);
                    let response = self
                        .forward(passed, route, peer, &request_id, html, id)
                        .await;
                    log(&route.metrics, response.status());
                    return Ok(response);
                }
            }
        }

        // 4. Route; 5. authenticate where the route needs it.
        let route = self.routes.find(path);
        let mut cookies = Vec::new();
        let needs_sign_in = match route.access {
            Access::Public => false,
            Access::Protected => true,
            // The console checks its own tokens; CORS preflights carry none.
            Access::UpstreamToken => {
                !(method == Method::OPTIONS || req.headers().contains_key(AUTHORIZATION))
            }
        };
        // An API route never redirects (a client would follow it to an
        // HTML page, a POST would become a GET): it answers 401 JSON.
        let redirects = html && route.access == Access::Protected;
        if needs_sign_in {
            let Some(signin) = &self.signin else {
                let response = pages::problem(pages::UNAUTHENTICATED, false, id);
                log(&route.metrics, response.status());
                return Ok(response);
            };
            let authenticated = match signin
                .authenticate(req.headers(), &connection.last_cookie)
                .await
            {
                Ok(authenticated) => authenticated,
                Err(rejected) => {
                    let response = match rejected {
                        Some(error) => signin.invalid_bearer(&error, id),
                        None => {
                            Box::pin(signin.challenge(
                                method,
                                req.uri(),
                                req.headers(),
                                redirects,
                                id,
                            ))
                            .await
                        }
                    };
                    log(&route.metrics, response.status());
                    return Ok(response);
                }
            };
            let identity = authenticated.identity();
            // 6. Authorize.
            if let Err(denial) = route.policy.check(&identity) {
                let response = signin.forbidden(&identity, &route.prefix, &denial, html, id);
                log(&route.metrics, response.status());
                return Ok(response);
            }
            // 7. Tell the upstream who it is. The header map grows once
            // for these and the forwarding headers, not at each step.
            req.headers_mut()
                .reserve(self.identity_headers.count() + proxy::HEADERS_ADDED);
            match &authenticated {
                Authenticated::Session { session, renewed } => {
                    // Before the gateway's cookies leave the request: a
                    // shrunk session must clear the chunks the browser
                    // still holds.
                    cookies = signin.session_cookies(session, *renewed, req.headers());
                    self.identity_headers
                        .inject_id_token(req.headers_mut(), &session.id_token);
                    session
                        .identity_headers
                        .get_or_init(|| self.identity_headers.values(&identity))
                        .apply(req.headers_mut());
                }
                Authenticated::Bearer(_) => {
                    self.identity_headers.inject(req.headers_mut(), &identity)
                }
            }
            signin.strip_own_cookies(req.headers_mut(), &connection.last_cookie);
        }

        // 8. Forward.
        let mut response = self.forward(req, route, peer, &request_id, html, id).await;
        append_cookies(&mut response, cookies);
        log(&route.metrics, response.status());
        Ok(response)
    }

    async fn forward(
        &self,
        req: Request<Body>,
        route: &Route,
        peer: &Peer,
        request_id: &http::HeaderValue,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        match self.proxy.forward(req, route, peer, request_id).await {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "upstream request failed");
                let problem = match e {
                    ProxyError::Connect { .. } => pages::UPSTREAM_UNREACHABLE,
                    ProxyError::Failed { .. } => pages::UPSTREAM_FAILED,
                    ProxyError::Timeout { .. } => pages::UPSTREAM_TIMEOUT,
                };
                pages::problem(problem, html, id)
            }
        }
    }

    /// `ping` answers while the process lives; `ready` only while it
    /// accepts new work and sign-in can start.
    fn own_endpoint(
        &self,
        endpoint: &str,
        req: &Request<Body>,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let method = req.method();
        let readable = method == Method::GET || method == Method::HEAD;
        let draining = self.draining.load(Ordering::Relaxed);
        let signin_ready = self.signin.as_ref().is_none_or(SignIn::is_ready);
        match (endpoint, &self.signin) {
            ("ping", _) if readable => {
                pages::json(StatusCode::OK, serde_json::json!({ "status": "ok" }))
            }
            ("ready", _) if readable && !draining && signin_ready => {
                pages::json(StatusCode::OK, serde_json::json!({ "ready": true }))
            }
            ("ready", _) if readable && draining => pages::problem(pages::DRAINING, html, id),
            ("ready", _) if readable => pages::problem(pages::PROVIDER_NOT_READY, html, id),
            ("sign_out", Some(signin)) => signin.sign_out(method, req.headers(), html, id),
            ("signed_out", Some(signin)) if readable => signin.signed_out_page(html, id),
            _ => pages::problem(pages::NOT_FOUND, html, id),
        }
    }
}

/// What the per-request log line and metrics need of a request.
struct Seen<'a> {
    method: Method,
    /// Only its path is logged: queries can carry codes and tokens.
    uri: Uri,
    started: Instant,
    id: &'a str,
    peer: SocketAddr,
}

/// One log line and the metrics per request; latency is the time to
/// response headers.
fn done(seen: &Seen, route: &RouteMetrics, status: StatusCode) {
    let latency = seen.started.elapsed();
    tracing::info!(
        target: "authgate::access",
        method = %seen.method,
        path = seen.uri.path(),
        route = route.route.as_str(),
        status = status.as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        request_id = seen.id,
        peer = %seen.peer.ip(),
        "request"
    );
    route.record(status.as_u16(), latency);
}
