//! The route table: which upstream serves a path. Longest prefix wins and
//! prefixes match whole path segments, so `/ws/id` serves `/ws/id` and
//! `/ws/id/…` but not `/ws/idle`.

use http::HeaderValue;

use crate::auth::policy::Policy;
use crate::config::{Access, RouteConfig, UpstreamUrl};
use crate::forward::upstream;
use crate::ops::metrics::{Metrics, RouteMetrics};

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub upstream: UpstreamUrl,
    /// The `Host` sent to `upstream` when the client's is not passed on;
    /// made once here rather than for every request.
    pub upstream_host: HeaderValue,
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
    /// `configs` must contain the `/` route (config validation puts it first).
    pub fn new(configs: &[RouteConfig], metrics: &Metrics) -> Routes {
        let mut by_length: Vec<Route> = configs
            .iter()
            .map(|c| Route {
                prefix: c.prefix.clone(),
                upstream: c.upstream.clone(),
                upstream_host: upstream::host_header(&c.upstream),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn table(prefixes: &[&str]) -> Routes {
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

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let routes = table(&["/", "/ws", "/ws/id", "/static/"]);
        assert_eq!(routes.find("/ws/id").prefix, "/ws/id");
        assert_eq!(routes.find("/ws/id/abc").prefix, "/ws/id");
        assert_eq!(routes.find("/ws/idle").prefix, "/ws");
        assert_eq!(routes.find("/ws/relay").prefix, "/ws");
        assert_eq!(routes.find("/wsx").prefix, "/");
        assert_eq!(routes.find("/static/app.js").prefix, "/static/");
        assert_eq!(routes.find("/static").prefix, "/");
        assert_eq!(routes.find("/").prefix, "/");
    }
}
