//! The host a request is forwarded for: never one the client made up.
//! Upstreams build links, redirects and password-reset mails from `Host`
//! (and `X-Forwarded-Host`, `Forwarded`); a client's `Host: evil.example`
//! must not reach them. A request for `public_url`'s host or one of
//! `extra_hosts` (by name: any case, port and trailing dot ignored) keeps
//! it; any other is forwarded for `public_url`'s host, or refused with 421
//! under `strict_host`.

use http::header::{HeaderValue, HOST};
use http::uri::Scheme;
use http::{Request, Uri};

use crate::auth::signin::safe_return_to;
use crate::config::Config;

pub(super) struct Hosts {
    /// Lower case, no port, no trailing dot; `public_url`'s first.
    names: Vec<String>,
    /// `public_url`'s authority, the `Host` of a request for any other.
    public: HeaderValue,
    public_port: Option<u16>,
    scheme: Scheme,
    strict: bool,
}

/// What the request's host turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Ours,
    /// Not ours: `Host` now says `public_url`'s.
    Replaced,
    /// Not ours, and `strict_host` refuses it.
    Misdirected,
}

impl Hosts {
    pub fn new(config: &Config) -> Hosts {
        let public = config.public_url.host().to_ascii_lowercase();
        Hosts {
            names: std::iter::once(public)
                .chain(config.extra_hosts.iter().cloned())
                .collect(),
            public: HeaderValue::from_str(config.public_url.authority.as_str())
                .expect("an authority is a header value"),
            public_port: config.public_url.authority.port_u16(),
            scheme: config.public_url.scheme.clone(),
            strict: config.strict_host,
        }
    }

    /// Judges the host `req` asks for: the target's own authority
    /// (absolute form, HTTP/2's `:authority`) before `Host`, as RFC 9112
    /// §3.2.2 says; afterwards `Host` says the host judged.
    pub fn judge<B>(&self, req: &mut Request<B>) -> Verdict {
        if let Some(authority) = req.uri().authority() {
            if self.is_ours(authority.host()) {
                // Host and port only: no `user@` a client slipped in.
                let host = match authority.port() {
                    Some(port) => format!("{}:{port}", authority.host()),
                    None => authority.host().to_owned(),
                };
                if let Ok(host) = HeaderValue::from_str(&host) {
                    req.headers_mut().insert(HOST, host);
                }
                return Verdict::Ours;
            }
        } else {
            let named = req.headers().get(HOST).and_then(|h| h.to_str().ok());
            if named.and_then(host_of).is_some_and(|h| self.is_ours(h)) {
                return Verdict::Ours;
            }
        }
        if self.strict {
            return Verdict::Misdirected;
        }
        req.headers_mut().insert(HOST, self.public.clone());
        Verdict::Replaced
    }

    /// Where a browser may return after sign-in, from the `rd` a link or
    /// a proxy in front named: a path (on `public_url`), or a URL on one
    /// of the gateway's own hosts with `public_url`'s scheme. Anything
    /// else, which would make sign-in an open redirect, becomes `/`.
    pub fn return_target(&self, rd: &str) -> String {
        if rd.starts_with('/') {
            return safe_return_to(rd);
        }
        let Ok(uri) = rd.parse::<Uri>() else {
            return "/".to_owned();
        };
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return "/".to_owned();
        };
        if *scheme != self.scheme
            || authority.as_str().contains('@')
            || !self.is_ours(authority.host())
        {
            return "/".to_owned();
        }
        let path = safe_return_to(uri.path_and_query().map_or("/", |p| p.as_str()));
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        if host == self.names[0] && authority.port_u16() == self.public_port {
            return path;
        }
        match authority.port_u16() {
            Some(port) => format!("{scheme}://{host}:{port}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }

    /// `public_url`'s scheme and authority.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            self.scheme,
            self.public.to_str().expect("an authority is text")
        )
    }

    pub fn is_ours(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.');
        self.names.iter().any(|n| n.eq_ignore_ascii_case(host))
    }
}

