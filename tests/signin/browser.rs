//! Sign-in as a browser goes through it, in a real headless Chromium.

use std::time::Instant;

use crate::common::peers::{browser, CLIENT_SECRET, TENANT};
use crate::common::stack::*;
use crate::common::*;
use http::{Request, StatusCode};
use serde_json::json;

#[tokio::test]
async fn first_visit_signs_in_and_lands_on_the_asked_url_with_identity_headers() {
    let stack = Stack::start("").await;
    let asked = stack.url("/console/devices?page=2&q=a%20b");
    let results = browser(
        &stack.origin,
        json!([{ "goto": asked }, { "login": "alice" }, { "cookies": true }]),
    )
    .await;

    assert!(
        results[0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&stack.provider_origin()),
        "first visit did not reach the provider: {}",
        results[0]["url"]
    );
    assert_eq!(results[1]["url"], asked.as_str());
    let echo = echo_of(&results[1]);
    assert_eq!(echo.path, "/console/devices?page=2&q=a%20b");
    assert_eq!(
        echo.header("x-forwarded-user"),
        Some("alice@contoso.example")
    );
    assert_eq!(
        echo.header("x-forwarded-email"),
        Some("alice@contoso.example")
    );
    assert_eq!(echo.header("x-forwarded-name"), Some("Alice Example"));
    assert_eq!(echo.header("x-forwarded-tenant"), Some(TENANT));
    assert_eq!(
        echo.header("x-forwarded-groups"),
        Some("group-alice-0,group-alice-1")
    );
    assert_eq!(echo.header("x-forwarded-roles"), Some("Console.User"));
    assert_eq!(
        echo.header("x-forwarded-user-id").map(str::len),
        Some(36),
        "oid, not sub"
    );
    assert!(
        !echo
            .header("cookie")
            .unwrap_or("")
            .contains("__Host-authgate"),
        "the gateway's own cookies reached the console"
    );

    let cookies = results[2].as_array().unwrap();
    let session = cookies
        .iter()
        .find(|c| c["name"] == "__Host-authgate")
        .expect("a session cookie");
    assert_eq!(session["secure"], true);
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Lax");
    assert!(
        !cookies
            .iter()
            .any(|c| c["name"].as_str().unwrap().contains("-login-")),
        "the login state cookie outlived the sign-in: {cookies:?}"
    );
    let audit = stack
        .gateway
        .log_line(|l| l["target"] == "authgate::audit" && l["fields"]["message"] == "signed in")
        .await;
    assert_eq!(audit["fields"]["user"], "alice@contoso.example");

    // Nothing secret in the log: not the client secret, not the session,
    // not the callback's code or state, not a token.
    let log = serde_json::to_string(&stack.gateway.logs()).unwrap();
    let session_value = session["value"].as_str().unwrap();
    for secret in [
        CLIENT_SECRET,
        SESSION_SECRET,
        &session_value[..40],
        "code=",
        "state=",
        "eyJ",
    ] {
        assert!(!log.contains(secret), "the log contains {secret}");
    }
}

#[tokio::test]
async fn signed_in_requests_cannot_spoof_identity_and_websockets_carry_it() {
    let stack = Stack::start("").await;
    let ws_url = stack.url("/ws/live").replace("https://", "wss://");
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/") },
            { "login": "bob" },
            { "websocket": ws_url, "send": "ping" },
            { "cookies": true }
        ]),
    )
    .await;
    let messages = &results[2]["messages"];
    assert_eq!(
        messages[0],
        json!({ "user": "bob@contoso.example" }).to_string()
    );
    assert_eq!(messages[1], "ping");

    // The same session from another client, with identity headers of its own.
    let response = send(
        stack.gateway.addr,
        get("/whoami")
            .header("cookie", session_cookie(&results[3]))
            .header("x-forwarded-user", "admin@contoso.example")
            .header("x-forwarded-groups", "Domain Admins")
            .body(empty())
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(
        echo.headers["x-forwarded-user"],
        vec!["bob@contoso.example"]
    );
    assert_eq!(
        echo.headers["x-forwarded-groups"],
        vec!["group-bob-0,group-bob-1"]
    );
}

#[tokio::test]
async fn sign_out_ends_both_sessions_and_the_next_visit_signs_in_again() {
    let stack = Stack::start("").await;
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/") },
            { "login": "carol" },
            { "sign_out": true },
            { "goto": stack.url("/after") }
        ]),
    )
    .await;
    assert_eq!(results[2]["url"], stack.url("/oauth2/signed_out").as_str());
    assert!(results[2]["text"]
        .as_str()
        .unwrap()
        .contains("You are signed out"));
    assert!(
        results[3]["url"]
            .as_str()
            .unwrap()
            .starts_with(&stack.provider_origin()),
        "after sign-out the console was reachable without signing in: {}",
        results[3]["url"]
    );
    assert!(
        results[3]["text"]
            .as_str()
            .unwrap()
            .contains("name=\"login\""),
        "the provider asks to log in again"
    );
}

