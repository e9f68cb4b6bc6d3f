//! Forwarding: the route table (`routes`), the request's hop headers
//! (`headers`), bodies streamed both ways over a pooled keep-alive
//! connection (`upstream`), and protocol upgrades (WebSocket) tunnelled
//! (`tunnel`) with hyper's own upgrade mechanism.

pub(crate) mod headers;
pub mod routes;
mod tunnel;
pub(crate) mod upstream;

use ipnet::IpNet;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use self::headers::{
    join_cookie_fields, remove_hop_by_hop, upgrade_protocol, Forwarding, Peer, X_REQUEST_ID,
};
use self::routes::Route;
use crate::net::Timeouts;
use crate::outbound::{self, ClientError};
use crate::Body;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub ca: Option<PathBuf>,
    pub trusted_proxies: Vec<IpNet>,
    pub preserve_host: bool,
    /// Direct unless `outbound.proxy_upstreams`.
    pub egress: outbound::Egress,
}

pub use self::headers::{remove_connection_named, HEADERS_ADDED};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot connect to upstream {upstream}: {message}")]
    Connect { upstream: String, message: String },
    #[error("upstream {upstream} failed: {source}")]
    Failed {
        upstream: String,
        source: hyper::Error,
    },
    #[error("upstream {upstream} sent no response headers within {after:?}")]
    Timeout { upstream: String, after: Duration },
}

#[derive(Clone)]
pub struct Proxy {
    websockets: Gauge,
    pool: upstream::Pool,
    forwarding: Forwarding,
    preserve_host: bool,
    response_timeout: Duration,
    websocket_idle: Duration,
}

impl Proxy {
    /// `websockets` counts the upgraded connections open.
    pub fn new(
        settings: &ProxyConfig,
        timeouts: &Timeouts,
        websockets: Gauge,
    ) -> Result<Proxy, ClientError> {
        let connector = outbound::connector(settings.ca.as_deref(), timeouts, &settings.egress)?;
        Ok(Proxy {
            pool: upstream::Pool::new(connector, timeouts.idle),
            forwarding: Forwarding {
                trusted_proxies: settings.trusted_proxies.clone(),
            },
            preserve_host: settings.preserve_host,
            response_timeout: timeouts.upstream_response,
            websocket_idle: timeouts.websocket_idle,
            websockets,
        })
    }

    /// The same proxy with a connection pool of its own.
    pub fn with_own_pool(&self) -> Proxy {
        Proxy {
            pool: self.pool.empty_copy(),
            ..self.clone()
        }
    }

    /// Sends `req` to the route's upstream and returns its response, with
    /// an upgraded connection (WebSocket) tunnelled in the background.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        route: &Route,
        peer: &Peer,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrade = upgrade_protocol(&req);
        let client_upgraded = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Grown once here rather than at each insert below (a no-op when
        // the gateway made room for the identity headers too).
        parts.headers.reserve(HEADERS_ADDED);

        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let keeps_trailers = parts.headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        remove_hop_by_hop(&mut parts.headers);
        join_cookie_fields(&mut parts.headers);
        if keeps_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        self.forwarding.set(&mut parts.headers, peer, host.as_ref());
        parts.headers.insert(&X_REQUEST_ID, request_id.clone());
        let sent_host = match (&host, self.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => route.upstream_host.clone(),
        };
        parts.headers.insert(header::HOST, sent_host);
        // HTTP/2 clients are served over HTTP/1.1 to the upstream, the
        // protocol consoles and WebSocket upgrades speak.
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);

        let upstream = &route.upstream;
        let shown = || upstream.to_string();
        let deadline = Instant::now() + self.response_timeout;
        // Boxed: inline, this future would make every request's future,
        // which each client connection keeps an allocation of, larger.
        let sent = Box::pin(self.pool.send(upstream, req, upgrade.is_some(), deadline));
        let mut response = match sent.await {
            Err(upstream::Error::TimedOut) => {
                return Err(ProxyError::Timeout {
                    upstream: shown(),
                    after: self.response_timeout,
                })
            }
            Err(upstream::Error::Connect(message)) => {
                return Err(ProxyError::Connect {
                    upstream: shown(),
                    message,
                })
            }
            Err(upstream::Error::Failed(source)) => {
                return Err(ProxyError::Failed {
                    upstream: shown(),
                    source,
                })
            }
            Ok(response) => response,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgraded) = client_upgraded {
                let upstream_upgraded = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel::run(
                    client_upgraded,
                    upstream_upgraded,
                    self.websockets.clone(),
                    self.websocket_idle,
                ));
            }
        } else {
            remove_hop_by_hop(response.headers_mut());
        }
        // Never indexed by HPACK (RFC 7541 §6.2.3): values that change
        // with every response (the request id) or every second (`Date`)
        // would only fill an HTTP/2 connection's header table, and h2's
        // encoder compares each response's value with every entry of that
        // name there.
        let mut id = request_id.clone();
        id.set_sensitive(true);
        response.headers_mut().insert(&X_REQUEST_ID, id);
        if let Some(date) = response.headers_mut().get_mut(header::DATE) {
            date.set_sensitive(true);
        }
        Ok(response.map(|b| b.map_err(Into::into).boxed()))
    }
}
