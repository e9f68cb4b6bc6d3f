//! What a session does after sign-in: renewal, replayed callbacks, the
//! server-side store (a small cookie, restarts, sign-out and revocation
//! that end copies), and sessions too large for one cookie in cookie mode.

use crate::common::peers::{browser, CLIENT_ID};
use crate::common::stack::*;
use crate::common::*;
use http::StatusCode;
use serde_json::{json, Value};

/// The session cookie a response sets, as a `Cookie` header value.
fn set_session_cookie(response: &http::Response<hyper::body::Incoming>) -> String {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .filter(|v| v.starts_with("__Host-authgate") && !v.contains("Max-Age=0"))
        .map(|v| v.split(';').next().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A stack whose every ID token is "about to expire", so each request
/// renews, and the session cookie of `user` signed in through it;
/// `session` adds keys to `[session]`.
async fn signed_in_due_for_renewal(user: &str, session: &str) -> (Stack, String) {
    let session = format!("refresh_before = \"2h\"\n{session}");
    let stack = Stack::with(Options {
        session: &session,
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": user }, { "cookies": true }]),
    )
    .await;
    let cookie = session_cookie(&results[2]);
    (stack, cookie)
}

#[tokio::test]
async fn sessions_in_cookies_renew_their_tokens_and_end_when_the_provider_refuses() {
    let (mut stack, cookie) = signed_in_due_for_renewal("ivan", "store = \"cookie\"").await;
    let response = send(
        stack.gateway.addr,
        get("/renewed")
            .header("cookie", cookie)
            .body(empty())
            .unwrap(),
    )
    .await;
    let renewed = set_session_cookie(&response);
    assert!(!renewed.is_empty(), "no renewed session cookie");
    assert_eq!(
        upstream_saw(response).await.header("x-forwarded-user"),
        Some("ivan@contoso.example")
    );

    // A restarted provider has forgotten every grant: the refresh token is
    // refused and the browser goes back through sign-in.
    stack.provider.restart();
    let response = send(
        stack.gateway.addr,
        get("/after-revocation")
            .header("cookie", renewed)
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(&stack.provider_origin()), "{location}");
    stack
        .gateway
        .log_line(|l| l["fields"]["message"] == "session ended: refresh refused")
        .await;
}

/// In the store, a renewal keeps the cookie and a refused one deletes the
/// session: the same cookie stays refused.
#[tokio::test]
async fn stored_sessions_renew_in_place_and_a_refused_renewal_ends_them() {
    let (mut stack, cookie) = signed_in_due_for_renewal("ivan", "").await;
    let before = token_requests(&stack.gateway.scrape().await);
    let response = send(
        stack.gateway.addr,
        get("/renewed")
            .header("cookie", cookie.as_str())
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(set_session_cookie(&response), "", "the id stays the same");
    assert_eq!(
        upstream_saw(response).await.header("x-forwarded-user"),
        Some("ivan@contoso.example")
    );
    assert_eq!(token_requests(&stack.gateway.scrape().await), before + 1);

    stack.provider.restart();
    for path in ["/after-revocation", "/and-again"] {
        let response = send(
            stack.gateway.addr,
            get(path)
                .header("cookie", cookie.as_str())
                .header("accept", "application/json")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // Asked once: the second request found no session to renew.
    assert_eq!(token_requests(&stack.gateway.scrape().await), before + 2);
    let (status, out, err) = stack.gateway.command(&["sessions", "list"]);
    assert!(status.success(), "{err}");
    assert!(out.contains("0 session(s)"), "{out}");
}

#[tokio::test]
async fn a_stored_session_is_one_small_cookie_survives_a_restart_and_sign_out_ends_its_copies() {
    let mut stack = Stack::start("").await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "many1" }, { "cookies": true }]),
    )
    .await;
    let groups = echo_of(&results[1])
        .header("x-forwarded-groups")
        .unwrap()
        .to_owned();
    assert_eq!(groups.split(',').count(), 150);
    // 150 groups, and still one cookie the size of an id.
    let cookie = session_cookie(&results[2]);
    assert!(cookie.len() <= 100 && !cookie.contains(';'), "{cookie}");

    // Killed and started again: the session is still there.
    stack.gateway.restart();
    wait_ready(&stack.gateway).await;
    let user_at = |path: &'static str| {
        let cookie = cookie.clone();
        let addr = stack.gateway.addr;
        async move {
            let response = send(
                addr,
                get(path)
                    .header("cookie", cookie)
                    .header("accept", "application/json")
                    .body(empty())
                    .unwrap(),
            )
            .await;
            match response.status() {
                StatusCode::OK => upstream_saw(response)
                    .await
                    .header("x-forwarded-user")
                    .map(str::to_owned),
                StatusCode::UNAUTHORIZED => None,
                other => panic!("{path}: {other}"),
            }
        }
    };
    assert_eq!(
        user_at("/after-restart").await.as_deref(),
        Some("many1@contoso.example")
    );

    // Signed out with one copy of the cookie: every copy is refused.
    let response = stack.sign_out(stack.gateway.addr, &cookie).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(user_at("/the-copy").await, None);
    stack
        .gateway
        .log_line(|l| l["fields"]["message"] == "signed out")
        .await;
}

/// Deep links of any length: the login state is in the store, not in a
/// cookie the browser would drop.
#[tokio::test]
async fn a_deep_link_of_8_kb_lands_whole_after_sign_in() {
    let stack = Stack::start("").await;
    let long = format!("/console/report?filter={}", "c".repeat(8192));
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url(&long) }, { "login": "alice" }]),
    )
    .await;
    assert_eq!(echo_of(&results[1]).path, long);
}

