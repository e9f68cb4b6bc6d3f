//! `headers.assertion`: each signed-in request carries an ES256 JWT the
//! upstream can verify against `/oauth2/jwks.json`, checked here with an
//! independent JWT library (jose), as an upstream would.

use http::header::COOKIE;
use http::StatusCode;
use serde_json::{json, Value};

use crate::common::peers::{browser, verify_jwt};
use crate::common::stack::*;
use crate::common::*;

async fn key_set(stack: &Stack) -> Value {
    let response = send(
        stack.gateway.addr,
        get("/oauth2/jwks.json").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    serde_json::from_str(&body_string(response).await).unwrap()
}

#[tokio::test]
async fn the_upstream_can_verify_who_the_gateway_says_the_user_is() {
    let mut stack = Stack::with(Options {
        tables: "[headers]\nassertion = true\n",
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "alice" }, { "cookies": true }]),
    )
    .await;
    let echo = echo_of(&results[1]);
    let token = echo
        .header("x-authgate-assertion")
        .expect("an assertion")
        .to_owned();
    let jwks = key_set(&stack).await;
    let audience = stack.upstream.url();

    let verified = verify_jwt(&token, &jwks, &stack.origin, &audience).await;
    let payload = &verified["payload"];
    assert_eq!(
        payload["preferred_username"], "alice@contoso.example",
        "{verified}"
    );
    assert_eq!(payload["email"], "alice@contoso.example");
    assert_eq!(payload["groups"], json!(["group-alice-0", "group-alice-1"]));
    assert_eq!(payload["roles"], json!(["Console.User"]));
    let lifetime = payload["exp"].as_u64().unwrap() - payload["iat"].as_u64().unwrap();
    assert!(lifetime <= 300, "{lifetime} s");
    assert_eq!(verified["header"]["alg"], "ES256");

    // Not for another upstream, not once tampered with.
    let elsewhere = verify_jwt(&token, &jwks, &stack.origin, "http://other.example").await;
    assert!(elsewhere["error"].is_string(), "{elsewhere}");
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let refused = verify_jwt(&tampered, &jwks, &stack.origin, &audience).await;
    assert!(refused["error"].is_string(), "{refused}");

    // The session's next request carries the same one: signed once, kept.
    let cookie = session_cookie(&results[2]);
    let echo = upstream_saw(
        send(
            stack.gateway.addr,
            get("/console")
                .header(COOKIE, &cookie)
                .body(empty())
                .unwrap(),
        )
        .await,
    )
    .await;
    assert_eq!(echo.header("x-authgate-assertion"), Some(token.as_str()));

    // A client's own never reaches the upstream, on any route.
    let echo = upstream_saw(
        send(
            stack.gateway.addr,
            get("/api/public/x")
                .header("x-authgate-assertion", &token)
                .body(empty())
                .unwrap(),
        )
        .await,
    )
    .await;
    assert_eq!(echo.header("x-authgate-assertion"), None);

    // The key outlives a restart: what upstreams cached still verifies.
    stack.gateway.restart();
    wait_ready(&stack.gateway).await;
    assert_eq!(key_set(&stack).await, jwks);
}
