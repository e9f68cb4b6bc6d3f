//! Sign-in as the browser sees it: the redirect to the provider, the
//! callback at `/api/oidc/callback` (ours, or the console's own when the
//! state is not ours), the session it leaves behind, and sign-out.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use http::header::{HeaderValue, AUTHORIZATION, SET_COOKIE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::{Authenticated, Unidentified};
use crate::auth::identity::Identity;
use crate::auth::policy::{self, Denial, Policy};
use crate::auth::session::{
    AdminError, Found, LastCookie, LoginState, Renewal, Session, Sessions, Who,
};
use crate::config::PublicUrl;
use crate::idp::cloud::Cloud;
use crate::idp::explain;
use crate::idp::provider::{Oidc, RefreshError};
use crate::idp::token::TokenError;
use crate::idp::GroupsOverage;
use crate::idp::{OidcConfig, ResponseMode};
use crate::ops::logging::AUDIT;
use crate::pages::{self, Page};
use crate::Body;

fn step_up_refused(unmet: &[&str]) -> Page {
    let mut page = Page::new(
        StatusCode::FORBIDDEN,
        "step_up_refused",
        "This page needs a stronger sign-in",
        format!(
            "You signed in again, but the sign-in did not satisfy the authentication context \
             {} this page requires (in Microsoft Entra, a Conditional Access policy such as \
             multifactor authentication or a compliant device).",
            unmet.join(", ")
        ),
    );
    page.advice.push(
        "The rest of the console stays open to you. Ask an administrator which sign-in \
         this page requires."
            .into(),
    );
    page.link = Some(("/".into(), "Back to the console"));
    page
}

