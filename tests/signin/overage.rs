//! Users in more groups than Entra puts in a token (its "groups overage":
//! `_claim_names` instead of `groups`): their groups from Microsoft Graph
//! (the test provider's Graph-shaped endpoint, through `oidc.graph_url`),
//! and never "no groups" when Graph cannot tell.

use serde_json::{json, Value};

use crate::common::peers::browser;
use crate::common::stack::*;
use crate::common::{empty, get, send, upstream_saw};

const ROUTES: &str = r#"
[headers]
groups_max = 100
[[routes]]
prefix = "/admin"
upstream = "{upstream}"
[routes.policy]
allowed_groups = ["group-overage1-240"]
"#;

async fn overage_stack(provider_env: &[(&str, &str)], oidc: &'static str) -> Stack {
    Stack::with(Options {
        tables: ROUTES,
        oidc,
        env: vec![("AUTHGATE_OIDC_GRAPH_URL", "{provider}/graph")],
        provider_env: provider_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Options::default()
    })
    .await
}

/// `overage1` signs in at `/console`, then opens `/admin`.
async fn overage_user_visits(stack: &Stack) -> Vec<Value> {
    browser(
        &stack.origin,
        json!([
            { "goto": stack.url("/console") },
            { "login": "overage1" },
            { "goto": stack.url("/admin/users") },
        ]),
    )
    .await
}

/// Graph was asked exactly once by this gateway process, and answered.
async fn assert_resolved_once(stack: &Stack) {
    let metrics = stack.gateway.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "authgate_graph_lookups_total{outcome=\"resolved\"} 1"),
        "{metrics}"
    );
}

fn finding(out: &str) -> Value {
    let findings: Vec<Value> = serde_json::from_str(out).unwrap_or_else(|_| panic!("{out}"));
    findings
        .into_iter()
        .find(|f| f["check"] == "graph")
        .unwrap_or_else(|| panic!("no graph finding in {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_tells_the_groups_of_a_user_in_overage_once_per_sign_in() {
    let stack = overage_stack(&[], "").await;
    let results = overage_user_visits(&stack).await;
    let echo = echo_of(&results[1]);
    let groups = echo
        .header("x-forwarded-groups")
        .expect("groups from Graph");
    assert_eq!(groups.split(',').count(), 100, "cut at groups_max");
    assert!(groups.starts_with("group-overage1-0,group-overage1-1,"));
    assert_eq!(echo.header("x-forwarded-groups-overage"), Some("cut"));
    // The policy sees every group, the 241st included.
    let admin = echo_of(&results[2]);
    assert_eq!(admin.path, "/admin/users");

    // Asked once for the sign-in, not for each request; never for a user
    // whose token lists their groups.
    let alice = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "alice" }]),
    )
    .await;
    let echo = echo_of(&alice[1]);
    assert_eq!(
        echo.header("x-forwarded-groups"),
        Some("group-alice-0,group-alice-1")
    );
    assert_eq!(echo.header("x-forwarded-groups-overage"), None);
    assert_resolved_once(&stack).await;

    // A bearer token of a user in overage: asked once for the token.
    let (token, _) = stack.provider.user_tokens("overage1@contoso.example").await;
    for _ in 0..2 {
        let echo = upstream_saw(stack.get_with_bearer("/admin/users", &token).await).await;
        assert_eq!(echo.header("x-forwarded-groups-overage"), Some("cut"));
    }
    stack
        .gateway
        .metric("authgate_graph_lookups_total{outcome=\"resolved\"} 2")
        .await;

    let (_, out, _) = stack.gateway.command(&["check", "--json"]);
    let graph = finding(&out);
    assert_eq!(graph["ok"], true, "{graph}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_graphs_permission_groups_are_unknown_never_none() {
    let stack = overage_stack(&[("GRAPH_PERMISSIONS", "none")], "").await;
    let results = overage_user_visits(&stack).await;
    let echo = echo_of(&results[1]);
    assert_eq!(echo.header("x-forwarded-groups"), None);
    assert_eq!(
        echo.header("x-forwarded-groups-overage"),
        Some("unresolved")
    );
    // A route with a group rule says what the admin must grant.
    assert_eq!(results[2]["status"], 403);
    let page = results[2]["text"].as_str().unwrap();
    assert!(
        page.contains("GroupMember.Read.All") && page.contains("User.Read.All"),
        "{page}"
    );
    stack
        .gateway
        .metric("authgate_graph_lookups_total{outcome=\"refused\"} 1")
        .await;
    let (token, _) = stack.provider.user_tokens("overage1@contoso.example").await;
    let response = stack.get_with_bearer("/admin/users", &token).await;
    assert_eq!(response.status(), http::StatusCode::FORBIDDEN);

    let (ok, out, _) = stack.gateway.command(&["check", "--json"]);
    assert!(!ok.success());
    let graph = finding(&out);
    assert_eq!(graph["ok"], false, "{graph}");
    assert!(
        graph["fix"]
            .as_str()
            .unwrap()
            .contains("GroupMember.Read.All"),
        "{graph}"
    );

    // Throttled: unknown too, counted apart.
    let throttled = overage_stack(&[("GRAPH_THROTTLE", "1")], "").await;
    let results = overage_user_visits(&throttled).await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-groups-overage"),
        Some("unresolved")
    );
    throttled
        .gateway
        .metric("authgate_graph_lookups_total{outcome=\"throttled\"} 1")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_look_up_waits_as_told_and_asks_again() {
    // The test Graph throttles the first look-up for a second, and any
    // look-up within that second: only a gateway that waits gets groups.
    let stack = overage_stack(&[("GRAPH_THROTTLE", "once")], "").await;
    let results = overage_user_visits(&stack).await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-groups-overage"),
        Some("cut"),
        "{:#}",
        results[1]
    );
    assert_eq!(results[2]["status"], 200, "{:#}", results[2]);
    assert_resolved_once(&stack).await;
    stack
        .gateway
        .metric("authgate_provider_requests_total{kind=\"graph\"} 2")
        .await;
}

