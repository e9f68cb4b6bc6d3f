//! The OpenID provider (Microsoft Entra ID): discovery with retry, the
//! authorization URL (code flow, PKCE S256, state, nonce) and the code
//! exchange, through the `openidconnect` crate driven by the gateway's own
//! HTTPS client (one crypto stack for the whole binary).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreErrorResponseType, CoreProviderMetadata,
    CoreTokenResponse,
};
use openidconnect::url::Url;
use openidconnect::{
    AsyncHttpClient, AuthType, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, HttpClientError, HttpRequest, HttpResponse,
    Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, Scope, StandardErrorResponse, TokenResponse, TokenUrl,
};

use super::graph::Graph;
use super::settings::{ClientAuth, GroupsOverage, OidcConfig, ResponseMode};
use crate::auth::identity::Identity;
use crate::auth::session::LoginState;
use crate::idp::credential::AssertionError;
use crate::idp::jwks::{Jwks, JwksError};
use crate::idp::token::{Claims, IssuerMatch, LogoutClaims, TokenError, Verifier};
use crate::ops::metrics::Metrics;
use crate::outbound::{self, FetchError, HttpClient};

const TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 7523 §2.2.
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A sign-in first checks that the provider answers, so a browser gets
/// our explanation rather than its own connection error; the answer is
/// reused this long.
const REACHABLE_TTL: Duration = Duration::from_secs(5);
const REACHABLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bearer tokens are verified once, then served from memory for a while
/// (an RS256 check costs ~10 µs; API clients repeat the same token).
const BEARER_CACHE_ENTRIES: u64 = 10_000;
const BEARER_CACHE_TTL: Duration = Duration::from_secs(300);
/// A refresh result is shared by requests that carried the same refresh
/// token within this time (providers may rotate refresh tokens); an
/// unreachable token endpoint is asked again after it.
const REFRESH_REUSE: Duration = Duration::from_secs(60);

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot fetch the discovery document: {0}")]
    Fetch(#[from] FetchError),
    #[error("the discovery document at {uri} is not valid: {message}")]
    Parse { uri: String, message: String },
    #[error("the discovery document names issuer `{found}`, but oidc.issuer is `{expected}` (they must match exactly, trailing slash included)")]
    Issuer { expected: String, found: String },
    #[error("the discovery document names the multi-tenant issuer `{found}`: users of any tenant could sign in; list the tenant ids that may in oidc.allowed_tenants")]
    TenantsNeeded { found: String },
    #[error(transparent)]
    Keys(#[from] JwksError),
}

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("the sign-in provider has not been reached yet")]
    NotReady,
    #[error("the sign-in provider does not answer")]
    Unreachable,
    #[error("the provider refused the code exchange: {error}")]
    Refused {
        error: String,
        description: Option<String>,
    },
    #[error("the code exchange failed: {0}")]
    Exchange(String),
    #[error("the app's credential could not be used: {0}")]
    Credential(#[from] AssertionError),
    #[error("the provider sent no ID token")]
    NoIdToken,
    #[error("the ID token was rejected: {0}")]
    Token(#[from] TokenError),
}

/// What discovery found, for `authgate check`.
pub struct Discovered {
    pub issuer: String,
    pub jwks_uri: String,
    pub keys: usize,
    pub multi_tenant: bool,
}

/// What a finished sign-in (or a refresh) yields.
#[derive(Clone)]
pub struct SignedIn {
    pub claims: Claims,
    pub id_token: String,
    pub refresh_token: Option<String>,
    pub access_token: String,
}

/// Everything learnt from discovery.
struct Provider {
    metadata: CoreProviderMetadata,
    verifier: Verifier,
    /// RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0).
    end_session: Option<Url>,
}

/// Why a session could not be renewed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    /// The provider said no (`invalid_grant`: revoked, expired, user
    /// disabled): the user must sign in again.
    #[error("the provider refused the refresh token: {0}")]
    Refused(String),
    /// The provider could not be asked; try again later.
    #[error("the refresh could not be done: {0}")]
    Unavailable(String),
}

