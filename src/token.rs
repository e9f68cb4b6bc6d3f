//! ID token validation, OpenID Connect Core §3.1.3.7, with RFC 8725's
//! advice: the algorithm comes from our allow-list (never `none`, never an
//! HMAC), the key only from the provider's published set (never from the
//! token's `jku`/`x5u`/`jwk`), `kid` is treated as untrusted input.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::identity::Identity;
use crate::jwks::{Jwks, JwksError, Source};

/// Claims every ID token must carry (OIDC Core §2).
const REQUIRED: &[&str] = &["iss", "sub", "aud", "exp", "iat"];

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token is signed with {0}, which is not allowed")]
    Algorithm(String),
    #[error("the token names no signing key (kid)")]
    NoKeyId,
    #[error("the token is signed with a key the provider does not publish")]
    UnknownKey,
    #[error(transparent)]
    Keys(#[from] JwksError),
    #[error("the token's signature is not valid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued in the future")]
    IssuedInFuture,
    #[error("the token is for another application (aud)")]
    Audience,
    #[error("the token was issued by `{0}`, not the configured provider")]
    Issuer(String),
    #[error("the token names no tenant (tid) to check its issuer against")]
    NoTenant,
    #[error("users of tenant {0} may not sign in here")]
    Tenant(String),
    #[error("the token does not belong to this sign-in (nonce)")]
    Nonce,
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("the token is not valid: {0}")]
    Other(String),
}

/// The ID token claims authgate reads (Entra v2 names).
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub nonce: Option<String>,
    pub azp: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    pub oid: Option<String>,
    pub tid: Option<String>,
    pub name: Option<String>,
    pub preferred_username: Option<String>,
    pub email: Option<String>,
    pub groups: Option<Vec<String>>,
    pub roles: Option<Vec<String>>,
    /// Present instead of `groups` when a user is in more than 200
    /// groups (Entra's "overage").
    #[serde(rename = "_claim_names")]
    pub claim_names: Option<serde_json::Map<String, serde_json::Value>>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Claims {
    pub fn identity(&self) -> Identity {
        Identity {
            subject: self.sub.clone(),
            user_id: self.oid.clone().unwrap_or_else(|| self.sub.clone()),
            username: self
                .preferred_username
                .clone()
                .or_else(|| self.email.clone())
                .unwrap_or_else(|| self.sub.clone()),
            email: self.email.clone(),
            name: self.name.clone(),
            tenant: self.tid.clone(),
            groups: self.groups.clone().unwrap_or_default(),
            roles: self.roles.clone().unwrap_or_default(),
            groups_overage: self
                .claim_names
                .as_ref()
                .is_some_and(|n| n.contains_key("groups")),
        }
    }
}

/// How a token's `iss` is matched.
#[derive(Debug, Clone)]
pub enum IssuerMatch {
    Exact(String),
    /// Entra multi-tenant: `https://login.microsoftonline.com/{tenantid}/v2.0`
    /// with the token's own `tid` substituted.
    Template(String),
}

pub struct Verifier {
    pub issuer: IssuerMatch,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub skew: Duration,
    /// Empty: any tenant the issuer itself admits.
    pub allowed_tenants: Vec<String>,
    pub jwks: Arc<Jwks>,
}

impl Verifier {
    /// Verifies an ID token from the token endpoint against the nonce this
    /// sign-in sent.
    pub async fn id_token(&self, token: &str, nonce: &str) -> Result<Claims, TokenError> {
        let claims = self.verify(token, Source::TokenEndpoint).await?;
        match &claims.nonce {
            // Not a secret comparison: a matching nonce only helps a token
            // whose signature already verified.
            Some(found) if found == nonce => Ok(claims),
            _ => Err(TokenError::Nonce),
        }
    }

    async fn verify(&self, token: &str, source: Source) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName => TokenError::Algorithm(algorithm_name(token)),
            _ => TokenError::Malformed,
        })?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenError::NoKeyId)?;
        let key = self
            .jwks
            .key(&kid, source)
            .await?
            .ok_or(TokenError::UnknownKey)?;
        if key.algorithm.is_some_and(|a| a != header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }

        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.skew.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(REQUIRED);
        if let IssuerMatch::Exact(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|e| self.explain(e, token))?
            .claims;

        if let IssuerMatch::Template(template) = &self.issuer {
            let tid = claims.tid.as_deref().ok_or(TokenError::NoTenant)?;
            if claims.iss != template.replace("{tenantid}", tid) {
                return Err(TokenError::Issuer(claims.iss));
            }
        }
        if !self.allowed_tenants.is_empty() {
            let tid = claims.tid.as_deref().ok_or(TokenError::NoTenant)?;
            if !self
                .allowed_tenants
                .iter()
                .any(|t| t.eq_ignore_ascii_case(tid))
            {
                return Err(TokenError::Tenant(tid.to_owned()));
            }
        }
        // jsonwebtoken never checks `iat`; a token from the future is as
        // suspicious as an expired one.
        if claims.iat > now() + self.skew.as_secs() {
            return Err(TokenError::IssuedInFuture);
        }
        // OIDC Core §3.1.3.7 (4, 5): with several audiences, `azp` must
        // name us.
        if claims.aud.len() > 1 && claims.azp.as_deref() != Some(self.audience.as_str()) {
            return Err(TokenError::Audience);
        }
        Ok(claims)
    }

    fn explain(&self, e: jsonwebtoken::errors::Error, token: &str) -> TokenError {
        match e.kind() {
            ErrorKind::InvalidSignature => TokenError::Signature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidAudience => TokenError::Audience,
            ErrorKind::InvalidIssuer => TokenError::Issuer(unverified_issuer(token)),
            ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
            ErrorKind::InvalidAlgorithm => TokenError::Algorithm("a mismatched algorithm".into()),
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => TokenError::Malformed,
            other => TokenError::Other(format!("{other:?}")),
        }
    }
}

/// Used only to word an error about a token already rejected.
fn unverified_issuer(token: &str) -> String {
    #[derive(Deserialize)]
    struct Iss {
        iss: String,
    }
    jsonwebtoken::dangerous::insecure_decode::<Iss>(token)
        .map(|t| t.claims.iss)
        .unwrap_or_else(|_| "an unknown issuer".into())
}

/// The `alg` a rejected token named, for the error message only.
fn algorithm_name(token: &str) -> String {
    use base64::Engine;
    token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .and_then(|h| h["alg"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "an unknown algorithm".into())
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
