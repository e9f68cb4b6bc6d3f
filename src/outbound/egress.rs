//! Where the gateway's own connections go: straight to the destination,
//! or through an HTTP proxy with `CONNECT` (enterprise hosts that reach
//! the internet only that way), as `[outbound]` or the environment say.
//! TLS to the destination runs inside the tunnel, so the destination's
//! certificate is checked as without a proxy (`oidc.ca` included).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy rules, if any: each connection asks them about its
/// destination (`NO_PROXY` exempts some).
#[derive(Clone, Default)]
pub struct Egress(Option<Arc<Matcher>>);

impl Egress {
    /// Every connection straight to its destination.
    pub fn direct() -> Egress {
        Egress(None)
    }

    pub fn through(matcher: Matcher) -> Egress {
        Egress(Some(Arc::new(matcher)))
    }

    /// The proxy a connection to `destination` goes through, without its
    /// credentials (for messages).
    pub fn proxy_for(&self, destination: &Uri) -> Option<String> {
        let intercept = self.0.as_ref()?.intercept(destination)?;
        let proxy = intercept.uri();
        Some(format!(
            "{}://{}",
            proxy.scheme_str().unwrap_or("http"),
            proxy
                .authority()
                .map_or("", |a| a.as_str().rsplit('@').next().unwrap_or(""))
        ))
    }
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Egress(proxy rules)",
            None => "Egress(direct)",
        })
    }
}

/// The TCP connector under TLS: direct, or a `CONNECT` tunnel through the
/// proxy the rules name for the destination.
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    egress: Egress,
}

impl EgressConnector {
    pub fn new(direct: HttpConnector, egress: Egress) -> EgressConnector {
        EgressConnector { direct, egress }
    }
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let proxy = self
            .egress
            .0
            .as_ref()
            .and_then(|rules| rules.intercept(&destination));
        match proxy {
            Some(proxy) => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), self.direct.clone());
                if let Some(credentials) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(credentials.clone());
                }
                let shown = self.egress.proxy_for(&destination).unwrap_or_default();
                Box::pin(async move {
                    tunnel.call(destination).await.map_err(|e| {
                        let message = super::error_chain(&e);
                        BoxError::from(format!("through the proxy {shown}: {message}"))
                    })
                })
            }
            None => {
                let connecting = self.direct.call(destination);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// The proxy environment as curl reads it: `http_proxy` in lower case
/// only (an `HTTP_PROXY` can be set by a client through CGI's `Proxy:`
/// header, "httpoxy"), `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY` in either
/// case, lower case first.
#[derive(Debug, Default, Clone)]
pub struct ProxyEnv {
    pub http: Option<(String, String)>,
    pub https: Option<(String, String)>,
    pub all: Option<(String, String)>,
    pub no: Option<(String, String)>,
}

impl ProxyEnv {
    pub fn of<'a>(env: impl IntoIterator<Item = &'a (String, String)>) -> ProxyEnv {
        let env: Vec<&(String, String)> = env.into_iter().collect();
        let first = |names: &[&str]| {
            names.iter().find_map(|name| {
                env.iter()
                    .find(|(k, v)| k == name && !v.trim().is_empty())
                    .map(|(k, v)| (k.clone(), v.trim().to_owned()))
            })
        };
        ProxyEnv {
            http: first(&["http_proxy"]),
            https: first(&["https_proxy", "HTTPS_PROXY"]),
            all: first(&["all_proxy", "ALL_PROXY"]),
            no: first(&["no_proxy", "NO_PROXY"]),
        }
    }
}
