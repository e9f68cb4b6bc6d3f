//! The trust boundary, tried at the wire as an attacker would: what the
//! gateway judges is what the upstream gets.

use crate::common::stack::*;
use crate::common::*;
use http::{Request, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (a request line and headers, CRLF-terminated, no blank
/// line) over TLS as written, and returns the status and the body.
async fn raw(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    let (mut tls, _) = tls_connect(addr, &[b"http/1.1"]).await;
    tls.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The answer is whole once the gateway closes; whether it sent TLS's
    // close_notify first is not what these tests judge.
    if let Err(e) = tls.read_to_end(&mut answer).await {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn get_raw(addr: std::net::SocketAddr, target: &str) -> (u16, String) {
    raw(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n"),
    )
    .await
}

/// The path the upstream's echo says it was asked for.
fn upstream_path(body: &str) -> String {
    echo_in(body)["path"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn dot_segments_cannot_climb_out_of_a_public_route() {
    let stack = Stack::start("").await;
    let addr = stack.gateway.addr;

    // Resolved before routing: these name the protected `/admin/secret`.
    for target in [
        "/api/public/../../admin/secret",
        "/api/public/%2e%2e/%2E%2E/admin/secret",
        "/api/public/.%2e/.%2e/admin/secret",
        "/api/public/./../x/../../admin/secret",
        "https://localhost/api/public/../../admin/secret",
    ] {
        let (status, body) = get_raw(addr, target).await;
        assert_eq!(status, 401, "{target}: {body}");
    }
    // No single meaning: refused before anything else.
    for target in [
        "/api/public/..%2f..%2fadmin/secret",
        "/api/public/%2F..%2F..%2Fadmin/secret",
        "/api/public/..%5c..%5cadmin/secret",
        "/api/public/..;/..;/admin/secret",
        "/api/public/%2e%2e;x=1/admin/secret",
        "/api/public/%00/../admin",
        "/api/public/..\\..\\admin/secret",
    ] {
        let (status, body) = get_raw(addr, target).await;
        assert_eq!(status, 400, "{target}: {body}");
        assert!(
            !body.contains("\"path\""),
            "{target} reached the upstream: {body}"
        );
    }

    // Within the public route the upstream is sent the canonical path,
    // other escapes as the client wrote them, and the query untouched.
    for (target, sent) in [
        ("/api/public/x/../heartbeat", "/api/public/heartbeat"),
        (
            "//api/public//heartbeat?a=../b",
            "/api/public/heartbeat?a=../b",
        ),
        ("/api/public/a%25b%20c/.", "/api/public/a%25b%20c/"),
        ("/api/public/heartbeat", "/api/public/heartbeat"),
    ] {
        let (status, body) = get_raw(addr, target).await;
        assert_eq!(status, 200, "{target}: {body}");
        assert_eq!(upstream_path(&body), sent, "{target}");
    }

    // HTTP/2's `:path` goes through the same code.
    let mut h2 = http2(addr).await;
    let response = h2
        .send_request(
            Request::get(stack.url("/api/public/%2e%2e/../admin/secret"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = h2
        .send_request(
            Request::get(stack.url("/api/public/a/../heartbeat"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(upstream_saw(response).await.path, "/api/public/heartbeat");
}

/// The upstream's echo, from a raw answer's body.
fn echo_in(body: &str) -> Value {
    serde_json::from_str(body.trim_start_matches(|c: char| c != '{'))
        .unwrap_or_else(|_| panic!("not the upstream's echo: {body}"))
}

#[tokio::test]
async fn no_client_header_can_speak_for_the_user_or_unsay_the_gateway() {
    let stack = Stack::start("").await;
    let addr = stack.gateway.addr;

    // Every spelling of an identity header, ours and other gateways', is
    // gone on a public route too; other headers pass.
    let forged = [
        "X_Forwarded_User",
        "x-forwarded-user-id",
        "X-FORWARDED-EMAIL",
        "X_Forwarded_Groups",
        "X.Forwarded.Roles",
        "X~Forwarded+Name",
        "X-Auth-Request-User",
        "X-Auth-Request-Email",
        "X-MS-CLIENT-PRINCIPAL-NAME",
        "X-MS-CLIENT-PRINCIPAL",
        "X-MS-TOKEN-AAD-ID-TOKEN",
        "X-Pomerium-Jwt-Assertion",
        "Remote-User",
        "X_Remote_User",
    ];
    let mut head = String::from("GET /api/public/heartbeat HTTP/1.1\r\nHost: localhost\r\n");
    for name in forged {
        head.push_str(&format!("{name}: mallory\r\n"));
    }
    head.push_str("X-Console-Theme: dark\r\n");
    let (status, body) = raw(addr, &head).await;
    assert_eq!(status, 200, "{body}");
    let echo = echo_in(&body);
    let seen = echo["headers"].as_object().unwrap();
    for name in forged {
        assert!(
            !seen.contains_key(&name.to_ascii_lowercase()),
            "{name} reached the upstream: {seen:?}"
        );
    }
    assert_eq!(seen["x-console-theme"][0], "dark");

    // Naming the identity headers in `Connection` does not remove the ones
    // the gateway injects.
    let (token, _) = stack.provider.user_tokens("alice@contoso.example").await;
    let (status, body) = raw(
        addr,
        &format!(
            "GET /api/devices HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Connection: X-Forwarded-User, X-Forwarded-Email, X-Request-Id, keep-alive\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echo = echo_in(&body);
    assert_eq!(
        echo["headers"]["x-forwarded-user"][0],
        "alice@contoso.example"
    );
    assert!(echo["headers"]["x-request-id"][0].is_string());

    // Only WebSocket upgrades are tunnelled: `h2c` goes on as a plain request.
    let (status, body) = raw(
        addr,
        "GET /api/public/heartbeat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echo = echo_in(&body);
    let seen = echo["headers"].as_object().unwrap();
    for name in ["upgrade", "http2-settings"] {
        assert!(
            !seen.contains_key(name),
            "{name} reached the upstream: {seen:?}"
        );
    }
}

#[tokio::test]
async fn the_gateways_cookies_never_reach_the_upstream() {
    let stack = Stack::with(Options {
        tables: "[[routes]]\nprefix = \"/api/own\"\nupstream = \"{upstream}\"\naccess = \"upstream_token\"\n",
        ..Options::default()
    })
    .await;
    let addr = stack.gateway.addr;
    let cookie = "Cookie: __Host-authgate=sealed-session; theme=dark; __Host-authgate.1=chunk; \
                  __Host-authgate-login-abc=state; lang=en\r\n";
    for (what, head) in [
        (
            "a public route",
            "GET /api/public/x HTTP/1.1\r\n".to_owned(),
        ),
        (
            "the console's own token",
            "GET /api/own/x HTTP/1.1\r\nAuthorization: Bearer console-token\r\n".to_owned(),
        ),
        (
            "a CORS preflight",
            "OPTIONS /api/own/x HTTP/1.1\r\nOrigin: https://elsewhere.example\r\n\
             Access-Control-Request-Method: POST\r\n"
                .to_owned(),
        ),
    ] {
        let (status, body) = raw(addr, &format!("{head}Host: localhost\r\n{cookie}")).await;
        assert_eq!(status, 200, "{what}: {body}");
        let echo = echo_in(&body);
        assert_eq!(
            echo["headers"]["cookie"],
            serde_json::json!(["theme=dark; lang=en"]),
            "{what}"
        );
    }

    // HTTP/2 may split the header into fields; the HTTP/1.1 upstream gets
    // one, without the gateway's.
    let mut h2 = http2(addr).await;
    let response = h2
        .send_request(
            Request::get(stack.url("/api/public/x"))
                .header("cookie", "theme=dark")
                .header("cookie", "__Host-authgate=sealed-session")
                .header("cookie", "lang=en")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let echo = upstream_saw(response).await;
    assert_eq!(echo.headers["cookie"], vec!["theme=dark; lang=en"]);
}

#[tokio::test]
async fn the_upstream_never_sees_a_host_the_client_made_up() {
    let stack = Stack::start("").await;
    let addr = stack.gateway.addr;
    let public = stack.origin.trim_start_matches("https://").to_owned();
    for head in [
        "GET /api/public/x HTTP/1.1\r\nHost: evil.example\r\n".to_owned(),
        "GET https://evil.example/api/public/x HTTP/1.1\r\nHost: localhost\r\n".to_owned(),
        "GET /api/public/x HTTP/1.1\r\nHost: evil@localhost\r\n".to_owned(),
        "GET /api/public/x HTTP/1.1\r\n".to_owned(),
    ] {
        let (status, body) = raw(addr, &head).await;
        assert_eq!(status, 200, "{head}: {body}");
        let headers = &echo_in(&body)["headers"];
        assert_eq!(headers["host"][0], public.as_str(), "{head}");
        assert_eq!(headers["x-forwarded-host"][0], public.as_str(), "{head}");
        let forwarded = headers["forwarded"][0].as_str().unwrap();
        assert!(
            forwarded.ends_with(&format!("host=\"{public}\"")),
            "{forwarded}"
        );
    }
    // Its own names pass as asked: any case, a trailing dot.
    let (_, body) = raw(addr, "GET /api/public/x HTTP/1.1\r\nHost: LOCALHOST.\r\n").await;
    assert_eq!(echo_in(&body)["headers"]["host"][0], "LOCALHOST.");
    // HTTP/2's :authority alike.
    let mut h2 = http2(addr).await;
    let response = h2
        .send_request(
            Request::get("https://evil.example/api/public/x")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        upstream_saw(response).await.header("host"),
        Some(public.as_str())
    );

    // strict_host refuses other hosts, extra_hosts adds names; probes
    // answer whatever the host.
    let strict = Stack::with(Options {
        top: "strict_host = true\nextra_hosts = [\"Console.Example\"]\n",
        ..Options::default()
    })
    .await;
    let addr = strict.gateway.addr;
    let (status, body) = raw(addr, "GET /api/public/x HTTP/1.1\r\nHost: evil.example\r\n").await;
    assert_eq!(status, 421, "{body}");
    let (status, _) = raw(addr, "GET /oauth2/ping HTTP/1.1\r\nHost: 10.1.2.3\r\n").await;
    assert_eq!(status, 200);
    let (status, body) = raw(
        addr,
        "GET /api/public/x HTTP/1.1\r\nHost: console.example:443\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(echo_in(&body)["headers"]["host"][0], "console.example:443");
}

#[tokio::test]
async fn nothing_a_client_sends_can_forge_a_log_line() {
    use base64::Engine;
    let stack = Stack::with(Options {
        env: vec![("AUTHGATE_LOG_FORMAT", "text")],
        ..Options::default()
    })
    .await;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header =
        b64(r#"{"alg":"RS256\nFORGED authgate::audit: signed in user=admin\u001b[2K","kid":"k"}"#);
    let token = format!("{header}.{}.c2ln", b64("{}"));
    let response = stack.get_with_bearer("/api/devices", &token).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let refused = stack
        .gateway
        .log_line(|l| {
            l["raw"]
                .as_str()
                .is_some_and(|raw| raw.contains("bearer token refused"))
        })
        .await;
    let refused = refused["raw"].as_str().unwrap();
    assert!(refused.contains("FORGED"), "the value is logged: {refused}");
    assert!(!refused.contains('\u{1b}'), "{refused}");
    for line in stack.gateway.logs() {
        let raw = line["raw"].as_str().unwrap_or_default();
        assert!(!raw.starts_with("FORGED"), "a forged line: {raw}");
    }
}

#[tokio::test]
async fn a_callback_body_that_never_arrives_is_not_waited_for() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::with(Options {
        tables: "[timeouts]\nheader_read = \"500ms\"\n",
        ..Options::default()
    })
    .await;
    let (mut tls, _) = tls_connect(stack.gateway.addr, &[b"http/1.1"]).await;
    tls.write_all(
        b"POST /api/oidc/callback HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 200\r\n\r\nstate=abc",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(DEADLINE, tls.read(&mut answer))
        .await
        .expect("the gateway waits for the body for ever")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
}
