//! The request path, top to bottom in [`Gateway::handle`]: the canonical
//! target, strip identity headers, the gateway's own endpoints, the
//! host, the sign-in callback, route, authenticate, authorize, then
//! forward with the identity added; one access-log line per request.

mod access_log;
mod endpoints;
mod forward_auth;
mod host;
pub mod target;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, STRICT_TRANSPORT_SECURITY};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use self::access_log::Seen;
use self::host::{Hosts, Verdict};
use crate::auth::assertion::Assertions;
use crate::auth::easy_auth::Tokens;
use crate::auth::identity::IdentityHeaders;
use crate::auth::policy::Denial;
use crate::auth::session::{LastCookie, Sessions};
use crate::auth::signin::{Callback, SignIn};
use crate::auth::{self, Authenticated};
use crate::config::Config;
use crate::forward::headers::{self, Peer};
use crate::forward::routes::{Route, Routes};
use crate::forward::{self, Proxy, ProxyError};
use crate::idp::Oidc;
use crate::ops::metrics::{Metrics, Outcomes, RouteMetrics};
use crate::pages;
use crate::Body;

/// The client end of one accepted connection, shared by the requests it
/// carries.
pub struct Client {
    pub peer: Peer,
    pub last_cookie: LastCookie,
}

impl Client {
    /// `http2`: whether the connection speaks HTTP/2 (else HTTP/1.1).
    pub fn new(addr: SocketAddr, http2: bool) -> Arc<Client> {
        Arc::new(Client {
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
    gateway_prefix: String,
    /// Set when shutdown begins, so readiness fails and load balancers stop
    /// sending new requests while in-flight ones drain.
    draining: Arc<AtomicBool>,
    /// `Strict-Transport-Security` for every response without its own.
    hsts: Option<HeaderValue>,
    hosts: Arc<Hosts>,
    /// Proxies whose forward-auth questions are answered (and loopback).
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Signs identity assertions, when `headers.assertion` is on.
    assertions: Option<Arc<Assertions>>,
    /// Forward-auth verdicts, by outcome.
    forward_auths: Outcomes,
}

impl Gateway {
    /// `oidc` and `sessions` are present exactly when the configuration
    /// has sign-in.
    pub fn new(
        config: &Config,
        oidc: Option<Arc<Oidc>>,
        sessions: Option<Sessions>,
        assertions: Option<Arc<Assertions>>,
        metrics: Metrics,
    ) -> Result<Arc<Gateway>, crate::outbound::ClientError> {
        let signin = oidc.zip(sessions).map(|(oidc, sessions)| {
            SignIn::new(
                oidc,
                sessions,
                config.public_url.clone(),
                config.gateway_prefix.clone(),
                // A body the gateway reads itself: as quick as a head.
                config.timeouts.header_read,
                config.headers.easy_auth && config.headers.easy_auth_tokens,
            )
        });
        Ok(Arc::new(Gateway {
            routes: Routes::new(&config.routes, &metrics),
            own_metrics: metrics.route("gateway"),
            signin_metrics: metrics.route("sign-in"),
            proxy: Proxy::new(
                &config.proxy,
                &config.timeouts,
                metrics.websockets_active.clone(),
            )?,
            identity_headers: IdentityHeaders::new(&config.headers),
            signin,
            gateway_prefix: config.gateway_prefix.clone(),
            draining: Arc::default(),
            hsts: config.tls.hsts.clone(),
            hosts: Arc::new(Hosts::new(config)),
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            assertions,
            forward_auths: metrics.forward_auths.clone(),
        }))
    }

    /// A copy for one worker thread: the same routes, sessions and
    /// sign-in, but a connection pool to the upstreams of its own, so that
    /// a request and its upstream connection live on one thread, and
    /// request metrics it counts apart.
    pub fn for_worker(&self) -> Arc<Gateway> {
        Arc::new(Gateway {
            proxy: self.proxy.with_own_pool(),
            routes: self.routes.for_worker(),
            own_metrics: self.own_metrics.for_worker(),
            signin_metrics: self.signin_metrics.for_worker(),
            hsts: self.hsts.as_ref().map(headers::own_copy),
            ..self.clone()
        })
    }

    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Arc<Client>,
    ) -> Result<Response<Body>, Infallible> {
        let mut response = self.answer(req, &client).await;
        if let Some(hsts) = &self.hsts {
            response
                .headers_mut()
                .entry(STRICT_TRANSPORT_SECURITY)
                .or_insert_with(|| hsts.clone());
        }
        Ok(response)
    }

    /// Every step of the request path, top to bottom.
    async fn answer(&self, req: Request<Incoming>, client: &Client) -> Response<Body> {
        let mut req = req.map(|b| b.map_err(|e| -> crate::BoxError { Box::new(e) }).boxed());
        let request_id = headers::request_id(req.headers());
        let html = pages::wants_html(req.headers());
        // 1. One target: the path routed, judged and forwarded is the same.
        let refused = target::canonicalize(req.uri_mut()).err();
        let seen = Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            started: Instant::now(),
            id: request_id.to_str().unwrap_or_default(),
            peer: client.peer.addr,
        };
        let (path, id) = (seen.uri.path(), seen.id);
        if let Some(refused) = refused {
            tracing::info!(request_id = id, reason = %refused, "request refused");
            let response = pages::problem(pages::AMBIGUOUS_PATH, html, id);
            seen.done(&self.own_metrics, response.status());
            return response;
        }

        // 2. No client speaks for the user: identity headers are ours
        // alone, and nothing the client names in `Connection` can remove
        // the ones the gateway adds.
        headers::remove_connection_named(req.headers_mut());
        self.identity_headers.strip(req.headers_mut());

        // 3. The gateway's own endpoints, and App Service's when on.
        if let Some(endpoint) = path.strip_prefix(&self.gateway_prefix) {
            let response = Box::pin(self.own_endpoint(endpoint, req, client, html, id)).await;
            seen.done(&self.own_metrics, response.status());
            return response;
        }
        if let Some(endpoint) = path
            .strip_prefix("/.auth/")
            .filter(|_| self.identity_headers.easy_auth.is_some())
        {
            let response = Box::pin(self.easy_auth_endpoint(endpoint, req, client, html, id)).await;
            seen.done(&self.own_metrics, response.status());
            return response;
        }

        // 4. Only the gateway's own host names reach the upstream.
        if self.hosts.judge(&mut req) == Verdict::Misdirected {
            let response = pages::problem(pages::MISDIRECTED, html, id);
            seen.done(&self.own_metrics, response.status());
            return response;
        }

        // 5. The sign-in callback, unless it belongs to the console.
        if let Some(signin) = self.signin.as_ref().filter(|s| s.is_callback(path)) {
            // Boxed, as the provider calls below are (see `SignIn::renew_if_due`).
            match Box::pin(signin.callback(req, html, id)).await {
                Callback::Answered(response) => {
                    seen.done(&self.signin_metrics, response.status());
                    return response;
                }
                // The console's own sign-in (RustDesk Pro's OIDC login):
                // its browser has no gateway session, and needs none.
                Callback::NotOurs(passed) => {
                    let route = self.routes.find(path);
                    let response = self
                        .forward(passed, route, client, &request_id, html, id)
                        .await;
                    seen.done(&route.metrics, response.status());
                    return response;
                }
            }
        }

        // 6. Route.
        let route = self.routes.find(path);

        // 7. Authenticate where the route needs it.
        let signin = self.signin.as_ref();
        let caller =
            match auth::authenticate(signin, route.access, &req, &client.last_cookie, html, id)
                .await
            {
                Ok(caller) => caller,
                Err(response) => {
                    seen.done(&route.metrics, response.status());
                    return response;
                }
            };

        let mut cookies = Vec::new();
        if let (Some(caller), Some(signin)) = (caller, signin) {
            let identity = caller.authenticated.identity();
            // 8. Authorize.
            if let Err(denial) = signin.authorize(&route.policy, &identity) {
                let response = match denial {
                    Denial::StepUp(acrs) => {
                        let session = matches!(caller.authenticated, Authenticated::Session(_));
                        let browser = (html && session).then(|| (req.method(), req.uri()));
                        Box::pin(signin.step_up(&identity, acrs, browser, id)).await
                    }
                    denial => signin.forbidden(&identity, &route.prefix, &denial, html, id),
                };
                seen.done(&route.metrics, response.status());
                return response;
            }
            // 9. Tell the upstream who it is. The header map grows once
            // for these and the forwarding headers, not at each step.
            req.headers_mut()
                .reserve(self.identity_headers.count() + forward::HEADERS_ADDED);
            self.tell_identity(
                req.headers_mut(),
                &caller.authenticated,
                &identity,
                route,
                &client.last_cookie,
            );
            cookies = caller.cookies;
        }

        // 10. Forward.
        let mut response = self
            .forward(req, route, client, &request_id, html, id)
            .await;
        pages::append_cookies(&mut response, cookies);
        seen.done(&route.metrics, response.status());
        response
    }

    /// Sets the identity headers of `authenticated` (whose identity is
    /// `identity`) in `headers`, for `route`'s upstream, and the signed
    /// assertion when on; `last` is the connection's last cookie.
    fn tell_identity(
        &self,
        headers: &mut http::HeaderMap,
        authenticated: &Authenticated,
        identity: &auth::identity::Identity,
        route: &Route,
        last: &LastCookie,
    ) {
        let assertion = match authenticated {
            Authenticated::Session(session) => {
                self.identity_headers
                    .inject_id_token(headers, &session.id_token);
                let build = || {
                    let tokens = Tokens {
                        claims_of: &session.id_token,
                        id_token: Some(&session.id_token),
                        access_token: session.access_token.as_deref(),
                    };
                    self.identity_headers.values(identity, &tokens)
                };
                last.tell_identity(session, build, headers);
                self.assertions
                    .as_ref()
                    .and_then(|a| a.for_session(&session.assertion, identity, &route.origin))
            }
            Authenticated::Bearer { token, .. } => {
                let tokens = Tokens {
                    claims_of: token,
                    id_token: None,
                    access_token: Some(token),
                };
                self.identity_headers.inject(headers, identity, &tokens);
                self.assertions
                    .as_ref()
                    .and_then(|a| a.once(identity, &route.origin))
            }
        };
        if let Some(assertion) = assertion {
            headers.insert(self.identity_headers.assertion.clone(), assertion);
        }
    }

    /// Forwards `req`, without the gateway's own cookies whatever the
    /// route: they carry a whole session, which no upstream may replay.
    async fn forward(
        &self,
        mut req: Request<Body>,
        route: &Route,
        client: &Client,
        request_id: &http::HeaderValue,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        if let Some(signin) = &self.signin {
            signin.strip_own_cookies(req.headers_mut(), &client.last_cookie);
        }
        match self
            .proxy
            .forward(req, route, &client.peer, request_id)
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
                pages::problem(problem, html, id)
            }
        }
    }
}
