//! API clients, public routes, callbacks the gateway did not start, and
//! route policies.

use crate::common::peers::browser;
use crate::common::stack::*;
use crate::common::*;
use http::{Request, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn api_clients_get_401_json_and_public_routes_need_no_session() {
    let stack = Stack::start("").await;
    let response = send(
        stack.gateway.addr,
        Request::post("/api/private").body(full("{}")).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let body: Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(body["error"], "unauthenticated");

    let response = send(
        stack.gateway.addr,
        Request::post("/api/public/heartbeat")
            .header("x-forwarded-user", "mallory")
            .header("authorization", "Bearer rustdesk-own-token")
            .body(full("{\"id\":1}"))
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(echo.body, "{\"id\":1}");
    assert_eq!(echo.header("x-forwarded-user"), None);
    assert_eq!(
        echo.header("authorization"),
        Some("Bearer rustdesk-own-token")
    );
}

#[tokio::test]
async fn callbacks_the_gateway_did_not_start_go_to_the_console_only_when_allowed() {
    let refusing = Stack::start("").await;
    let response = send(
        refusing.gateway.addr,
        get("/api/oidc/callback?code=abc&state=rustdesk-login-1")
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(body_string(response)
        .await
        .contains("not one this browser started"));
    let response = send(
        refusing.gateway.addr,
        get("/api/oidc/callback?code=abc").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::BAD_REQUEST,
        "a callback without state"
    );

    let passing = Stack::start("pass_unknown_callbacks = true").await;
    let response = send(
        passing.gateway.addr,
        get("/api/oidc/callback?code=abc&state=rustdesk-login-1")
            .body(empty())
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(echo.upstream, "console");
    assert_eq!(
        echo.path,
        "/api/oidc/callback?code=abc&state=rustdesk-login-1"
    );

    let response = send(
        passing.gateway.addr,
        Request::post("/api/oidc/callback")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("code=abc&state=rustdesk-login-2"))
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(echo.body, "code=abc&state=rustdesk-login-2");
    drop(passing.upstream);
}

#[tokio::test]
async fn policies_refuse_signed_in_users_with_a_page_that_says_who_they_are() {
    let routes = r#"
[[routes]]
prefix = "/admin"
upstream = "UPSTREAM"
[routes.policy]
allowed_roles = ["Console.Admin"]
[[routes]]
prefix = "/ops"
upstream = "UPSTREAM"
[routes.policy]
allowed_groups = ["group-overage1-0"]
"#;
    let upstream = Upstream::start("console").await;
    let stack = Stack::with(Options {
        tables: &routes.replace("UPSTREAM", &upstream.url()),
        ..Options::default()
    })
    .await;

    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "alice" }, { "goto": stack.url("/admin/users") }]),
    )
    .await;
    assert_eq!(results[2]["status"], 403);
    let page = results[2]["text"].as_str().unwrap();
    assert!(
        page.contains("signed in as alice@contoso.example"),
        "{page}"
    );
    assert!(page.contains("app role"), "{page}");
    assert!(page.contains("Sign out"), "{page}");
    let audit = stack
        .gateway
        .log_line(|l| l["fields"]["message"] == "refused")
        .await;
    assert_eq!(audit["fields"]["route"], "/admin");
    assert_eq!(audit["fields"]["reason"], "role_not_allowed");

    let admin = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/admin/users") }, { "login": "admin" }]),
    )
    .await;
    assert_eq!(echo_of(&admin[1]).upstream, "console");
    assert_eq!(
        echo_of(&admin[1]).header("x-forwarded-roles"),
        Some("Console.Admin")
    );

    // More than 200 groups: Entra sends _claim_names, not groups. That is
    // "unknown", not "none", and the page says so.
    let overage = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/ops") }, { "login": "overage1" }]),
    )
    .await;
    assert_eq!(overage[1]["status"], 403);
    assert!(overage[1]["text"]
        .as_str()
        .unwrap()
        .contains("more groups than Microsoft Entra ID puts in a sign-in token"));
}