/// The tenant id an Entra issuer names (`https://<host>/<tenant id>/v2.0`,
/// or v1's `https://sts.windows.net/<tenant id>/`), when its first path
/// segment is one.
pub fn issuer_tenant(issuer: &str) -> Option<String> {
    let path = issuer.split_once("://")?.1.split_once('/')?.1;
    let first = path.split('/').next()?;
    uuid::Uuid::parse_str(first).ok().map(|_| first.to_owned())
}

/// How the app proves itself to the token endpoint.
enum Credential {
    /// Sent by openidconnect itself (basic or in the body).
    Secret,
    Certificate(crate::idp::credential::CertificateCredential),
    Federated(std::path::PathBuf),
}

pub struct Oidc {
    metrics: Metrics,
    config: OidcConfig,
    credential: Credential,
    /// Refreshes in flight or just done, keyed by refresh token, so
    /// parallel requests of one browser refresh once.
    refreshes: moka::future::Cache<String, Arc<Result<SignedIn, RefreshError>>>,
    /// Verified bearer tokens, keyed by the whole token; `exp` is checked
    /// again on every hit.
    bearers: moka::future::Cache<String, Arc<Claims>>,
    http: HttpClient,
    discovery_uri: String,
    provider: OnceLock<Provider>,
    reachable: moka::future::Cache<(), bool>,
    /// Asked for the groups of users in overage (`oidc.groups_overage =
    /// "graph"`, on a provider with a Graph).
    graph: Option<Graph>,
}