#[tokio::test]
async fn a_multi_tenant_issuer_asks_graph_with_the_users_own_tenants_token() {
    let tenants = format!("[\"{}\"]", crate::common::peers::TENANT);
    let stack = Stack::with(Options {
        tables: ROUTES,
        env: vec![
            ("AUTHGATE_OIDC_GRAPH_URL", "{provider}/graph"),
            ("AUTHGATE_OIDC_ISSUER", "{provider}/organizations/v2.0"),
            ("AUTHGATE_OIDC_ALLOWED_TENANTS", &tenants),
        ],
        ..Options::default()
    })
    .await;
    let results = overage_user_visits(&stack).await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-groups-overage"),
        Some("cut")
    );
    assert_eq!(echo_of(&results[2]).path, "/admin/users");
}

#[tokio::test]
async fn with_the_cookie_store_graph_groups_stay_out_of_the_cookie() {
    let mut stack = Stack::with(Options {
        tables: ROUTES,
        session: "store = \"cookie\"",
        env: vec![("AUTHGATE_OIDC_GRAPH_URL", "{provider}/graph")],
        ..Options::default()
    })
    .await;
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "overage1" }, { "cookies": true }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-groups-overage"),
        Some("cut")
    );
    let cookie = session_cookie(&results[2]);
    assert!(cookie.len() < 4096, "250 groups in {} bytes", cookie.len());

    // A restarted gateway asks Graph again, once, when the cookie comes.
    stack.gateway.restart();
    wait_ready(&stack.gateway).await;
    for path in ["/admin/users", "/console"] {
        let echo = upstream_saw(
            send(
                stack.gateway.addr,
                get(path).header("cookie", &cookie).body(empty()).unwrap(),
            )
            .await,
        )
        .await;
        assert_eq!(echo.path, path);
        assert_eq!(echo.header("x-forwarded-groups-overage"), Some("cut"));
    }
    assert_resolved_once(&stack).await;
}

#[tokio::test]
async fn deny_refuses_users_in_overage_on_every_route() {
    let stack = overage_stack(&[], "groups_overage = \"deny\"").await;
    let results = overage_user_visits(&stack).await;
    assert_eq!(results[1]["status"], 403);
    let page = results[1]["text"].as_str().unwrap();
    assert!(page.contains("refuse such accounts"), "{page}");
    let alice = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "alice" }]),
    )
    .await;
    assert_eq!(echo_of(&alice[1]).path, "/console");
}