#[tokio::test]
async fn cross_site_sign_out_is_refused() {
    let stack = Stack::start("").await;
    let response = send(
        stack.gateway.addr,
        Request::post("/oauth2/sign_out")
            .header("origin", "https://evil.example")
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn two_tabs_signing_in_at_once_both_succeed() {
    let stack = Stack::start("").await;
    let (a, b) = (stack.url("/tab/one"), stack.url("/tab/two"));
    let results = browser(&stack.origin, json!([{ "tabs": [a, b], "user": "dave" }])).await;
    let tabs = results[0].as_array().unwrap();
    assert_eq!(tabs[0]["url"], a.as_str(), "{}", tabs[0]["text"]);
    assert_eq!(tabs[1]["url"], b.as_str(), "{}", tabs[1]["text"]);
    assert_eq!(echo_of(&tabs[0]).path, "/tab/one");
    assert_eq!(echo_of(&tabs[1]).path, "/tab/two");
    assert_eq!(
        echo_of(&tabs[1]).header("x-forwarded-user"),
        Some("dave@contoso.example")
    );
}

#[tokio::test]
async fn sign_in_after_the_provider_rolled_its_keys_succeeds() {
    let mut stack = Stack::start("").await;
    let first = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "erin" }]),
    )
    .await;
    assert_eq!(
        echo_of(&first[1]).header("x-forwarded-user"),
        Some("erin@contoso.example")
    );

    stack.provider.restart();
    let second = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/again") }, { "login": "frank" }]),
    )
    .await;
    assert_eq!(
        echo_of(&second[1]).header("x-forwarded-user"),
        Some("frank@contoso.example")
    );
    stack
        .gateway
        .log_line(|l| {
            l["fields"]["message"] == "token signed with an unknown key; refetching the key set"
        })
        .await;
}

#[tokio::test]
async fn provider_down_keeps_sessions_and_explains_new_sign_ins() {
    let mut stack = Stack::start("").await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "grace" }, { "cookies": true }]),
    )
    .await;
    let cookie = session_cookie(&results[2]);
    stack.provider.stop();

    let response = send(
        stack.gateway.addr,
        get("/still-signed-in")
            .header("cookie", cookie)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        upstream_saw(response).await.header("x-forwarded-user"),
        Some("grace@contoso.example")
    );

    // The gateway notices within its reachability check's lifetime.
    let started = Instant::now();
    loop {
        let response = send(
            stack.gateway.addr,
            get("/")
                .header("accept", "text/html")
                .body(empty())
                .unwrap(),
        )
        .await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(response.status(), StatusCode::FOUND);
        assert!(
            started.elapsed() < DEADLINE,
            "the gateway kept sending browsers to a dead provider"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let page = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/new-visitor") }]),
    )
    .await;
    assert_eq!(page[0]["status"], 503);
    assert_eq!(page[0]["url"], stack.url("/new-visitor").as_str());
    assert!(page[0]["text"]
        .as_str()
        .unwrap()
        .contains("The sign-in provider cannot be reached"));
}

#[tokio::test]
async fn a_cancelled_sign_in_shows_what_happened() {
    let stack = Stack::start("").await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "cancel": true }]),
    )
    .await;
    assert_eq!(results[1]["status"], 401);
    let page = results[1]["text"].as_str().unwrap();
    assert!(page.contains("Sign-in was cancelled or denied"), "{page}");
    assert!(page.contains("Try signing in again"), "{page}");
}

#[tokio::test]
async fn form_post_callbacks_work_cross_site() {
    let stack = Stack::start("response_mode = \"form_post\"").await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/posted") }, { "login": "heidi" }]),
    )
    .await;
    assert_eq!(results[1]["url"], stack.url("/posted").as_str());
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("heidi@contoso.example")
    );
}

#[tokio::test]
/// With sessions in cookies, the login state is a cookie too, and a
/// browser keeps only 4 KB of one.
async fn a_deep_link_too_long_for_a_cookie_still_signs_in_and_says_so() {
    let stack = Stack::with(Options {
        session: "store = \"cookie\"",
        ..Options::default()
    })
    .await;
    // Just under the limit: carried whole.
    let long = format!("/console/report?filter={}", "b".repeat(2000));
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url(&long) }, { "login": "alice" }]),
    )
    .await;
    assert_eq!(echo_of(&results[1]).path, long);

    // Over it: signed in all the same, told, and offered the page itself.
    let longer = format!("/console/report?filter={}", "a".repeat(3000));
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url(&longer) },
            { "login": "alice" },
            { "goto": stack.url("/console/report") }
        ]),
    )
    .await;
    assert_eq!(results[1]["status"], 200);
    let text = results[1]["text"].as_str().unwrap();
    assert!(text.contains("too long to carry"), "{text}");
    assert!(text.contains("href=\"/console/report\""), "{text}");
    assert_eq!(
        echo_of(&results[2]).header("x-forwarded-user"),
        Some("alice@contoso.example")
    );
}