impl Oidc {
    pub fn new(
        config: OidcConfig,
        http: HttpClient,
        metrics: Metrics,
    ) -> Result<Arc<Oidc>, crate::idp::credential::CredentialError> {
        let credential = match (&config.client_certificate, &config.federated_token_path) {
            (Some((cert, key)), _) => Credential::Certificate(
                crate::idp::credential::CertificateCredential::load(cert, key)?,
            ),
            (None, Some(path)) => Credential::Federated(path.clone()),
            (None, None) => Credential::Secret,
        };
        let graph = match (&config.graph_url, config.groups_overage) {
            (Some(url), GroupsOverage::Graph) => Some(Graph::new(url, metrics.clone())),
            _ => None,
        };
        Ok(Arc::new(Oidc {
            graph,
            metrics,
            credential,
            refreshes: moka::future::Cache::builder()
                .max_capacity(BEARER_CACHE_ENTRIES)
                .time_to_live(REFRESH_REUSE)
                .build(),
            bearers: moka::future::Cache::builder()
                .max_capacity(BEARER_CACHE_ENTRIES)
                .time_to_live(BEARER_CACHE_TTL)
                .build(),
            discovery_uri: format!(
                "{}/.well-known/openid-configuration",
                config.issuer.trim_end_matches('/')
            ),
            config,
            http,
            provider: OnceLock::new(),
            reachable: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(REACHABLE_TTL)
                .build(),
        }))
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// True once discovery and the first key fetch succeeded.
    pub fn is_ready(&self) -> bool {
        self.provider.get().is_some()
    }

    /// Discovers the provider, retrying with backoff while it is
    /// unreachable (the gateway serves and reports not-ready meanwhile),
    /// then keeps its keys fresh.
    pub async fn discover_until_ready(self: Arc<Self>) {
        let mut wait = RETRY_FIRST;
        let jwks = loop {
            match self.discover().await {
                Ok((provider, jwks)) => {
                    let _ = self.provider.set(provider);
                    break jwks;
                }
                Err(e) => {
                    tracing::warn!(error = %e, issuer = %self.config.issuer, retry_in = ?wait, "sign-in provider not ready");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        };
        tracing::info!(issuer = %self.config.issuer, "sign-in provider ready");
        jwks.refresh_periodically(self.config.jwks_refresh).await;
    }

    async fn discover(&self) -> Result<(Provider, Arc<Jwks>), DiscoveryError> {
        let uri = &self.discovery_uri;
        self.metrics.provider_request("discovery");
        let body = outbound::get_json(&self.http, uri, TIMEOUT).await?;
        let metadata: CoreProviderMetadata =
            serde_json::from_slice(&body).map_err(|e| DiscoveryError::Parse {
                uri: uri.to_owned(),
                message: e.to_string(),
            })?;
        // Not part of the core metadata type.
        let end_session = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|doc| {
                doc["end_session_endpoint"]
                    .as_str()
                    .and_then(|u| Url::parse(u).ok())
            });
        let found = metadata.issuer().as_str().to_owned();
        // Any discovery document with a `{tenantid}` issuer is
        // multi-tenant, whatever host and path it was fetched from (US
        // Government, China, External ID, a provider of its own).
        let issuer = if found.contains("{tenantid}") {
            if self.config.allowed_tenants.is_empty() {
                return Err(DiscoveryError::TenantsNeeded { found });
            }
            IssuerMatch::Template(found)
        } else if found == self.config.issuer {
            IssuerMatch::Exact(found)
        } else {
            return Err(DiscoveryError::Issuer {
                expected: self.config.issuer.clone(),
                found,
            });
        };
        let jwks = Arc::new(Jwks::new(
            metadata.jwks_uri().url().to_string(),
            self.http.clone(),
            self.metrics.clone(),
        ));
        jwks.current().await?;
        let issuer_tenant = match &issuer {
            IssuerMatch::Exact(exact) => issuer_tenant(exact),
            IssuerMatch::Template(_) => None,
        };
        let verifier = Verifier {
            issuer,
            audience: self.config.client_id.clone(),
            bearer_audiences: self.config.bearer_audiences.clone(),
            algorithms: self.config.algorithms.clone(),
            skew: self.config.clock_skew,
            allowed_tenants: self.config.allowed_tenants.clone(),
            issuer_tenant,
            bearer_scopes: self.config.bearer_scopes.clone(),
            bearer_app_tokens: self.config.bearer_app_tokens,
            v1_issuer: self.config.bearer_v1_issuer.clone(),
            jwks: jwks.clone(),
        };
        Ok((
            Provider {
                metadata,
                verifier,
                end_session,
            },
            jwks,
        ))
    }

    /// Discovers the provider once, for `authgate check`: what it found,
    /// or why it failed.
    pub async fn discover_once(&self) -> Result<Discovered, DiscoveryError> {
        let (provider, jwks) = self.discover().await?;
        let keys = jwks.current().await?.len();
        let discovered = Discovered {
            issuer: provider.metadata.issuer().to_string(),
            jwks_uri: provider.metadata.jwks_uri().url().to_string(),
            keys,
            multi_tenant: matches!(provider.verifier.issuer, IssuerMatch::Template(_)),
        };
        let _ = self.provider.set(provider);
        Ok(discovered)
    }

    /// An app-only access token for `resource` (scope `<resource>/.default`)
    /// from the token endpoint of `tenant`, with the app's own credential,
    /// and when it expires (Unix seconds). A multi-tenant issuer's token
    /// endpoint (`/organizations/…`) cannot issue app-only tokens: the
    /// tenant's own (`/<tenant id>/oauth2/v2.0/token`) is asked.
    pub async fn app_token(
        &self,
        tenant: &str,
        resource: &str,
    ) -> Result<(String, u64), SignInError> {
        let provider = self.provider.get().ok_or(SignInError::NotReady)?;
        let mut endpoint = token_endpoint(provider).cloned().ok_or_else(|| {
            SignInError::Exchange("the provider publishes no token endpoint".into())
        })?;
        if matches!(provider.verifier.issuer, IssuerMatch::Template(_)) {
            endpoint = tenant_endpoint(&endpoint, tenant);
        }
        let client = self
            .client(provider)
            .set_token_uri(TokenUrl::from_url(endpoint.clone()));
        let mut request = client
            .exchange_client_credentials()
            .add_scope(Scope::new(format!("{resource}/.default")));
        for (name, value) in self.assertion(Some(&endpoint))? {
            request = request.add_extra_param(name, value);
        }
        let response: CoreTokenResponse = request
            .request_async(&Idp(&self.http, &self.metrics))
            .await
            .map_err(explain_token_error)?;
        let lifetime = response.expires_in().map_or(300, |d| d.as_secs());
        Ok((
            response.access_token().secret().clone(),
            crate::clock::now() + lifetime,
        ))
    }

    /// Microsoft Graph, when users in overage are looked up there.
    pub fn graph(&self) -> Option<&Graph> {
        self.graph.as_ref()
    }

    /// `identity` with its groups from Microsoft Graph when its token
    /// listed none for being in too many, and Graph is to be asked; as it
    /// was otherwise (its groups then stay unknown, never "none").
    pub async fn with_groups(&self, mut identity: Identity) -> Identity {
        if !identity.groups_overage || identity.app {
            return identity;
        }
        let Some(graph) = &self.graph else {
            if self.config.groups_overage == GroupsOverage::Graph {
                Metrics::outcome(&self.metrics.graph_lookups, "no_graph");
                tracing::warn!(user = %identity.username, "the user is in more groups than the token lists, and this provider has no Microsoft Graph to ask (oidc.graph_url)");
            }
            return identity;
        };
        let tenant = identity.tenant.clone().unwrap_or_default();
        match graph.member_groups(self, &tenant, &identity.user_id).await {
            Ok(groups) => {
                tracing::debug!(user = %identity.username, groups = groups.len(), "groups from Microsoft Graph");
                identity.groups = groups;
                identity.groups_from_graph = true;
            }
            Err(e) => {
                tracing::warn!(user = %identity.username, error = %e, "the groups of a user in more groups than the token lists are unknown");
            }
        }
        identity
    }

    /// The client the gateway calls the provider and Graph with.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// Asks the token endpoint for a client-credentials token (for Entra,
    /// scope `<client id>/.default`), which makes it judge the app's
    /// credential. `Ok` when the credential was accepted, even if the
    /// grant itself was not allowed.
    pub async fn probe_credential(&self) -> Result<(), SignInError> {
        let provider = self.provider.get().ok_or(SignInError::NotReady)?;
        let client = self.client(provider);
        let mut request = client
            .exchange_client_credentials()
            .map_err(|e| SignInError::Exchange(e.to_string()))?
            .add_scope(Scope::new(format!("{}/.default", self.config.client_id)));
        for (name, value) in self.assertion(token_endpoint(provider))? {
            request = request.add_extra_param(name, value);
        }
        let result: Result<CoreTokenResponse, _> =
            request.request_async(&Idp(&self.http, &self.metrics)).await;
        match result.map_err(explain_token_error) {
            Ok(_) => Ok(()),
            // RFC 6749 §5.2: these are the credential's fault.
            Err(SignInError::Refused { error, description })
                if error == "invalid_client" || error == "unauthorized_client" =>
            {
                Err(SignInError::Refused { error, description })
            }
            Err(SignInError::Refused { .. }) => Ok(()),
            Err(other) => Err(other),
        }
    }

    /// Verifies an `Authorization: Bearer` token from an API client.
    pub async fn verify_bearer(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        let provider = self.provider.get().ok_or(TokenError::Other(
            "the provider has not been reached yet".into(),
        ))?;
        if let Some(claims) = self.bearers.get(token).await {
            if claims.exp + provider.verifier.skew.as_secs() > crate::clock::now() {
                Metrics::outcome(&self.metrics.token_validations, "bearer_cached");
                return Ok(claims);
            }
            self.bearers.invalidate(token).await;
            self.validated("bearer", false);
            return Err(TokenError::Expired);
        }
        let verified = provider.verifier.bearer(token).await;
        self.validated("bearer", verified.is_ok());
        let mut claims = verified?;
        // Asked once per token, kept with it in the cache.
        let identity = claims.identity();
        if identity.groups_overage {
            let identity = self.with_groups(identity).await;
            if identity.groups_from_graph {
                claims.graph_groups = Some(identity.groups);
            }
        }
        let claims = Arc::new(claims);
        self.bearers.insert(token.to_owned(), claims.clone()).await;
        Ok(claims)
    }

    /// Verifies a back-channel logout token the provider posted.
    pub async fn verify_logout_token(&self, token: &str) -> Result<LogoutClaims, TokenError> {
        let provider = self.provider.get().ok_or(TokenError::Other(
            "the provider has not been reached yet".into(),
        ))?;
        provider.verifier.logout_token(token).await
    }

    /// Whether `iss` names this provider (a front-channel logout's).
    pub fn accepts_issuer(&self, iss: &str) -> bool {
        self.provider
            .get()
            .is_some_and(|p| p.verifier.issuer.accepts(iss))
    }

    fn validated(&self, kind: &'static str, valid: bool) {
        let outcome = match (kind, valid) {
            ("id_token", true) => "id_token_valid",
            ("id_token", false) => "id_token_rejected",
            (_, true) => "bearer_valid",
            (_, false) => "bearer_rejected",
        };
        Metrics::outcome(&self.metrics.token_validations, outcome);
    }

    /// The gateway's metrics, for the sign-in steps to record.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where to send the browser to end the provider's session, coming
    /// back to `post_logout_redirect`.
    pub fn end_session_url(&self, post_logout_redirect: &str) -> Option<Url> {
        let mut url = self.provider.get()?.end_session.clone()?;
        url.query_pairs_mut()
            .append_pair("client_id", &self.config.client_id)
            .append_pair("post_logout_redirect_uri", post_logout_redirect);
        Some(url)
    }

    fn client(&self, provider: &Provider) -> Client {
        let redirect =
            RedirectUrl::new(self.config.redirect_uri.clone()).expect("validated by config");
        CoreClient::from_provider_metadata(
            provider.metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            self.config.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect)
        .set_auth_type(match self.config.client_auth {
            ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
            // Assertions go in the body, next to the client id.
            _ => AuthType::RequestBody,
        })
    }

    /// The extra token-request parameters that carry a client assertion
    /// (RFC 7523 §2.2) to `token_endpoint`, when the app proves itself
    /// with a certificate or a federated token; none for a secret, which
    /// openidconnect sends.
    fn assertion(
        &self,
        token_endpoint: Option<&Url>,
    ) -> Result<Vec<(&'static str, String)>, AssertionError> {
        let assertion = match &self.credential {
            Credential::Secret => return Ok(Vec::new()),
            Credential::Certificate(certificate) => {
                let audience = token_endpoint.ok_or(AssertionError::NoTokenEndpoint)?;
                certificate.assertion(&self.config.client_id, audience.as_str())?
            }
            // Read each time: the platform rotates the file's token.
            Credential::Federated(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|source| AssertionError::FederatedFile {
                    path: path.clone(),
                    source,
                })?,
        };
        Ok(vec![
            ("client_assertion_type", ASSERTION_TYPE.to_owned()),
            ("client_assertion", assertion),
        ])
    }

    /// The provider's authorization URL for a new sign-in, and what the
    /// callback will need to finish it. `step_up`: authentication context
    /// ids the ID token must carry in `acrs`, asked for with the `claims`
    /// parameter (OpenID Connect Core §5.5), as Entra documents for
    /// authentication contexts
    /// (<https://learn.microsoft.com/entra/identity-platform/developer-guide-conditional-access-authentication-context>).
    pub async fn start(
        &self,
        return_to: String,
        step_up: Vec<String>,
    ) -> Result<(String, LoginState), SignInError> {
        let provider = self.provider.get().ok_or(SignInError::NotReady)?;
        let answers = self
            .reachable
            .get_with((), async {
                self.metrics.provider_request("probe");
                outbound::get_json(&self.http, &self.discovery_uri, REACHABLE_TIMEOUT)
                    .await
                    .is_ok()
            })
            .await;
        if !answers {
            return Err(SignInError::Unreachable);
        }
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = self.client(provider);
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in self.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        if self.config.response_mode == ResponseMode::FormPost {
            request = request.add_extra_param("response_mode", "form_post");
        }
        if !step_up.is_empty() {
            let acrs = match step_up.as_slice() {
                [one] => serde_json::json!({ "essential": true, "value": one }),
                many => serde_json::json!({ "essential": true, "values": many }),
            };
            let claims = serde_json::json!({ "id_token": { "acrs": acrs } });
            request = request.add_extra_param("claims", claims.to_string());
        }
        let (url, state, nonce) = request.url();
        let login = LoginState {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
            return_to,
            shortened: false,
            step_up,
            started_at: crate::clock::now(),
        };
        Ok((url.to_string(), login))
    }

    /// Exchanges the callback's code and verifies the ID token.
    pub async fn finish(&self, login: &LoginState, code: &str) -> Result<SignedIn, SignInError> {
        let provider = self.provider.get().ok_or(SignInError::NotReady)?;
        let client = self.client(provider);
        let mut request = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| SignInError::Exchange(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(login.pkce_verifier.clone()));
        for (name, value) in self.assertion(token_endpoint(provider))? {
            request = request.add_extra_param(name, value);
        }
        let response: CoreTokenResponse = request
            .request_async(&Idp(&self.http, &self.metrics))
            .await
            .map_err(explain_token_error)?;
        let id_token = response
            .id_token()
            .ok_or(SignInError::NoIdToken)?
            .to_string();
        let verified = provider.verifier.id_token(&id_token, &login.nonce).await;
        self.validated("id_token", verified.is_ok());
        let claims = verified?;
        Ok(SignedIn {
            claims,
            id_token,
            refresh_token: response.refresh_token().map(|t| t.secret().clone()),
            access_token: response.access_token().secret().clone(),
        })
    }

    /// Renews the tokens of `subject`'s session with its refresh token.
    /// Concurrent calls with one token share one refresh; the result is
    /// kept a while only when the provider rotated the token (requests
    /// still carrying the old one must not spend it again), so a revoked
    /// grant is noticed on the next request otherwise.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        subject: &str,
    ) -> Arc<Result<SignedIn, RefreshError>> {
        let outcome = self
            .refreshes
            .get_with(refresh_token.to_owned(), async {
                Arc::new(self.refresh_now(refresh_token, subject).await)
            })
            .await;
        // Kept for REFRESH_REUSE: a rotated token's result (its old value
        // must not be spent twice), a refusal, and an unreachable token
        // endpoint, which is asked again only once that has passed, not by
        // every request of the session meanwhile.
        let kept_token =
            matches!(&*outcome, Ok(s) if s.refresh_token.as_deref() == Some(refresh_token));
        if kept_token {
            self.refreshes.invalidate(refresh_token).await;
        }
        outcome
    }

    async fn refresh_now(
        &self,
        refresh_token: &str,
        subject: &str,
    ) -> Result<SignedIn, RefreshError> {
        let unavailable = |e: &dyn std::fmt::Display| RefreshError::Unavailable(e.to_string());
        let provider = self
            .provider
            .get()
            .ok_or_else(|| unavailable(&"the provider has not been reached"))?;
        let client = self.client(provider);
        let token = RefreshToken::new(refresh_token.to_owned());
        let mut request = client
            .exchange_refresh_token(&token)
            .map_err(|e| unavailable(&e))?;
        for (name, value) in self
            .assertion(token_endpoint(provider))
            .map_err(|e| unavailable(&e))?
        {
            request = request.add_extra_param(name, value);
        }
        let response: CoreTokenResponse = request
            .request_async(&Idp(&self.http, &self.metrics))
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => {
                    RefreshError::Refused(r.error().to_string())
                }
                other => unavailable(&other),
            })?;
        let id_token = response
            .id_token()
            .ok_or_else(|| RefreshError::Refused("no ID token in the refresh response".into()))?
            .to_string();
        let claims = provider
            .verifier
            .refreshed_id_token(&id_token, subject)
            .await
            .map_err(|e| RefreshError::Refused(e.to_string()))?;
        Ok(SignedIn {
            claims,
            id_token,
            refresh_token: Some(
                response
                    .refresh_token()
                    .map(|t| t.secret().clone())
                    .unwrap_or_else(|| refresh_token.to_owned()),
            ),
            access_token: response.access_token().secret().clone(),
        })
    }
}