#[tokio::test]
async fn an_admin_lists_and_revokes_a_users_sessions() {
    let stack = Stack::start("").await;
    let mut cookies = Vec::new();
    for user in ["ivan", "ivan", "judy"] {
        let results = browser(
            &stack.origin,
            json!([{ "goto": stack.url("/") }, { "login": user }, { "cookies": true }]),
        )
        .await;
        cookies.push(session_cookie(&results[2]));
    }
    let (status, out, err) = stack.gateway.command(&["sessions", "list"]);
    assert!(status.success(), "{err}");
    assert_eq!(out.matches("ivan@contoso.example").count(), 2, "{out}");
    assert_eq!(out.matches("judy@contoso.example").count(), 1, "{out}");
    assert!(
        !out.contains(&cookies[0][16..]),
        "a session id was listed: {out}"
    );

    let (status, out, err) =
        stack
            .gateway
            .command(&["sessions", "revoke", "--user", "IVAN@contoso.example"]);
    assert!(status.success(), "{err}");
    assert!(out.contains("2 session(s) ended"), "{out}");
    assert_eq!(
        status_with(&stack, &cookies[0]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_with(&stack, &cookies[1]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status_with(&stack, &cookies[2]).await, StatusCode::OK);
    stack
        .gateway
        .log_line(|l| l["fields"]["message"] == "sessions revoked" && l["fields"]["count"] == 2)
        .await;

    // The endpoint itself wants the token: none, or a wrong one, is 401.
    let admin = stack.gateway.admin_addr.unwrap();
    let token =
        std::fs::read_to_string(stack.gateway.dir.path().join("state/admin.token")).unwrap();
    for authorization in [None, Some("Bearer wrong-token-of-some-length".to_owned())] {
        let mut request = http::Request::delete("/sessions?all=true");
        if let Some(value) = &authorization {
            request = request.header("authorization", value.as_str());
        }
        let response = send_plain(admin, request.body(empty()).unwrap()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
    }
    assert_eq!(status_with(&stack, &cookies[2]).await, StatusCode::OK);
    let response = send_plain(
        admin,
        http::Request::delete("/sessions?all=true")
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        status_with(&stack, &cookies[2]).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_replayed_callback_is_refused() {
    let stack = Stack::start("").await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "judy" }, { "replay_callback": true }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("judy@contoso.example")
    );
    assert_eq!(results[2]["status"], 400);
    assert!(results[2]["text"]
        .as_str()
        .unwrap()
        .contains("not one this browser started"));
}

#[tokio::test]
async fn large_sessions_in_cookies_split_and_the_id_token_can_be_passed_on() {
    let stack = Stack::with(Options {
        tables: "[headers]\nid_token = \"X-Id-Token\"",
        session: "store = \"cookie\"",
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/") },
            { "login": "many1" },
            { "cookies": true },
            { "goto": stack.url("/second") }
        ]),
    )
    .await;
    let first = echo_of(&results[1]);
    assert_eq!(
        first
            .header("x-forwarded-groups")
            .unwrap()
            .split(',')
            .count(),
        150
    );
    let names: Vec<&str> = results[2]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"__Host-authgate.1"),
        "the session was not split: {names:?}"
    );

    // The split session comes back whole on the next request.
    let second = echo_of(&results[3]);
    assert_eq!(
        second.header("x-forwarded-user"),
        Some("many1@contoso.example")
    );
    let id_token = second
        .header("x-id-token")
        .expect("the ID token was passed on");
    let payload = id_token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["preferred_username"], "many1@contoso.example");
    assert_eq!(claims["aud"], CLIENT_ID);
}

