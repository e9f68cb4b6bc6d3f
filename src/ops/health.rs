//! `authgate health`: the container's HEALTHCHECK. Distroless images have
//! no curl, so the binary asks itself: a TLS connection to its own listen
//! port, trusting exactly the configured certificate (pinned, so no CA
//! and no host name are involved), and `GET <prefix>ping`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::Config;

const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Certificate(#[from] crate::net::tls::TlsError),
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("no answer within {DEADLINE:?}")]
    Timeout,
    #[error("answered {0}")]
    Status(StatusCode),
}

/// Probes the gateway this configuration describes.
pub async fn probe(config: &Config) -> Result<(), HealthError> {
    tokio::time::timeout(DEADLINE, exchange(config))
        .await
        .map_err(|_| HealthError::Timeout)?
}

async fn exchange(config: &Config) -> Result<(), HealthError> {
    let kept = crate::net::tls::load(&config.tls.cert, &config.tls.key);
    // With ACME the served certificate changes under the probe (the
    // self-signed stand-in, renewals): its own listener is trusted as is.
    let pinned = match kept {
        Ok(key) => Some(key.cert[0].clone()),
        Err(_) if config.tls.acme.is_some() => None,
        Err(e) => return Err(e.into()),
    };
    let mut addr = config.listen;
    // A wildcard bind is reached over loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let tls = crate::outbound::tls_client_config(Arc::new(Pinned(pinned)))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| HealthError::Connect { addr, source })?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|source| HealthError::Connect { addr, source })?;
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(format!("{}ping", config.gateway_prefix))
        .header(http::header::HOST, config.public_url.authority.as_str())
        .body(Empty::<bytes::Bytes>::new())
        .expect("a static request is valid");
    let status = send.send_request(request).await?.status();
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(HealthError::Status(status))
    }
}

/// Accepts the one certificate read from the gateway's own files (any,
/// with ACME before the first certificate is kept).
#[derive(Debug)]
struct Pinned(Option<CertificateDer<'static>>);

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.0.as_ref().is_none_or(|pinned| end_entity == pinned) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the gateway served a certificate other than its configured one".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crate::net::tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &crate::net::tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::net::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