/// Where a browser returns after signing in for `uri`: only a GET can be
/// replayed; anything else lands on `/`.
fn replayable(method: &Method, uri: &http::Uri) -> String {
    if method == Method::GET {
        safe_return_to(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
    } else {
        "/".to_owned()
    }
}

/// Largest form_post callback body read (a code, a state and an id).
const MAX_CALLBACK_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct SignIn {
    oidc: Arc<Oidc>,
    sessions: Sessions,
    public_url: PublicUrl,
    gateway_prefix: String,
    body_deadline: Duration,
    /// Sessions keep the provider's access token (`headers.easy_auth_tokens`).
    keep_access_token: bool,
}

/// What the callback endpoint decided.
pub enum Callback {
    Answered(Response<Body>),
    /// Not a sign-in this gateway started: the console's own (RustDesk
    /// Pro's OIDC login shares the path). Forward it as it came.
    NotOurs(Request<Body>),
}

/// The parameters a provider sends back (RFC 6749 §4.1.2, RFC 9207).
#[derive(Debug, Default, serde::Deserialize)]
struct CallbackParams {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl SignIn {
    /// `body_deadline`: how long a form_post callback body may take to
    /// arrive (a browser sends its few hundred bytes at once).
    pub fn new(
        oidc: Arc<Oidc>,
        sessions: Sessions,
        public_url: PublicUrl,
        gateway_prefix: String,
        body_deadline: Duration,
        keep_access_token: bool,
    ) -> SignIn {
        SignIn {
            oidc,
            sessions,
            public_url,
            gateway_prefix,
            body_deadline,
            keep_access_token,
        }
    }

    /// Whether `identity` may pass a route with `policy`: the gateway's
    /// own rule first (`oidc.groups_overage = "deny"` refuses users in
    /// overage on every route), then the route's.
    pub fn authorize(&self, policy: &Policy, identity: &Identity) -> Result<(), Denial> {
        match self.config().groups_overage {
            GroupsOverage::Deny if identity.groups_overage => Err(Denial::GroupsOverageRefused),
            _ => policy.check(identity),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.oidc.is_ready()
    }

    /// Whether the session store answers; `None` without one.
    pub async fn store_health(&self) -> Option<Result<(), crate::auth::session::StoreError>> {
        self.sessions.store_health().await
    }

    fn config(&self) -> &OidcConfig {
        self.oidc.config()
    }

    fn cloud(&self) -> Cloud {
        Cloud::of_issuer(&self.config().issuer)
    }

    pub fn is_callback(&self, path: &str) -> bool {
        path == self.config().callback_path
    }

    /// A session cookie, else an `Authorization: Bearer` token, and the
    /// `Set-Cookie` values the response must carry (a renewed session, a
    /// slid idle timer). `last` is the connection's (see [`LastCookie`]).
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        last: &LastCookie,
    ) -> Result<(Authenticated, Vec<HeaderValue>), Unidentified> {
        match self.sessions.read_remembering(headers, last).await {
            Found::Valid(session) => {
                let session = if session.identity.groups_unknown()
                    && !session.regrouped
                    && self.sessions.without_graph_groups()
                {
                    Box::pin(self.regroup(session, headers, last)).await
                } else {
                    session
                };
                let (session, cookies) = if self.sessions.due_for_refresh(&session) {
                    // Boxed, as every call to the provider is: inline, its
                    // future would grow every request's, which each client
                    // connection keeps an allocation of.
                    Box::pin(self.renew(session, headers))
                        .await
                        .ok_or(Unidentified::Nothing)?
                } else {
                    let cookies = self.sessions.touch(&session, headers);
                    (session, cookies)
                };
                return Ok((Authenticated::Session(session), cookies));
            }
            // A bearer token does not need the store; a browser does.
            Found::Unavailable if !headers.contains_key(AUTHORIZATION) => {
                return Err(Unidentified::StoreDown)
            }
            Found::None | Found::Unusable | Found::Unavailable => {}
        }
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|_| self.config().bearer);
        match token {
            Some(token) => Box::pin(self.oidc.verify_bearer(token))
                .await
                .map(|claims| {
                    let token = token.to_owned();
                    (Authenticated::Bearer { claims, token }, Vec::new())
                })
                .map_err(Unidentified::Bearer),
            None => Err(Unidentified::Nothing),
        }
    }

    /// A cookie-mode session opened without the groups Graph told at
    /// sign-in (they stay out of the cookie): asked for again, once per
    /// opening, and kept with it.
    async fn regroup(
        &self,
        session: Arc<Session>,
        headers: &HeaderMap,
        last: &LastCookie,
    ) -> Arc<Session> {
        let identity = self.oidc.with_groups(session.identity.clone()).await;
        let session = Arc::new(session.regrouped(identity));
        self.sessions.completed(headers, last, &session);
        session
    }

    /// Renews the session's tokens (its ID token is about to expire).
    /// `None` when the provider refused (revoked, user disabled) or the
    /// session was ended elsewhere: the user must sign in again. A
    /// provider that cannot be asked, or another instance renewing the
    /// same session right now, does not end it: it serves as it is.
    async fn renew(
        &self,
        session: Arc<Session>,
        request: &HeaderMap,
    ) -> Option<(Arc<Session>, Vec<HeaderValue>)> {
        let as_is = |session: Arc<Session>| {
            let cookies = self.sessions.touch(&session, request);
            Some((session, cookies))
        };
        let Some(refresh_token) = session.refresh_token.clone() else {
            return as_is(session);
        };
        let lock = match self.sessions.begin_renewal(&session).await {
            Ok(Renewal::Go(lock)) => lock,
            Ok(Renewal::Done(renewed)) => return Some((renewed, Vec::new())),
            Ok(Renewal::Ended) => return None,
            // Logged by the store when it failed.
            Ok(Renewal::Busy) | Err(_) => return as_is(session),
        };
        // On a task of its own: a request dropped midway (the browser
        // went away) must not lose a rotated refresh token, which the
        // provider has spent, nor hold the renewal lock.
        let this = self.clone();
        let (held, request) = (session.clone(), request.clone());
        tokio::spawn(async move {
            let renewed = this.refresh(held, &refresh_token, &request).await;
            this.sessions.end_renewal(lock).await;
            renewed
        })
        .await
        .unwrap_or_else(|_| as_is(session))
    }

    /// Renews the session's tokens now, whatever their age (App Service's
    /// `/.auth/refresh`): 200 once renewed, 401 without a session or when
    /// the provider refused (the session is then ended), an explanation
    /// when there is no refresh token or the provider cannot be asked.
    pub async fn renew_now(&self, headers: &HeaderMap, id: &str) -> Response<Body> {
        let session = match self.sessions.read(headers).await {
            Found::Valid(session) => session,
            Found::Unavailable => return pages::problem(pages::STORE_UNAVAILABLE, false, id),
            Found::None | Found::Unusable => {
                return pages::problem(pages::UNAUTHENTICATED, false, id)
            }
        };
        if session.refresh_token.is_none() {
            return Page::new(
                StatusCode::CONFLICT,
                "no_refresh_token",
                "This session cannot be renewed",
                "The provider gave no refresh token at sign-in: add `offline_access` to \
                 `oidc.scopes` to have one.",
            )
            .render(false, id);
        }
        match Box::pin(self.renew(session.clone(), headers)).await {
            // Anything but a renewal serves the session it was given.
            Some((renewed, cookies)) if !Arc::ptr_eq(&renewed, &session) => {
                let mut response =
                    pages::json(StatusCode::OK, serde_json::json!({ "renewed": true }));
                pages::append_cookies(&mut response, cookies);
                response
            }
            Some((_, cookies)) => {
                let mut response = Page::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "renewal_unavailable",
                    "The tokens were not renewed",
                    "The provider could not be asked, or another request is renewing them \
                     right now; try again in a moment.",
                )
                .render(false, id);
                pages::append_cookies(&mut response, cookies);
                response
            }
            None => {
                let mut response = pages::problem(pages::UNAUTHENTICATED, false, id);
                pages::append_cookies(&mut response, self.sessions.clear(headers));
                response
            }
        }
    }

    /// Asks the provider for new tokens and keeps them with the session.
    async fn refresh(
        &self,
        session: Arc<Session>,
        refresh_token: &str,
        request: &HeaderMap,
    ) -> Option<(Arc<Session>, Vec<HeaderValue>)> {
        let outcome = self
            .oidc
            .refresh(refresh_token, &session.identity.subject)
            .await;
        match &*outcome {
            Ok(signed_in) => {
                tracing::debug!(user = %session.identity.username, "session renewed");
                let identity = self.oidc.with_groups(signed_in.claims.identity()).await;
                let renewed = session
                    .renewed(
                        identity,
                        signed_in.id_token.clone(),
                        signed_in.refresh_token.clone(),
                        signed_in.claims.exp,
                    )
                    .with_access_token(
                        self.keep_access_token
                            .then(|| signed_in.access_token.clone()),
                    );
                match self.sessions.save(renewed, request).await {
                    Ok(saved) => Some(saved),
                    // Logged by the store; the session as it was serves
                    // this request, and renewal is tried again.
                    Err(_) => Some((session, Vec::new())),
                }
            }
            Err(RefreshError::Refused(reason)) => {
                tracing::info!(
                    target: AUDIT,
                    user = %session.identity.username,
                    tenant = session.identity.tenant.as_deref().unwrap_or(""),
                    reason,
                    "session ended: refresh refused"
                );
                // Logged by the store; the refusal stands either way.
                let _ = self.sessions.end(&session).await;
                None
            }
            Err(RefreshError::Unavailable(reason)) => {
                tracing::warn!(user = %session.identity.username, reason, "session not renewed; trying again later");
                let cookies = self.sessions.touch(&session, request);
                Some((session, cookies))
            }
        }
    }

    /// RFC 6750 §3: a rejected bearer token gets `invalid_token`.
    pub fn invalid_bearer(&self, error: &TokenError, id: &str) -> Response<Body> {
        tracing::info!(target: AUDIT, request_id = id, reason = %error, "bearer token refused");
        let page = Page::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "The bearer token was refused",
            error.to_string(),
        );
        let mut response = page.render(false, id);
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"authgate\", error=\"invalid_token\""),
        );
        response
    }

    pub fn strip_own_cookies(&self, headers: &mut HeaderMap, last: &LastCookie) {
        self.sessions.strip_own(headers, last);
    }

    /// No usable session: browsers go to the provider, API clients get a
    /// 401 they can act on (a redirect would turn their POST into a GET
    /// and hand them an HTML page).
    pub async fn challenge(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let stale = self.sessions.clear(headers);
        if !html {
            let mut response = pages::problem(pages::UNAUTHENTICATED, false, id);
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"authgate\""),
            );
            pages::append_cookies(&mut response, stale);
            return response;
        }
        let mut response = self.start(replayable(method, uri), id).await;
        pages::append_cookies(&mut response, stale);
        response
    }

    /// A signed-in caller whose sign-in lacks the authentication contexts
    /// `acrs` (a route's `require_acrs`): a browser with a session
    /// (`browser`: its request) goes back through sign-in asking for them;
    /// anyone else gets RFC 9470's 401 naming them, for a client that can
    /// ask its provider itself.
    pub async fn step_up(
        &self,
        identity: &Identity,
        acrs: Vec<String>,
        browser: Option<(&Method, &http::Uri)>,
        id: &str,
    ) -> Response<Body> {
        tracing::info!(
            target: AUDIT,
            request_id = id,
            user = %identity.username,
            acrs = %acrs.join(" "),
            "step-up required"
        );
        if let Some((method, uri)) = browser {
            return self.begin(replayable(method, uri), acrs, id).await;
        }
        let page = Page::new(
            StatusCode::UNAUTHORIZED,
            "insufficient_user_authentication",
            "A stronger sign-in is required",
            format!(
                "This resource needs a token whose sign-in satisfied the authentication context {}.",
                acrs.join(", ")
            ),
        );
        let mut response = page.render(false, id);
        let challenge = format!(
            "Bearer realm=\"authgate\", error=\"insufficient_user_authentication\", \
             error_description=\"A stronger sign-in is required\", acr_values=\"{}\"",
            acrs.join(" ")
        );
        if let Ok(challenge) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
        }
        response
    }

    /// Sends the browser to the provider, to come back to `return_to`: a
    /// path on `public_url`, or a URL the caller checked is ours.
    pub async fn start(&self, return_to: String, id: &str) -> Response<Body> {
        self.begin(return_to, Vec::new(), id).await
    }

    /// `start`, asking for the authentication contexts `step_up` too.
    async fn begin(&self, return_to: String, step_up: Vec<String>, id: &str) -> Response<Body> {
        let (return_to, shortened) = if self.sessions.is_stored() {
            (return_to, false)
        } else {
            carried(return_to)
        };
        let (url, login) = match self.oidc.start(return_to, step_up).await {
            Ok((url, login)) => (url, LoginState { shortened, ..login }),
            Err(e) => {
                return explain::sign_in_error(&e, &self.config().redirect_uri, &self.cloud())
                    .render(true, id)
            }
        };
        let cross_site_post = self.config().response_mode == ResponseMode::FormPost;
        let login_cookie = match self.sessions.write_login(&login, cross_site_post).await {
            Ok(cookie) => cookie,
            Err(_) => return pages::problem(pages::STORE_UNAVAILABLE, true, id),
        };
        let mut response = pages::redirect(StatusCode::FOUND, &url);
        response.headers_mut().append(SET_COOKIE, login_cookie);
        response
    }

    /// Handles `GET` (query) and `POST` (form_post) callbacks.
    pub async fn callback(&self, req: Request<Body>, html: bool, id: &str) -> Callback {
        let (parts, body) = req.into_parts();
        let (params, body) = if parts.method == Method::POST {
            let read =
                tokio::time::timeout(self.body_deadline, read_limited(body, MAX_CALLBACK_BODY));
            let Ok(Some(bytes)) = read.await else {
                return Callback::Answered(bad_callback(html, id));
            };
            let params = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
            (
                params,
                Full::new(bytes).map_err(|never| match never {}).boxed(),
            )
        } else {
            let params =
                serde_urlencoded::from_str(parts.uri.query().unwrap_or("")).unwrap_or_default();
            (params, body)
        };
        let params: CallbackParams = params;
        let login = match &params.state {
            Some(state) => self.sessions.take_login(&parts.headers, state).await,
            None => Ok(None),
        };
        let login = match login {
            Ok(login) => login,
            Err(_) => {
                return Callback::Answered(pages::problem(pages::STORE_UNAVAILABLE, html, id))
            }
        };
        let Some(login) = login else {
            self.count("unknown_state");
            if self.config().pass_unknown_callbacks {
                return Callback::NotOurs(Request::from_parts(parts, body));
            }
            return Callback::Answered(bad_callback(html, id));
        };
        let clear_login = self.sessions.clear_login(&login.state);
        let redirect_uri = &self.config().redirect_uri;

        let mut response = if let Some(error) = &params.error {
            self.count("provider_error");
            tracing::warn!(target: AUDIT, request_id = id, error, "sign-in failed at the provider");
            explain::provider_error(
                error,
                params.error_description.as_deref(),
                redirect_uri,
                &self.cloud(),
            )
            .render(html, id)
        } else if let Some(code) = &params.code {
            match self.oidc.finish(&login, code).await {
                Ok(signed_in) => {
                    self.count("success");
                    let identity = self.oidc.with_groups(signed_in.claims.identity()).await;
                    tracing::info!(
                        target: AUDIT,
                        request_id = id,
                        user = %identity.username,
                        tenant = identity.tenant.as_deref().unwrap_or(""),
                        route = %login.return_to.split('?').next().unwrap_or("/"),
                        "signed in"
                    );
                    let unmet: Vec<&str> = policy::unmet(&login.step_up, &identity)
                        .map(String::as_str)
                        .collect();
                    let step_up_refused = (!unmet.is_empty()).then(|| {
                        tracing::info!(target: AUDIT, request_id = id, user = %identity.username, acrs = %unmet.join(" "), "step-up not satisfied");
                        step_up_refused(&unmet)
                    });
                    let session = Session::new(
                        identity,
                        signed_in.id_token,
                        signed_in.refresh_token,
                        signed_in.claims.exp,
                    )
                    .with_sid(signed_in.claims.sid)
                    .with_access_token(self.keep_access_token.then_some(signed_in.access_token));
                    // The session this browser had before, if any, ends:
                    // one cookie, one session.
                    if let Found::Valid(old) = self.sessions.read(&parts.headers).await {
                        let _ = self.sessions.end(&old).await;
                    }
                    match self.sessions.save(session, &parts.headers).await {
                        Ok((_, cookies)) => {
                            // A full URL was checked to be ours at the start.
                            let location = if login.return_to.starts_with('/') {
                                format!("{}{}", self.public_url, login.return_to)
                            } else {
                                login.return_to.clone()
                            };
                            // A step-up the provider did not satisfy: the
                            // new session serves the other routes, and the
                            // page says why this one stays shut (going
                            // back would ask again, and again).
                            let mut response = match step_up_refused {
                                Some(page) => page.render(html, id),
                                None if login.shortened => {
                                    shortened_link(&login.return_to, html, id)
                                }
                                None => pages::redirect(StatusCode::SEE_OTHER, &location),
                            };
                            pages::append_cookies(&mut response, cookies);
                            response
                        }
                        Err(_) => pages::problem(pages::STORE_UNAVAILABLE, html, id),
                    }
                }
                Err(e) => {
                    self.count("failed");
                    tracing::warn!(target: AUDIT, request_id = id, error = %e, "sign-in failed");
                    explain::sign_in_error(&e, redirect_uri, &self.cloud()).render(html, id)
                }
            }
        } else {
            self.count("failed");
            bad_callback(html, id)
        };
        response.headers_mut().append(SET_COOKIE, clear_login);
        Callback::Answered(response)
    }

    fn count(&self, outcome: &'static str) {
        crate::ops::metrics::Metrics::outcome(&self.oidc.metrics().sign_ins, outcome);
    }

    /// `GET` asks (a link cannot sign anyone out cross-site); `POST` from
    /// this origin clears the session and, when the provider supports it,
    /// ends the provider's session too.
    pub async fn sign_out(
        &self,
        method: &Method,
        headers: &HeaderMap,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let action = format!("{}sign_out", self.gateway_prefix);
        if method != Method::POST {
            let mut page = Page::new(
                StatusCode::OK,
                "sign_out",
                "Sign out?",
                "This signs you out of the console.",
            );
            page.form = Some((action, "Sign out"));
            return page.render(html, id);
        }
        if !self.same_origin(headers) {
            return Page::new(
                StatusCode::FORBIDDEN,
                "cross_site_sign_out",
                "Sign-out refused",
                "The sign-out request did not come from this site.",
            )
            .render(html, id);
        }
        // A session that cannot be ended would outlive the cleared cookie
        // in its copies: say so rather than pretend.
        let session = match self.sessions.read(headers).await {
            Found::Valid(session) => Some(session),
            Found::None | Found::Unusable => None,
            Found::Unavailable => return pages::problem(pages::STORE_UNAVAILABLE, html, id),
        };
        if let Some(session) = &session {
            if self.sessions.end(session).await.is_err() {
                return pages::problem(pages::STORE_UNAVAILABLE, html, id);
            }
            tracing::info!(
                target: AUDIT,
                request_id = id,
                user = %session.identity.username,
                tenant = session.identity.tenant.as_deref().unwrap_or(""),
                "signed out"
            );
        }
        let signed_out = format!("{}{}signed_out", self.public_url, self.gateway_prefix);
        let location = match (session, self.oidc.end_session_url(&signed_out)) {
            (Some(session), Some(mut url)) => {
                url.query_pairs_mut()
                    .append_pair("id_token_hint", &session.id_token);
                url.to_string()
            }
            (None, Some(url)) => url.to_string(),
            (_, None) => signed_out,
        };
        let mut response = pages::redirect(StatusCode::SEE_OTHER, &location);
        pages::append_cookies(&mut response, self.sessions.clear(headers));
        response
    }

    /// Front-channel logout (OpenID Connect Front-Channel Logout 1.0 §2),
    /// what Entra loads in a hidden frame at the app's "Front-channel
    /// logout URL" when the user signs out elsewhere: ends the sessions of
    /// the provider's session `sid`. Entra may leave `iss` out; when
    /// present it must be this provider. Knowing a `sid` is all it takes,
    /// as the specification has it: a `sid` is as unguessable as a session
    /// id, and ending a session is all it can do.
    pub async fn front_channel_logout(
        &self,
        query: Option<&str>,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        #[derive(serde::Deserialize)]
        struct Params {
            sid: Option<String>,
            iss: Option<String>,
        }
        let params: Params = serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or(Params {
            sid: None,
            iss: None,
        });
        let Some(sid) = params.sid.filter(|s| !s.is_empty()) else {
            return logout_refused(
                "no_sid",
                "The logout names no session (sid). Add the optional claim `sid` to the ID \
                 token in Entra (Token configuration), so the provider's logouts can name it.",
                html,
                id,
            );
        };
        if params
            .iss
            .as_deref()
            .is_some_and(|iss| !self.oidc.accepts_issuer(iss))
        {
            return logout_refused(
                "wrong_issuer",
                "The logout comes from another provider than the one this gateway signs in with.",
                html,
                id,
            );
        }
        match self.sessions.revoke(&Who::ProviderSession(sid)).await {
            Ok(ended) => {
                tracing::info!(target: AUDIT, request_id = id, ended, "signed out by the provider (front-channel)");
                let mut page = Page::new(
                    StatusCode::OK,
                    "signed_out",
                    "You are signed out",
                    "Your session here has ended along with your sign-in at the provider.",
                );
                page.link = Some(("/".into(), "Sign in again"));
                page.render(html, id)
            }
            Err(e) => logout_failed(&e, html, id),
        }
    }

    /// Back-Channel Logout 1.0: the provider posts a signed logout token
    /// (`logout_token`, form-encoded) naming a session (`sid`) or a user
    /// (`sub`); each token is used once (`jti`). Answers 200, or 400 with
    /// the reason (§2.8).
    pub async fn back_channel_logout(&self, req: Request<Body>, id: &str) -> Response<Body> {
        let invalid = |detail: String| {
            tracing::info!(target: AUDIT, request_id = id, reason = %detail, "logout token refused");
            pages::json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": "invalid_request", "error_description": detail }),
            )
        };
        if req.method() != Method::POST {
            return invalid("a logout token is POSTed".into());
        }
        let read = tokio::time::timeout(
            self.body_deadline,
            read_limited(req.into_body(), MAX_CALLBACK_BODY),
        );
        let Ok(Some(body)) = read.await else {
            return invalid("the body did not arrive whole and in time".into());
        };
        #[derive(serde::Deserialize)]
        struct Form {
            logout_token: String,
        }
        let Ok(form) = serde_urlencoded::from_bytes::<Form>(&body) else {
            return invalid("no logout_token in the form".into());
        };
        let claims = match self.oidc.verify_logout_token(&form.logout_token).await {
            Ok(claims) => claims,
            Err(e) => return invalid(e.to_string()),
        };
        let jti = claims.jti.as_deref().unwrap_or_default();
        let marker = format!("logout\0{}\0{jti}", claims.iss);
        let skew = self.config().clock_skew.as_secs();
        let who = match (&claims.sid, &claims.sub) {
            (Some(sid), _) => Who::ProviderSession(sid.clone()),
            (None, Some(sub)) => Who::Subject(sub.clone()),
            (None, None) => unreachable!("verified: a sub or a sid"),
        };
        let ended = match self
            .sessions
            .first_use(marker.as_bytes(), claims.exp + skew)
            .await
        {
            Ok(true) => self.sessions.revoke(&who).await,
            Ok(false) => return invalid("this logout token was used before (jti)".into()),
            Err(e) => Err(e),
        };
        match ended {
            Ok(ended) => {
                tracing::info!(target: AUDIT, request_id = id, ended, "signed out by the provider (back-channel)");
                pages::json(StatusCode::OK, serde_json::json!({ "ended": ended }))
            }
            Err(e) => logout_failed(&e, false, id),
        }
    }

    /// A signed-in user the route's policy refuses: who they are signed
    /// in as, why, and a way to sign in as someone else.
    pub fn forbidden(
        &self,
        identity: &Identity,
        route: &str,
        denial: &Denial,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        tracing::info!(
            target: AUDIT,
            request_id = id,
            user = %identity.username,
            tenant = identity.tenant.as_deref().unwrap_or(""),
            route,
            reason = denial.code(),
            "refused"
        );
        let mut page = Page::new(
            StatusCode::FORBIDDEN,
            denial.code(),
            "You do not have access to this page",
            format!("You are signed in as {}, but {denial}.", identity.username),
        );
        page.advice
            .push("Ask an administrator for access, or sign in with another account.".into());
        page.form = Some((format!("{}sign_out", self.gateway_prefix), "Sign out"));
        page.render(html, id)
    }

    pub fn signed_out_page(&self, html: bool, id: &str) -> Response<Body> {
        let mut page = Page::new(
            StatusCode::OK,
            "signed_out",
            "You are signed out",
            "Your session has ended.",
        );
        page.link = Some(("/".into(), "Sign in again"));
        page.render(html, id)
    }

    /// Fetch metadata when the browser sends it, else `Origin`.
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        if let Some(site) = headers.get("sec-fetch-site") {
            return site == "same-origin";
        }
        headers
            .get(http::header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| o == self.public_url.to_string())
    }
}

