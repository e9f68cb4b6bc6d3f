//! The gateway behind the proxy an admin already runs, as its
//! forward-auth: Debian's nginx (`auth_request`) and caddy
//! (`forward_auth`), and Traefik (`ForwardAuth`), each started once with
//! its recipe from
//! `examples/forward-auth/`, in front of the gateway and the console.
//! What the user and the console see through each, and what a client
//! cannot make either of them believe.

use futures_util::{SinkExt, StreamExt};
use http::header::{ACCEPT, COOKIE, LOCATION};
use http::StatusCode;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::peers::{browser, verify_jwt, Front, FrontKind};
use crate::common::stack::*;
use crate::common::*;

const ROUTES: &str = "[headers]\nassertion = true\n\
                      [[routes]]\nprefix = \"/console-api\"\nupstream = \"{upstream}\"\n\
                      access = \"upstream_token\"\n\
                      [[routes]]\nprefix = \"/admin\"\nupstream = \"{upstream}\"\n\
                      [routes.policy]\nallowed_roles = [\"Console.Admin\"]\n";

async fn behind(kind: FrontKind) -> (Stack, Front) {
    let port = closed_port().port();
    let stack = Stack::with(Options {
        tables: ROUTES,
        front: Some(port),
        ..Options::default()
    })
    .await;
    let console = stack.upstream.url().replace("http://", "");
    let front = Front::start(kind, port, stack.gateway.addr, &console).await;
    (stack, front)
}

/// A request through the proxy, as a client on the console's host sends it.
fn through(front: &Front, path: &str) -> http::request::Builder {
    get(path).header("host", format!("localhost:{}", front.port))
}

/// Signs alice in through the proxy in a real browser; what the console
/// saw of the page she asked for, and her session cookie.
async fn alice_signs_in(stack: &Stack, front: &Front) -> (Echo, String) {
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/console/devices?page=2&sort=name") },
            { "login": "alice" },
            { "cookies": true },
        ]),
    )
    .await;
    assert_eq!(
        results[1]["status"],
        200,
        "{:#} {}",
        results[1],
        front.log()
    );
    assert_eq!(
        results[1]["url"],
        stack.url("/console/devices?page=2&sort=name"),
        "the deep link survives sign-in"
    );
    (echo_of(&results[1]), session_cookie(&results[2]))
}