/// `authgate_provider_requests_total{kind="token"}` in an exposition.
pub(crate) fn token_requests(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("authgate_provider_requests_total{kind=\"token\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_not_asked_by_every_request() {
    let (mut stack, cookie) = signed_in_due_for_renewal("judy", "").await;
    stack.provider.stop();
    let before = token_requests(&stack.gateway.scrape().await);
    for _ in 0..5 {
        let response = send(
            stack.gateway.addr,
            get("/while-the-provider-is-down")
                .header("cookie", cookie.as_str())
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            upstream_saw(response).await.header("x-forwarded-user"),
            Some("judy@contoso.example"),
            "the session goes on meanwhile"
        );
    }
    let after = token_requests(&stack.gateway.scrape().await);
    assert_eq!(after - before, 1, "one try for five requests");
}

/// The provider configured to log out back-channel to this gateway (and
/// so to put `sid` in its ID tokens), trusting the gateway's test
/// certificate; the ID token passed on, to read the `sid` from.
async fn stack_with_provider_logouts() -> Stack {
    Stack::with(Options {
        tables: "[headers]\nid_token = \"X-Id-Token\"",
        provider_env: vec![
            (
                "BACKCHANNEL_LOGOUT_URI".into(),
                "{origin}/oauth2/back_channel_logout".into(),
            ),
            // The provider's own outbound call to the gateway's
            // self-signed test certificate.
            ("NODE_TLS_REJECT_UNAUTHORIZED".into(), "0".into()),
        ],
        ..Options::default()
    })
    .await
}

/// `user` signed in: the session cookie and the ID token the upstream got.
async fn signed_in_with_id_token(stack: &Stack, user: &str) -> (String, String) {
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": user }, { "cookies": true }]),
    )
    .await;
    let id_token = echo_of(&results[1])
        .header("x-id-token")
        .expect("the ID token was passed on")
        .to_owned();
    (session_cookie(&results[2]), id_token)
}

/// The finding `name` of `authgate check --json` run beside `gateway`.
pub(crate) fn check_finding(gateway: &Gateway, name: &str) -> Value {
    let (_, out, err) = gateway.command(&["check", "--json"]);
    let findings: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == name)
        .unwrap_or_else(|| panic!("no `{name}` finding in {findings:#}"))
        .clone()
}

/// Without the optional claim `sid`, Entra's front-channel logout cannot
/// name the session: the doctor says so once someone has signed in.
#[tokio::test]
async fn the_doctor_tells_when_id_tokens_lack_sid() {
    let stack = Stack::start("").await;
    let finding = check_finding(&stack.gateway, "provider logout");
    assert_eq!(finding["ok"], true, "{finding}");
    assert!(
        finding["detail"]
            .as_str()
            .unwrap()
            .contains("no one is signed in"),
        "{finding}"
    );
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "hank" }]),
    )
    .await;
    assert_eq!(results[1]["status"], 200);
    let finding = check_finding(&stack.gateway, "provider logout");
    assert_eq!(finding["ok"], false, "{finding}");
    assert!(
        finding["fix"].as_str().unwrap().contains("sid"),
        "{finding}"
    );
    let store = check_finding(&stack.gateway, "sessions");
    assert!(
        store["detail"].as_str().unwrap().contains("sessions.redb"),
        "{store}"
    );
}

