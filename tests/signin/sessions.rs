//! What a session does after sign-in: renewal, replayed callbacks, sessions
//! too large for one cookie.

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
/// renews, and the session cookie of `user` signed in through it.
async fn signed_in_due_for_renewal(user: &str) -> (Stack, String) {
    let stack = Stack::with(Options {
        session: "refresh_before = \"2h\"",
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
async fn sessions_renew_their_tokens_and_end_when_the_provider_refuses() {
    let (mut stack, cookie) = signed_in_due_for_renewal("ivan").await;
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
async fn large_sessions_split_across_cookies_and_the_id_token_can_be_passed_on() {
    let stack = Stack::with(Options {
        tables: "[headers]\nid_token = \"X-Id-Token\"",
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
fn token_requests(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("authgate_provider_requests_total{kind=\"token\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_not_asked_by_every_request() {
    let (mut stack, cookie) = signed_in_due_for_renewal("judy").await;
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
