//! Who the caller is and whether they may pass: the session and its
//! cookies, bearer tokens, the browser's sign-in flow and sign-out, the
//! identity told to the upstream, and each route's policy.
//!
//! [`authenticate`] is the pipeline's one call: it returns who the caller
//! is, or the answer to send instead (a redirect to sign in, a 401).

pub mod assertion;
pub mod easy_auth;
pub mod identity;
pub(crate) mod policy;
pub mod session;
pub(crate) mod signin;

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION};
use http::{HeaderMap, Method, Request, Response};

use self::identity::Identity;
use self::session::{LastCookie, Session};
use self::signin::SignIn;
use crate::forward::routes::Access;
use crate::idp::token::{Claims, TokenError};
use crate::pages;
use crate::Body;

/// How a request proved who it is.
pub enum Authenticated {
    Session(Arc<Session>),
    /// The token's verified claims, and the token itself.
    Bearer {
        claims: Arc<Claims>,
        token: String,
    },
}

/// Why a request is not authenticated.
pub enum Unidentified {
    /// Neither a usable session nor a bearer token.
    Nothing,
    /// A bearer token was presented and refused.
    Bearer(TokenError),
    /// The session store could not be asked about the session cookie.
    StoreDown,
}

impl Authenticated {
    pub fn identity(&self) -> Cow<'_, Identity> {
        match self {
            Authenticated::Session(session) => Cow::Borrowed(&session.identity),
            Authenticated::Bearer { claims, .. } => Cow::Owned(claims.identity()),
        }
    }
}

/// A caller who proved who they are, and the `Set-Cookie` values their
/// response must carry (a renewed session, a slid idle timer).
pub struct Caller {
    pub authenticated: Authenticated,
    pub cookies: Vec<HeaderValue>,
}

/// Whether a request to a route with `access` must prove who it is.
pub fn needs_sign_in(access: Access, method: &Method, headers: &HeaderMap) -> bool {
    match access {
        Access::Public => false,
        Access::Protected => true,
        // The console checks its own tokens; CORS preflights carry none.
        Access::UpstreamToken => {
            !(method == Method::OPTIONS || headers.contains_key(AUTHORIZATION))
        }
    }
}

/// The authentication step of a request to a route with `access`:
/// `Ok(None)` when the route lets the request through as it is,
/// `Ok(Some(_))` for a signed-in caller, `Err(_)` the answer to send
/// instead. `signin` is `None` when the gateway has no sign-in.
pub async fn authenticate(
    signin: Option<&SignIn>,
    access: Access,
    req: &Request<Body>,
    last: &LastCookie,
    html: bool,
    id: &str,
) -> Result<Option<Caller>, Response<Body>> {
    if !needs_sign_in(access, req.method(), req.headers()) {
        return Ok(None);
    }
    let Some(signin) = signin else {
        return Err(pages::problem(pages::UNAUTHENTICATED, false, id));
    };
    match signin.identify(req.headers(), last).await {
        Ok((authenticated, cookies)) => Ok(Some(Caller {
            authenticated,
            cookies,
        })),
        Err(Unidentified::Bearer(error)) => Err(signin.invalid_bearer(&error, id)),
        // Never a redirect to sign in, which would come back here: a loop.
        Err(Unidentified::StoreDown) => Err(pages::problem(pages::STORE_UNAVAILABLE, html, id)),
        // An API route never redirects (a client would follow it to an
        // HTML page, a POST would become a GET): it answers 401 JSON.
        Err(Unidentified::Nothing) => {
            let redirects = html && access == Access::Protected;
            Err(
                Box::pin(signin.challenge(req.method(), req.uri(), req.headers(), redirects, id))
                    .await,
            )
        }
    }
}