/// What both recipes must hold to, whatever the proxy.
async fn the_recipe_holds(kind: FrontKind) {
    let (stack, front) = behind(kind).await;
    let (echo, cookie) = alice_signs_in(&stack, &front).await;
    assert_eq!(
        echo.header("x-forwarded-user"),
        Some("alice@contoso.example")
    );
    // The signed assertion passes through the proxy, for the console.
    let assertion = echo.header("x-authgate-assertion").expect("an assertion");
    let jwks: serde_json::Value = serde_json::from_str(
        &body_string(
            send(
                stack.gateway.addr,
                get("/oauth2/jwks.json").body(empty()).unwrap(),
            )
            .await,
        )
        .await,
    )
    .unwrap();
    let verified = verify_jwt(assertion, &jwks, &stack.origin, &stack.upstream.url()).await;
    assert_eq!(
        verified["payload"]["preferred_username"], "alice@contoso.example",
        "{verified}"
    );
    assert_eq!(
        echo.header("x-forwarded-groups"),
        Some("group-alice-0,group-alice-1")
    );
    // The console's WebSockets pass, told who the user is.
    let (mut sender, _) = http1(front.addr()).await;
    let upgrade = through(&front, "/console/ws")
        .header(COOKIE, &cookie)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .unwrap();
    let response = sender.send_request(upgrade).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SWITCHING_PROTOCOLS,
        "{}",
        front.log()
    );
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    let greeting = ws.next().await.unwrap().unwrap();
    assert!(
        greeting
            .to_text()
            .unwrap()
            .contains("alice@contoso.example"),
        "{greeting}"
    );
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    // The console never sees the session cookie; its own cookies pass.
    let echo = upstream_saw(
        send(
            front.addr(),
            through(&front, "/console")
                .header(COOKIE, format!("theme=dark; {cookie}; lang=en"))
                .body(empty())
                .unwrap(),
        )
        .await,
    )
    .await;
    let cookies = echo.header("cookie").unwrap_or_default();
    assert!(!cookies.contains("__Host-authgate"), "{cookies}");
    assert!(
        cookies.contains("theme=dark") && cookies.contains("lang=en"),
        "{cookies}"
    );

    // A client cannot speak for the user: forged identity headers are
    // replaced on a signed-in request and dropped on a public route,
    // where the gateway names nobody.
    let forged = |path: &str, cookie: Option<&str>| {
        let mut request = through(&front, path)
            .header("x-forwarded-user", "mallory@contoso.example")
            .header("x-forwarded-roles", "Console.Admin")
            .header("X-Forwarded-Groups", "admins")
            .header("X-Forwarded-Groups-Overage", "cut")
            .header("X-Authgate-Assertion", "forged.by.client")
            .header("X_Forwarded_User", "mallory@contoso.example")
            .header("X.Forwarded.Email", "mallory@contoso.example");
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, cookie);
        }
        request.body(empty()).unwrap()
    };
    let echo = upstream_saw(send(front.addr(), forged("/console", Some(&cookie))).await).await;
    let aliases: Vec<&String> = echo
        .headers
        .keys()
        .filter(|name| name.contains(['_', '.']))
        .collect();
    assert!(aliases.is_empty(), "{aliases:?} reached the console");
    assert_eq!(
        echo.header("x-forwarded-user"),
        Some("alice@contoso.example")
    );
    assert_eq!(echo.header("x-forwarded-roles"), Some("Console.User"));
    assert_ne!(
        echo.header("x-authgate-assertion"),
        Some("forged.by.client")
    );
    assert_eq!(
        echo.header("x-forwarded-groups"),
        Some("group-alice-0,group-alice-1")
    );
    let overage = echo
        .header("x-forwarded-groups-overage")
        .unwrap_or_default();
    assert!(overage.is_empty(), "{overage} reached the console");
    let echo = upstream_saw(send(front.addr(), forged("/api/public/x", None)).await).await;
    // Absent (nginx leaves out an empty header) or empty (Caddy copies
    // the gateway's blank answer).
    for name in [
        "x-forwarded-user",
        "x-forwarded-roles",
        "x-forwarded-groups",
        "x-forwarded-groups-overage",
        "x-authgate-assertion",
    ] {
        let value = echo.header(name).unwrap_or_default();
        assert!(value.is_empty(), "{name}: {value} reached the console");
    }

    // The route's policy applies to the path the proxy serves, dot
    // segments resolved: alice is no admin.
    for path in [
        "/admin/users",
        "/console/../admin/users",
        "/console/%2e%2e/admin/users",
    ] {
        let response = send(
            front.addr(),
            through(&front, path)
                .header(COOKIE, &cookie)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // A client naming another target in the headers the proxy uses to
    // name it gets nowhere: the proxy's own wins, or two that differ are
    // refused.
    let response = send(
        front.addr(),
        through(&front, "/admin/users")
            .header(COOKIE, &cookie)
            .header("x-forwarded-uri", "/console")
            .header("x-original-uri", "/console")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert!(
        matches!(
            response.status(),
            StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST | StatusCode::INTERNAL_SERVER_ERROR
        ),
        "{}",
        response.status()
    );

    // Without a session: an API client gets 401, never the console.
    let response = send(
        front.addr(),
        through(&front, "/console")
            .header(ACCEPT, "application/json")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // A CORS preflight to the console's own API passes without a token;
    // a request naming itself one in the header the proxy uses for the
    // method does not.
    let preflight = http::Request::options("/console-api/devices")
        .header("host", format!("localhost:{}", front.port))
        .header("origin", "https://elsewhere.example")
        .header("access-control-request-method", "GET")
        .body(empty())
        .unwrap();
    let response = send(front.addr(), preflight).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", front.log());
    let response = send(
        front.addr(),
        through(&front, "/console-api/devices")
            .header("x-forwarded-method", "OPTIONS")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "{}",
        front.log()
    );
    // A browser is sent to sign in, to come back where it was.
    let response = send(
        front.addr(),
        through(&front, "/console/devices?page=2")
            .header(ACCEPT, "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        response.headers()[LOCATION],
        stack.url("/oauth2/start?rd=%2Fconsole%2Fdevices%3Fpage%3D2"),
        "{}",
        front.log()
    );
}

#[tokio::test]
async fn behind_nginx_auth_request() {
    the_recipe_holds(FrontKind::Nginx).await;
}

#[tokio::test]
async fn behind_caddy_forward_auth() {
    the_recipe_holds(FrontKind::Caddy).await;
}

#[tokio::test]
async fn behind_traefik_forward_auth() {
    the_recipe_holds(FrontKind::Traefik).await;
}

/// `/oauth2/auth` asked directly, as a proxy on loopback would.
async fn ask(stack: &Stack, headers: &[(&str, &str)]) -> http::Response<hyper::body::Incoming> {
    let mut request = get("/oauth2/auth");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(stack.gateway.addr, request.body(empty()).unwrap()).await
}

/// This machine's address on its network: a client that is no proxy
/// connects from it.
fn outside_address() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: the kernel only picks the route's source.
    socket
        .connect("198.51.100.1:9")
        .expect("a network route to tell an address that is not loopback");
    let ip = socket.local_addr().unwrap().ip();
    assert!(!ip.is_loopback());
    ip
}

#[tokio::test]
async fn forward_auth_answers_only_trusted_proxies_about_the_canonical_target() {
    let stack = Stack::with(Options {
        tables: ROUTES,
        ..Options::default()
    })
    .await;
    let (token, _) = stack.provider.user_tokens("alice@contoso.example").await;
    let bearer = format!("Bearer {token}");

    // From loopback: a bearer token is judged for the target named, and
    // the answer names the user, and blanks what the user has not.
    let response = ask(
        &stack,
        &[("x-forwarded-uri", "/console"), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-forwarded-user"],
        "alice@contoso.example"
    );
    assert_eq!(response.headers()["x-forwarded-roles"], "Console.User");
    let response = ask(
        &stack,
        &[
            ("x-original-uri", "/console/%2E%2e/admin"),
            ("authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // A public route: 200 naming nobody, whatever the client claimed.
    let response = ask(
        &stack,
        &[
            ("x-forwarded-uri", "/api/public/x"),
            ("x-forwarded-user", "mallory"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-forwarded-user"], "");

    // No target, two different targets, or one with no single meaning.
    for headers in [
        vec![],
        vec![
            ("x-forwarded-uri", "/api/public/x"),
            ("x-original-uri", "/admin"),
        ],
        vec![("x-forwarded-uri", "/api/public/..%2fadmin")],
        vec![("x-forwarded-uri", "https://localhost/api/public/x")],
    ] {
        let response = ask(&stack, &headers).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{headers:?}");
    }

    // Without a session, with redirect=1: a browser is sent to sign in,
    // an API client is not.
    let asked = |accept: &'static str| {
        get("/oauth2/auth?redirect=1")
            .header("x-forwarded-uri", "/console?tab=1")
            .header(ACCEPT, accept)
            .body(empty())
            .unwrap()
    };
    let response = send(stack.gateway.addr, asked("text/html")).await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        response.headers()[LOCATION],
        stack.url("/oauth2/start?rd=%2Fconsole%3Ftab%3D1")
    );
    let response = send(stack.gateway.addr, asked("application/json")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // From anywhere else, no answer about anything, not even with a
    // valid token: anyone could name whatever target suits them.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((outside_address(), 0).into()).unwrap();
    let listener = std::net::SocketAddr::from(([127, 0, 0, 1], stack.gateway.addr.port()));
    let (tls, _) = tls_over(socket.connect(listener).await.unwrap(), &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            get("/oauth2/auth")
                .header("host", "localhost")
                .header("x-forwarded-uri", "/console")
                .header("authorization", &bearer)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.headers().get("x-forwarded-user").is_none());

    // Each verdict counted for the operator.
    for line in [
        "allowed\"} 1",
        "forbidden\"} 1",
        "passed\"} 1",
        "no_target\"} 4",
        "unauthenticated\"} 2",
        "untrusted_peer\"} 1",
    ] {
        let line = format!("authgate_forward_auths_total{{outcome=\"{line}");
        stack.gateway.metric(&line).await;
    }
}

#[tokio::test]
async fn the_sign_in_start_returns_only_to_the_gateways_own_hosts() {
    let stack = Stack::start("").await;
    for (rd, landing) in [
        (
            "/console/devices?page=2&sort=name",
            "/console/devices?page=2&sort=name",
        ),
        ("https://evil.example/console", "/"),
        ("//evil.example/console", "/"),
    ] {
        let start = format!(
            "/oauth2/start?rd={}",
            percent_encoding::utf8_percent_encode(rd, percent_encoding::NON_ALPHANUMERIC)
        );
        let results = browser(
            &stack.origin,
            json!([{ "goto": stack.url(&start) }, { "login": "alice" }]),
        )
        .await;
        assert_eq!(results[1]["url"], stack.url(landing), "{rd}");
    }
}