fn logout_refused(
    code: &'static str,
    detail: &'static str,
    html: bool,
    id: &str,
) -> Response<Body> {
    Page::new(
        StatusCode::BAD_REQUEST,
        code,
        "Logout not understood",
        detail,
    )
    .render(html, id)
}

/// A provider's logout that could not end sessions: without a store
/// there are none to end; with one, it failed.
fn logout_failed(error: &AdminError, html: bool, id: &str) -> Response<Body> {
    match error {
        AdminError::NoStore => Page::new(
            StatusCode::NOT_IMPLEMENTED,
            "no_session_store",
            "Logouts from the provider need a session store",
            error.to_string(),
        )
        .render(html, id),
        AdminError::Store(_) => pages::problem(pages::STORE_UNAVAILABLE, html, id),
    }
}

/// Longest return path carried through sign-in. With the state, nonce
/// and PKCE verifier, sealed and base64-encoded, the login cookie then
/// stays under the 4096 bytes a browser keeps of a cookie (RFC 6265
/// §6.1); a longer one was dropped, and the sign-in failed.
const MAX_RETURN_TO: usize = 2048;

/// The return path as carried through sign-in, and whether its query (or
/// all of it) had to be left out.
fn carried(return_to: String) -> (String, bool) {
    if return_to.len() <= MAX_RETURN_TO {
        return (return_to, false);
    }
    let path = return_to.split('?').next().unwrap_or("/");
    let path = if path.len() <= MAX_RETURN_TO {
        path
    } else {
        "/"
    };
    (path.to_owned(), true)
}

