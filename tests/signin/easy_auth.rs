//! `headers.easy_auth`: an app written for Azure App Service's built-in
//! authentication gets the headers and `/.auth/*` endpoints it expects.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::COOKIE;
use http::StatusCode;
use serde_json::{json, Value};

use crate::common::peers::browser;
use crate::common::stack::*;
use crate::common::*;

const OBJECT_ID: &str = "http://schemas.microsoft.com/identity/claims/objectidentifier";

/// `/.auth/me` as `header: value` sees it: its status and JSON.
async fn me(stack: &Stack, header: (&str, &str)) -> (StatusCode, Value) {
    let response = send(
        stack.gateway.addr,
        get("/.auth/me")
            .header(header.0, header.1)
            .body(empty())
            .unwrap(),
    )
    .await;
    let status = response.status();
    let text = body_string(response).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn principal(echo: &Echo) -> Value {
    let encoded = echo.header("x-ms-client-principal").expect("a principal");
    serde_json::from_slice(&STANDARD.decode(encoded).unwrap()).unwrap()
}

fn has_claim(claims: &Value, typ: &str, val: &str) -> bool {
    claims
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["typ"] == typ && c["val"] == val)
}

#[tokio::test]
async fn an_app_service_app_sees_its_headers_and_endpoints() {
    let stack = Stack::with(Options {
        tables: "[headers]\neasy_auth = true\neasy_auth_tokens = true\n",
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/.auth/login/aad?post_login_redirect_uri=/console/deep%3Fx%3D1") },
            { "login": "alice" },
            { "cookies": true },
        ]),
    )
    .await;
    let echo = echo_of(&results[1]);
    assert_eq!(echo.path, "/console/deep?x=1", "back where the app asked");
    assert_eq!(
        echo.header("x-ms-client-principal-name"),
        Some("alice@contoso.example")
    );
    let oid = echo.header("x-forwarded-user-id").unwrap();
    assert_eq!(echo.header("x-ms-client-principal-id"), Some(oid));
    assert_eq!(echo.header("x-ms-client-principal-idp"), Some("aad"));
    let principal = principal(&echo);
    assert_eq!(principal["auth_typ"], "aad");
    assert!(
        has_claim(&principal["claims"], OBJECT_ID, oid),
        "{principal}"
    );
    assert!(has_claim(&principal["claims"], "groups", "group-alice-1"));
    assert!(has_claim(
        &principal["claims"],
        principal["name_typ"].as_str().unwrap(),
        "alice@contoso.example"
    ));
    let id_token = echo
        .header("x-ms-token-aad-id-token")
        .expect("the ID token");
    assert_eq!(id_token.split('.').count(), 3);
    let access_token = echo
        .header("x-ms-token-aad-access-token")
        .expect("the access token");

    // /.auth/me: the same user and tokens, never the refresh token.
    let cookie = session_cookie(&results[2]);
    let (status, body) = me(&stack, ("cookie", &cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let entry = &body[0];
    assert_eq!(entry["provider_name"], "aad");
    assert_eq!(entry["user_id"], "alice@contoso.example");
    assert_eq!(entry["id_token"], id_token);
    assert_eq!(entry["access_token"], access_token);
    assert!(entry["expires_on"].as_str().unwrap().ends_with('Z'));
    assert!(has_claim(&entry["user_claims"], OBJECT_ID, oid));
    assert!(!body.to_string().contains("refresh_token"), "{body}");

    // A client's own App Service headers never reach the app.
    for path in ["/api/public/x", "/console"] {
        let echo = upstream_saw(
            send(
                stack.gateway.addr,
                get(path)
                    .header(COOKIE, &cookie)
                    .header("X-MS-CLIENT-PRINCIPAL-NAME", "admin@contoso.example")
                    .header("x_ms_client_principal_id", "forged")
                    .header("X-MS-TOKEN-AAD-ID-TOKEN", "forged")
                    .body(empty())
                    .unwrap(),
            )
            .await,
        )
        .await;
        let public = path.starts_with("/api/public");
        let name = echo.header("x-ms-client-principal-name");
        assert_eq!(name, (!public).then_some("alice@contoso.example"), "{path}");
        assert!(echo.header("x_ms_client_principal_id").is_none(), "{path}");
        assert_ne!(echo.header("x-ms-token-aad-id-token"), Some("forged"));
    }

    // /.auth/refresh renews the tokens now; /.auth/me shows the new ones.
    let response = send(
        stack.gateway.addr,
        get("/.auth/refresh")
            .header(COOKIE, &cookie)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (_, body) = me(&stack, ("cookie", &cookie)).await;
    assert_ne!(body[0]["access_token"], access_token, "renewed: {body}");

    // Without a session: 401, as App Service answers.
    for path in ["/.auth/me", "/.auth/refresh"] {
        let response = send(stack.gateway.addr, get(path).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // Only Entra ID signs in here.
    let response = send(
        stack.gateway.addr,
        get("/.auth/login/google").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // A bearer client's /.auth/me names it, with its own token.
    let (token, _) = stack.provider.user_tokens("alice@contoso.example").await;
    let (status, body) = me(&stack, ("authorization", &format!("Bearer {token}"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["user_id"], "alice@contoso.example");
    assert_eq!(body[0]["access_token"], token.as_str());

    // /.auth/logout signs out (after the confirmation a link cannot skip).
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/console") },
            { "login": "alice" },
            { "cookies": true },
            { "sign_out": "/.auth/logout" },
        ]),
    )
    .await;
    let cookie = session_cookie(&results[2]);
    assert!(results[3]["url"].as_str().unwrap().contains("signed_out"));
    let (status, _) = me(&stack, ("cookie", &cookie)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_tokens_are_passed_only_when_asked_and_auth_paths_are_the_apps_when_off() {
    let stack = Stack::with(Options {
        tables: "[headers]\neasy_auth = true\n",
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "alice" }, { "cookies": true }]),
    )
    .await;
    let echo = echo_of(&results[1]);
    assert!(echo.header("x-ms-client-principal").is_some());
    assert!(echo.header("x-ms-token-aad-id-token").is_none());
    assert!(echo.header("x-ms-token-aad-access-token").is_none());
    let (status, body) = me(&stack, ("cookie", &session_cookie(&results[2]))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body[0].get("id_token").is_none(), "{body}");
    assert!(body[0].get("access_token").is_none(), "{body}");

    // A return target off the gateway's hosts lands on `/` instead.
    let results = browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/.auth/login/aad?post_login_redirect_uri=https://evil.example/steal") },
            { "login": "alice" },
            { "goto": stack.url("/.auth/login/aad?post_login_redirect_uri=//evil.example/steal") },
        ]),
    )
    .await;
    for result in &results[1..] {
        assert!(
            result["url"].as_str().unwrap().starts_with(&stack.origin),
            "{result}"
        );
        assert_eq!(echo_of(result).path, "/");
    }

    // Off (the default), `/.auth/` is the console's like any path.
    let off = Stack::start("").await;
    let response = send(off.gateway.addr, get("/.auth/me").body(empty()).unwrap()).await;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "protected like the console"
    );
    let response = off
        .get_with_bearer(
            "/.auth/me",
            &off.provider.user_tokens("alice@contoso.example").await.0,
        )
        .await;
    assert_eq!(upstream_saw(response).await.path, "/.auth/me");
}
