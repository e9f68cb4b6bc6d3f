//! Sign-in end to end: the real binary with real TLS, a real OpenID
//! provider process shaped like Entra (npm `oidc-provider`), a real
//! upstream, and a real headless Chromium clicking through the login.

mod common;

use std::time::Instant;

use common::peers::{browser, Provider, CLIENT_ID, CLIENT_SECRET, TENANT};
use common::stack::*;
use common::*;
use http::{Request, StatusCode};
use serde_json::{json, Value};

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
    let token = stack.provider.api_token().await;
    let response = send(
        stack.gateway.addr,
        get("/api/devices")
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(echo.header("x-forwarded-user"), Some(CLIENT_ID));

    // Same token with its signature's last characters changed.
    let forged = format!("{}AAAA", &token[..token.len() - 4]);
    let response = send(
        stack.gateway.addr,
        get("/api/devices")
            .header("authorization", format!("Bearer {forged}"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
}

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

#[tokio::test]
async fn sessions_renew_their_tokens_and_end_when_the_provider_refuses() {
    // Every ID token is "about to expire": each request renews.
    let mut stack = Stack::with(Options {
        session: "refresh_before = \"2h\"",
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "ivan" }, { "cookies": true }]),
    )
    .await;
    let response = send(
        stack.gateway.addr,
        get("/renewed")
            .header("cookie", session_cookie(&results[2]))
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

/// An RSA key and a self-signed certificate for it, as an app
/// registration's certificate credential: (cert PEM, key PEM, public PEM).
fn app_certificate() -> (String, String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["authgate-client".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem(), key.public_key_pem())
}

fn provider_with_public_key(public_pem: &str) -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.pub");
    std::fs::write(&path, public_pem).unwrap();
    let env = vec![
        ("CLIENT_AUTH".to_owned(), "private_key_jwt".to_owned()),
        ("CLIENT_PUBLIC_KEY".to_owned(), path.display().to_string()),
    ];
    (dir, env)
}

#[tokio::test]
async fn a_certificate_credential_signs_in_without_a_secret() {
    let (cert, key, public) = app_certificate();
    let (_keep, provider_env) = provider_with_public_key(&public);
    let stack = Stack::with(Options {
        oidc: "client_auth = \"private_key_jwt\"\nclient_certificate = \"client.crt\"\nclient_key = \"client.key\"",
        provider_env,
        files: vec![("client.crt", cert.into_bytes()), ("client.key", key.into_bytes())],
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "kim" }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("kim@contoso.example")
    );
}

#[tokio::test]
async fn a_federated_credential_is_read_from_its_file_at_each_sign_in() {
    let (_, key, public) = app_certificate();
    let (_keep, provider_env) = provider_with_public_key(&public);
    // Placeholder until the provider's token endpoint is known.
    let stack = Stack::with(Options {
        oidc: "client_auth = \"federated\"\nfederated_token_path = \"federated-token\"",
        provider_env,
        files: vec![("federated-token", b"not yet".to_vec())],
        ..Options::default()
    })
    .await;
    // What the platform would mount: a JWT for the token endpoint, signed
    // by a key the provider trusts for this app.
    let token_endpoint = stack.provider.issuer.replace("/v2.0", "/oauth2/v2.0/token");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let assertion = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({ "iss": CLIENT_ID, "sub": CLIENT_ID, "aud": token_endpoint, "jti": "federated-1",
                 "iat": now, "exp": now + 3600 }),
        &jsonwebtoken::EncodingKey::from_rsa_pem(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let token_file = stack.gateway.dir.path().join("federated-token");
    std::fs::write(&token_file, &assertion).unwrap();
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "lee" }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("lee@contoso.example")
    );

    // A token the provider does not accept: the next sign-in says so.
    std::fs::write(&token_file, "expired-or-garbage").unwrap();
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "lee" }]),
    )
    .await;
    assert_eq!(results[1]["status"], 401);
    assert!(
        results[1]["text"]
            .as_str()
            .unwrap()
            .contains("client_assertion"),
        "{}",
        results[1]["text"]
    );
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

#[tokio::test]
async fn the_gateway_starts_before_its_provider_and_becomes_ready_when_it_answers() {
    let ca = TestCa::new();
    let upstream = Upstream::start("console").await;
    let (port, provider_port) = (closed_port().port(), closed_port().port());
    let origin = format!("https://localhost:{port}");
    let issuer = format!("https://127.0.0.1:{provider_port}/{TENANT}/v2.0");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("provider-ca.pem"), &ca.pem).unwrap();
    let gateway = Gateway::start_in(
        dir,
        &format!(
            "listen = \"127.0.0.1:{port}\"\npublic_url = \"{origin}\"\nupstream = \"{}\"\n\
             [oidc]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n\
             ca = \"provider-ca.pem\"\n",
            upstream.url()
        ),
    );
    // Up, but not ready; a browser is told why instead of being redirected.
    let response = send(gateway.addr, get("/oauth2/ready").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let response = send(
        gateway.addr,
        get("/")
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_string(response).await.contains("cannot be reached"));
    gateway
        .log_line(|l| l["fields"]["message"] == "sign-in provider not ready")
        .await;

    let _provider = Provider::start_on(
        provider_port,
        &ca,
        &format!("{origin}/api/oidc/callback"),
        &format!("{origin}/oauth2/signed_out"),
        &[],
    );
    wait_ready(&gateway).await;
    let results = browser(
        &origin,
        json!([{ "goto": format!("{origin}/") }, { "login": "mia" }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("mia@contoso.example")
    );
}

#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_body() {
    let stack = Stack::with(Options {
        oidc: "client_auth = \"client_secret_post\"",
        provider_env: vec![("CLIENT_AUTH".into(), "client_secret_post".into())],
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "noor" }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("noor@contoso.example")
    );
}

/// Runs `authgate check --json` in the stack's directory.
async fn check(stack: &Stack, env: &[(&str, &str)]) -> (bool, Vec<Value>) {
    let dir = stack.gateway.dir.path().to_owned();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // Blocking: the upstream it probes runs on this test's runtime.
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_authgate(
            &dir,
            &["check", "--config", "authgate.toml", "--json"],
            &env,
        )
    })
    .await
    .unwrap();
    let findings: Vec<Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("{stdout}{stderr}"));
    (status.success(), findings)
}

