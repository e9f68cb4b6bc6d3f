//! What the gateway itself answers: small HTML pages for browsers and JSON
//! for API clients, chosen by the request's `Accept` header.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::Body;

/// Whether the caller is a browser navigating (HTML) rather than an API
/// client (JSON). RustDesk clients never send `text/html`.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// A failure explained: `code` is stable for scripts, `title` and
/// `detail` are for people.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: &'static str,
}

pub const UPSTREAM_UNREACHABLE: Problem = Problem {
    status: StatusCode::BAD_GATEWAY,
    code: "upstream_unreachable",
    title: "The console is not reachable",
    detail: "The gateway could not connect to the application behind it. \
             It may be stopped or restarting; try again in a moment.",
};

pub const UPSTREAM_FAILED: Problem = Problem {
    status: StatusCode::BAD_GATEWAY,
    code: "upstream_failed",
    title: "The console answered with an error",
    detail: "The connection to the application behind the gateway broke \
             before it sent a complete answer. Try again in a moment.",
};

pub const UPSTREAM_TIMEOUT: Problem = Problem {
    status: StatusCode::GATEWAY_TIMEOUT,
    code: "upstream_timeout",
    title: "The console took too long to answer",
    detail: "The application behind the gateway did not answer in time. \
             Try again; if it keeps happening, the console may be overloaded.",
};

pub const NOT_FOUND: Problem = Problem {
    status: StatusCode::NOT_FOUND,
    code: "not_found",
    title: "No such gateway endpoint",
    detail: "This path belongs to the gateway itself and serves nothing here.",
};

pub const AMBIGUOUS_PATH: Problem = Problem {
    status: StatusCode::BAD_REQUEST,
    code: "ambiguous_path",
    title: "This address cannot be served",
    detail: "Its path holds an encoded slash or backslash, a backslash, a NUL byte, \
             or a `..` with parameters, which servers read in different ways. \
             Use the address without them.",
};

pub const MISDIRECTED: Problem = Problem {
    status: StatusCode::MISDIRECTED_REQUEST,
    code: "misdirected",
    title: "This site is not served here",
    detail: "The address names a host this gateway does not serve. \
             Open the console at its configured address.",
};

pub const STORE_UNAVAILABLE: Problem = Problem {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "session_store_unavailable",
    title: "Sessions cannot be checked right now",
    detail: "The gateway cannot reach the store that keeps sign-in sessions. \
             Try again in a moment; if it keeps happening, tell the administrator \
             (the gateway's log says why).",
};

pub const UNAUTHENTICATED: Problem = Problem {
    status: StatusCode::UNAUTHORIZED,
    code: "unauthenticated",
    title: "Sign-in required",
    detail: "This resource needs a signed-in user or a token.",
};

pub const PROVIDER_NOT_READY: Problem = Problem {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "provider_not_ready",
    title: "The sign-in provider has not been reached yet",
    detail: "The gateway keeps retrying its OpenID provider's discovery document and keys; \
             its log says why they failed.",
};

pub const DRAINING: Problem = Problem {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "shutting_down",
    title: "The gateway is shutting down",
    detail: "This instance is draining its connections; retry shortly.",
};

/// Any page the gateway renders: a problem, a sign-in failure explained,
/// a notice. Dynamic text is escaped when rendered.
#[derive(Debug, Clone)]
pub struct Page {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub title: Cow<'static, str>,
    pub detail: Cow<'static, str>,
    /// What to check or do, for whoever can fix it.
    pub advice: Vec<String>,
    /// A link on this origin and its label, e.g. ("/", "Sign in again").
    pub link: Option<(String, &'static str)>,
    /// A same-origin POST form and its button label (sign-out).
    pub form: Option<(String, &'static str)>,
}

impl From<Problem> for Page {
    fn from(p: Problem) -> Page {
        Page::new(p.status, p.code, p.title, p.detail)
    }
}

impl Page {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        title: impl Into<Cow<'static, str>>,
        detail: impl Into<Cow<'static, str>>,
    ) -> Page {
        Page {
            status,
            code: code.into(),
            title: title.into(),
            detail: detail.into(),
            advice: Vec::new(),
            link: None,
            form: None,
        }
    }

    /// HTML for browsers, JSON for everyone else.
    pub fn render(&self, html: bool, request_id: &str) -> Response<Body> {
        let (content_type, body) = if html {
            ("text/html; charset=utf-8", self.html(request_id))
        } else {
            let body = serde_json::json!({
                "error": self.code,
                "message": self.title,
                "detail": self.detail,
                "advice": self.advice,
                "request_id": request_id,
            });
            ("application/json", body.to_string())
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        guard(headers);
        response
    }

    fn html(&self, request_id: &str) -> String {
        use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};
        let mut out = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head>\
             <body style=\"font-family:sans-serif;max-width:42em;margin:4em auto;line-height:1.5\">\
             <h1>{title}</h1><p>{detail}</p>",
            title = text(&self.title),
            detail = text(&self.detail),
        );
        if !self.advice.is_empty() {
            out.push_str("<h2>What to check</h2><ul>");
            for item in &self.advice {
                out.push_str(&format!("<li>{}</li>", text(item)));
            }
            out.push_str("</ul>");
        }
        if let Some((href, label)) = &self.link {
            out.push_str(&format!(
                "<p><a href=\"{}\">{}</a></p>",
                attr(href),
                text(label)
            ));
        }
        if let Some((action, label)) = &self.form {
            out.push_str(&format!(
                "<form method=\"post\" action=\"{}\"><button type=\"submit\">{}</button></form>",
                attr(action),
                text(label)
            ));
        }
        out.push_str(&format!(
            "<p><small>Error {} · {} · request {}</small></p></body></html>",
            self.status.as_u16(),
            text(&self.code),
            text(request_id)
        ));
        out
    }
}

/// Renders `problem` as HTML or JSON.
pub fn problem(problem: Problem, html: bool, request_id: &str) -> Response<Body> {
    Page::from(problem).render(html, request_id)
}

/// A small JSON answer, e.g. for health endpoints.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    guard(response.headers_mut());
    response
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A redirect the browser must not cache: sign-in steps, sign-out and the
/// port-80 redirect all depend on state or configuration that can change.
pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut response = empty(status);
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

/// An answer with no body (a redirect, a forward-auth verdict).
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    guard(response.headers_mut());
    response
}

/// What every answer of the gateway's own carries: never framed
/// (clickjacking a sign-out button), never sniffed into another type,
/// never cached, and no `Referer` from it (its URLs can hold a sign-in's
/// state or a return path).
fn guard(headers: &mut HeaderMap) {
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

pub fn append_cookies(response: &mut Response<Body>, cookies: Vec<HeaderValue>) {
    for cookie in cookies {
        response.headers_mut().append(SET_COOKIE, cookie);
    }
}
