//! The admin listener (`admin_listen`, loopback by default): `/metrics`
//! for anyone who can reach it, and the session endpoints, which need the
//! admin token since the listener may face a cluster network:
//!
//! - `GET /sessions[?user=UPN|OID]`: the live sessions (never an id or a
//!   token);
//! - `DELETE /sessions?user=UPN|OID`, `?session=HANDLE` or `?all=true`:
//!   ends them, here and (within `session.cache_ttl`) on every instance
//!   sharing the store.
//!
//! `authgate sessions` is the client of these, in [`client`]; with
//! sessions in Redis it asks Redis itself, so no gateway need be running.

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::auth::session::{AdminError, Sessions, Who};
use crate::config::Config;
use crate::ops::logging::AUDIT;
use crate::ops::metrics::Metrics;
use crate::pages;
use crate::state::{StateError, ADMIN_TOKEN_FILE};
use crate::Body;

/// The token the session endpoints want: `admin_token`, else the one
/// generated and kept under `state_dir` (which `authgate sessions`, run
/// with the same configuration, reads too).
pub fn token(config: &Config) -> Result<String, StateError> {
    match &config.admin_token {
        Some(token) => Ok(token.clone()),
        None => config.state_dir.secret(ADMIN_TOKEN_FILE),
    }
}

pub struct Admin {
    pub metrics: Metrics,
    /// `None` when the gateway has no sign-in.
    pub sessions: Option<Sessions>,
    pub token: String,
}

/// What the session endpoints, and `authgate sessions`, are asked.
#[derive(Debug)]
pub enum Ask {
    /// The live sessions, of one user (UPN or object id) or all.
    List(Option<String>),
    Revoke(Who),
}

impl Ask {
    /// Lists or ends sessions, as `{"sessions": [...]}` or `{"revoked": n}`.
    pub async fn perform(&self, sessions: &Sessions) -> Result<serde_json::Value, AdminError> {
        match self {
            Ask::List(user) => sessions
                .list(user.as_deref())
                .await
                .map(|listed| json!({ "sessions": listed })),
            Ask::Revoke(who) => {
                let count = sessions.revoke(who).await?;
                tracing::info!(target: AUDIT, who = ?who, count, "sessions revoked");
                Ok(json!({ "revoked": count }))
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct Query {
    user: Option<String>,
    session: Option<String>,
    #[serde(default)]
    all: bool,
}

impl Admin {
    pub async fn answer<B>(&self, req: Request<B>) -> Response<Body> {
        match req.uri().path() {
            "/metrics" if req.method() == Method::GET => {
                let mut response = Response::new(pages::full(self.metrics.render()));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/sessions" => self.sessions(&req).await,
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "here: GET /metrics, GET and DELETE /sessions",
            ),
        }
    }

    async fn sessions<B>(&self, req: &Request<B>) -> Response<Body> {
        if !self.authorized(req) {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send `Authorization: Bearer <admin token>` (admin_token, or the file admin.token \
                 under state_dir)",
            );
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let Some(sessions) = &self.sessions else {
            return error(
                StatusCode::NOT_FOUND,
                "no_sign_in",
                "this gateway has no sign-in, so no sessions",
            );
        };
        let Ok(query) = serde_urlencoded::from_str::<Query>(req.uri().query().unwrap_or("")) else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "parameters: user=UPN|OID, session=HANDLE, all=true",
            );
        };
        let ask = match *req.method() {
            Method::GET => Ask::List(query.user),
            Method::DELETE => Ask::Revoke(match (query.user, query.session, query.all) {
                (Some(user), None, false) => Who::User(user),
                (None, Some(handle), false) => Who::Session(handle),
                (None, None, true) => Who::All,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "whose_sessions",
                        "say whose sessions to end: exactly one of user=UPN|OID, \
                             session=HANDLE or all=true",
                    )
                }
            }),
            _ => {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method",
                    "GET lists sessions, DELETE ends them",
                )
            }
        };
        match ask.perform(sessions).await {
            Ok(body) => pages::json(StatusCode::OK, body),
            Err(e @ AdminError::NoStore) => error(StatusCode::CONFLICT, "no_store", &e.to_string()),
            Err(AdminError::Store(e)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                &e.to_string(),
            ),
        }
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        // Compared in constant time: the listener may be reachable by
        // more than the admin.
        aws_lc_rs::constant_time::verify_slices_are_equal(sent.as_bytes(), self.token.as_bytes())
            .is_ok()
    }
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    pages::json(status, json!({ "error": code, "detail": detail }))
}

