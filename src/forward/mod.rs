//! Forwarding one request to its upstream: hop-by-hop headers removed
//! (RFC 9110 §7.6.1), `X-Forwarded-*`/`Forwarded`/`X-Real-IP` set from the
//! peer we accepted, bodies streamed both ways over a pooled keep-alive
//! connection ([`crate::upstream`]), and protocol upgrades (WebSocket)
//! tunnelled ([`crate::tunnel`]) with hyper's own upgrade mechanism.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Config;
use crate::outbound::{self, ClientError};
use crate::routes::Route;
use crate::Body;
use crate::{tunnel, upstream};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Headers `forward` adds to a request: the forwarding five,
/// `X-Request-Id` and `Host` (HTTP/2 requests have none).
pub const HEADERS_ADDED: usize = 7;
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
    trusted_proxies: Vec<IpNet>,
    preserve_host: bool,
    response_timeout: Duration,
    websocket_idle: Duration,
}

impl Proxy {
    /// `websockets` counts the upgraded connections open.
    pub fn new(config: &Config, websockets: Gauge) -> Result<Proxy, ClientError> {
        let connector = outbound::connector(config.proxy.ca.as_deref(), &config.timeouts)?;
        Ok(Proxy {
            pool: upstream::Pool::new(connector, config.timeouts.idle),
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            preserve_host: config.proxy.preserve_host,
            response_timeout: config.timeouts.upstream_response,
            websocket_idle: config.timeouts.websocket_idle,
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
        // Boxed: inline, this future (a connection and its buffers'
        // state) made every request's future, which each client
        // connection keeps an allocation of, several KiB larger.
        let sent = Box::pin(self.pool.send(upstream, req, upgrade.is_some()));
        let mut response = match tokio::time::timeout(self.response_timeout, sent).await {
            Err(_) => {
                return Err(ProxyError::Timeout {
                    upstream: shown(),
                    after: self.response_timeout,
                })
            }
            Ok(Err(upstream::Error::Connect(message))) => {
                return Err(ProxyError::Connect {
                    upstream: shown(),
                    message,
                })
            }
            Ok(Err(upstream::Error::Failed(source))) => {
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

    /// The forwarding chain is only extended from trusted proxies; anyone
    /// else's `X-Forwarded-For`/`X-Real-IP` is replaced (hbbs and hbbr
    /// believe these headers, see RustDesk's nginx guide).
    fn set_forwarding_headers(
        &self,
        headers: &mut HeaderMap,
        peer: &Peer,
        host: Option<&HeaderValue>,
    ) {
        if self.is_trusted(peer.ip) {
            return self.extend_forwarding_headers(headers, peer, host);
        }
        // Values made once per connection: this is every request's path.
        headers.insert(&X_FORWARDED_FOR, peer.ip_text.clone());
        headers.insert(&X_REAL_IP, peer.ip_text.clone());
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set_forwarded_host(headers, host);
        set_owned(headers, &header::FORWARDED, peer.forwarded_element(host));
    }

    /// From a trusted proxy: its chain goes on, and the client is the
    /// nearest address in it that is not a trusted proxy.
    fn extend_forwarding_headers(
        &self,
        headers: &mut HeaderMap,
        peer: &Peer,
        host: Option<&HeaderValue>,
    ) {
        let chain: Vec<String> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let client_ip = chain
            .iter()
            .rev()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .find(|ip| !self.is_trusted(*ip))
            .unwrap_or(peer.ip);

        let mut xff = chain.join(", ");
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        xff.push_str(peer.ip_text.to_str().expect("an address is text"));
        set_owned(headers, &X_FORWARDED_FOR, xff);
        set_owned(headers, &X_REAL_IP, client_ip.to_string());
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            set_forwarded_host(headers, host);
        }
        let element = peer.forwarded_element(host);
        let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {element}"),
            None => element,
        };
        set_owned(headers, &header::FORWARDED, forwarded);
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

fn set_forwarded_host(headers: &mut HeaderMap, host: Option<&HeaderValue>) {
    match host {
        Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// Sets `name`, or removes it when `value` cannot be a header value.
fn set_owned(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        Ok(value) => headers.insert(name, value),
        Err(_) => headers.remove(name),
    };
}

/// The client end of an accepted connection, with what every request on
/// it tells the upstream about it made once.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    ip: IpAddr,
    ip_text: HeaderValue,
    /// `for=…;proto=https` of RFC 7239's `Forwarded`.
    forwarded_for: String,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let text = ip.to_string();
        // RFC 7239: IPv6 nodes are quoted and bracketed.
        let forwarded_for = match ip {
            IpAddr::V4(_) => format!("for={text};proto=https"),
            IpAddr::V6(_) => format!("for=\"[{text}]\";proto=https"),
        };
        Peer {
            addr,
            ip,
            ip_text: HeaderValue::from_str(&text).expect("an address is a header value"),
            forwarded_for,
        }
    }

    /// This hop's `Forwarded` element; hosts are quoted (RFC 7239).
    fn forwarded_element(&self, host: Option<&HeaderValue>) -> String {
        let host = host.and_then(|h| h.to_str().ok());
        let mut element =
            String::with_capacity(self.forwarded_for.len() + host.map_or(0, |h| h.len() + 8));
        element.push_str(&self.forwarded_for);
        if let Some(host) = host {
            element.push_str(";host=\"");
            element.push_str(host);
            element.push('"');
        }
        element
    }
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
    // Most messages carry none, or only `Connection: keep-alive`: looking
    // first saves a removal per name.
    let fixed = hop_by_hop();
    if !headers.keys().any(|k| fixed.contains(&k)) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !fixed.iter().any(|f| f.as_str().eq_ignore_ascii_case(t)))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(fixed) {
        headers.remove(name);
    }
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
            let mut text = uuid::Uuid::encode_buffer();
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            HeaderValue::from_str(text).expect("a UUID is a valid header value")
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
