//! The HTTPS client the gateway itself uses: pooled, keep-alive, rustls
//! with the system roots plus an optional CA file, one instance per
//! destination kind (upstreams, the identity provider, the ACME CA),
//! direct or through an HTTP proxy ([`egress`]).

pub mod egress;

use std::path::Path;
use std::sync::Arc;

use hyper_rustls::HttpsConnector;

use self::egress::EgressConnector;
pub use self::egress::{Egress, ProxyEnv};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::net::Timeouts;
use crate::Body;

pub type Connector = HttpsConnector<EgressConnector>;
pub type HttpClient = Client<Connector, Body>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read CA file {path}: {source}")]
    Ca {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path}: {source}")]
    BadCa { path: String, source: rustls::Error },
    #[error("cannot set up the outbound TLS client: {0}")]
    Tls(#[from] rustls::Error),
}

/// The system's root certificates, read from disk once however many
/// clients (upstreams, provider, `authgate check`) are built.
pub fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Builds a client trusting the system's roots and, when given, the CA
/// certificates in `ca` (PEM), connecting as `egress` says.
pub fn client(
    ca: Option<&Path>,
    timeouts: &Timeouts,
    egress: &Egress,
) -> Result<HttpClient, ClientError> {
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle)
        .build(connector(ca, timeouts, egress)?))
}

/// The roots outbound connections trust: the system's and, when given,
/// the CA certificates in `ca` (PEM).
pub fn root_store(ca: Option<&Path>) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = ca {
        let shown = path.display().to_string();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .map_err(|source| ClientError::Ca {
                path: shown.clone(),
                source,
            })?;
        for cert in certs {
            roots.add(cert).map_err(|source| ClientError::BadCa {
                path: shown.clone(),
                source,
            })?;
        }
    }
    Ok(roots)
}

/// A verifier of server certificates against `roots`, with the binary's
/// one crypto provider.
pub fn verifier(roots: rustls::RootCertStore) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::net::tls::provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Every outbound TLS client configuration: the binary's crypto
/// provider, TLS 1.2 and 1.3, no client certificate; `verifier` judges
/// the server.
pub fn tls_client_config(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::net::tls::provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

/// The TLS-capable connector behind [`client`]; the CA file is read here.
pub fn connector(
    ca: Option<&Path>,
    timeouts: &Timeouts,
    egress: &Egress,
) -> Result<Connector, ClientError> {
    let tls = tls_client_config(verifier(root_store(ca)?)?)?;

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeouts.connect));
    http.set_nodelay(true);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(EgressConnector::new(http, egress.clone())))
}

/// Largest body accepted from the identity provider (discovery, keys,
/// tokens are a few KiB).
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{uri}: {message}")]
    Failed { uri: String, message: String },
    #[error("{uri}: no answer within {after:?}")]
    Timeout {
        uri: String,
        after: std::time::Duration,
    },
    #[error("{uri}: answered {status}")]
    Status {
        uri: String,
        status: http::StatusCode,
    },
}

/// Sends a small request and reads the whole (bounded) answer. No
/// redirects are followed: the provider's endpoints are used as published.
pub async fn exchange(
    client: &HttpClient,
    request: http::Request<Vec<u8>>,
    timeout: std::time::Duration,
) -> Result<http::Response<Vec<u8>>, FetchError> {
    use http_body_util::{BodyExt, Full, Limited};
    let uri = request.uri().to_string();
    let failed = |message: String| FetchError::Failed {
        uri: uri.clone(),
        message,
    };
    let request = request.map(|b| {
        Full::new(bytes::Bytes::from(b))
            .map_err(|never| match never {})
            .boxed()
    });
    let work = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(http::Response::from_parts(parts, body.to_vec()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::Timeout {
            uri: uri.clone(),
            after: timeout,
        })?
}

/// GETs a JSON document, requiring a 200.
pub async fn get_json(
    client: &HttpClient,
    uri: &str,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, FetchError> {
    let request = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| FetchError::Failed {
            uri: uri.to_owned(),
            message: e.to_string(),
        })?;
    let response = exchange(client, request, timeout).await?;
    if response.status() != http::StatusCode::OK {
        return Err(FetchError::Status {
            uri: uri.to_owned(),
            status: response.status(),
        });
    }
    Ok(response.into_body())
}

/// "connect error: tcp connect error: Connection refused" rather than
/// the outermost "client error (Connect)".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}
