//! Forward-auth: the gateway as the judge for a proxy in front of the
//! app (nginx `auth_request`, Traefik `ForwardAuth`, Caddy
//! `forward_auth`). The proxy asks `auth` about each request it is given,
//! naming that request's target in `X-Forwarded-Uri` (Traefik, Caddy) or
//! `X-Original-URI` (nginx), and gets the answer the gateway would give
//! the request itself: 200 with the identity headers (and the cookies)
//! for the proxy to copy onto it, 401, or 403. Only a proxy the gateway trusts is answered: anyone
//! else could name whatever target suits them.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, COOKIE, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::{target, Client, Gateway};
use crate::auth::policy::Denial;
use crate::auth::{self, Unidentified};
use crate::forward::headers::{join_cookie_fields, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::forward::routes::Access;
use crate::ops::metrics::Metrics;
use crate::pages::{self, Problem};
use crate::Body;

static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
/// On a 401: where to send the browser to sign in, for proxies (nginx)
/// that answer the browser themselves.
static X_AUTHGATE_SIGN_IN: HeaderName = HeaderName::from_static("x-authgate-sign-in");

const UNTRUSTED: Problem = Problem {
    status: StatusCode::FORBIDDEN,
    code: "forward_auth_untrusted",
    title: "Forward-auth answers only trusted proxies",
    detail: "This endpoint is for the reverse proxy in front of the application. \
             Add the proxy's address to proxy.trusted_proxies (loopback is always trusted).",
};

const NO_TARGET: Problem = Problem {
    status: StatusCode::BAD_REQUEST,
    code: "forward_auth_no_target",
    title: "The proxy did not say which request to judge",
    detail: "Send the original request's path and query in X-Forwarded-Uri or \
             X-Original-URI (one of them, or both with the same value).",
};

impl Gateway {
    /// `redirect`: the proxy hands a non-2xx answer to the browser as it
    /// is (Traefik, Caddy), so a browser without a session gets a 302 to
    /// sign in rather than a 401.
    pub(super) async fn forward_auth(
        &self,
        req: Request<Body>,
        client: &Client,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let (verdict, response) = self.judge(req, client, html, id).await;
        Metrics::outcome(&self.forward_auths, verdict);
        response
    }

    /// The answer, and its verdict for `authgate_forward_auths_total`.
    async fn judge(
        &self,
        req: Request<Body>,
        client: &Client,
        html: bool,
        id: &str,
    ) -> (&'static str, Response<Body>) {
        let peer = client.peer.addr.ip().to_canonical();
        if !self.is_trusted_proxy(peer) {
            tracing::warn!(request_id = id, %peer, "forward-auth asked by a peer that is not a trusted proxy");
            return ("untrusted_peer", pages::problem(UNTRUSTED, html, id));
        }
        let (parts, _) = req.into_parts();
        let redirect = asks_redirect(parts.uri.query());
        let headers = parts.headers;
        let Some(uri) = original_target(&headers) else {
            return ("no_target", pages::problem(NO_TARGET, html, id));
        };
        let method = headers
            .get(&X_FORWARDED_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(Method::GET);
        let route = self.routes.find(uri.path());
        if !auth::needs_sign_in(route.access, &method, &headers) {
            return ("passed", self.allowed(&headers, client));
        }
        let Some(signin) = &self.signin else {
            let response = pages::problem(pages::UNAUTHENTICATED, false, id);
            return ("unauthenticated", response);
        };
        match signin.identify(&headers, &client.last_cookie).await {
            Ok((authenticated, cookies)) => {
                let identity = authenticated.identity();
                match signin.authorize(&route.policy, &identity) {
                    // The proxy in front cannot send a browser through a
                    // step-up: the 401 names what is missing.
                    Err(Denial::StepUp(acrs)) => {
                        let response = signin.step_up(&identity, acrs, None, id).await;
                        return ("step_up_required", response);
                    }
                    Err(denial) => {
                        let response =
                            signin.forbidden(&identity, &route.prefix, &denial, html, id);
                        return ("forbidden", response);
                    }
                    Ok(()) => {}
                }
                let mut response = self.allowed(&headers, client);
                self.tell_identity(
                    response.headers_mut(),
                    &authenticated,
                    &identity,
                    route,
                    &client.last_cookie,
                );
                pages::append_cookies(&mut response, cookies);
                ("allowed", response)
            }
            Err(Unidentified::Bearer(error)) => {
                ("invalid_token", signin.invalid_bearer(&error, id))
            }
            Err(Unidentified::StoreDown) => (
                "store_unavailable",
                pages::problem(pages::STORE_UNAVAILABLE, html, id),
            ),
            Err(Unidentified::Nothing) => {
                let start = self.sign_in_start(&headers, &uri);
                if redirect && html && route.access == Access::Protected {
                    return (
                        "unauthenticated",
                        pages::redirect(StatusCode::FOUND, &start),
                    );
                }
                let mut response =
                    Box::pin(signin.challenge(&method, &uri, &headers, false, id)).await;
                if let Ok(start) = HeaderValue::from_str(&start) {
                    response.headers_mut().insert(&X_AUTHGATE_SIGN_IN, start);
                }
                ("unauthenticated", response)
            }
        }
    }

    /// A 200 naming nobody, until the identity is told over its blanks,
    /// with the `Cookie` for the proxy to forward in place of the
    /// client's: the same cookies without the gateway's, blank when none
    /// is left. A proxy cannot always take one cookie out of a header
    /// itself (Traefik cannot); every one can copy a header.
    fn allowed(&self, request: &HeaderMap, client: &Client) -> Response<Body> {
        let mut response = pages::empty(StatusCode::OK);
        let headers = response.headers_mut();
        self.identity_headers.blank_missing(headers);
        for cookie in request.get_all(COOKIE) {
            headers.append(COOKIE, cookie.clone());
        }
        if let Some(signin) = &self.signin {
            signin.strip_own_cookies(headers, &client.last_cookie);
        }
        join_cookie_fields(headers);
        headers
            .entry(COOKIE)
            .or_insert_with(|| HeaderValue::from_static(""));
        response
    }

    fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The gateway's sign-in start, returning to the original request's
    /// URL as the proxy describes it (checked by the start like any `rd`).
    /// On `public_url`, where the callback is: the login cookie set there
    /// must be there when the provider sends the browser back. Absolute,
    /// as a proxy resolves a relative one against the gateway's own
    /// address (Traefik does), which the browser may not reach.
    fn sign_in_start(&self, headers: &HeaderMap, uri: &Uri) -> String {
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let proto = text(&X_FORWARDED_PROTO).filter(|p| matches!(*p, "https" | "http"));
        let host = text(&X_FORWARDED_HOST).or_else(|| text(&HOST));
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let rd = match (proto, host) {
            (Some(proto), Some(host)) => format!("{proto}://{host}{path}"),
            _ => path.to_owned(),
        };
        let rd = self.hosts.return_target(&rd);
        format!(
            "{}{}start?rd={}",
            self.hosts.origin(),
            self.gateway_prefix,
            utf8_percent_encode(&rd, NON_ALPHANUMERIC)
        )
    }
}

/// The request the proxy asks about, its path made canonical as every
/// request's is; `None` when not named, named twice differently, or not
/// a path the gateway would serve.
fn original_target(headers: &HeaderMap) -> Option<Uri> {
    let named = |name: &HeaderName| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (value, None) => Ok(value),
            _ => Err(()),
        }
    };
    let target = match (named(&X_FORWARDED_URI).ok()?, named(&X_ORIGINAL_URI).ok()?) {
        (Some(a), Some(b)) if a != b => return None,
        (Some(value), _) | (None, Some(value)) => value,
        (None, None) => return None,
    };
    let mut uri: Uri = target.to_str().ok()?.parse().ok()?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        return None;
    }
    target::canonicalize(&mut uri).ok()?;
    Some(uri)
}

