//! The route table: which upstream serves a path. Longest prefix wins and
//! prefixes match whole path segments, so `/ws/id` serves `/ws/id` and
//! `/ws/id/…` but not `/ws/idle`.

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use serde::Deserialize;
use std::fmt;

use crate::auth::policy::Policy;
use crate::ops::metrics::{Metrics, RouteMetrics};

/// An upstream origin: scheme and authority, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl UpstreamUrl {
    /// `Host` for this upstream when the client's is not passed on: its
    /// authority, without the scheme's default port (RFC 9110 §7.2 lets a
    /// client leave it out; some apps compare `Host` against their own
    /// name, which has none).
    pub fn host_header(&self) -> HeaderValue {
        let default_port = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match self.authority.port_u16() {
            Some(port) if port == default_port => self.authority.host(),
            _ => self.authority.as_str(),
        };
        HeaderValue::from_str(host).expect("an authority is a header value")
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub prefix: String,
    pub upstream: UpstreamUrl,
    pub access: Access,
    /// Who may pass once signed in.
    pub policy: Policy,
}

/// Whether a route needs a signed-in user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Browsers are sent to sign in; API clients need a bearer token.
    Protected,
    /// Passed through without sign-in (identity headers still stripped),
    /// e.g. the RustDesk client API, which carries its own tokens.
    Public,
    /// The upstream's own API: a request carrying its own `Authorization`
    /// (the console's tokens, never checked here) or a CORS preflight
    /// passes untouched; one with a gateway session passes with identity;
    /// anything else gets 401 JSON, never a redirect.
    #[serde(rename = "upstream_token")]
    UpstreamToken,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub upstream: UpstreamUrl,
    /// The `Host` sent to `upstream` when the client's is not passed on;
    /// made once here rather than for every request.
    pub upstream_host: HeaderValue,
    /// `upstream` as text: the audience of identity assertions for it.
    pub origin: std::sync::Arc<str>,
    pub access: Access,
    pub policy: Policy,
    pub metrics: RouteMetrics,
}

#[derive(Debug, Clone)]
pub struct Routes {
    /// Longest prefix first; the last one is always `/`.
    by_length: Vec<Route>,
}

impl Routes {
    /// The same routes for one worker thread: with header values of their
    /// own (see `forward::headers::own_copy`), and metrics it counts apart.
    pub fn for_worker(&self) -> Routes {
        let mut routes = self.clone();
        for route in &mut routes.by_length {
            route.upstream_host = crate::forward::headers::own_copy(&route.upstream_host);
            route.metrics = route.metrics.for_worker();
        }
        routes
    }

    /// `configs` must contain the `/` route (config validation puts it first).
    pub fn new(configs: &[RouteConfig], metrics: &Metrics) -> Routes {
        let mut by_length: Vec<Route> = configs
            .iter()
            .map(|c| Route {
                prefix: c.prefix.clone(),
                upstream: c.upstream.clone(),
                upstream_host: c.upstream.host_header(),
                origin: c.upstream.to_string().into(),
                access: c.access,
                policy: c.policy.clone(),
                metrics: metrics.route(&c.prefix),
            })
            .collect();
        by_length.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        assert!(
            by_length.last().is_some_and(|r| r.prefix == "/"),
            "route table without a `/` route"
        );
        Routes { by_length }
    }

    pub fn find(&self, path: &str) -> &Route {
        self.by_length
            .iter()
            .find(|r| matches(&r.prefix, path))
            .unwrap_or_else(|| &self.by_length[self.by_length.len() - 1])
    }
}

fn matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A table of public routes with these prefixes, for tests.
#[cfg(test)]
pub(crate) fn table_of(prefixes: &[&str]) -> Routes {
    use std::str::FromStr;
    let configs: Vec<RouteConfig> = prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| RouteConfig {
            prefix: p.to_string(),
            upstream: UpstreamUrl {
                scheme: http::uri::Scheme::HTTP,
                authority: http::uri::Authority::from_str(&format!("u{i}:1")).unwrap(),
            },
            access: Access::Public,
            policy: Policy::default(),
        })
        .collect();
    Routes::new(&configs, &Metrics::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let routes = table_of(&["/", "/ws", "/ws/id", "/static/"]);
        assert_eq!(routes.find("/ws/id").prefix, "/ws/id");
        assert_eq!(routes.find("/ws/id/abc").prefix, "/ws/id");
        assert_eq!(routes.find("/ws/idle").prefix, "/ws");
        assert_eq!(routes.find("/ws/relay").prefix, "/ws");
        assert_eq!(routes.find("/wsx").prefix, "/");
        assert_eq!(routes.find("/static/app.js").prefix, "/static/");
        assert_eq!(routes.find("/static").prefix, "/");
        assert_eq!(routes.find("/").prefix, "/");
    }

    fn upstream(url: &str) -> UpstreamUrl {
        let uri = http::Uri::from_str(url).unwrap();
        UpstreamUrl {
            scheme: uri.scheme().unwrap().clone(),
            authority: uri.authority().unwrap().clone(),
        }
    }

    #[test]
    fn host_leaves_out_only_the_default_port() {
        let host = |url| upstream(url).host_header();
        assert_eq!(host("http://console:80"), "console");
        assert_eq!(host("https://console:443"), "console");
        assert_eq!(host("http://console:21114"), "console:21114");
        assert_eq!(host("https://console:80"), "console:80");
        assert_eq!(host("http://[::1]:80"), "[::1]");
        assert_eq!(host("http://console"), "console");
    }
}
