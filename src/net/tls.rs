//! TLS termination: the rustls server configuration (TLS 1.2+, ALPN h2 and
//! http/1.1), PEM loading, the self-signed fallback for first runs, and a
//! certificate resolver whose key pair can be swapped while connections
//! stay up, so a renewed certificate is served on the next handshake.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// True when neither file was configured: a missing pair may then be
    /// generated as a self-signed certificate for testing.
    pub may_self_sign: bool,
    pub reload_check: Duration,
    /// `Strict-Transport-Security` for responses that lack one; `None`: off.
    pub hsts: Option<http::HeaderValue>,
    /// The certificate comes from an ACME CA (kept at `cert` and `key`).
    pub acme: Option<crate::net::acme::AcmeSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}")]
    Certificate {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read private key file {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate {cert} and key {key} do not belong together: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("a generated certificate is not usable: {0}")]
    Generated(#[source] rustls::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The one crypto provider of the whole binary (aws-lc-rs): TLS, the
/// upstream client and certificate generation all use it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The protocol an ACME CA's TLS-ALPN-01 validation offers, alone
/// (RFC 8737 §6.2); such a connection ends after the handshake.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Builds the server configuration around a certificate resolver;
/// `acme` adds the ALPN protocol of TLS-ALPN-01 validation.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    acme: bool,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(config))
}

/// Reads a PEM chain and key and checks that they match.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: cert.into(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.into() });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.into(),
        source,
    })?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|source| TlsError::Mismatch {
        cert: cert.into(),
        key: key.into(),
        source,
    })
}

/// A certificate rcgen made, for rustls. Made with its key, so no match
/// is checked (that check parses the certificate as a client would, and
/// refuses the critical extension of an ACME challenge certificate).
pub fn certified(
    cert: &rcgen::Certificate,
    key: &rcgen::KeyPair,
) -> Result<CertifiedKey, TlsError> {
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(TlsError::Generated)?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// A self-signed certificate for `names`, in memory.
pub fn self_signed(names: &[String]) -> Result<CertifiedKey, TlsError> {
    let generated = rcgen::generate_simple_self_signed(names.to_vec())?;
    certified(&generated.cert, &generated.signing_key)
}

/// Writes a self-signed certificate for `host` when neither file exists.
/// Returns whether it did, so the caller can warn loudly.
pub fn ensure_self_signed(cert: &Path, key: &Path, host: &str) -> Result<bool, TlsError> {
    if cert.exists() || key.exists() {
        return Ok(false);
    }
    let mut names = vec![host.to_owned()];
    if host != "localhost" {
        names.push("localhost".into());
    }
    let generated = rcgen::generate_simple_self_signed(names)?;
    for path in [cert, key] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
                path: dir.into(),
                source,
            })?;
        }
    }
    write_private(key, generated.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert, generated.cert.pem()).map_err(|source| TlsError::Write {
        path: cert.into(),
        source,
    })?;
    Ok(true)
}

fn write_private(path: &Path, content: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(content))
        .map_err(|source| TlsError::Write {
            path: path.into(),
            source,
        })
}

/// The certificate handed to every handshake; replaced whole on reload,
/// so connections already established keep the one they started with.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(key)),
        })
    }

    pub(crate) fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Records when the leaf certificate of `key` expires (Unix seconds).
pub fn record_expiry(key: &CertifiedKey, gauge: &Gauge<i64, AtomicI64>) {
    if let Some(not_after) = key.cert.first().and_then(|leaf| not_after(leaf.as_ref())) {
        gauge.set(not_after);
    }
}

/// The `notAfter` of a DER certificate, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// What identifies a version of the files on disk without reading them.
type Stamp = Option<[(SystemTime, u64); 2]>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    Some([one(cert)?, one(key)?])
}

/// Reloads the certificate when its files change (checked every
/// `interval`) and on SIGHUP. A pair that fails to load (e.g. half
/// written) is logged and the old certificate kept; the next check retries.
pub struct CertWatcher {
    /// Set to the served certificate's expiry on every load.
    expiry: Gauge<i64, AtomicI64>,
    cert_path: PathBuf,
    key_path: PathBuf,
    interval: Duration,
    /// Registered before the first load, so a SIGHUP sent as soon as the
    /// gateway is up reloads instead of killing the process.
    hangup: Signal,
    /// The files' state when last loaded successfully.
    loaded: Stamp,
}

impl CertWatcher {
    /// Call before loading the certificate, so a change made between the
    /// load and the first check is not missed.
    pub fn new(
        cert_path: PathBuf,
        key_path: PathBuf,
        interval: Duration,
        expiry: Gauge<i64, AtomicI64>,
    ) -> std::io::Result<CertWatcher> {
        Ok(CertWatcher {
            expiry,
            loaded: stamp(&cert_path, &key_path),
            hangup: signal(SignalKind::hangup())?,
            cert_path,
            key_path,
            interval,
        })
    }

    pub async fn run(mut self, cert: Arc<ReloadableCert>) {
        let start = tokio::time::Instant::now() + self.interval;
        let mut ticks = tokio::time::interval_at(start, self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = ticks.tick() => false,
                Some(()) = self.hangup.recv() => true,
            };
            let now = stamp(&self.cert_path, &self.key_path);
            if !forced && now == self.loaded {
                continue;
            }
            match load(&self.cert_path, &self.key_path) {
                Ok(key) => {
                    record_expiry(&key, &self.expiry);
                    cert.replace(key);
                    self.loaded = now;
                    tracing::info!(
                        cert = %self.cert_path.display(),
                        reason = if forced { "SIGHUP" } else { "file changed" },
                        "TLS certificate reloaded"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; still serving the previous one")
                }
            }
        }
    }
}