/// After a sign-in whose link was too long to carry: the user is signed
/// in, and told why they land on less than they asked for.
fn shortened_link(return_to: &str, html: bool, id: &str) -> Response<Body> {
    let mut page = Page::new(
        StatusCode::OK,
        "signed_in_link_shortened",
        "You are signed in",
        "The link you opened was too long to carry through sign-in, so its query \
         (the part after `?`) was left out. Open the link again now that you are \
         signed in, or continue to its page.",
    );
    page.link = Some((return_to.to_owned(), "Continue"));
    page.render(html, id)
}

/// A path to return to after sign-in: only ever a path on this origin.
/// Anything a browser could read as another host (`//evil`, `/\\evil`,
/// their encoded forms, control characters) becomes `/`.
pub fn safe_return_to(path_and_query: &str) -> String {
    let decoded: String = percent_decoded_prefix(path_and_query);
    let looks_foreign = !path_and_query.starts_with('/')
        || decoded.starts_with("//")
        || decoded.starts_with("/\\")
        || decoded.chars().any(|c| c.is_control());
    if looks_foreign {
        "/".to_owned()
    } else {
        path_and_query.to_owned()
    }
}

/// The first characters, percent-decoded (repeatedly, for doubly
/// encoded input), which is where a second slash or backslash would hide.
fn percent_decoded_prefix(input: &str) -> String {
    let mut current: String = input.chars().take(64).collect();
    for _ in 0..3 {
        let decoded = percent_encoding::percent_decode_str(&current)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == current {
            break;
        }
        current = decoded;
    }
    current
}