async fn status_with(stack: &Stack, cookie: &str) -> StatusCode {
    send(
        stack.gateway.addr,
        get("/x")
            .header("cookie", cookie)
            .header("accept", "application/json")
            .body(empty())
            .unwrap(),
    )
    .await
    .status()
}

/// Signed out at the provider itself (as from another app of the tenant):
/// the provider posts a logout token, and the session ends here, copies
/// of its cookie included.
#[tokio::test]
async fn a_sign_out_at_the_provider_ends_the_session_here() {
    let stack = stack_with_provider_logouts().await;
    let end_session = stack
        .provider
        .issuer
        .replace("/v2.0", "/oauth2/v2.0/logout");
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/") },
            { "login": "erin" },
            { "cookies": true },
            { "provider_sign_out": end_session }
        ]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("erin@contoso.example")
    );
    let cookie = session_cookie(&results[2]);
    let ended = stack
        .gateway
        .log_line(|l| l["fields"]["message"] == "signed out by the provider (back-channel)")
        .await;
    assert_eq!(ended["fields"]["ended"], 1, "{ended}");
    assert_eq!(status_with(&stack, &cookie).await, StatusCode::UNAUTHORIZED);
}

/// What Entra's "Front-channel logout URL" receives: the `sid` of the
/// provider's session (and maybe its `iss`).
#[tokio::test]
async fn a_front_channel_logout_ends_the_sessions_of_its_sid() {
    let stack = stack_with_provider_logouts().await;
    let (cookie, id_token) = signed_in_with_id_token(&stack, "frank").await;
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(id_token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let sid = claims["sid"].as_str().expect("the ID token carries sid");
    let finding = check_finding(&stack.gateway, "provider logout");
    assert_eq!(finding["ok"], true, "{finding}");
    assert!(
        finding["detail"].as_str().unwrap().contains("carry sid"),
        "{finding}"
    );
    let logout = |query: String| {
        let addr = stack.gateway.addr;
        async move {
            send(
                addr,
                get(&format!("/oauth2/front_channel_logout?{query}"))
                    .header("accept", "text/html")
                    .body(empty())
                    .unwrap(),
            )
            .await
        }
    };
    let encode = |v: &str| {
        percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
    };

    // Another provider's, or one naming no session: refused, and the
    // session goes on.
    let response = logout(format!(
        "iss={}&sid={}",
        encode("https://evil.example/v2.0"),
        encode(sid)
    ))
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = logout(format!("iss={}", encode(&stack.provider.issuer))).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(body_string(response).await.contains("optional claim"));
    assert_eq!(status_with(&stack, &cookie).await, StatusCode::OK);

    let response = logout(format!(
        "iss={}&sid={}",
        encode(&stack.provider.issuer),
        encode(sid)
    ))
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(status_with(&stack, &cookie).await, StatusCode::UNAUTHORIZED);
    // Entra may leave `iss` out.
    let response = logout(format!("sid={}", encode(sid))).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// The back-channel endpoint at the wire: anything but a signed logout
/// token from the provider is a 400 that ends nothing.
#[tokio::test]
async fn forged_back_channel_logouts_end_nothing() {
    let stack = stack_with_provider_logouts().await;
    let (cookie, id_token) = signed_in_with_id_token(&stack, "gina").await;
    // An ID token of the provider's, genuinely signed: not a logout token.
    let forms = [
        format!("logout_token={id_token}"),
        "logout_token=eyJhbGciOiJub25lIn0.eyJzaWQiOiJ4In0.".to_owned(),
        "token=nothing".to_owned(),
        String::new(),
    ];
    for form in forms {
        let response = send(
            stack.gateway.addr,
            http::Request::post("/oauth2/back_channel_logout")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(full(form.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{form}");
        let body: Value = serde_json::from_str(&body_string(response).await).unwrap();
        assert_eq!(body["error"], "invalid_request", "{form}");
    }
    assert_eq!(status_with(&stack, &cookie).await, StatusCode::OK);
}