fn finding<'a>(findings: &'a [Value], check: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["check"].as_str().unwrap().starts_with(check))
        .unwrap_or_else(|| panic!("no {check} finding in {findings:#?}"))
}

#[tokio::test]
async fn authgate_check_reports_each_problem_with_its_fix() {
    let stack = Stack::start("").await;
    let (all_passed, findings) = check(&stack, &[]).await;
    for name in [
        "configuration",
        "public_url",
        "issuer",
        "discovery",
        "signing keys",
        "credential",
        "upstream",
    ] {
        assert_eq!(
            finding(&findings, name)["ok"],
            true,
            "{name}: {findings:#?}"
        );
    }
    assert!(finding(&findings, "public_url")["detail"]
        .as_str()
        .unwrap()
        .contains(&stack.url("/api/oidc/callback")));
    // The test certificate is self-signed: the one failure, with its fix.
    let certificate = finding(&findings, "certificate");
    assert_eq!(certificate["ok"], false);
    assert!(certificate["fix"].as_str().unwrap().contains("fullchain"));
    assert!(!all_passed, "exit 0 despite a failed check");

    let (_, findings) = check(&stack, &[("AUTHGATE_OIDC_CLIENT_SECRET", "wrong-secret")]).await;
    let credential = finding(&findings, "credential");
    assert_eq!(credential["ok"], false, "{findings:#?}");
    assert!(
        credential["detail"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{credential}"
    );
    assert!(
        credential["fix"]
            .as_str()
            .unwrap()
            .contains("client_secret"),
        "{credential}"
    );

    let down = format!("http://{}", closed_port());
    let (_, findings) = check(&stack, &[("AUTHGATE_UPSTREAM", &down)]).await;
    let upstream = finding(&findings, &format!("upstream {down}"));
    assert_eq!(upstream["ok"], false);
    assert!(upstream["fix"]
        .as_str()
        .unwrap()
        .contains("start the service"));

    let (_, findings) = check(
        &stack,
        &[("AUTHGATE_OIDC_ISSUER", "https://127.0.0.1:9/nothing/v2.0")],
    )
    .await;
    assert_eq!(finding(&findings, "discovery")["ok"], false);
    let (all_passed, findings) = check(&stack, &[("AUTHGATE_LISTEN", "not-an-address")]).await;
    assert!(!all_passed);
    assert!(finding(&findings, "configuration")["detail"]
        .as_str()
        .unwrap()
        .contains("`listen`"));
}

/// The sum of a counter family's samples in an exposition.
fn total(metrics: &str, family: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn signed_in_traffic_sends_nothing_to_the_provider_in_steady_state() {
    let stack = Stack::start("").await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "pat" }, { "cookies": true }]),
    )
    .await;
    let cookie = session_cookie(&results[2]);
    let before = stack
        .gateway
        .metric("authgate_sign_ins_total{outcome=\"success\"} 1")
        .await;
    assert!(before.contains("authgate_token_validations_total{outcome=\"id_token_valid\"} 1"));
    let provider_before = total(&before, "authgate_provider_requests_total");
    assert!(
        provider_before > 0,
        "discovery, keys and the code exchange were counted"
    );

    for i in 0..20 {
        let response = send(
            stack.gateway.addr,
            get(&format!("/steady/{i}"))
                .header("cookie", &cookie)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let after = stack.gateway.scrape().await;
    assert_eq!(
        total(&after, "authgate_provider_requests_total"),
        provider_before,
        "{after}"
    );
}

#[tokio::test]
async fn audit_lines_can_go_to_a_file_of_their_own() {
    let stack = Stack::with(Options {
        tables: "[log]\naudit_log = \"audit.log\"",
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": "quinn" }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("quinn@contoso.example")
    );
    let path = stack.gateway.dir.path().join("audit.log");
    let started = Instant::now();
    let audit = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("signed in") {
            break text;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no sign-in in the audit log: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let line: Value =
        serde_json::from_str(audit.lines().find(|l| l.contains("signed in")).unwrap()).unwrap();
    assert_eq!(line["fields"]["user"], "quinn@contoso.example");
    assert_eq!(line["fields"]["tenant"], TENANT);
    assert!(
        !audit.contains("authgate::access"),
        "request lines in the audit log"
    );
    assert!(
        !stack
            .gateway
            .logs()
            .iter()
            .any(|l| l["target"] == "authgate::audit"),
        "audit lines still on stdout"
    );
}