/// `authgate sessions`: the same requests, asked of Redis when sessions
/// live there, else sent to the running gateway this configuration
/// describes (the embedded store's file is locked by it).
pub mod client {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    use super::Ask;
    use crate::auth::session::{AdminError, OpenError, SessionConfig, Sessions, StoreKind, Who};
    use crate::config::Config;
    use crate::ops::metrics::Metrics;
    use crate::state::{ADMIN_TOKEN_FILE, SESSION_SECRET_FILE};

    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        #[error("admin_listen is off, and `authgate sessions` talks to the gateway through it")]
        NoAdminListener,
        #[error(transparent)]
        Token(#[from] crate::state::StateError),
        #[error(
            "no admin token: admin_token is unset and the gateway has not made one in {0} yet \
             (has it run with this configuration and state_dir?)"
        )]
        NoToken(String),
        #[error("cannot reach the gateway's admin listener at {addr} (is authgate running with this configuration?): {source}")]
        Connect {
            addr: std::net::SocketAddr,
            source: std::io::Error,
        },
        #[error("the admin listener's answer broke off: {0}")]
        Http(#[from] hyper::Error),
        #[error("the gateway answered {status}: {detail}")]
        Refused { status: StatusCode, detail: String },
        #[error(
            "no session secret: session.secret is unset and the gateway has not made one in {0} \
             yet (has it run with this configuration and state_dir?)"
        )]
        NoSecret(String),
        #[error(transparent)]
        Open(#[from] OpenError),
        #[error(transparent)]
        Sessions(#[from] AdminError),
        #[error("the admin listener ends sessions by user, handle or all, not {0}")]
        NotAskable(String),
    }

    /// Performs `ask` and returns the JSON answer the admin endpoint gives.
    pub async fn call(config: &Config, ask: &Ask) -> Result<serde_json::Value, ClientError> {
        match config
            .session
            .as_ref()
            .filter(|s| s.store == StoreKind::Redis)
        {
            Some(session) => in_redis(config, session, ask).await,
            None => over_admin_listener(config, ask).await,
        }
    }

    async fn in_redis(
        config: &Config,
        session: &SessionConfig,
        ask: &Ask,
    ) -> Result<serde_json::Value, ClientError> {
        // The gateway's generated secret is read, never made here: one made
        // by the command would open none of the gateway's sessions.
        if session.secrets.is_empty()
            && config.state_dir.kept_secret(SESSION_SECRET_FILE)?.is_none()
        {
            let dir = config.state_dir.path().display().to_string();
            return Err(ClientError::NoSecret(dir));
        }
        let sessions = Sessions::open(session, &config.state_dir, &Metrics::default())?;
        Ok(ask.perform(&sessions).await?)
    }

    async fn over_admin_listener(
        config: &Config,
        ask: &Ask,
    ) -> Result<serde_json::Value, ClientError> {
        let (method, query) = match ask {
            Ask::List(user) => (Method::GET, user.as_deref().map(|u| ("user", u))),
            Ask::Revoke(Who::User(user)) => (Method::DELETE, Some(("user", user.as_str()))),
            Ask::Revoke(Who::Session(handle)) => {
                (Method::DELETE, Some(("session", handle.as_str())))
            }
            Ask::Revoke(Who::All) => (Method::DELETE, Some(("all", "true"))),
            Ask::Revoke(who) => return Err(ClientError::NotAskable(format!("{who:?}"))),
        };
        let mut addr = config.admin_listen.ok_or(ClientError::NoAdminListener)?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        // Read, never made here: a command run as another user must not
        // create state_dir files the gateway cannot read.
        let token = match &config.admin_token {
            Some(token) => token.clone(),
            None => config
                .state_dir
                .kept_secret(ADMIN_TOKEN_FILE)?
                .ok_or_else(|| {
                    ClientError::NoToken(config.state_dir.path().display().to_string())
                })?,
        };
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let query = serde_urlencoded::to_string(query.as_slice()).expect("pairs of strings encode");
        let request = Request::builder()
            .method(method)
            .uri(format!("/sessions?{query}"))
            .header(http::header::HOST, addr.to_string())
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let response = send.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if status != StatusCode::OK {
            let detail = json["detail"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused { status, detail });
        }
        Ok(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::session::{SessionConfig, StoreKind};
    use crate::state::StateDir;
    use std::time::Duration;

    const TOKEN: &str = "an-admin-token-of-some-length";

    fn admin(dir: &std::path::Path) -> Admin {
        let config = SessionConfig {
            store: StoreKind::Embedded,
            cache_ttl: Duration::from_secs(5),
            secrets: vec![vec![3; 32]],
            refresh_before: Duration::from_secs(300),
            cookie_name: "__Host-authgate".into(),
            idle_timeout: Duration::from_secs(3600),
            lifetime: Duration::from_secs(7200),
            redis: None,
        };
        let metrics = Metrics::default();
        Admin {
            sessions: Some(Sessions::open(&config, &StateDir::new(dir), &metrics).unwrap()),
            metrics,
            token: TOKEN.into(),
        }
    }

    async fn status(admin: &Admin, method: &str, uri: &str, authorization: Option<&str>) -> u16 {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        admin
            .answer(request.body(()).unwrap())
            .await
            .status()
            .as_u16()
    }

    /// What anyone who reaches the listener may send: without the exact
    /// token nothing about sessions answers, and a request that does not
    /// say exactly whose sessions to end ends none.
    #[tokio::test]
    async fn the_session_endpoints_want_the_token_and_an_unambiguous_request() {
        let dir = tempfile::tempdir().unwrap();
        let admin = admin(dir.path());
        let bearer = format!("Bearer {TOKEN}");
        for authorization in [
            None,
            Some("Bearer "),
            Some("Bearer an-admin-token"),
            Some(&format!("Bearer {TOKEN}x")),
            Some(&format!("Basic {TOKEN}")),
            Some(TOKEN),
        ] {
            for method in ["GET", "DELETE"] {
                assert_eq!(
                    status(&admin, method, "/sessions?all=true", authorization).await,
                    401,
                    "{method} with {authorization:?}"
                );
            }
        }
        for query in [
            "",
            "?all=false",
            "?all=yes",
            "?all=true&user=alice",
            "?user=alice&session=abc",
            "?user=a&user=b",
        ] {
            let uri = format!("/sessions{query}");
            assert_eq!(
                status(&admin, "DELETE", &uri, Some(&bearer)).await,
                400,
                "{uri}"
            );
        }
        assert_eq!(
            status(&admin, "POST", "/sessions", Some(&bearer)).await,
            405
        );
        assert_eq!(
            status(&admin, "GET", "/sessions/../metrics", Some(&bearer)).await,
            404
        );
        assert_eq!(status(&admin, "GET", "/sessions", Some(&bearer)).await, 200);
        assert_eq!(
            status(&admin, "DELETE", "/sessions?all=true", Some(&bearer)).await,
            200
        );
        // Metrics need no token.
        assert_eq!(status(&admin, "GET", "/metrics", None).await, 200);
    }
}
