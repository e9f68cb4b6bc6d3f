//! The standard end-to-end stack: a real OpenID provider, the gateway in
//! front of a real upstream, wired together, and what tests read back.

use std::time::Instant;

use http::{Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;

use super::peers::{Provider, CLIENT_ID, CLIENT_SECRET};
use super::*;

pub const SESSION_SECRET: &str = "dGVzdC1zZXNzaW9uLXNlY3JldC0zMi1ieXRlcy1sb25nLWVub3VnaA";

/// Provider, gateway and console, wired together.
pub struct Stack {
    pub gateway: Gateway,
    pub provider: Provider,
    pub upstream: Upstream,
    pub origin: String,
}

/// What a test changes in the standard stack.
#[derive(Default)]
pub struct Options<'a> {
    /// Top-level keys, before any table.
    pub top: &'a str,
    /// More tables before `[oidc]`: `[[routes]]`, `[headers]`…; `{upstream}`
    /// in them stands for the stack's upstream.
    pub tables: &'a str,
    /// More keys of `[oidc]` and `[session]`.
    pub oidc: &'a str,
    pub session: &'a str,
    /// Environment of the provider process; `{origin}` in a value stands
    /// for the gateway's.
    pub provider_env: Vec<(String, String)>,
    /// Environment of the gateway process, on top of the test defaults;
    /// `{provider}` in a value stands for the provider's origin.
    pub env: Vec<(&'a str, &'a str)>,
    /// Files written into the gateway's directory before it starts.
    pub files: Vec<(&'a str, Vec<u8>)>,
    /// A config file of the repository to run instead of the standard
    /// one, with these replacements (`{listen}`, `{origin}` and
    /// `{upstream}` in them stand for the stack's own); the provider's
    /// values are added to its `[oidc]` section.
    pub preset: Option<(&'a str, Vec<(String, String)>)>,
    /// The port of a proxy in front: the origin (`public_url`) is there,
    /// and the gateway listens on a port of its own.
    pub front: Option<u16>,
}

impl Stack {
    pub async fn start(oidc_extra: &str) -> Stack {
        Stack::with(Options {
            oidc: oidc_extra,
            ..Options::default()
        })
        .await
    }

    pub async fn with(options: Options<'_>) -> Stack {
        let Options {
            top,
            tables,
            oidc: oidc_extra,
            session: session_extra,
            provider_env,
            env,
            files,
            preset,
            front,
        } = options;
        let ca = TestCa::new();
        let upstream = Upstream::start("console").await;
        let port = closed_port().port();
        let origin = format!("https://localhost:{}", front.unwrap_or(port));
        let provider_env: Vec<(String, String)> = provider_env
            .into_iter()
            .map(|(k, v)| (k, v.replace("{origin}", &origin)))
            .collect();
        let provider = Provider::start(
            &ca,
            &format!("{origin}/api/oidc/callback"),
            &format!("{origin}/oauth2/signed_out"),
            &provider_env,
        );
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        std::fs::write(dir.path().join("provider-ca.pem"), &ca.pem).unwrap();
        let oidc_values = format!(
            "issuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nca = \"provider-ca.pem\"\n",
            provider.issuer
        );
        let tables = tables.replace("{upstream}", &upstream.url());
        let config = match preset {
            Some((path, replacements)) => {
                let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
                let mut text = std::fs::read_to_string(path).unwrap();
                for (from, to) in replacements {
                    assert!(text.contains(&from), "the preset has no `{from}`");
                    let to = to
                        .replace("{listen}", &format!("127.0.0.1:{port}"))
                        .replace("{origin}", &origin)
                        .replace("{upstream}", &upstream.url());
                    text = text.replace(&from, &to);
                }
                text.replace("[oidc]\n", &format!("[oidc]\n{oidc_values}"))
                    .replace(
                        "[session]\n",
                        &format!("[session]\nsecret = \"{SESSION_SECRET}\"\n"),
                    )
            }
            None => format!(
                r#"
listen = "127.0.0.1:{port}"
public_url = "{origin}"
upstream = "{upstream}"
{top}
[[routes]]
prefix = "/api/public"
upstream = "{upstream}"
access = "public"
{tables}
[oidc]
{oidc_values}
{oidc_extra}
[session]
secret = "{SESSION_SECRET}"
{session_extra}
"#,
                upstream = upstream.url(),
            ),
        };
        let provider_origin = format!("https://127.0.0.1:{}", provider.port);
        let env: Vec<(&str, String)> = env
            .into_iter()
            .map(|(k, v)| (k, v.replace("{provider}", &provider_origin)))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let gateway = Gateway::start_with_env(dir, &config, &env);
        wait_ready(&gateway).await;
        Stack {
            gateway,
            provider,
            upstream,
            origin,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    /// `GET path` with `Authorization: Bearer <token>`.
    pub async fn get_with_bearer(&self, path: &str, token: &str) -> Response<Incoming> {
        send(
            self.gateway.addr,
            get(path)
                .header("authorization", format!("Bearer {token}"))
                .body(empty())
                .unwrap(),
        )
        .await
    }

    /// Signs out with `cookie` at the gateway at `addr` (this stack's or a
    /// replica's), as the sign-out button of this origin does.
    pub async fn sign_out(&self, addr: std::net::SocketAddr, cookie: &str) -> Response<Incoming> {
        send(
            addr,
            http::Request::post("/oauth2/sign_out")
                .header("cookie", cookie)
                .header("origin", self.origin.as_str())
                .body(empty())
                .unwrap(),
        )
        .await
    }

    pub fn provider_origin(&self) -> String {
        format!("https://127.0.0.1:{}/", self.provider.port)
    }
}

/// Readiness means discovery and the first key fetch have succeeded.
pub async fn wait_ready(gateway: &Gateway) {
    let started = Instant::now();
    loop {
        let response = send(gateway.addr, get("/oauth2/ready").body(empty()).unwrap()).await;
        if response.status() == StatusCode::OK {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "gateway never became ready: {:?}",
            gateway.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub fn echo_of(result: &Value) -> Echo {
    let text = result["text"].as_str().unwrap();
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not the console's echo ({e}): {result:#}"))
}

/// The session cookies a browser holds, as a `Cookie` header value.
pub fn session_cookie(cookies: &Value) -> String {
    cookies
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("__Host-authgate"))
        .map(|c| {
            format!(
                "{}={}",
                c["name"].as_str().unwrap(),
                c["value"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