type TokenRequestError =
    RequestTokenError<HttpClientError<FetchError>, StandardErrorResponse<CoreErrorResponseType>>;

fn explain_token_error(error: TokenRequestError) -> SignInError {
    match error {
        RequestTokenError::ServerResponse(response) => SignInError::Refused {
            error: response.error().to_string(),
            description: response.error_description().cloned(),
        },
        other => SignInError::Exchange(other.to_string()),
    }
}

/// `endpoint` (`https://<host>/organizations/oauth2/v2.0/token`) of
/// `tenant` instead (`https://<host>/<tenant>/oauth2/v2.0/token`).
fn tenant_endpoint(endpoint: &Url, tenant: &str) -> Url {
    let mut of_tenant = endpoint.clone();
    let path = endpoint.path().trim_start_matches('/');
    let rest = path.split_once('/').map_or("", |(_, rest)| rest);
    of_tenant.set_path(&format!("/{tenant}/{rest}"));
    of_tenant
}

fn token_endpoint(provider: &Provider) -> Option<&Url> {
    provider.metadata.token_endpoint().map(|u| u.url())
}

/// Drives `openidconnect` with the gateway's own client.
struct Idp<'a>(&'a HttpClient, &'a Metrics);

impl<'c> AsyncHttpClient<'c> for Idp<'_> {
    type Error = HttpClientError<FetchError>;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Self::Error>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            self.1.provider_request("token");
            outbound::exchange(self.0, request, TIMEOUT)
                .await
                .map_err(|e| HttpClientError::Other(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_tenant_token_endpoint_becomes_the_tenants_own() {
        let tenant = "7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b";
        for (endpoint, expected) in [
            (
                "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
                format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
            ),
            (
                "https://login.partner.microsoftonline.cn/common/oauth2/v2.0/token",
                format!("https://login.partner.microsoftonline.cn/{tenant}/oauth2/v2.0/token"),
            ),
        ] {
            let endpoint = Url::parse(endpoint).unwrap();
            assert_eq!(tenant_endpoint(&endpoint, tenant).as_str(), expected);
        }
    }

    #[test]
    fn an_exact_entra_issuer_names_its_tenant() {
        let tenant = "7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b";
        for issuer in [
            format!("https://login.microsoftonline.com/{tenant}/v2.0"),
            format!("https://sts.windows.net/{tenant}/"),
            format!("https://contoso.ciamlogin.com/{tenant}/v2.0"),
        ] {
            assert_eq!(issuer_tenant(&issuer).as_deref(), Some(tenant), "{issuer}");
        }
        for issuer in [
            "https://accounts.example.com",
            "https://idp.example.com/realms/x",
        ] {
            assert_eq!(issuer_tenant(issuer), None, "{issuer}");
        }
    }
}
