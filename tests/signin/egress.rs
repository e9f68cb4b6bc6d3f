//! The gateway's own requests through an HTTP proxy (Debian's
//! `tinyproxy`): the provider is reached through a `CONNECT` tunnel,
//! upstreams are not unless asked, `outbound.proxy` wins over the
//! environment, and a proxy that is down is named where it fails.

use serde_json::json;

use crate::common::peers::{browser, Tinyproxy};
use crate::common::stack::*;
use crate::common::*;

/// The standard stack with `HTTPS_PROXY` set to `proxy`.
async fn behind(proxy: &str) -> Stack {
    Stack::with(Options {
        env: vec![("HTTPS_PROXY", proxy)],
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn the_provider_is_reached_through_the_proxy_and_upstreams_are_not() {
    let proxy = Tinyproxy::shared();
    let url = proxy.url();
    let stack = behind(&url).await;
    // Discovery, keys and the token endpoint, through the tunnel, with
    // the provider's private CA still checked inside it.
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "alice" }]),
    )
    .await;
    let echo = echo_of(&results[1]);
    assert_eq!(
        echo.header("x-forwarded-user"),
        Some("alice@contoso.example")
    );
    let provider = format!("127.0.0.1:{}", stack.provider.port);
    assert!(proxy.tunnelled_to(&provider), "{}", proxy.log());
    let upstream = stack.upstream.url().replace("http://", "");
    assert!(!proxy.tunnelled_to(&upstream), "{}", proxy.log());
}

#[tokio::test]
async fn upstreams_go_through_the_proxy_when_asked() {
    let proxy = Tinyproxy::shared();
    let tables = format!(
        "[outbound]\nproxy = \"{}\"\nproxy_upstreams = true\n",
        proxy.url()
    );
    let stack = Stack::with(Options {
        tables: &tables,
        ..Options::default()
    })
    .await;
    let response = send(
        stack.gateway.addr,
        get("/api/public/through").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(upstream_saw(response).await.path, "/api/public/through");
    let upstream = stack.upstream.url().replace("http://", "");
    assert!(proxy.tunnelled_to(&upstream), "{}", proxy.log());
}

#[tokio::test]
async fn outbound_proxy_wins_and_a_proxy_that_is_down_is_named() {
    let proxy = Tinyproxy::shared();
    let url = proxy.url();
    let stack = behind(&url).await;
    let dead = format!("http://127.0.0.1:{}", closed_port().port());

    // The doctor, with outbound.proxy naming a proxy that is down: the
    // environment's working proxy is not used.
    let (status, out, _) = run_authgate(
        stack.gateway.dir.path(),
        &["--config", "authgate.toml", "check"],
        &[("HTTPS_PROXY", &url), ("AUTHGATE_OUTBOUND_PROXY", &dead)],
    );
    assert!(!status.success());
    let discovery = out
        .lines()
        .find(|l| l.contains("discovery"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(discovery.starts_with("FAIL"), "{out}");
    assert!(
        discovery.contains(&format!("through the proxy {dead}")),
        "{out}"
    );

    // A gateway started so says in its log why the provider is not ready.
    let dir = tempfile::tempdir().unwrap();
    for file in ["authgate.toml", "provider-ca.pem"] {
        std::fs::copy(stack.gateway.dir.path().join(file), dir.path().join(file)).unwrap();
    }
    let config = std::fs::read_to_string(dir.path().join("authgate.toml")).unwrap();
    let config = config.replace(
        &format!("listen = \"{}\"", stack.gateway.addr),
        "listen = \"127.0.0.1:0\"",
    );
    let gateway = Gateway::start_with_env(dir, &config, &[("AUTHGATE_OUTBOUND_PROXY", &dead)]);
    let line = gateway
        .log_line(|l| l["fields"]["message"] == "sign-in provider not ready")
        .await;
    let error = line["fields"]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("through the proxy {dead}")),
        "{error}"
    );
}

#[tokio::test]
async fn proxy_credentials_never_reach_a_message() {
    let proxy = Tinyproxy::shared();
    let with_credentials = format!("http://ops:s3cret-pw@127.0.0.1:{}", proxy.port);
    let stack = behind(&with_credentials).await;
    let (_, out, err) = stack.gateway.command(&["check"]);
    let shown = format!("through http://127.0.0.1:{} (CONNECT)", proxy.port);
    assert!(out.contains(&shown), "{out}");
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "{out}{err}"
    );
    assert!(!stack
        .gateway
        .logs()
        .iter()
        .any(|l| l.to_string().contains("s3cret")));
    // A bad value is refused without being echoed.
    let (status, _, err) = run_authgate(
        stack.gateway.dir.path(),
        &["--config", "authgate.toml", "check-config"],
        &[(
            "AUTHGATE_OUTBOUND_PROXY",
            "https://ops:s3cret-pw@proxy.example.com",
        )],
    );
    assert_eq!(status.code(), Some(2));
    assert!(
        err.contains("outbound.proxy") && !err.contains("s3cret"),
        "{err}"
    );
}
