//! The RustDesk Server Pro preset (`config/rustdesk.toml`) end to end: a
//! browser signs in to the console, RustDesk clients keep working without
//! a session, the admin API stays closed, RustDesk's own OIDC callback
//! reaches the console.

mod common;

use common::peers::browser;
use common::stack::*;
use common::*;
use http::{Method, Request, StatusCode};
use serde_json::json;

/// The preset with the test's ports: the console is the stack's upstream,
/// hbbs and hbbr upstreams of their own.
async fn preset(hbbs: &Upstream, hbbr: &Upstream) -> Stack {
    let replacements = [
        ("0.0.0.0:443", "{listen}".to_owned()),
        ("https://rustdesk.example.com", "{origin}".to_owned()),
        ("0.0.0.0:80", "127.0.0.1:0".to_owned()),
        ("http://127.0.0.1:21114", "{upstream}".to_owned()),
        ("http://127.0.0.1:21118", hbbs.url()),
        ("http://127.0.0.1:21119", hbbr.url()),
    ];
    Stack::with(Options {
        preset: Some((
            "config/rustdesk.toml",
            replacements
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn the_rustdesk_preset_guards_the_console_and_lets_clients_through() {
    let (hbbs, hbbr) = (Upstream::start("hbbs").await, Upstream::start("hbbr").await);
    let stack = preset(&hbbs, &hbbr).await;
    let addr = stack.gateway.addr;

    // A browser signs in and reaches console pages.
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/web/") }, { "login": "olga" }]),
    )
    .await;
    let page = echo_of(&results[1]);
    assert_eq!(page.upstream, "console");
    assert_eq!(page.path, "/web/");
    assert_eq!(
        page.header("x-forwarded-user"),
        Some("olga@contoso.example")
    );

    // Client calls without a session, as RustDesk clients make them.
    for (method, path, authorization) in [
        (Method::HEAD, "/api/login-options", None),
        (Method::POST, "/api/login", None),
        (Method::POST, "/api/oidc/auth", None),
        (Method::GET, "/api/oidc/auth-query?code=c&id=1&uuid=u", None),
        (Method::POST, "/api/heartbeat", None),
        (Method::POST, "/api/sysinfo_ver", None),
        (Method::POST, "/api/audit/conn", None),
        (Method::POST, "/api/record?type=new&file=x", None),
        (
            Method::POST,
            "/api/currentUser",
            Some("Bearer rustdesk-access-token"),
        ),
        (
            Method::GET,
            "/api/ab/personal",
            Some("Bearer rustdesk-access-token"),
        ),
        (
            Method::GET,
            "/api/users?current=1",
            Some("Bearer console-api-token"),
        ),
        (Method::OPTIONS, "/api/devices", None),
    ] {
        let mut request = Request::builder().method(method.clone()).uri(path);
        if let Some(token) = authorization {
            request = request.header("authorization", token);
        }
        let response = send(addr, request.body(full("{}")).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK, "{method} {path}");
        assert_eq!(
            response.headers()["x-upstream"],
            "console",
            "{method} {path}"
        );
        if method != Method::HEAD {
            let echo = upstream_saw(response).await;
            assert_eq!(
                echo.header("authorization"),
                authorization,
                "{path}: the client's token must pass untouched"
            );
        }
    }

    // The admin API and console pages without credentials: refused, as
    // JSON for the API (never a redirect), with a sign-in for browsers.
    for path in [
        "/api/users",
        "/api/devices",
        "/api/audits/conn",
        "/api/strategies",
    ] {
        let response = send(
            addr,
            get(path)
                .header("accept", "text/html")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
    }
    let response = send(
        addr,
        get("/")
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FOUND);

    // The web client's WebSockets reach hbbs and hbbr.
    let response = send(addr, get("/ws/id").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.upstream, "hbbs");
    let response = send(addr, get("/ws/relay").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.upstream, "hbbr");

    // RustDesk Pro's own OIDC login comes back to the same callback path
    // with a state the gateway never issued: the console gets it.
    let response = send(
        addr,
        get("/api/oidc/callback?code=entra-code&state=rustdesk-code-1")
            .body(empty())
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(echo.upstream, "console");
    assert_eq!(
        echo.path,
        "/api/oidc/callback?code=entra-code&state=rustdesk-code-1"
    );
}
