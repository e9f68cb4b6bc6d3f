//! The per-request authentication work, measured: finding a session (in
//! its cookie, or in the embedded store by the cookie's id), bearer JWT validation (cold: a signature check; cached:
//! the verified-token cache), identity header injection (and two cores
//! copying one session's at once), signed identity
//! assertions (signed anew, and kept with the session), and making the
//! request target canonical.
//!
//!   cargo bench --bench auth
//!
//! The bearer benchmarks go through the real `Oidc` against a small local
//! provider (discovery document and keys over HTTP), so the code measured
//! is the code that runs.

use std::sync::Arc;
use std::time::Duration;

use authgate::auth::assertion::Assertions;
use authgate::auth::easy_auth::Tokens;
use authgate::auth::identity::{Identity, IdentityHeaderNames, IdentityHeaders};
use authgate::auth::session::{LastCookie, Session, SessionConfig, Sessions, StoreKind};
use authgate::clock::now;
use authgate::idp::Oidc;
use authgate::idp::{ClientAuth, GroupsOverage, OidcConfig, ResponseMode};
use authgate::net::Timeouts;
use authgate::ops::metrics::Metrics;
use authgate::pipeline::target::canonicalize;
use authgate::state::StateDir;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::HeaderMap;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

// The allocator authgate's binary uses, so the figures are comparable.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn identity() -> Identity {
    Identity {
        subject: "s".into(),
        user_id: "7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b".into(),
        username: "alice@contoso.example".into(),
        email: Some("alice@contoso.example".into()),
        name: Some("Alice Example".into()),
        tenant: Some("7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b".into()),
        groups: vec![
            "0a1b2c3d-0000-0000-0000-000000000001".into(),
            "0a1b2c3d-0000-0000-0000-000000000002".into(),
        ],
        roles: vec!["Console.User".into()],
        groups_overage: false,
        groups_from_graph: false,
        acrs: Vec::new(),
        app: false,
    }
}

/// A session's requests, with the session in its cookie and in the
/// embedded store (where the cookie is an id).
fn sessions(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    for (label, store) in [
        ("cookie", StoreKind::Cookie),
        ("embedded", StoreKind::Embedded),
    ] {
        let config = SessionConfig {
            store,
            cache_ttl: Duration::from_secs(5),
            secrets: vec![vec![7; 32]],
            refresh_before: Duration::from_secs(300),
            redis: None,
            cookie_name: "__Host-authgate".into(),
            idle_timeout: Duration::from_secs(3600),
            lifetime: Duration::from_secs(8 * 3600),
        };
        let sessions =
            Sessions::open(&config, &StateDir::new(state.path()), &Metrics::default()).unwrap();
        // Each sign-in is a new cookie: new ciphertext (a fresh nonce), or
        // a new id.
        let browser_request = || {
            // A realistic Entra ID token is ~1.5 KB.
            let session = Session::new(
                identity(),
                "x".repeat(1500),
                Some("r".repeat(900)),
                now() + 3600,
            );
            let (_, cookies) = runtime
                .block_on(sessions.save(session, &HeaderMap::new()))
                .unwrap();
            let pairs: Vec<String> = cookies
                .iter()
                .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
                .collect();
            let mut request = HeaderMap::new();
            request.insert(http::header::COOKIE, pairs.join("; ").parse().unwrap());
            request
        };
        // In cookie mode the first request with a cookie opens it; in the
        // store the session saved is already cached, so this is the
        // cache's cost (a store read happens once per cache_ttl).
        let mut group = c.benchmark_group(format!("session ({label})"));
        // A new embedded session is a durable commit: few samples.
        group.sample_size(10);
        group.bench_function("first request", |b| {
            b.iter_batched(
                browser_request,
                |request| std::hint::black_box(runtime.block_on(sessions.read(&request))),
                BatchSize::SmallInput,
            )
        });
        group.finish();
        let request = browser_request();
        c.bench_function(&format!("session ({label}): next requests"), |b| {
            b.to_async(&runtime)
                .iter(|| async { std::hint::black_box(sessions.read(&request).await) })
        });
        // What the gateway calls: the same header again on one connection.
        let last = LastCookie::new(false);
        c.bench_function(
            &format!("session ({label}): next requests on a connection"),
            |b| {
                b.to_async(&runtime).iter(|| async {
                    std::hint::black_box(sessions.read_remembering(&request, &last).await)
                })
            },
        );
    }
}