#[tokio::test]
async fn api_clients_with_a_provider_token_pass_and_forged_ones_do_not() {
    let stack = Stack::start("").await;
    let (token, _) = stack.provider.user_tokens("alice@contoso.example").await;
    let response = stack.get_with_bearer("/api/devices", &token).await;
    let echo = upstream_saw(response).await;
    assert_eq!(
        echo.header("x-forwarded-user"),
        Some("alice@contoso.example")
    );

    // Same token with its signature's last characters changed.
    let forged = format!("{}AAAA", &token[..token.len() - 4]);
    let response = stack.get_with_bearer("/api/devices", &forged).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
}

/// The status and `WWW-Authenticate` of a bearer request to `path`.
async fn with_bearer(stack: &Stack, path: &str, token: &str) -> (StatusCode, String) {
    let response = stack.get_with_bearer(path, token).await;
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (response.status(), challenge)
}

#[tokio::test]
async fn bearer_tokens_must_be_a_users_access_tokens_for_this_api() {
    let stack = Stack::with(Options {
        tables: "[[routes]]\nprefix = \"/api/automation\"\nupstream = \"{upstream}\"\n\
                 [routes.policy]\nallowed_roles = [\"Console.Automation\"]\n",
        ..Options::default()
    })
    .await;
    let (_, id_token) = stack.provider.user_tokens("bob@contoso.example").await;
    let app = stack.provider.app_token().await;
    // An ID token is not an access token; an app-only token is refused
    // unless bearer_app_tokens allows it.
    for token in [&id_token, &app] {
        let (status, challenge) = with_bearer(&stack, "/api/devices", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(challenge.contains("invalid_token"), "{challenge}");
    }

    let allowing = Stack::with(Options {
        tables: "[[routes]]\nprefix = \"/api/automation\"\nupstream = \"{upstream}\"\n\
                 [routes.policy]\nallowed_roles = [\"Console.Automation\"]\n",
        oidc: "bearer_app_tokens = true\nbearer_scopes = [\"api\"]",
        ..Options::default()
    })
    .await;
    let app = allowing.provider.app_token().await;
    // Only where a role rule admits one of its roles.
    let (status, _) = with_bearer(&allowing, "/api/automation/run", &app).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = with_bearer(&allowing, "/api/devices", &app).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A user's token still passes, its scope among bearer_scopes.
    let (user, _) = allowing.provider.user_tokens("bob@contoso.example").await;
    let (status, _) = with_bearer(&allowing, "/api/devices", &user).await;
    assert_eq!(status, StatusCode::OK);

    // Bearer tokens can be turned off altogether.
    let off = Stack::start("bearer = false").await;
    let (user, _) = off.provider.user_tokens("bob@contoso.example").await;
    let (status, challenge) = with_bearer(&off, "/api/devices", &user).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!challenge.contains("invalid_token"), "{challenge}");
}

#[tokio::test]
async fn v1_access_tokens_pass_only_when_accepted() {
    let stack = Stack::start(
        "bearer_accept_v1 = true\nbearer_v1_issuer = \"https://sts.windows.net/{tenantid}/\"",
    )
    .await;
    let token = stack.provider.user_v1_token("alice@contoso.example").await;
    use base64::Engine;
    let payload: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        payload["iss"],
        format!("https://sts.windows.net/{}/", crate::common::peers::TENANT)
    );
    assert!(payload.get("preferred_username").is_none(), "{payload}");
    let echo = upstream_saw(stack.get_with_bearer("/api/devices", &token).await).await;
    assert_eq!(
        echo.header("x-forwarded-user"),
        Some("alice@contoso.example"),
        "the user from upn"
    );

    // Off (the default), the same token is refused as from another issuer.
    let off = Stack::start("").await;
    let token = off.provider.user_v1_token("alice@contoso.example").await;
    let (status, challenge) = with_bearer(&off, "/api/devices", &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge.contains("invalid_token"), "{challenge}");
    // A provider that is not Entra has no v1 issuer to derive.
    let (status, _, err) = run_authgate(
        off.gateway.dir.path(),
        &["--config", "authgate.toml", "check-config"],
        &[("AUTHGATE_OIDC_BEARER_ACCEPT_V1", "true")],
    );
    assert_eq!(status.code(), Some(2));
    assert!(
        err.contains("oidc.bearer_accept_v1") && err.contains("oidc.bearer_v1_issuer"),
        "{err}"
    );
}
