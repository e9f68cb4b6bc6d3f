//! Running it: start-up before the provider, `authgate check`, metrics,
//! audit logs.

use std::time::Instant;

use crate::common::peers::{browser, Provider, CLIENT_ID, CLIENT_SECRET, TENANT};
use crate::common::stack::*;
use crate::common::*;
use http::StatusCode;
use serde_json::{json, Value};

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