/// A bearer token's claims (only Easy Auth reads them).
const TOKENS: Tokens<'static> = Tokens {
    claims_of: "e30.eyJzdWIiOiJzdWItMSJ9.c2ln",
    id_token: None,
    access_token: None,
};

fn identity_headers(c: &mut Criterion) {
    let headers = IdentityHeaders::new(&IdentityHeaderNames::default());
    let who = identity();
    // What a browser sends the console; none of it names the user.
    let mut request = HeaderMap::new();
    for (name, value) in [
        ("host", "console.contoso.example"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0",
        ),
        ("accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
        ("accept-language", "en-US,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("sec-fetch-dest", "document"),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-site", "same-origin"),
        ("referer", "https://console.contoso.example/"),
        ("cookie", "__Host-authgate=sealed; theme=dark"),
    ] {
        request.insert(name, value.parse().unwrap());
    }
    // As the gateway does: the map grows once, for these and the
    // forwarding headers.
    let room = headers.count() + authgate::forward::HEADERS_ADDED;
    c.bench_function("identity headers: strip and inject", |b| {
        b.iter_batched_ref(
            || request.clone(),
            |h| {
                headers.strip(h);
                h.reserve(room);
                headers.inject(h, &who, &TOKENS);
            },
            BatchSize::SmallInput,
        )
    });
    // What a session's requests after its first do: the values were built
    // once and are copied.
    let values = headers.values(&who, &TOKENS);
    c.bench_function("identity headers: strip and copy a session's", |b| {
        b.iter_batched_ref(
            || request.clone(),
            |h| {
                headers.strip(h);
                h.reserve(room);
                values.apply(h);
            },
            BatchSize::SmallInput,
        )
    });
    // Two cores serving one session's requests at once: copying the
    // session's shared values has both contend for their reference
    // counts, each core's own copy (what the gateway uses) does not.
    let session = Session::new(who.clone(), "x".repeat(1500), None, now() + 3600);
    for (label, own) in [("shared values", false), ("each core's own copy", true)] {
        c.bench_function(&format!("identity headers: two cores, {label}"), |b| {
            b.iter_custom(|iters| {
                let started = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..2 {
                        scope.spawn(|| {
                            let copy = own.then(|| {
                                session.identity_headers(|| headers.values(&who, &TOKENS))
                            });
                            let values = copy.as_deref().unwrap_or(&values);
                            let mut h = HeaderMap::with_capacity(room);
                            for _ in 0..iters {
                                values.apply(&mut h);
                                h.clear();
                            }
                        });
                    }
                });
                started.elapsed()
            })
        });
    }
    // A hostile request: identity headers in every spelling, ours and
    // other gateways', and headers named in `Connection`.
    let mut hostile = request.clone();
    for name in [
        "x_forwarded_user",
        "x-forwarded-email",
        "x-auth-request-user",
        "x-ms-client-principal-name",
        "x-pomerium-jwt-assertion",
        "remote-user",
    ] {
        hostile.insert(name, "mallory".parse().unwrap());
    }
    hostile.insert(
        "connection",
        "keep-alive, x-forwarded-user, x-request-id"
            .parse()
            .unwrap(),
    );
    c.bench_function("identity headers: strip a hostile request and copy", |b| {
        b.iter_batched_ref(
            || hostile.clone(),
            |h| {
                authgate::forward::remove_connection_named(h);
                headers.strip(h);
                h.reserve(room);
                values.apply(h);
            },
            BatchSize::SmallInput,
        )
    });
}

