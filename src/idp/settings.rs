//! What the gateway knows of its identity provider and its own app
//! registration there.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How the gateway proves itself to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
    /// A JWT signed with the app's certificate key (`private_key_jwt`).
    PrivateKeyJwt,
    /// A JWT another issuer gave this workload, read fresh from a file
    /// (Entra workload identity federation): no secret at all.
    Federated,
}

/// What to do for a user whose token lists no groups because they are in
/// too many (Entra's groups overage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupsOverage {
    /// Ask Microsoft Graph for the user's groups.
    Graph,
    /// Refuse the user everywhere.
    Deny,
}

/// How the provider returns the browser to the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseMode {
    Query,
    FormPost,
}

#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// As configured, trailing slash and all (issuers compare exactly).
    pub issuer: String,
    /// True for Entra's `/common`, `/organizations` and `/consumers`.
    pub multi_tenant: bool,
    pub client_id: String,
    pub client_auth: ClientAuth,
    /// Set for the `client_secret_*` methods.
    pub client_secret: Option<String>,
    /// Certificate and key (PEM) for `private_key_jwt`.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// The assertion file for `federated`.
    pub federated_token_path: Option<PathBuf>,
    pub scopes: Vec<String>,
    pub callback_path: String,
    /// `public_url` + `callback_path`: what the admin registers in Entra.
    pub redirect_uri: String,
    pub response_mode: ResponseMode,
    pub pass_unknown_callbacks: bool,
    pub allowed_tenants: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub clock_skew: Duration,
    pub ca: Option<PathBuf>,
    pub jwks_refresh: Duration,
    /// Audiences accepted in `Authorization: Bearer` tokens.
    pub bearer_audiences: Vec<String>,
    /// Whether API clients may authenticate with bearer tokens at all.
    pub bearer: bool,
    /// Delegated bearer tokens must carry one of these in `scp`; empty:
    /// any scope of this API.
    pub bearer_scopes: Vec<String>,
    /// App-only tokens (a service principal, no user) may pass, to routes
    /// whose policy admits one of their app roles.
    pub bearer_app_tokens: bool,
    /// With `oidc.bearer_accept_v1`: the v1 issuer template
    /// (`https://sts.windows.net/{tenantid}/`) bearer tokens may carry.
    pub bearer_v1_issuer: Option<String>,
    pub groups_overage: GroupsOverage,
    /// Microsoft Graph's base URL (`oidc.graph_url`, else the issuer's
    /// cloud's); `None` for a provider that is not Entra.
    pub graph_url: Option<String>,
}
