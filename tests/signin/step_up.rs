//! Step-up per route (Entra authentication contexts): a route's
//! `require_acrs` sends a signed-in browser back through sign-in asking
//! for them (the `claims` parameter), and holds bearer tokens to them.

use http::StatusCode;
use serde_json::json;

use crate::common::peers::browser;
use crate::common::stack::*;

const ROUTES: &str = r#"
[[routes]]
prefix = "/admin"
upstream = "{upstream}"
[routes.policy]
require_acrs = ["c1"]
"#;

#[tokio::test]
async fn admin_pages_ask_for_a_stronger_sign_in_and_other_routes_keep_the_session() {
    let stack = Stack::with(Options {
        tables: ROUTES,
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/console") },
            { "login": "alice" },
            { "goto": stack.url("/admin/users?page=2") },
            { "goto": stack.url("/admin/users") },
        ]),
    )
    .await;
    assert_eq!(echo_of(&results[1]).path, "/console");
    // Through the provider again (its session makes it silent here), back
    // on the deep link, the ID token now carrying the context.
    let admin = echo_of(&results[2]);
    assert_eq!(admin.path, "/admin/users?page=2");
    assert_eq!(echo_of(&results[3]).path, "/admin/users");
    let asked = stack
        .gateway
        .log_line(|l| l["fields"]["message"] == "step-up required")
        .await;
    assert_eq!(asked["fields"]["acrs"], "c1");

    // A user whose sign-in never satisfies it gets a page, not a loop, and
    // keeps the rest of the console.
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/console") },
            { "login": "nomfa" },
            { "goto": stack.url("/admin/users") },
            { "goto": stack.url("/console/devices") },
        ]),
    )
    .await;
    assert_eq!(results[2]["status"], 403);
    let page = results[2]["text"].as_str().unwrap();
    assert!(
        page.contains("stronger sign-in") && page.contains("c1"),
        "{page}"
    );
    assert_eq!(echo_of(&results[3]).path, "/console/devices");

    // A bearer token without the context: RFC 9470's challenge.
    let (token, _) = stack.provider.user_tokens("alice@contoso.example").await;
    let response = stack.get_with_bearer("/admin/users", &token).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("error=\"insufficient_user_authentication\"")
            && challenge.contains("acr_values=\"c1\""),
        "{challenge}"
    );
    let response = stack.get_with_bearer("/console", &token).await;
    assert_eq!(response.status(), StatusCode::OK, "other routes as before");
}
