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
    let status_with = |cookie: String| async move {
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
    };
    assert_eq!(
        status_with(cookies[0].clone()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_with(cookies[1].clone()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status_with(cookies[2].clone()).await, StatusCode::OK);
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
    assert_eq!(status_with(cookies[2].clone()).await, StatusCode::OK);
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
        status_with(cookies[2].clone()).await,
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
