//! What the gateway itself answers: small HTML pages for browsers and JSON
//! for API clients, chosen by the request's `Accept` header.

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
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

pub const DRAINING: Problem = Problem {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "shutting_down",
    title: "The gateway is shutting down",
    detail: "This instance is draining its connections; retry shortly.",
};

/// Renders `problem` as HTML or JSON. `request_id` has been sanitised to
/// a safe character set by the caller, so it can be embedded verbatim.
pub fn problem(problem: Problem, html: bool, request_id: &str) -> Response<Body> {
    let (content_type, body) = if html {
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width\">\
             <title>{title}</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\">\
             <h1>{title}</h1><p>{detail}</p>\
             <p><small>Error {status} · {code} · request {request_id}</small></p></body></html>",
            title = problem.title,
            detail = problem.detail,
            status = problem.status.as_u16(),
            code = problem.code,
        );
        ("text/html; charset=utf-8", body)
    } else {
        let body = serde_json::json!({
            "error": problem.code,
            "message": problem.title,
            "detail": problem.detail,
            "request_id": request_id,
        })
        .to_string();
        ("application/json", body)
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = problem.status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A small JSON answer, e.g. for health endpoints.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}
