//! `headers.assertion`: each signed-in request carries an ES256 JWT the
//! upstream can verify against `/oauth2/jwks.json`, checked here with an
//! independent JWT library (jose), as an upstream would.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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

    // Rotation, its clock moved by dating the kept keys back: a key that
    // has signed for the rotation period (30 days) gets a successor,
    // published at once but signing only 10 minutes later...
    let ring = stack.gateway.dir.path().join("state/assertion-keys.json");
    let date_back = |ages: &[u64]| {
        let mut kept: Value = serde_json::from_slice(&std::fs::read(&ring).unwrap()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (key, age) in kept["keys"].as_array_mut().unwrap().iter_mut().zip(ages) {
            key["made"] = (now - age).into();
        }
        std::fs::write(&ring, kept.to_string()).unwrap();
    };
    let signer = |stack: &Stack| {
        let cookie = cookie.clone();
        let addr = stack.gateway.addr;
        async move {
            let echo = upstream_saw(
                send(
                    addr,
                    get("/console")
                        .header(COOKIE, &cookie)
                        .body(empty())
                        .unwrap(),
                )
                .await,
            )
            .await;
            let token = echo.header("x-authgate-assertion").unwrap().to_owned();
            let header = URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap();
            let kid = serde_json::from_slice::<Value>(&header).unwrap()["kid"].clone();
            (token, kid)
        }
    };
    let kids = |set: &Value| -> Vec<Value> {
        set["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].clone())
            .collect()
    };
    let day = 24 * 3600;
    date_back(&[31 * day]);
    stack.gateway.restart();
    wait_ready(&stack.gateway).await;
    let both = key_set(&stack).await;
    assert_eq!(kids(&both).len(), 2, "{both}");
    assert_eq!(kids(&both)[0], kids(&jwks)[0]);
    let (token, kid) = signer(&stack).await;
    assert_eq!(kid, kids(&jwks)[0], "the new key does not sign yet");
    let verified = verify_jwt(&token, &both, &stack.origin, &audience).await;
    assert!(verified["payload"].is_object(), "{verified}");

    // ...then signs, the old key still published for what it signed...
    date_back(&[31 * day, 11 * 60]);
    stack.gateway.restart();
    wait_ready(&stack.gateway).await;
    assert_eq!(key_set(&stack).await, both);
    assert_eq!(signer(&stack).await.1, kids(&both)[1]);

    // ...until the last assertion it signed has expired.
    date_back(&[31 * day, 16 * 60]);
    stack.gateway.restart();
    wait_ready(&stack.gateway).await;
    assert_eq!(kids(&key_set(&stack).await), vec![kids(&both)[1].clone()]);
    // An upstream holding the old set verifies nothing new: it refetches.
    let (token, _) = signer(&stack).await;
    let stale = verify_jwt(&token, &jwks, &stack.origin, &audience).await;
    assert!(stale["error"].is_string(), "{stale}");
}
