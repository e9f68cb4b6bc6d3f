//! ID token validation, OpenID Connect Core §3.1.3.7, with RFC 8725's
//! advice: the algorithm comes from our allow-list (never `none`, never an
//! HMAC), the key only from the provider's published set (never from the
//! token's `jku`/`x5u`/`jwk`), `kid` is treated as untrusted input.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::now;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::auth::identity::Identity;
use crate::idp::jwks::{Jwks, JwksError, Source};

/// Claims every ID token must carry (OIDC Core §2).
const REQUIRED: &[&str] = &["iss", "sub", "aud", "exp", "iat"];
/// A logout token may name a session (`sid`) instead of a user (`sub`).
const LOGOUT_REQUIRED: &[&str] = &["iss", "aud", "exp", "iat"];
/// The event a logout token carries (Back-Channel Logout 1.0 §2.4).
const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

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
    #[error("the refreshed token is about another user")]
    Subject,
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("the token is not an access token for this API (no `scp`): ID tokens are not accepted as bearer tokens")]
    NotAnAccessToken,
    #[error("the token grants none of the scopes this API accepts")]
    Scope,
    #[error(
        "the token is an app-only token (no signed-in user), which this gateway does not accept"
    )]
    AppOnly,
    #[error("the token's tenant (tid) is not its issuer's")]
    TenantMismatch,
    #[error("the token is not a logout token: {0}")]
    NotALogoutToken(&'static str),
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
    /// v1 access tokens name the user here instead.
    pub upn: Option<String>,
    pub unique_name: Option<String>,
    pub email: Option<String>,
    pub groups: Option<Vec<String>>,
    pub roles: Option<Vec<String>>,
    /// Delegated permissions of an access token, space-separated (Entra
    /// puts them in `scp`, not OAuth's `scope`).
    pub scp: Option<String>,
    /// `app` on Entra's app-only tokens (an optional claim).
    pub idtyp: Option<String>,
    /// The provider's session: what its logout messages name. An optional
    /// claim in Entra (Token configuration → Add optional claim → sid).
    pub sid: Option<String>,
    /// Entra authentication contexts satisfied (`c1`…), when asked for.
    pub acrs: Option<Vec<String>>,
    /// A bearer token's groups from Microsoft Graph, for a user in overage.
    #[serde(skip)]
    pub graph_groups: Option<Vec<String>>,
    /// Set by the bearer check: a service principal's own token.
    #[serde(skip)]
    pub app_only: bool,
    /// Present instead of `groups` when a user is in more than 200
    /// groups (Entra's "overage").
    #[serde(rename = "_claim_names")]
    pub claim_names: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A logout token's claims (OpenID Connect Back-Channel Logout 1.0 §2.4).
#[derive(Debug, Clone, Deserialize)]
pub struct LogoutClaims {
    pub iss: String,
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: Option<String>,
    pub exp: u64,
    pub iat: u64,
    pub tid: Option<String>,
    pub events: Option<serde_json::Map<String, serde_json::Value>>,
    /// Must be absent: a token with a nonce is an ID token.
    pub nonce: Option<serde_json::Value>,
}

/// What `verify` checks beyond the signature, in either kind of token.
trait Issued: serde::de::DeserializeOwned {
    fn iss(&self) -> &str;
    fn tid(&self) -> Option<&str>;
    fn iat(&self) -> u64;
}

macro_rules! issued {
    ($($claims:ty),*) => {$(
        impl Issued for $claims {
            fn iss(&self) -> &str {
                &self.iss
            }
            fn tid(&self) -> Option<&str> {
                self.tid.as_deref()
            }
            fn iat(&self) -> u64 {
                self.iat
            }
        }
    )*};
}

issued!(Claims, LogoutClaims);

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
                .or_else(|| self.upn.clone())
                .or_else(|| self.unique_name.clone())
                .or_else(|| self.email.clone())
                .unwrap_or_else(|| self.sub.clone()),
            email: self.email.clone(),
            name: self.name.clone(),
            tenant: self.tid.clone(),
            groups: self
                .graph_groups
                .clone()
                .or_else(|| self.groups.clone())
                .unwrap_or_default(),
            roles: self.roles.clone().unwrap_or_default(),
            groups_overage: self
                .claim_names
                .as_ref()
                .is_some_and(|n| n.contains_key("groups")),
            groups_from_graph: self.graph_groups.is_some(),
            acrs: self.acrs.clone().unwrap_or_default(),
            app: self.app_only,
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

impl IssuerMatch {
    /// Whether `iss` (without a token to read a `tid` from, as a
    /// front-channel logout names it) is this provider's.
    pub fn accepts(&self, iss: &str) -> bool {
        match self {
            IssuerMatch::Exact(issuer) => iss == issuer,
            IssuerMatch::Template(template) => {
                let (before, after) = template
                    .split_once("{tenantid}")
                    .expect("a template names {tenantid}");
                iss.strip_prefix(before)
                    .and_then(|rest| rest.strip_suffix(after))
                    .is_some_and(|tenant| !tenant.is_empty() && !tenant.contains('/'))
            }
        }
    }
}

pub struct Verifier {
    pub issuer: IssuerMatch,
    /// The client id: an ID token's audience.
    pub audience: String,
    /// Audiences a bearer token may carry (the client id by default; an
    /// Entra access token for this app's API carries it too).
    pub bearer_audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub skew: Duration,
    /// Empty: any tenant the issuer itself admits.
    pub allowed_tenants: Vec<String>,
    /// The tenant an exact issuer names (`…/<tenant id>/v2.0`): every
    /// token's `tid` must be it.
    pub issuer_tenant: Option<String>,
    pub bearer_scopes: Vec<String>,
    pub bearer_app_tokens: bool,
    /// Bearer tokens may also be Entra v1 access tokens, whose `iss` is
    /// this template with the token's `tid` (`oidc.bearer_accept_v1`).
    pub v1_issuer: Option<String>,
    pub jwks: Arc<Jwks>,
}

impl Verifier {
    /// Verifies an ID token from the token endpoint against the nonce this
    /// sign-in sent.
    pub async fn id_token(&self, token: &str, nonce: &str) -> Result<Claims, TokenError> {
        let claims = self.verify_issued(token).await?;
        match &claims.nonce {
            // Not a secret comparison: a matching nonce only helps a token
            // whose signature already verified.
            Some(found) if found == nonce => Ok(claims),
            _ => Err(TokenError::Nonce),
        }
    }

    /// Verifies an ID token from a refresh (OIDC Core §12.2): same checks,
    /// no nonce, and it must be about the same user.
    pub async fn refreshed_id_token(
        &self,
        token: &str,
        subject: &str,
    ) -> Result<Claims, TokenError> {
        let claims = self.verify_issued(token).await?;
        if claims.sub != subject {
            return Err(TokenError::Subject);
        }
        Ok(claims)
    }

    async fn verify_issued(&self, token: &str) -> Result<Claims, TokenError> {
        let claims: Claims = self
            .verify(
                token,
                Source::TokenEndpoint,
                &[&self.audience],
                REQUIRED,
                None,
            )
            .await?;
        // OIDC Core §3.1.3.7 (4, 5): with several audiences, `azp` must
        // name us.
        if claims.aud.len() > 1 && claims.azp.as_deref() != Some(self.audience.as_str()) {
            return Err(TokenError::Audience);
        }
        Ok(claims)
    }

    /// Verifies a token an API client presented. Its `kid` is attacker
    /// chosen, so unknown keys refetch the set only at a limited rate.
    /// It must be an access token for this API, as Microsoft's guidance
    /// for protected APIs says ("Validate tokens", learn.microsoft.com/
    /// entra/identity-platform/claims-validation): a delegated one carries
    /// `scp` (one of `oidc.bearer_scopes` when set); an app-only one
    /// (`idtyp=app`, or `roles` without `scp`) passes only with
    /// `oidc.bearer_app_tokens`; an ID token (no `scp`) never.
    pub async fn bearer(&self, token: &str) -> Result<Claims, TokenError> {
        let audiences: Vec<&str> = self.bearer_audiences.iter().map(String::as_str).collect();
        let v1 = self.v1_issuer.as_deref();
        let mut claims: Claims = self
            .verify(token, Source::Client, &audiences, REQUIRED, v1)
            .await?;
        let app_only = claims.idtyp.as_deref() == Some("app")
            || (claims.scp.is_none() && claims.roles.is_some());
        if app_only {
            if !self.bearer_app_tokens {
                return Err(TokenError::AppOnly);
            }
            claims.app_only = true;
            return Ok(claims);
        }
        let scopes = claims.scp.as_deref().ok_or(TokenError::NotAnAccessToken)?;
        if !self.bearer_scopes.is_empty()
            && !scopes
                .split_ascii_whitespace()
                .any(|s| self.bearer_scopes.iter().any(|b| b == s))
        {
            return Err(TokenError::Scope);
        }
        Ok(claims)
    }

    /// Verifies a logout token the provider posted (Back-Channel Logout
    /// 1.0 §2.6): signed like an ID token, for this client, with the
    /// logout event, a `jti`, a `sub` or a `sid`, and no nonce. Whoever
    /// posted it chose its `kid`: unknown keys refetch at a limited rate.
    pub async fn logout_token(&self, token: &str) -> Result<LogoutClaims, TokenError> {
        let claims: LogoutClaims = self
            .verify(
                token,
                Source::Client,
                &[&self.audience],
                LOGOUT_REQUIRED,
                None,
            )
            .await?;
        let event = claims
            .events
            .as_ref()
            .and_then(|events| events.get(BACKCHANNEL_LOGOUT_EVENT));
        if !event.is_some_and(serde_json::Value::is_object) {
            return Err(TokenError::NotALogoutToken("no back-channel logout event"));
        }
        if claims.nonce.is_some() {
            return Err(TokenError::NotALogoutToken("it carries a nonce"));
        }
        if claims.jti.is_none() {
            return Err(TokenError::NotALogoutToken("it has no jti"));
        }
        if claims.sub.is_none() && claims.sid.is_none() {
            return Err(TokenError::NotALogoutToken("it names neither sub nor sid"));
        }
        Ok(claims)
    }

    /// `v1_issuer`: a v1 issuer template also accepted (bearer tokens).
    async fn verify<T: Issued>(
        &self,
        token: &str,
        source: Source,
        audiences: &[&str],
        required: &[&str],
        v1_issuer: Option<&str>,
    ) -> Result<T, TokenError> {
        // A header naming an algorithm the library does not know (`none`)
        // fails to parse: say which algorithm was refused.
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| match algorithm_name(token) {
                Some(alg) => TokenError::Algorithm(alg),
                None => TokenError::Malformed,
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
        validation.set_audience(audiences);
        validation.set_required_spec_claims(required);
        let claims = jsonwebtoken::decode::<T>(token, &key.decoding, &validation)
            .map_err(explain)?
            .claims;

        // The token's issuer: this provider's (its template with the
        // token's own tenant when multi-tenant), or the same tenant's v1
        // issuer when that is accepted; the tenant itself is held to
        // `issuer_tenant` and `allowed_tenants` below either way.
        let of_tenant = |template: &str| {
            claims
                .tid()
                .is_some_and(|tid| claims.iss() == template.replace("{tenantid}", tid))
        };
        let issuer_ok = match &self.issuer {
            IssuerMatch::Exact(issuer) => claims.iss() == issuer,
            IssuerMatch::Template(template) => of_tenant(template),
        } || v1_issuer.is_some_and(of_tenant);
        if !issuer_ok {
            if claims.tid().is_none() && matches!(self.issuer, IssuerMatch::Template(_)) {
                return Err(TokenError::NoTenant);
            }
            return Err(TokenError::Issuer(claims.iss().to_owned()));
        }
        if let (Some(issuer_tenant), Some(tid)) = (&self.issuer_tenant, claims.tid()) {
            if !issuer_tenant.eq_ignore_ascii_case(tid) {
                return Err(TokenError::TenantMismatch);
            }
        }
        if !self.allowed_tenants.is_empty() {
            let tid = claims.tid().ok_or(TokenError::NoTenant)?;
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
        if claims.iat() > now() + self.skew.as_secs() {
            return Err(TokenError::IssuedInFuture);
        }
        Ok(claims)
    }
}

/// What the JWT library's refusal means for the caller.
fn explain(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::InvalidSignature => TokenError::Signature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm => TokenError::Algorithm("a mismatched algorithm".into()),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => TokenError::Malformed,
        other => TokenError::Other(format!("{other:?}")),
    }
}

/// The `alg` a rejected token named, for the error message only.
fn algorithm_name(token: &str) -> Option<String> {
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
}

/// Tokens a real provider would never sign: forged, expired, misdirected.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::idp::jwks::{Key, KeySet};
    use jsonwebtoken::{encode, DecodingKey, EncodingKey, Header};
    use serde_json::json;

    const ISSUER: &str = "https://login.microsoftonline.com/tid-1/v2.0";
    const CLIENT: &str = "client-1";

    struct Signer {
        private: EncodingKey,
        public_pem: String,
    }

    fn rsa() -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        Signer {
            private: EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap(),
            public_pem: pair.public_key_pem(),
        }
    }

    async fn verifier(signer: &Signer, issuer: IssuerMatch, tenants: &[&str]) -> Verifier {
        let key = Key {
            decoding: DecodingKey::from_rsa_pem(signer.public_pem.as_bytes()).unwrap(),
            algorithm: Some(Algorithm::RS256),
        };
        let jwks = Jwks::preloaded(KeySet::from_keys(vec![("k1".into(), key)])).await;
        Verifier {
            issuer,
            audience: CLIENT.into(),
            bearer_audiences: vec![CLIENT.into(), "api://client-1".into()],
            algorithms: vec![Algorithm::RS256],
            skew: Duration::from_secs(60),
            allowed_tenants: tenants.iter().map(|t| t.to_string()).collect(),
            issuer_tenant: None,
            bearer_scopes: Vec::new(),
            bearer_app_tokens: false,
            v1_issuer: None,
            jwks: Arc::new(jwks),
        }
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": ISSUER, "aud": CLIENT, "sub": "s", "oid": "o", "tid": "tid-1",
            "iat": now(), "nbf": now(), "exp": now() + 3600, "nonce": "n-1",
            "preferred_username": "alice@contoso.example",
        })
    }

    fn sign(signer: &Signer, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, &signer.private).unwrap()
    }

    fn with(changes: serde_json::Value) -> serde_json::Value {
        let mut c = claims();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn b64(value: &serde_json::Value) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    }

    async fn check(v: &Verifier, token: &str) -> Result<Claims, TokenError> {
        v.id_token(token, "n-1").await
    }

    fn logout(changes: serde_json::Value) -> serde_json::Value {
        let mut c = json!({
            "iss": ISSUER, "aud": CLIENT, "sub": "s", "sid": "sid-1", "tid": "tid-1",
            "iat": now(), "exp": now() + 120, "jti": "j-1",
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    #[tokio::test]
    async fn logout_tokens_must_be_signed_logout_events_for_us() {
        let key = rsa();
        let v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        let token = |claims: serde_json::Value| sign(&key, Some("k1"), &claims);
        let good = v.logout_token(&token(logout(json!({})))).await.unwrap();
        assert_eq!(
            (good.sid.as_deref(), good.jti.as_deref()),
            (Some("sid-1"), Some("j-1"))
        );
        // A user alone, or a session alone, is enough.
        assert!(v
            .logout_token(&token(logout(json!({"sid": null}))))
            .await
            .is_ok());
        assert!(v
            .logout_token(&token(logout(json!({"sub": null}))))
            .await
            .is_ok());

        for (changes, wanted) in [
            (json!({"events": null}), "event"),
            (json!({"events": {"http://example/other": {}}}), "event"),
            (
                json!({"events": {BACKCHANNEL_LOGOUT_EVENT: "yes"}}),
                "event",
            ),
            (json!({"nonce": "n-1"}), "nonce"),
            (json!({"jti": null}), "jti"),
            (json!({"sub": null, "sid": null}), "neither"),
            (json!({"aud": "another-app"}), "another application"),
            (json!({"iss": "https://evil.example/v2.0"}), "evil.example"),
            (json!({"exp": now() - 3600}), "expired"),
            (json!({"exp": null}), "well-formed"),
        ] {
            let err = v
                .logout_token(&token(logout(changes.clone())))
                .await
                .unwrap_err();
            assert!(err.to_string().contains(wanted), "{changes}: {err}");
        }
        // An ID token is not a logout token, and a forged one is refused.
        assert!(v.logout_token(&token(claims())).await.is_err());
        let forged = sign(&rsa(), Some("k1"), &logout(json!({})));
        assert!(matches!(
            v.logout_token(&forged).await,
            Err(TokenError::Signature)
        ));
    }

    #[test]
    fn front_channel_issuers_are_matched_exactly_or_by_template() {
        let exact = IssuerMatch::Exact(ISSUER.into());
        assert!(exact.accepts(ISSUER));
        assert!(!exact.accepts("https://login.microsoftonline.com/tid-2/v2.0"));
        let template =
            IssuerMatch::Template("https://login.microsoftonline.com/{tenantid}/v2.0".into());
        assert!(template.accepts("https://login.microsoftonline.com/tid-2/v2.0"));
        for refused in [
            "https://login.microsoftonline.com//v2.0",
            "https://login.microsoftonline.com/a/b/v2.0",
            "https://login.microsoftonline.com.evil.example/t/v2.0",
            "https://login.microsoftonline.com/t/v2.0/extra",
            "",
        ] {
            assert!(!template.accepts(refused), "{refused}");
        }
    }

    proptest::proptest! {
        /// An `iss` from a query string: any text is judged without a
        /// panic, and the template accepts only its own shape.
        #[test]
        fn any_front_channel_issuer_is_judged(iss in "\\PC{0,80}") {
            let template =
                IssuerMatch::Template("https://login.microsoftonline.com/{tenantid}/v2.0".into());
            if template.accepts(&iss) {
                proptest::prop_assert!(iss.starts_with("https://login.microsoftonline.com/"));
                proptest::prop_assert!(iss.ends_with("/v2.0"));
            }
        }
    }

    #[tokio::test]
    async fn a_well_formed_token_passes() {
        let key = rsa();
        let v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        let claims = check(&v, &sign(&key, Some("k1"), &claims())).await.unwrap();
        assert_eq!(claims.identity().username, "alice@contoso.example");
        assert_eq!(claims.identity().user_id, "o");
    }

    #[tokio::test]
    async fn forged_and_unsigned_tokens_are_rejected() {
        let key = rsa();
        let v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        let forged = sign(&rsa(), Some("k1"), &claims());
        assert!(matches!(
            check(&v, &forged).await,
            Err(TokenError::Signature)
        ));

        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "kid": "k1"})),
            b64(&claims())
        );
        assert!(matches!(check(&v, &none).await, Err(TokenError::Algorithm(a)) if a == "none"));

        // HS256 keyed with the provider's public key, the classic confusion.
        let hs = encode(
            &Header {
                kid: Some("k1".into()),
                ..Header::new(Algorithm::HS256)
            },
            &claims(),
            &EncodingKey::from_secret(key.public_pem.as_bytes()),
        )
        .unwrap();
        assert!(matches!(
            check(&v, &hs).await,
            Err(TokenError::Algorithm(_))
        ));

        assert!(matches!(
            check(&v, &sign(&key, None, &claims())).await,
            Err(TokenError::NoKeyId)
        ));
        let unknown = sign(&key, Some("../../etc/passwd"), &claims());
        assert!(matches!(
            check(&v, &unknown).await,
            Err(TokenError::UnknownKey)
        ));
        assert!(matches!(
            check(&v, "not.a.jwt").await,
            Err(TokenError::Malformed)
        ));
        let real = sign(&key, Some("k1"), &claims());
        assert!(matches!(
            check(&v, &real[..real.len() - 20]).await,
            Err(TokenError::Signature | TokenError::Malformed)
        ));
    }

    #[tokio::test]
    async fn misdirected_and_stale_tokens_are_rejected() {
        let key = rsa();
        let v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        let cases = [
            (with(json!({"aud": "someone-else"})), "aud"),
            (with(json!({"aud": [CLIENT, "other"]})), "aud without azp"),
            (
                with(json!({"iss": "https://login.microsoftonline.com/other/v2.0"})),
                "iss",
            ),
            (with(json!({"exp": now() - 3600})), "expired"),
            (with(json!({"nbf": now() + 3600})), "not yet valid"),
            (with(json!({"iat": now() + 3600})), "issued in the future"),
            (with(json!({"nonce": "n-2"})), "nonce"),
            (with(json!({"nonce": null})), "no nonce"),
            (with(json!({"exp": null})), "no exp"),
            (with(json!({"sub": null})), "no sub"),
        ];
        for (claims, what) in cases {
            let result = check(&v, &sign(&key, Some("k1"), &claims)).await;
            assert!(result.is_err(), "{what} was accepted");
        }
        let with_azp = with(json!({"aud": [CLIENT, "other"], "azp": CLIENT}));
        assert!(check(&v, &sign(&key, Some("k1"), &with_azp)).await.is_ok());
    }

    #[tokio::test]
    async fn bearer_tokens_are_access_tokens_for_this_api() {
        let key = rsa();
        let mut v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        let bearer = |claims: serde_json::Value| sign(&key, Some("k1"), &claims);
        // An ID token (no scp) is not an access token.
        assert!(matches!(
            v.bearer(&bearer(claims())).await,
            Err(TokenError::NotAnAccessToken)
        ));
        // App-only tokens: idtyp=app, or roles without scp.
        let app = with(json!({"nonce": null, "idtyp": "app", "roles": ["Console.Automation"]}));
        let roles_only = with(json!({"nonce": null, "roles": ["Console.Automation"]}));
        for token in [bearer(app.clone()), bearer(roles_only)] {
            assert!(matches!(v.bearer(&token).await, Err(TokenError::AppOnly)));
        }
        v.bearer_app_tokens = true;
        let claims = v.bearer(&bearer(app)).await.unwrap();
        assert!(claims.identity().app);
        // Delegated: any scope, or one of bearer_scopes.
        let delegated = bearer(with(
            json!({"nonce": null, "scp": "Devices.Read Devices.Write"}),
        ));
        assert!(!v.bearer(&delegated).await.unwrap().identity().app);
        v.bearer_scopes = vec!["Console.Admin".into()];
        assert!(matches!(v.bearer(&delegated).await, Err(TokenError::Scope)));
        v.bearer_scopes = vec!["Devices.Write".into()];
        assert!(v.bearer(&delegated).await.is_ok());
        // A token whose tid is not its issuer's tenant.
        v.issuer_tenant = Some("tid-1".into());
        assert!(v.bearer(&delegated).await.is_ok());
        let elsewhere = bearer(with(
            json!({"nonce": null, "scp": "Devices.Write", "tid": "tid-2"}),
        ));
        assert!(matches!(
            v.bearer(&elsewhere).await,
            Err(TokenError::TenantMismatch)
        ));
    }

    #[tokio::test]
    async fn bearer_tokens_need_no_nonce_and_may_name_the_api() {
        let key = rsa();
        let v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        let access = with(json!({"nonce": null, "aud": "api://client-1", "scp": "Devices.Read"}));
        assert!(v.bearer(&sign(&key, Some("k1"), &access)).await.is_ok());
        let other = with(json!({"nonce": null, "aud": "api://another-app", "scp": "Devices.Read"}));
        assert!(matches!(
            v.bearer(&sign(&key, Some("k1"), &other)).await,
            Err(TokenError::Audience)
        ));
        // An ID token's checks stay strict: the API audience is not ours.
        assert!(check(
            &v,
            &sign(&key, Some("k1"), &with(json!({"aud": "api://client-1"})))
        )
        .await
        .is_err());
    }

    #[tokio::test]
    async fn v1_access_tokens_pass_only_when_accepted_and_only_of_the_same_tenant() {
        let key = rsa();
        let mut v = verifier(&key, IssuerMatch::Exact(ISSUER.into()), &[]).await;
        v.issuer_tenant = Some("tid-1".into());
        let v1 = |changes: serde_json::Value| {
            let mut claims = with(json!({
                "nonce": null, "preferred_username": null, "aud": "api://client-1",
                "iss": "https://sts.windows.net/tid-1/", "ver": "1.0", "scp": "Devices.Read",
                "upn": "alice@contoso.example", "unique_name": "alice@contoso.example",
            }));
            for (k, value) in changes.as_object().unwrap() {
                claims[k] = value.clone();
            }
            sign(&key, Some("k1"), &claims)
        };
        assert!(matches!(
            v.bearer(&v1(json!({}))).await,
            Err(TokenError::Issuer(i)) if i == "https://sts.windows.net/tid-1/"
        ));
        v.v1_issuer = Some("https://sts.windows.net/{tenantid}/".into());
        let claims = v.bearer(&v1(json!({}))).await.unwrap();
        assert_eq!(claims.identity().username, "alice@contoso.example");
        // The v1 issuer of another tenant, or one that disagrees with tid.
        let other = v1(json!({"tid": "tid-2", "iss": "https://sts.windows.net/tid-2/"}));
        assert!(matches!(
            v.bearer(&other).await,
            Err(TokenError::TenantMismatch)
        ));
        let mismatched = v1(json!({"iss": "https://sts.windows.net/tid-2/"}));
        assert!(matches!(
            v.bearer(&mismatched).await,
            Err(TokenError::Issuer(_))
        ));
        // Never an ID token: sign-in keeps to the v2 issuer.
        let id_token = with(json!({"iss": "https://sts.windows.net/tid-1/"}));
        assert!(matches!(
            check(&v, &sign(&key, Some("k1"), &id_token)).await,
            Err(TokenError::Issuer(_))
        ));
    }

    #[tokio::test]
    async fn multi_tenant_issuers_check_the_tokens_own_tenant() {
        let key = rsa();
        let template =
            IssuerMatch::Template("https://login.microsoftonline.com/{tenantid}/v2.0".into());
        let v = verifier(&key, template, &["tid-1"]).await;
        assert!(check(&v, &sign(&key, Some("k1"), &claims())).await.is_ok());

        // A token of another tenant, consistent with itself, is still refused.
        let other =
            with(json!({"tid": "tid-2", "iss": "https://login.microsoftonline.com/tid-2/v2.0"}));
        assert!(
            matches!(check(&v, &sign(&key, Some("k1"), &other)).await, Err(TokenError::Tenant(t)) if t == "tid-2")
        );
        // iss and tid that disagree.
        let mismatched = with(json!({"iss": "https://login.microsoftonline.com/tid-2/v2.0"}));
        assert!(matches!(
            check(&v, &sign(&key, Some("k1"), &mismatched)).await,
            Err(TokenError::Issuer(_))
        ));
        let no_tid = with(json!({"tid": null}));
        assert!(matches!(
            check(&v, &sign(&key, Some("k1"), &no_tid)).await,
            Err(TokenError::NoTenant)
        ));
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// The header read to word an error never panics, whatever the
            /// token; neither does verifying it.
            #[test]
            fn any_token_is_refused_cleanly(token in "[A-Za-z0-9_.=-]{0,80}|\\PC{0,40}") {
                let _ = algorithm_name(&token);
            }
        }
    }
}
