//! The signed identity assertion (`headers.assertion`): a short-lived
//! ES256 JWT on each signed-in request saying who the user is, for an
//! upstream that can be reached other than through the gateway and must
//! tell the gateway's word from a header anyone could send. The upstream
//! verifies it with the public key published at `jwks.json` under the
//! gateway prefix, `iss` = `public_url`, `aud` = its own origin.
//!
//! The key is made on first use and kept under `state_dir`, so a restart
//! does not invalidate what upstreams have cached of the key set; with
//! the Redis session store it is kept there instead, so that every
//! replica signs with it and publishes the same key set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::identity::Identity;
use super::session::{Shared, StoreError};
use crate::clock::now;
use crate::state::{StateDir, StateError};

/// The signing key, PKCS#8 DER, under `state_dir`.
pub const KEY_FILE: &str = "assertion-key.p8";
/// How long an assertion is valid: short, so that a leaked one is soon
/// worth nothing, and well within the 5 minutes upstreams are promised.
const LIFETIME: u64 = 4 * 60;
/// A cached assertion is signed anew once this little of it is left, so
/// that none reaches an upstream about to expire.
const RENEW_WITHIN: u64 = 60;
/// The key's name among what replicas share, and its lock's.
const SHARED_KEY: &str = "assertion-key";
const SHARED_KEY_LOCK: &str = "assertion-key-lock";
/// Kept until replaced (there is no rotation yet).
const SHARED_KEY_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a replica waits for another that is making the shared key.
const SHARED_KEY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("state_dir `{0}` holds an assertion signing key that is not a P-256 PKCS#8 key; remove it to have a new one made")]
    BadKey(String),
    #[error("cannot share the assertion signing key with the other replicas through the session store: {0}")]
    Shared(#[from] StoreError),
    #[error("another replica took the lock to make the shared assertion signing key and wrote none within {0:?}")]
    SharedTimeout(Duration),
    #[error("cannot make an assertion signing key")]
    Generate,
}

/// Signs assertions for one gateway.
pub struct Assertions {
    key: EncodingKey,
    header: Header,
    /// The public key as a JWK (RFC 7517), for `jwks.json`.
    jwk: serde_json::Value,
    issuer: String,
}

/// An assertion made for a session, kept with it until it is due for
/// renewal.
#[derive(Debug)]
pub struct Signed {
    audience: Arc<str>,
    renew_at: u64,
    value: HeaderValue,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    oid: &'a str,
    preferred_username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tid: Option<&'a str>,
    groups: &'a [String],
    roles: &'a [String],
    iat: u64,
    exp: u64,
}

impl Assertions {
    /// `issuer`: `public_url`. The key is `shared`'s when given (Redis),
    /// else the one under `state`.
    pub async fn load(
        state: &StateDir,
        shared: Option<&Shared>,
        issuer: String,
    ) -> Result<Assertions, AssertionError> {
        let bad = || AssertionError::BadKey(state.path().display().to_string());
        let der = match shared {
            Some(shared) => shared_key(shared).await?,
            None => match state.read(KEY_FILE)? {
                Some(der) => der,
                None => {
                    let made = new_key()?;
                    state.write_private(KEY_FILE, &made)?;
                    made
                }
            },
        };
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).map_err(|_| bad())?;
        // An uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 65 {
            return Err(bad());
        }
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..]),
        );
        // RFC 7638: the thumbprint hashes the required members, sorted.
        let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            thumbprint.as_bytes(),
        ));
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.clone());
        Ok(Assertions {
            key: EncodingKey::from_ec_der(&der),
            header,
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": x, "y": y,
                "kid": kid, "alg": "ES256", "use": "sig",
            }),
            issuer,
        })
    }

    /// The key set upstreams verify with.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.jwk] })
    }

    /// An assertion about `identity` for the upstream at `audience`
    /// (its origin), valid from now.
    pub fn sign(&self, identity: &Identity, audience: &str) -> Option<Signed> {
        let iat = now();
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            sub: &identity.subject,
            oid: &identity.user_id,
            preferred_username: &identity.username,
            email: identity.email.as_deref(),
            name: identity.name.as_deref(),
            tid: identity.tenant.as_deref(),
            groups: &identity.groups,
            roles: &identity.roles,
            iat,
            exp: iat + LIFETIME,
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.key)
            .inspect_err(|e| tracing::error!(error = %e, "cannot sign an identity assertion"))
            .ok()?;
        Some(Signed {
            audience: audience.into(),
            renew_at: iat + LIFETIME - RENEW_WITHIN,
            value: HeaderValue::try_from(token).ok()?,
        })
    }

    /// The assertion kept in `kept` for `audience` while it is fresh,
    /// else a new one, kept there for the next request.
    pub fn for_session(
        &self,
        kept: &std::sync::Mutex<Option<Signed>>,
        identity: &Identity,
        audience: &str,
    ) -> Option<HeaderValue> {
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(signed) = kept
            .as_ref()
            .filter(|s| &*s.audience == audience && now() < s.renew_at)
        {
            return Some(signed.value.clone());
        }
        let signed = self.sign(identity, audience)?;
        let value = signed.value.clone();
        *kept = Some(signed);
        Some(value)
    }

    /// A new assertion, not kept (bearer requests).
    pub fn once(&self, identity: &Identity, audience: &str) -> Option<HeaderValue> {
        self.sign(identity, audience).map(|s| s.value)
    }
}

/// A new P-256 key, PKCS#8 DER.
fn new_key() -> Result<Vec<u8>, AssertionError> {
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| AssertionError::Generate)
}

/// The key kept in the store, if one is.
async fn kept_key(shared: &Shared) -> Result<Option<Vec<u8>>, AssertionError> {
    let kept = shared.get::<String>(SHARED_KEY).await?;
    Ok(kept.and_then(|k| URL_SAFE_NO_PAD.decode(k).ok()))
}

/// The replicas' key: the one kept in the store, else one this replica
/// makes and keeps there under a lock, so that two starting at once do not
/// each make their own.
async fn shared_key(shared: &Shared) -> Result<Vec<u8>, AssertionError> {
    let started = Instant::now();
    loop {
        if let Some(der) = kept_key(shared).await? {
            return Ok(der);
        }
        if let Some(token) = shared.lock(SHARED_KEY_LOCK, SHARED_KEY_WAIT).await? {
            let der = make_shared_key(shared).await;
            shared.unlock(SHARED_KEY_LOCK, &token).await;
            return der;
        }
        if started.elapsed() > SHARED_KEY_WAIT {
            return Err(AssertionError::SharedTimeout(SHARED_KEY_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Under the lock: the key another replica kept between the look and the
/// lock, else a new one, kept.
async fn make_shared_key(shared: &Shared) -> Result<Vec<u8>, AssertionError> {
    if let Some(der) = kept_key(shared).await? {
        return Ok(der);
    }
    let made = new_key()?;
    let text = URL_SAFE_NO_PAD.encode(&made);
    shared.put(SHARED_KEY, &text, SHARED_KEY_LIFETIME).await?;
    Ok(made)
}
