//! Forwarding one request to its upstream: hop-by-hop headers removed
//! (RFC 9110 §7.6.1), `X-Forwarded-*`/`Forwarded`/`X-Real-IP` set from the
//! peer we accepted, bodies streamed both ways through a pooled keep-alive
//! client, and protocol upgrades (WebSocket) tunnelled with hyper's own
//! upgrade mechanism.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::{Config, Timeouts, UpstreamUrl};
use crate::outbound::{self, ClientError, Connector, HttpClient};
use crate::Body;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never the message (RFC 9110
/// §7.6.1, plus the legacy `Keep-Alive`/`Proxy-Connection` and the
/// proxy-auth pair that is addressed to us, as Go's and nginx's proxies do).
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        upstream: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream {upstream} failed: {source}")]
    Failed {
        upstream: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream {upstream} sent no response headers within {after:?}")]
    Timeout { upstream: String, after: Duration },
}

#[derive(Clone)]
pub struct Proxy {
    websockets: Gauge,
    /// Kept to give each worker a pool of its own without reading the CA
    /// file again.
    connector: Connector,
    client: HttpClient,
    trusted_proxies: Vec<IpNet>,
    preserve_host: bool,
    timeouts: Timeouts,
}

impl Proxy {
    /// `websockets` counts the upgraded connections open.
    pub fn new(config: &Config, websockets: Gauge) -> Result<Proxy, ClientError> {
        let connector = outbound::connector(config.proxy.ca.as_deref(), &config.timeouts)?;
        Ok(Proxy {
            client: outbound::pooled(connector.clone(), &config.timeouts),
            connector,
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            preserve_host: config.proxy.preserve_host,
            timeouts: config.timeouts,
            websockets,
        })
    }

    /// The same proxy with a connection pool of its own.
    pub fn with_own_pool(&self) -> Proxy {
        Proxy {
            client: outbound::pooled(self.connector.clone(), &self.timeouts),
            ..self.clone()
        }
    }

    /// Sends `req` to `upstream` and returns its response, with an upgraded
    /// connection (WebSocket) tunnelled in the background.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        upstream: &UpstreamUrl,
        peer: SocketAddr,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrade = upgrade_protocol(&req);
        let client_upgraded = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

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
        self.set_forwarding_headers(&mut parts.headers, peer, host.as_ref());
        parts.headers.insert(&X_REQUEST_ID, request_id.clone());
        match (&host, self.preserve_host) {
            (Some(host), true) => {
                parts.headers.insert(header::HOST, host.clone());
            }
            _ => {
                // The client sets `Host` from the URI when none is present.
                parts.headers.remove(header::HOST);
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(path)
            .build()
            .expect("scheme, authority and path were each valid already");
        // HTTP/2 clients are served over HTTP/1.1 to the upstream, the
        // protocol consoles and WebSocket upgrades speak.
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);

        let shown = || upstream.to_string();
        let mut response =
            match tokio::time::timeout(self.timeouts.upstream_response, self.client.request(req))
                .await
            {
                Err(_) => {
                    return Err(ProxyError::Timeout {
                        upstream: shown(),
                        after: self.timeouts.upstream_response,
                    })
                }
                Ok(Err(source)) if source.is_connect() => {
                    return Err(ProxyError::Connect {
                        upstream: shown(),
                        source,
                    })
                }
                Ok(Err(source)) => {
                    return Err(ProxyError::Failed {
                        upstream: shown(),
                        source,
                    })
                }
                Ok(Ok(response)) => response,
            };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgraded) = client_upgraded {
                let upstream_upgraded = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(
                    client_upgraded,
                    upstream_upgraded,
                    self.websockets.clone(),
                ));
            }
        } else {
            remove_hop_by_hop(response.headers_mut());
        }
        response
            .headers_mut()
            .insert(&X_REQUEST_ID, request_id.clone());
        Ok(response.map(|b| b.map_err(Into::into).boxed()))
    }

    /// The forwarding chain is only extended from trusted proxies; anyone
    /// else's `X-Forwarded-For`/`X-Real-IP` is replaced (hbbs and hbbr
    /// believe these headers, see RustDesk's nginx guide).
    fn set_forwarding_headers(
        &self,
        headers: &mut HeaderMap,
        peer: SocketAddr,
        host: Option<&HeaderValue>,
    ) {
        let peer_ip = peer.ip().to_canonical();
        let trusted = self.is_trusted(peer_ip);
        let chain: Vec<String> = if trusted {
            headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        // The client is the nearest address that is not a trusted proxy.
        let client_ip = chain
            .iter()
            .rev()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .find(|ip| !self.is_trusted(*ip))
            .filter(|_| trusted)
            .unwrap_or(peer_ip);

        let peer_text = peer_ip.to_string();
        let mut xff = chain.join(", ");
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        xff.push_str(&peer_text);
        set(headers, &X_FORWARDED_FOR, &xff);
        if client_ip == peer_ip {
            set(headers, &X_REAL_IP, &peer_text);
        } else {
            set(headers, &X_REAL_IP, &client_ip.to_string());
        }

        if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
            match host {
                Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
                None => headers.remove(&X_FORWARDED_HOST),
            };
        }
        // RFC 7239: IPv6 nodes are quoted and bracketed, hosts quoted.
        let mut element = match peer_ip {
            IpAddr::V4(_) => format!("for={peer_text};proto=https"),
            IpAddr::V6(_) => format!("for=\"[{peer_text}]\";proto=https"),
        };
        if let Some(host) = host.and_then(|h| h.to_str().ok()) {
            element.push_str(&format!(";host=\"{host}\""));
        }
        let earlier = trusted
            .then(|| {
                headers
                    .get(header::FORWARDED)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .flatten();
        let forwarded = match earlier {
            Some(earlier) => format!("{earlier}, {element}"),
            None => element,
        };
        set(headers, &header::FORWARDED, &forwarded);
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(value) => headers.insert(name, value),
        Err(_) => headers.remove(name),
    };
}

/// `Some(protocol)` when an HTTP/1.1 request asks to switch protocols
/// (`Connection: upgrade` + `Upgrade: <protocol>`).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    (asks && req.version() == Version::HTTP_11)
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the fixed hop-by-hop headers and every header that
/// `Connection` names (RFC 9110 §7.6.1).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(hop_by_hop()) {
        headers.remove(name);
    }
}

async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    open: Gauge,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    open.inc();
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed with an error");
    }
    open.dec();
}

/// A request id the client sent is passed on when it is short and made of
/// safe characters (it ends up in logs and pages); otherwise a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .expect("a UUID is a valid header value")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_and_fixed_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, close"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn unsafe_request_ids_are_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("<script>"));
        assert_ne!(request_id(&headers), "<script>");
    }
}
