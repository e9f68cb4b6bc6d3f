//! The headers a forwarded request carries about its hops: hop-by-hop
//! headers removed (RFC 9110 §7.6.1), `X-Forwarded-*`/`Forwarded`/
//! `X-Real-IP` set from the peer we accepted, and the request id.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Version};
use ipnet::IpNet;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Headers `forward` adds to a request: the forwarding five,
/// `X-Request-Id` and `Host` (HTTP/2 requests have none).
pub const HEADERS_ADDED: usize = 7;
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
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

/// A copy of `value` that shares no bytes with it. Values the gateway
/// adds to every request are cloned, and dropped, once per request: a
/// value cloned on two cores has them contend for its reference count,
/// so each worker clones a copy of its own (a session's identity
/// headers: `Session::identity_headers`).
pub fn own_copy(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).expect("copied from a valid value");
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// Who may extend the forwarding chain.
#[derive(Debug, Clone)]
pub struct Forwarding {
    pub trusted_proxies: Vec<IpNet>,
}

impl Forwarding {
    /// The forwarding chain is only extended from trusted proxies; anyone
    /// else's `X-Forwarded-For`/`X-Real-IP` is replaced (hbbs and hbbr
    /// believe these headers, see RustDesk's nginx guide).
    pub fn set(&self, headers: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>) {
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

/// `Some(protocol)` when an HTTP/1.1 request asks to switch to WebSocket
/// (`Connection: upgrade` + `Upgrade: websocket`). Other upgrades (`h2c`
/// above all, which would hand the upstream a connection the gateway no
/// longer reads) are not tunnelled: the request goes on without them.
pub(super) fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let websocket = req.headers().get(header::UPGRADE).filter(|protocol| {
        protocol
            .to_str()
            .is_ok_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    (asks && req.version() == Version::HTTP_11)
        .then(|| websocket.cloned())
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

/// Removes the headers a request's `Connection` names, first thing, so
/// that a client cannot name a header the gateway adds later (identity,
/// forwarding) and have it removed on the way out (RFC 9110 §7.6.1). The
/// connection options (`keep-alive`, `upgrade`, `te`, `close`…) stay for
/// forwarding to judge.
pub fn remove_connection_named(headers: &mut HeaderMap) {
    let fixed = hop_by_hop();
    let is_option = |t: &str| {
        t.eq_ignore_ascii_case("close") || fixed.iter().any(|f| f.as_str().eq_ignore_ascii_case(t))
    };
    if connection_tokens(headers).all(is_option) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !is_option(t))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let options = connection_tokens(headers)
        .filter(|t| is_option(t))
        .collect::<Vec<_>>()
        .join(", ");
    for name in &named {
        headers.remove(name);
    }
    match HeaderValue::from_str(&options) {
        Ok(options) if !options.is_empty() => headers.insert(header::CONNECTION, options),
        _ => headers.remove(header::CONNECTION),
    };
}

/// Joins the `Cookie` fields an HTTP/2 client may split (RFC 9113 §8.2.3)
/// into the one field HTTP/1.1 allows (RFC 6265 §5.4), for the upstream.
pub fn join_cookie_fields(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    if fields.nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let joined = HeaderValue::from_bytes(&joined.join(&b"; "[..]))
        .expect("header values joined by `; ` are a header value");
    headers.insert(header::COOKIE, joined);
}

/// Removes the fixed hop-by-hop headers and every header that
/// `Connection` names (RFC 9110 §7.6.1).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, or only `Connection: keep-alive` (every
    // response of an nginx upstream): one pass over the names finds those
    // present, and only they are removed (a removal costs a lookup).
    let fixed = hop_by_hop();
    let mut present = 0u16;
    for key in headers.keys() {
        if let Some(i) = fixed.iter().position(|f| *f == key) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !fixed.iter().any(|f| f.as_str().eq_ignore_ascii_case(t)))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let fixed_present = fixed
        .into_iter()
        .enumerate()
        .filter(|(i, _)| present & (1 << i) != 0)
        .map(|(_, name)| name);
    for name in named.iter().chain(fixed_present) {
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

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever chain a trusted proxy passes on, the upstream gets
            /// that chain plus the proxy's address, and an address as the
            /// client's.
            #[test]
            fn forwarding_chains_never_break(chain in "[0-9a-f.:, ]{0,40}|\\PC{0,20}") {
                let forwarding = Forwarding {
                    trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
                };
                let peer = Peer::new("127.0.0.1:9".parse().unwrap());
                let mut headers = HeaderMap::new();
                let Ok(value) = HeaderValue::from_str(&chain) else {
                    return Ok(());
                };
                headers.insert(&X_FORWARDED_FOR, value.clone());
                headers.insert(header::FORWARDED, value);
                forwarding.set(&mut headers, &peer, None);
                let xff = headers[&X_FORWARDED_FOR].to_str().unwrap();
                prop_assert!(xff.ends_with("127.0.0.1"));
                let real = headers[&X_REAL_IP].to_str().unwrap();
                prop_assert!(real.parse::<IpAddr>().is_ok());
            }

            /// Whatever mix of hop-by-hop headers and `Connection` tokens a
            /// message carries, none of them is passed on, and every other
            /// header is, whole.
            #[test]
            fn hop_headers_go_and_the_rest_stay(
                fields in proptest::collection::vec(
                    (
                        "connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade|proxy-authorization|x-[a-c]",
                        "[a-c, -]{0,12}|(x-[a-c]|keep-alive|close)(, ?(x-[a-c]|te))?",
                        any::<bool>(),
                    ),
                    0..12,
                )
            ) {
                let mut headers = HeaderMap::new();
                for (name, value, shouted) in &fields {
                    let (name, value) = match shouted {
                        true => (name.to_ascii_uppercase(), value.to_ascii_uppercase()),
                        false => (name.clone(), value.clone()),
                    };
                    headers.append(
                        HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        HeaderValue::from_str(&value).unwrap(),
                    );
                }
                let named: Vec<String> = connection_tokens(&headers)
                    .map(str::to_ascii_lowercase)
                    .collect();
                let before = headers.clone();
                remove_hop_by_hop(&mut headers);
                for name in before.keys() {
                    let hop = hop_by_hop().contains(&name) || named.iter().any(|n| n == name.as_str());
                    let kept: Vec<_> = headers.get_all(name).iter().collect();
                    if hop {
                        prop_assert!(kept.is_empty(), "{} passed on", name);
                    } else {
                        prop_assert_eq!(kept, before.get_all(name).iter().collect::<Vec<_>>());
                    }
                }
                prop_assert!(headers.keys().all(|k| before.contains_key(k)));
            }
        }
    }
}
