//! Entra beyond the global cloud: a multi-tenant issuer is told by its
//! tenant segment and by a `{tenantid}` issuer in discovery, on any host
//! (US Government, China, External ID, or here the test provider's own).

use serde_json::json;

use crate::common::peers::{browser, TENANT};
use crate::common::stack::*;
use crate::common::*;

#[tokio::test]
async fn an_organizations_issuer_on_a_host_of_its_own_signs_users_in() {
    let tenants = format!("[\"{TENANT}\"]");
    let stack = Stack::with(Options {
        env: vec![
            ("AUTHGATE_OIDC_ISSUER", "{provider}/organizations/v2.0"),
            ("AUTHGATE_OIDC_ALLOWED_TENANTS", &tenants),
        ],
        ..Options::default()
    })
    .await;
    // Ready means discovery accepted the `{tenantid}` template; the ID
    // token's `iss` is the user's own tenant's.
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/console") }, { "login": "alice" }]),
    )
    .await;
    assert_eq!(
        echo_of(&results[1]).header("x-forwarded-user"),
        Some("alice@contoso.example")
    );
    let (_, out, _) = stack.gateway.command(&["check"]);
    assert!(
        out.contains("several tenants, limited to oidc.allowed_tenants"),
        "{out}"
    );
}

#[tokio::test]
async fn a_templated_issuer_without_a_tenant_list_is_refused() {
    let stack = Stack::start("").await;
    let (status, _, err) = run_authgate(
        stack.gateway.dir.path(),
        &["--config", "authgate.toml", "check-config"],
        &[(
            "AUTHGATE_OIDC_ISSUER",
            &format!(
                "https://127.0.0.1:{}/organizations/v2.0",
                stack.provider.port
            ),
        )],
    );
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("oidc.allowed_tenants"), "{err}");
}