/// The whole body, or `None` when it is larger than `limit` or broken.
async fn read_limited(mut body: Body, limit: usize) -> Option<Bytes> {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buffer.len() + data.len() > limit {
                return None;
            }
            buffer.extend_from_slice(&data);
        }
    }
    Some(buffer.freeze())
}

fn bad_callback(html: bool, id: &str) -> Response<Body> {
    let mut page = Page::new(
        StatusCode::BAD_REQUEST,
        "unknown_sign_in",
        "This sign-in response is not one this browser started",
        "It may have expired (sign-ins must finish within 10 minutes), been opened in another browser, \
         or been used already.",
    );
    page.link = Some(("/".into(), "Start signing in again"));
    page.render(html, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_is_only_ever_a_local_path() {
        for ok in [
            "/",
            "/console/devices?page=2",
            "/a//b",
            "/%E2%9C%93",
            "/x?next=//evil.example",
        ] {
            assert_eq!(safe_return_to(ok), ok);
        }
        for evil in [
            "//evil.example/",
            "/\\evil.example",
            "/%2Fevil.example",
            "/%2F%2Fevil.example",
            "/%5Cevil.example",
            "/%252F%252Fevil.example",
            "https://evil.example/",
            "evil.example",
            "/%0d%0aLocation:%20https://evil.example",
            "/\t/evil.example",
        ] {
            assert_eq!(safe_return_to(evil), "/", "{evil}");
        }
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the target, sign-in returns to a path on this origin
            /// that no browser reads as another host, and judging it again
            /// changes nothing.
            #[test]
            fn return_to_is_a_local_path(target in "(/|//|/\\\\|%2[fF]|%5[cC]|%25|[ -~]){0,16}") {
                let kept = safe_return_to(&target);
                prop_assert!(kept.starts_with('/'));
                let decoded = percent_decoded_prefix(&kept);
                prop_assert!(!decoded.starts_with("//") && !decoded.starts_with("/\\"));
                prop_assert_eq!(safe_return_to(&kept), kept.clone());
                let (carried, _) = carried(kept);
                prop_assert!(carried.len() <= MAX_RETURN_TO);
            }
        }
    }
}
