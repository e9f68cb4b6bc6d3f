//! The gateway's own endpoints under `gateway_prefix`: liveness,
//! readiness (and the session store's health), the identity assertions'
//! key set, forward-auth for a proxy
//! in front and the sign-in start it sends browsers to, sign-out, the
//! signed-out page, and the provider's logouts (front- and back-channel);
//! and, with `headers.easy_auth`, App Service's `/.auth/*`.

use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode};

use super::{Client, Gateway};
use crate::auth::easy_auth;
use crate::auth::signin::SignIn;
use crate::auth::{Authenticated, Unidentified};
use crate::pages;
use crate::Body;

impl Gateway {
    /// `ping` answers while the process lives; `ready` only while it
    /// accepts new work and sign-in can start.
    pub(super) async fn own_endpoint(
        &self,
        endpoint: &str,
        req: Request<Body>,
        client: &Client,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let method = req.method().clone();
        let readable = is_read(&method);
        let draining = self.draining.load(Ordering::Relaxed);
        let signin_ready = self.signin.as_ref().is_none_or(SignIn::is_ready);
        match (endpoint, &self.signin) {
            ("ping", _) if readable => {
                pages::json(StatusCode::OK, serde_json::json!({ "status": "ok" }))
            }
            // A session store that is down does not make the gateway
            // unready: public routes and the clients' API still work. It
            // is reported.
            ("ready", _) if readable && !draining && signin_ready => {
                let mut body = serde_json::json!({ "ready": true });
                if let Some(health) = match &self.signin {
                    Some(signin) => signin.store_health().await,
                    None => None,
                } {
                    body["session_store"] =
                        if health.is_ok() { "ok" } else { "unavailable" }.into();
                }
                pages::json(StatusCode::OK, body)
            }
            ("ready", _) if readable && draining => pages::problem(pages::DRAINING, html, id),
            ("ready", _) if readable => pages::problem(pages::PROVIDER_NOT_READY, html, id),
            ("jwks.json", _) if readable => match &self.assertions {
                Some(assertions) => {
                    let mut response = pages::json(StatusCode::OK, assertions.jwks());
                    // Upstreams fetch it again when they meet a new key id.
                    response.headers_mut().insert(
                        http::header::CACHE_CONTROL,
                        http::HeaderValue::from_static("public, max-age=300"),
                    );
                    response
                }
                None => pages::problem(pages::NOT_FOUND, html, id),
            },
            ("auth", _) => Box::pin(self.forward_auth(req, client, html, id)).await,
            ("start", Some(signin)) if readable => {
                let rd = query_param(req.uri(), "rd");
                let return_to = self.hosts.return_target(rd.as_deref().unwrap_or("/"));
                signin.start(return_to, id).await
            }
            ("sign_out", Some(signin)) => signin.sign_out(&method, req.headers(), html, id).await,
            ("front_channel_logout", Some(signin)) if readable => {
                signin
                    .front_channel_logout(req.uri().query(), html, id)
                    .await
            }
            ("back_channel_logout", Some(signin)) => signin.back_channel_logout(req, id).await,
            ("signed_out", Some(signin)) if readable => signin.signed_out_page(html, id),
            _ => pages::problem(pages::NOT_FOUND, html, id),
        }
    }
}

impl Gateway {
    /// App Service's endpoints under `/.auth/`
    /// (<https://learn.microsoft.com/azure/app-service/configure-authentication-customize-sign-in-out>):
    /// who is signed in, sign-in (`post_login_redirect_uri` held to the
    /// same rules as any return target), sign-out (its confirmation page
    /// for a `GET`, as the gateway's own: a link must not sign anyone
    /// out), and renewing the tokens now.
    pub(super) async fn easy_auth_endpoint(
        &self,
        endpoint: &str,
        req: Request<Body>,
        client: &Client,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let method = req.method().clone();
        let readable = is_read(&method);
        let Some(signin) = &self.signin else {
            return pages::problem(pages::NOT_FOUND, html, id);
        };
        match endpoint {
            "me" if readable => self.easy_auth_me(signin, &req, client, id).await,
            "login/aad" if readable => {
                let rd = query_param(req.uri(), "post_login_redirect_uri");
                let return_to = self.hosts.return_target(rd.as_deref().unwrap_or("/"));
                signin.start(return_to, id).await
            }
            "logout" => signin.sign_out(&method, req.headers(), html, id).await,
            "refresh" if readable => signin.renew_now(req.headers(), id).await,
            _ => pages::problem(pages::NOT_FOUND, html, id),
        }
    }

    /// `/.auth/me`: App Service's answer for the signed-in caller, a
    /// one-element array; the tokens only with `headers.easy_auth_tokens`,
    /// and never the refresh token, which is the gateway's alone.
    async fn easy_auth_me(
        &self,
        signin: &SignIn,
        req: &Request<Body>,
        client: &Client,
        id: &str,
    ) -> Response<Body> {
        let (authenticated, cookies) = match signin
            .identify(req.headers(), &client.last_cookie)
            .await
        {
            Ok(caller) => caller,
            Err(Unidentified::Bearer(error)) => return signin.invalid_bearer(&error, id),
            Err(Unidentified::StoreDown) => {
                return pages::problem(pages::STORE_UNAVAILABLE, false, id)
            }
            Err(Unidentified::Nothing) => return pages::problem(pages::UNAUTHENTICATED, false, id),
        };
        let identity = authenticated.identity();
        let (claims_of, id_token, access_token, expires_at) = match &authenticated {
            Authenticated::Session(session) => (
                session.id_token.as_str(),
                Some(session.id_token.as_str()),
                session.access_token.as_deref(),
                session.expires_at,
            ),
            Authenticated::Bearer { claims, token } => {
                (token.as_str(), None, Some(token.as_str()), claims.exp)
            }
        };
        let mut entry = serde_json::json!({
            "provider_name": easy_auth::PROVIDER,
            "user_id": identity.username,
            "user_claims": easy_auth::claims(claims_of, &identity.username),
        });
        if self
            .identity_headers
            .easy_auth
            .is_some_and(|easy_auth| easy_auth.tokens)
        {
            entry["id_token"] = id_token.into();
            entry["access_token"] = access_token.into();
            let expires_on = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at);
            entry["expires_on"] = humantime::format_rfc3339_seconds(expires_on)
                .to_string()
                .into();
        }
        let mut response = pages::json(StatusCode::OK, serde_json::json!([entry]));
        pages::append_cookies(&mut response, cookies);
        response
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The first value of `name` in `uri`'s query.
fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(uri.query().unwrap_or(""))
        .unwrap_or_default()
        .into_iter()
        .find_map(|(key, value)| (key == name).then_some(value))
}