/// The host name of a `Host` value (RFC 9110 §7.2: `uri-host [":" port]`),
/// or `None` when it is anything else (a `user@`, a path, a bare port).
fn host_of(value: &str) -> Option<&str> {
    if value.contains(['@', '/', '?', '#', '\\', ' ']) {
        return None;
    }
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            (
                host,
                after.strip_prefix(':').or(after.is_empty().then_some("")),
            )
        }
        None => match value.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, Some("")),
        },
    };
    let port = port?;
    (!host.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn host_values_are_read_strictly() {
        for (value, host) in [
            ("console.example.com", Some("console.example.com")),
            ("console.example.com:8443", Some("console.example.com")),
            ("Console.Example.com.", Some("Console.Example.com.")),
            ("[::1]:8443", Some("::1")),
            ("[::1]", Some("::1")),
            ("10.0.0.1", Some("10.0.0.1")),
            ("evil@console.example.com", None),
            ("console.example.com/x", None),
            ("console.example.com:80x", None),
            (":8443", None),
            ("[::1", None),
            ("[::1]x", None),
        ] {
            assert_eq!(host_of(value), host, "{value}");
        }
    }

    fn hosts() -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authgate.toml");
        std::fs::write(
            &path,
            "access = \"public\"\npublic_url = \"https://console.example.com\"\n\
             extra_hosts = [\"rd.example.com\"]\nupstream = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        Hosts::new(&Config::load(&path, true, []).unwrap())
    }

    #[test]
    fn sign_in_returns_only_to_the_gateways_own_hosts() {
        let hosts = hosts();
        for (rd, target) in [
            ("/console?page=2", "/console?page=2"),
            (
                "https://console.example.com/console?a=1&b=2",
                "/console?a=1&b=2",
            ),
            ("https://Console.Example.com/x", "/x"),
            ("https://console.example.com", "/"),
            ("https://console.example.com./x", "/x"),
            (
                "https://console.example.com:8443/x",
                "https://console.example.com:8443/x",
            ),
            ("https://rd.example.com/x?y", "https://rd.example.com/x?y"),
            (
                "https://RD.example.com:8443/x",
                "https://rd.example.com:8443/x",
            ),
            (
                "https://rd.example.com//evil.example/",
                "https://rd.example.com/",
            ),
            ("http://console.example.com/x", "/"),
            ("https://evil.example/x", "/"),
            ("https://console.example.com.evil.example/x", "/"),
            ("https://console.example.com@evil.example/x", "/"),
            ("https://evil.example@console.example.com/x", "/"),
            ("//evil.example/x", "/"),
            ("/\\evil.example/x", "/"),
            ("javascript:alert(1)", "/"),
            ("console.example.com/x", "/"),
            ("", "/"),
        ] {
            assert_eq!(hosts.return_target(rd), target, "{rd}");
        }
    }

    proptest! {
        #[test]
        fn a_return_target_is_a_local_path_or_on_an_own_host(rd in "(https://|/|//|http://)?(console|rd|evil)?(\\.example\\.com)?[@:/\\\\%a-z0-9.]{0,20}") {
            let hosts = hosts();
            let target = hosts.return_target(&rd);
            let local = target.starts_with('/') && safe_return_to(&target) == target;
            let own = target.parse::<Uri>().is_ok_and(|uri| {
                uri.scheme_str() == Some("https")
                    && uri.authority().is_some_and(|a| {
                        !a.as_str().contains('@') && hosts.is_ours(a.host())
                    })
                    && uri.path().starts_with('/')
                    && !uri.path().starts_with("//")
            });
            prop_assert!(local || own, "{} -> {}", rd, target);
        }

        #[test]
        fn host_of_never_panics_and_finds_a_part_of_the_value(value in "\\PC{0,40}") {
            if let Some(host) = host_of(&value) {
                prop_assert!(value.contains(host));
                prop_assert!(!host.is_empty());
            }
        }
    }
}