fn asks_redirect(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "redirect=1" | "redirect=true"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_of(pairs: &[(&HeaderName, &str)]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        original_target(&headers).map(|uri| uri.to_string())
    }

    #[test]
    fn the_original_target_is_named_once_and_made_canonical() {
        let canonical = Some("/admin?x=1".to_owned());
        assert_eq!(target_of(&[(&X_FORWARDED_URI, "/admin?x=1")]), canonical);
        assert_eq!(
            target_of(&[(&X_ORIGINAL_URI, "/public/../admin?x=1")]),
            canonical
        );
        assert_eq!(
            target_of(&[
                (&X_FORWARDED_URI, "/a/%2e%2e/admin?x=1"),
                (&X_ORIGINAL_URI, "/a/%2e%2e/admin?x=1")
            ]),
            canonical
        );
        for refused in [
            vec![],
            vec![(&X_FORWARDED_URI, "/public"), (&X_ORIGINAL_URI, "/admin")],
            vec![(&X_FORWARDED_URI, "/public"), (&X_FORWARDED_URI, "/admin")],
            vec![(&X_FORWARDED_URI, "https://evil.example/admin")],
            vec![(&X_FORWARDED_URI, "admin")],
            vec![(&X_FORWARDED_URI, "/public/..%2fadmin")],
            vec![(&X_ORIGINAL_URI, "/a\\b")],
        ] {
            assert_eq!(target_of(&refused), None, "{refused:?}");
        }
    }

    #[test]
    fn only_a_redirect_parameter_asks_for_a_redirect() {
        assert!(asks_redirect(Some("redirect=1")));
        assert!(asks_redirect(Some("a=b&redirect=true")));
        assert!(!asks_redirect(Some("redirect=0")));
        assert!(!asks_redirect(Some("noredirect=1")));
        assert!(!asks_redirect(None));
    }
}
