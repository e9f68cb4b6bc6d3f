//! The gateway's own endpoints under `gateway_prefix`: liveness,
//! readiness (and the session store's health), the identity assertions'
//! key set, forward-auth for a proxy
//! in front and the sign-in start it sends browsers to, sign-out, the
//! signed-out page, and the provider's logouts (front- and back-channel).

use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode};

use super::{Client, Gateway};
use crate::auth::signin::SignIn;
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
        let readable = method == Method::GET || method == Method::HEAD;
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
                let rd = serde_urlencoded::from_str::<Vec<(String, String)>>(
                    req.uri().query().unwrap_or(""),
                )
                .unwrap_or_default()
                .into_iter()
                .find_map(|(key, value)| (key == "rd").then_some(value));
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
