//! Microsoft Graph, asked for the groups of a user whose token lists none
//! because they are in too many (Entra's "groups overage": more than 200
//! in a JWT, `_claim_names` instead of `groups`). The token's own
//! `_claim_sources` endpoint names the retired Azure AD Graph
//! (`graph.windows.net`) and is never called.
//!
//! One call per sign-in or renewal: `POST /v1.0/users/{oid}/getMemberGroups`
//! returns every group the user is in, transitively, up to 11,000 ids
//! (<https://learn.microsoft.com/graph/api/user-getmembergroups>), which is
//! what the `groups` claim would have held; `transitiveMemberOf` would take
//! a page per 100 groups, `checkMemberGroups` needs the groups to ask about
//! beforehand. It takes an app-only token with the application permissions
//! `User.Read.All` and `GroupMember.Read.All` (admin consent).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::StatusCode;

use super::provider::{Oidc, SignInError};
use crate::clock::now;
use crate::ops::metrics::Metrics;
use crate::outbound::{self, FetchError};

const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` a throttled look-up waits for before it asks
/// once more: a browser is waiting on its sign-in's callback.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// An app-only token is asked for again this long before it expires.
const TOKEN_MARGIN: u64 = 120;
/// What an admin must grant the app, for the pages and `authgate check`.
pub const PERMISSIONS: &str = "User.Read.All and GroupMember.Read.All";

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("no app-only token for Microsoft Graph: {0}")]
    Token(#[from] SignInError),
    #[error("the user has no Entra object id (oid) to look up")]
    NoObjectId,
    #[error("Microsoft Graph refused ({status}, {code}): {message}; the app needs the application permissions {PERMISSIONS}, with admin consent")]
    Refused {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("Microsoft Graph is throttling the app (429, {})", retry_after(.0))]
    Throttled(Option<Duration>),
    #[error("Microsoft Graph could not be asked: {0}")]
    Unavailable(#[from] FetchError),
    #[error("Microsoft Graph answered {0} with something other than a list of group ids")]
    Unreadable(StatusCode),
}

fn retry_after(wait: &Option<Duration>) -> String {
    match wait {
        Some(wait) => format!("retry after {} s", wait.as_secs()),
        None => "no Retry-After".to_owned(),
    }
}

impl GraphError {
    /// The label it is counted under.
    pub fn outcome(&self) -> &'static str {
        match self {
            GraphError::Token(_) | GraphError::Refused { .. } | GraphError::NoObjectId => "refused",
            GraphError::Throttled(_) => "throttled",
            GraphError::Unavailable(_) | GraphError::Unreadable(_) => "unavailable",
        }
    }
}

pub struct Graph {
    /// Such as `https://graph.microsoft.com`, no trailing slash.
    base: String,
    /// App-only tokens by tenant, and when each expires.
    tokens: Mutex<HashMap<String, (String, u64)>>,
    metrics: Metrics,
}

#[derive(serde::Deserialize)]
struct Groups {
    value: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Failure {
    error: FailureDetail,
}

#[derive(serde::Deserialize)]
struct FailureDetail {
    code: String,
    message: String,
}

impl Graph {
    pub fn new(base: &str, metrics: Metrics) -> Graph {
        Graph {
            base: base.trim_end_matches('/').to_owned(),
            tokens: Mutex::default(),
            metrics,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Every group `user` (an object id) of `tenant` is in, counted in
    /// `authgate_graph_lookups_total`. Throttled, it waits as long as
    /// Graph's `Retry-After` says, up to `MAX_RETRY_WAIT`, and asks once
    /// more, as Microsoft's guidance has clients do
    /// (<https://learn.microsoft.com/graph/throttling#best-practices-to-handle-throttling>).
    pub async fn member_groups(
        &self,
        oidc: &Oidc,
        tenant: &str,
        user: &str,
    ) -> Result<Vec<String>, GraphError> {
        let mut outcome = self.ask(oidc, tenant, user).await;
        if let Err(GraphError::Throttled(Some(wait))) = outcome {
            if wait <= MAX_RETRY_WAIT {
                tokio::time::sleep(wait).await;
                outcome = self.ask(oidc, tenant, user).await;
            }
        }
        let label = match &outcome {
            Ok(_) => "resolved",
            Err(e) => e.outcome(),
        };
        Metrics::outcome(&self.metrics.graph_lookups, label);
        outcome
    }

    /// Whether the app may look up groups in `tenant`: a look-up of a user
    /// that cannot exist is refused (403) without the permissions, and not
    /// found (404) with them.
    pub async fn probe(&self, oidc: &Oidc, tenant: &str) -> Result<(), GraphError> {
        match self.ask(oidc, tenant, &uuid::Uuid::nil().to_string()).await {
            Ok(_) => Ok(()),
            Err(GraphError::Refused { status, .. }) if status == StatusCode::NOT_FOUND => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn ask(&self, oidc: &Oidc, tenant: &str, user: &str) -> Result<Vec<String>, GraphError> {
        // A path segment from a verified token, but a path segment all the
        // same: only an object id (a GUID) goes into the URL.
        let user = uuid::Uuid::parse_str(user).map_err(|_| GraphError::NoObjectId)?;
        let token = self.token(oidc, tenant).await?;
        let uri = format!("{}/v1.0/users/{user}/getMemberGroups", self.base);
        let request = http::Request::post(&uri)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(br#"{"securityEnabledOnly":false}"#.to_vec())
            .map_err(|_| GraphError::Unreadable(StatusCode::BAD_REQUEST))?;
        self.metrics.provider_request("graph");
        let response = outbound::exchange(oidc.http(), request, TIMEOUT).await?;
        let status = response.status();
        if status == StatusCode::OK {
            return serde_json::from_slice::<Groups>(response.body())
                .map(|g| g.value)
                .map_err(|_| GraphError::Unreadable(status));
        }
        if status == StatusCode::UNAUTHORIZED {
            // Revoked or expired early: the next look-up asks anew.
            self.tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(tenant);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            // Seconds, the form Graph sends; an HTTP date is not waited for.
            let wait = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(GraphError::Throttled(wait));
        }
        if status.is_server_error() {
            return Err(GraphError::Unreadable(status));
        }
        let failure = serde_json::from_slice::<Failure>(response.body())
            .map(|f| (f.error.code, f.error.message))
            .unwrap_or_else(|_| ("unknown".into(), "no explanation".into()));
        Err(GraphError::Refused {
            status,
            code: failure.0,
            message: failure.1,
        })
    }

    /// The tenant's app-only token for Graph, kept until shortly before
    /// it expires.
    async fn token(&self, oidc: &Oidc, tenant: &str) -> Result<String, GraphError> {
        let kept = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .filter(|(_, expires)| now() + TOKEN_MARGIN < *expires)
            .map(|(token, _)| token.clone());
        if let Some(token) = kept {
            return Ok(token);
        }
        let (token, expires) = oidc.app_token(tenant, &self.base).await?;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.to_owned(), (token.clone(), expires));
        Ok(token)
    }
}