/// A provider on loopback serving a discovery document and one RSA key.
async fn local_provider(public_jwk: serde_json::Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let issuer = format!("{base}/tenant/v2.0");
    let discovery = serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/tenant/oauth2/v2.0/authorize"),
        "token_endpoint": format!("{base}/tenant/oauth2/v2.0/token"),
        "jwks_uri": format!("{base}/tenant/discovery/v2.0/keys"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
    .to_string();
    let keys = serde_json::json!({ "keys": [public_jwk] }).to_string();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (discovery, keys) = (discovery.clone(), keys.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = if req.uri().path().ends_with("keys") {
                        keys.clone()
                    } else {
                        discovery.clone()
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    issuer
}

fn bearer_tokens(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap();
    // The public key as a JWK, as a provider publishes it.
    use x509_parser::prelude::FromDer;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&pair);
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let jwk = match info.parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            use base64::Engine;
            let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
            let n = rsa.modulus.strip_prefix(&[0]).unwrap_or(rsa.modulus);
            serde_json::json!({ "kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": b64(n), "e": b64(rsa.exponent) })
        }
        _ => unreachable!("an RSA key"),
    };
    let issuer = runtime.block_on(local_provider(jwk));
    let config = OidcConfig {
        issuer: issuer.clone(),
        multi_tenant: false,
        client_id: "client".into(),
        client_auth: ClientAuth::ClientSecretBasic,
        client_secret: Some("secret".into()),
        client_certificate: None,
        federated_token_path: None,
        scopes: vec!["openid".into()],
        callback_path: "/api/oidc/callback".into(),
        redirect_uri: "https://localhost/api/oidc/callback".into(),
        response_mode: ResponseMode::Query,
        pass_unknown_callbacks: false,
        allowed_tenants: vec![],
        algorithms: vec![jsonwebtoken::Algorithm::RS256],
        clock_skew: Duration::from_secs(60),
        ca: None,
        jwks_refresh: Duration::from_secs(3600),
        bearer: true,
        bearer_audiences: vec!["client".into()],
        bearer_scopes: Vec::new(),
        bearer_app_tokens: false,
        bearer_v1_issuer: None,
        groups_overage: GroupsOverage::Graph,
        graph_url: None,
    };
    let http = authgate::outbound::client(
        None,
        &Timeouts::default(),
        &authgate::outbound::Egress::direct(),
    )
    .unwrap();
    let oidc: Arc<Oidc> = Oidc::new(config, http, Metrics::default()).unwrap();
    runtime.block_on(oidc.discover_once()).unwrap();
    let mut serial = 0u64;
    let mut token = || {
        serial += 1;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({ "iss": issuer, "aud": "client", "sub": "api-client", "scp": "Devices.Read", "iat": now(),
                                         "exp": now() + 3600, "jti": serial });
        jsonwebtoken::encode(&header, &claims, &signing).unwrap()
    };
    c.bench_function("bearer JWT: cold (RS256 signature and claims)", |b| {
        b.to_async(&runtime).iter_batched(
            &mut token,
            |t| {
                let oidc = oidc.clone();
                async move { oidc.verify_bearer(&t).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    let cached = token();
    runtime.block_on(oidc.verify_bearer(&cached)).unwrap();
    c.bench_function("bearer JWT: cached", |b| {
        b.to_async(&runtime).iter(|| oidc.verify_bearer(&cached))
    });
}

/// The request target made canonical, as every request's is: a browser's
/// (already canonical, nothing copied) and a hostile one (rewritten).
fn request_target(c: &mut Criterion) {
    for (name, target) in [
        ("a browser's", "/console/devices/3f2a9c?page=2&sort=name"),
        (
            "a hostile one",
            "/api/login-options/%2e%2e/./x//../../admin/secret?q=1",
        ),
    ] {
        let uri: http::Uri = target.parse().unwrap();
        c.bench_function(&format!("request target: {name}"), |b| {
            b.iter_batched_ref(
                || uri.clone(),
                |u| canonicalize(u).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
}

/// `headers.assertion`: an ES256 signature per assertion, made once per
/// session and upstream every few minutes; a steady request copies it.
fn assertions(c: &mut Criterion) {
    let state = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let assertions = runtime
        .block_on(Assertions::load(
            &StateDir::new(state.path()),
            None,
            "https://console.example.com".into(),
            std::time::Duration::from_secs(30 * 24 * 3600),
        ))
        .unwrap();
    let identity = identity();
    let audience = "http://127.0.0.1:21114";
    c.bench_function("assertion: signed anew", |b| {
        b.iter(|| assertions.once(&identity, audience).unwrap())
    });
    let kept = std::sync::Mutex::default();
    c.bench_function("assertion: kept with the session", |b| {
        b.iter(|| assertions.for_session(&kept, &identity, audience).unwrap())
    });
}

criterion_group!(
    benches,
    sessions,
    identity_headers,
    assertions,
    bearer_tokens,
    request_target
);
criterion_main!(benches);
