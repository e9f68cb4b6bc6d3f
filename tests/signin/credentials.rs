//! The app's credential at the token endpoint: certificate, federated,
//! client_secret_post.

use crate::common::peers::{browser, CLIENT_ID};
use crate::common::stack::*;
use serde_json::json;

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
