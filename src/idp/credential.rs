//! The app's certificate credential: a short-lived JWT signed with the
//! certificate's key, in the shape Microsoft Entra ID documents
//! ("Microsoft identity platform application authentication certificate
//! credentials", learn.microsoft.com/entra/identity-platform/
//! certificate-credentials): PS256, `x5t#S256` (and the older SHA-1 `x5t`)
//! thumbprints of the certificate, `aud` the token endpoint, `iss` = `sub`
//! = the client id, a fresh `jti`, valid for a few minutes.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Long enough for one token request, short enough to be useless later.
const LIFETIME_SECS: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the client certificate {path}: {source}")]
    Certificate {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("the client certificate file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read the client key {path}: {message}")]
    Key { path: PathBuf, message: String },
}

/// Why a client assertion could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("the provider publishes no token endpoint to address the assertion to")]
    NoTokenEndpoint,
    #[error("cannot sign the client assertion: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("cannot read the federated token file {path}: {source}")]
    FederatedFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct CertificateCredential {
    key: EncodingKey,
    sha1_thumbprint: String,
    sha256_thumbprint: String,
}

impl CertificateCredential {
    pub fn load(cert: &Path, key: &Path) -> Result<CertificateCredential, CredentialError> {
        let der = CertificateDer::pem_file_iter(cert)
            .and_then(|mut certs| certs.next().transpose())
            .map_err(|source| CredentialError::Certificate {
                path: cert.into(),
                source,
            })?
            .ok_or_else(|| CredentialError::NoCertificate { path: cert.into() })?;
        let pem = std::fs::read(key).map_err(|e| CredentialError::Key {
            path: key.into(),
            message: e.to_string(),
        })?;
        let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| CredentialError::Key {
            path: key.into(),
            message: format!("{e} (an RSA key in PEM is expected)"),
        })?;
        let thumbprint =
            |algorithm| URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(algorithm, der.as_ref()));
        Ok(CertificateCredential {
            key,
            sha1_thumbprint: thumbprint(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY),
            sha256_thumbprint: thumbprint(&aws_lc_rs::digest::SHA256),
        })
    }

    /// A client assertion for the token endpoint `audience`.
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<String, AssertionError> {
        let mut header = Header::new(Algorithm::PS256);
        header.x5t = Some(self.sha1_thumbprint.clone());
        header.x5t_s256 = Some(self.sha256_thumbprint.clone());
        let now = crate::clock::now();
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "nbf": now,
            "exp": now + LIFETIME_SECS,
        });
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(AssertionError::Sign)
    }
}
