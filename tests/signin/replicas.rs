//! Replicas sharing sessions through a real `redis-server`: a session
//! signed in at one is used at the other, ended at one and refused by the
//! other within `session.cache_ttl`, and a Redis that goes away costs
//! signed-in routes a clear 503, not the public ones, until it is back.
//! They share their ACME certificate too (from Debian's `pebble`).

use std::time::{Duration, Instant};

use crate::common::peers::{browser, Pebble, Redis, RedisCluster, RedisSentinel};
use crate::common::stack::*;
use crate::common::*;
use crate::sessions::{check_finding, token_requests};
use http::StatusCode;
use serde_json::json;

/// `[session]` keys for a Redis store at `url`, opened sessions cached 1 s.
fn redis_session(url: &str) -> String {
    format!("store = \"redis\"\nredis_url = \"{url}\"\ncache_ttl = \"1s\"")
}

/// The status a request with `cookie` gets from the gateway at `addr`, and
/// the user the upstream was told.
async fn visit(
    addr: std::net::SocketAddr,
    cookie: &str,
    accept: &str,
) -> (StatusCode, Option<String>) {
    let response = send(
        addr,
        get("/console")
            .header("cookie", cookie)
            .header("accept", accept)
            .body(empty())
            .unwrap(),
    )
    .await;
    match response.status() {
        StatusCode::OK => {
            let user = upstream_saw(response)
                .await
                .header("x-forwarded-user")
                .map(str::to_owned);
            (StatusCode::OK, user)
        }
        status => (status, None),
    }
}

/// Waits (up to `bound` and a second) for the gateway at `addr` to answer
/// `wanted` to `cookie`; how long it took.
async fn answers_within(
    addr: std::net::SocketAddr,
    cookie: &str,
    wanted: StatusCode,
    bound: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let (status, _) = visit(addr, cookie, "application/json").await;
        if status == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound + Duration::from_secs(1),
            "still {status} after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `authgate sessions <args>` beside `gateway`, which must succeed: what
/// it printed.
fn sessions(gateway: &Gateway, args: &[&str]) -> String {
    let (status, out, err) = gateway.command(&[&["sessions"], args].concat());
    assert!(status.success(), "{err}");
    out
}

/// `authgate sessions revoke <args>` beside `gateway`: how many sessions
/// it ended.
fn revoke(gateway: &Gateway, args: &[&str]) -> usize {
    let out = sessions(gateway, &[&["revoke"], args].concat());
    let count = out.strip_suffix(" session(s) ended\n");
    count
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{out}"))
}

async fn sign_in(stack: &Stack, user: &str) -> String {
    let results = browser(
        &stack.origin,
        json!([{ "goto": stack.url("/") }, { "login": user }, { "cookies": true }]),
    )
    .await;
    session_cookie(&results[2])
}

#[tokio::test]
async fn replicas_share_sessions_and_their_ending() {
    let session = redis_session(&Redis::shared().database());
    let stack = Stack::with(Options {
        session: &session,
        ..Options::default()
    })
    .await;
    let a = &stack.gateway;
    let b = a.replica();
    wait_ready(&b).await;

    // Signed in through A, used through B.
    let cookie = sign_in(&stack, "alice").await;
    assert!(cookie.len() <= 100, "{cookie}");
    let alice = Some("alice@contoso.example".to_owned());
    assert_eq!(
        visit(b.addr, &cookie, "text/html").await,
        (StatusCode::OK, alice.clone())
    );
    assert_eq!(
        visit(a.addr, &cookie, "text/html").await,
        (StatusCode::OK, alice)
    );

    // Signed out at B: A, which has the session cached, refuses the copy
    // within the cache's second.
    let response = stack.sign_out(b.addr, &cookie).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let took = answers_within(
        a.addr,
        &cookie,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;
    assert!(took <= Duration::from_millis(1500), "{took:?}");

    // Revoked from A's command line: B, which used it a moment ago,
    // refuses it as soon.
    let cookie = sign_in(&stack, "ivan").await;
    assert_eq!(
        visit(b.addr, &cookie, "application/json").await.0,
        StatusCode::OK
    );
    let out = sessions(a, &["list"]);
    assert!(
        out.contains("ivan@contoso.example") && out.contains("1 session(s)"),
        "{out}"
    );
    assert_eq!(revoke(a, &["--user", "ivan@contoso.example"]), 1);
    let took = answers_within(
        b.addr,
        &cookie,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;
    assert!(took <= Duration::from_millis(1500), "{took:?}");

    // With no gateway running, the command asks Redis itself: a session
    // it ends is refused by the next gateway to start.
    let cookie = sign_in(&stack, "judy").await;
    for gateway in [a, &b] {
        gateway.signal(libc::SIGKILL);
        let admin = gateway.admin_addr.unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(admin).is_ok() {
            assert!(started.elapsed() < DEADLINE, "still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let out = sessions(a, &["list", "--user", "JUDY@contoso.example"]);
    assert!(
        out.contains("judy@contoso.example") && out.contains("1 session(s)"),
        "{out}"
    );
    assert_eq!(revoke(a, &["--user", "judy@contoso.example"]), 1);
    let c = a.replica();
    wait_ready(&c).await;
    assert_eq!(
        visit(c.addr, &cookie, "application/json").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_redis_outage_costs_signed_in_routes_a_503_until_it_is_back() {
    // Its own server, since it is stopped; durable, so the session is
    // still there when it comes back.
    let mut redis = Redis::start(true);
    let session = redis_session(&redis.database());
    let stack = Stack::with(Options {
        session: &session,
        ..Options::default()
    })
    .await;
    let addr = stack.gateway.addr;
    let cookie = sign_in(&stack, "judy").await;
    assert_eq!(visit(addr, &cookie, "text/html").await.0, StatusCode::OK);

    redis.stop();
    // Once the cached copy is stale: a 503 saying why, never a redirect
    // to sign in (which would loop), JSON for API clients.
    answers_within(
        addr,
        &cookie,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(1),
    )
    .await;
    let response = send(
        addr,
        get("/console")
            .header("cookie", cookie.as_str())
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_string(response)
        .await
        .contains("Sessions cannot be checked"));
    let response = send(
        addr,
        get("/console")
            .header("cookie", cookie.as_str())
            .header("accept", "application/json")
            .body(empty())
            .unwrap(),
    )
    .await;
    let body: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(body["error"], "session_store_unavailable");
    // Public routes do not need the store.
    let response = send(addr, get("/api/public/status").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    // Readiness stays (public routes and the clients' API work) and says so.
    let response = send(addr, get("/oauth2/ready").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(body["session_store"], "unavailable", "{body}");
    let errors = stack.gateway.scrape().await;
    assert!(
        !errors.contains("authgate_session_store_errors_total 0"),
        "{errors}"
    );

    let finding = check_finding(&stack.gateway, "sessions");
    assert_eq!(finding["ok"], false, "{finding}");
    assert!(
        finding["fix"].as_str().unwrap().contains("redis_url"),
        "{finding}"
    );

    // Back, and the gateway reconnects by itself.
    redis.restart();
    answers_within(addr, &cookie, StatusCode::OK, Duration::from_secs(5)).await;
    assert_eq!(
        visit(addr, &cookie, "text/html").await.1.as_deref(),
        Some("judy@contoso.example")
    );
}

/// A provider that rotates refresh tokens revokes the grant when one is
/// spent twice. Two replicas hammered at once, each request due for
/// renewal: one renews at a time, the other takes its result, and the
/// session lives on.
#[tokio::test]
async fn replicas_renew_a_session_one_at_a_time() {
    let session = format!(
        "{}\nrefresh_before = \"2h\"",
        redis_session(&Redis::shared().database())
    );
    let stack = Stack::with(Options {
        session: &session,
        provider_env: vec![("ROTATE_REFRESH".into(), "1".into())],
        ..Options::default()
    })
    .await;
    let b = stack.gateway.replica();
    wait_ready(&b).await;
    let cookie = sign_in(&stack, "dave").await;
    let before = token_requests(&stack.gateway.scrape().await) + token_requests(&b.scrape().await);
    for _ in 0..4 {
        let visits = (0..8).map(|i| {
            let addr = if i % 2 == 0 {
                stack.gateway.addr
            } else {
                b.addr
            };
            let cookie = cookie.clone();
            async move { visit(addr, &cookie, "application/json").await }
        });
        for (status, user) in futures_util::future::join_all(visits).await {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(user.as_deref(), Some("dave@contoso.example"));
        }
    }
    let after = token_requests(&stack.gateway.scrape().await) + token_requests(&b.scrape().await);
    assert!(after > before, "nothing was renewed");
    // The grant survived: the latest refresh token still works.
    for addr in [stack.gateway.addr, b.addr] {
        assert_eq!(
            visit(addr, &cookie, "application/json").await.0,
            StatusCode::OK
        );
    }
    assert!(
        !stack
            .gateway
            .logs()
            .iter()
            .chain(b.logs().iter())
            .any(|l| l["fields"]["message"] == "session ended: refresh refused"),
        "a refresh token was spent twice"
    );
}

/// Sessions kept where Redis Sentinel says follow the master through a
/// planned failover (the old master then answers writes `READONLY`) and
/// through the loss of the master.
#[tokio::test]
async fn sessions_follow_the_master_redis_sentinel_names() {
    let mut redis = RedisSentinel::start();
    let session = format!(
        "store = \"redis\"\nredis_sentinels = [\"redis://127.0.0.1:{}\"]\n\
         redis_sentinel_master = \"{}\"\ncache_ttl = \"1s\"",
        redis.port,
        RedisSentinel::MASTER
    );
    let stack = Stack::with(Options {
        session: &session,
        ..Options::default()
    })
    .await;
    let gateway = &stack.gateway;
    let alice = sign_in(&stack, "alice").await;
    let bob = sign_in(&stack, "bob").await;
    assert_eq!(
        visit(gateway.addr, &alice, "application/json").await.0,
        StatusCode::OK
    );

    // Planned: the sign-out is written to the new master.
    redis.fail_over();
    let response = stack.sign_out(gateway.addr, &alice).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let refused = |cookie| {
        answers_within(
            gateway.addr,
            cookie,
            StatusCode::UNAUTHORIZED,
            Duration::from_secs(1),
        )
    };
    refused(&alice).await;

    // Lost: sessions signed in before and after it are found at the new
    // master, by the gateway and by `authgate sessions`.
    redis.stop_master();
    let carol = sign_in(&stack, "carol").await;
    let out = sessions(gateway, &["list"]);
    assert!(
        out.contains("bob@contoso.example")
            && out.contains("carol@contoso.example")
            && out.contains("2 session(s)"),
        "{out}"
    );
    assert_eq!(revoke(gateway, &["--user", "bob@contoso.example"]), 1);
    refused(&bob).await;
    assert_eq!(
        visit(gateway.addr, &carol, "application/json").await.0,
        StatusCode::OK
    );
}

/// Sessions kept in a Redis Cluster: spread over its shards, shared by
/// replicas, listed and ended by user and all at once, signed out.
#[tokio::test]
async fn sessions_kept_in_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}\""))
        .collect();
    let session = format!(
        "store = \"redis\"\nredis_cluster = [{}]\ncache_ttl = \"1s\"",
        nodes.join(", ")
    );
    let stack = Stack::with(Options {
        session: &session,
        ..Options::default()
    })
    .await;
    let a = &stack.gateway;
    let b = a.replica();
    wait_ready(&b).await;
    let mut cookies = Vec::new();
    for user in ["alice", "bob", "carol", "dave"] {
        cookies.push(sign_in(&stack, user).await);
    }
    let holding = cluster.keys().iter().filter(|k| **k > 0).count();
    assert!(holding >= 2, "every key on one shard: {:?}", cluster.keys());
    for cookie in &cookies {
        assert_eq!(
            visit(b.addr, cookie, "application/json").await.0,
            StatusCode::OK
        );
    }
    let refused = |addr, cookie| {
        answers_within(
            addr,
            cookie,
            StatusCode::UNAUTHORIZED,
            Duration::from_secs(1),
        )
    };

    let out = sessions(a, &["list"]);
    assert!(out.contains("4 session(s)"), "{out}");
    assert_eq!(revoke(a, &["--user", "bob@contoso.example"]), 1);
    refused(b.addr, &cookies[1]).await;

    let response = stack.sign_out(b.addr, &cookies[0]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    refused(a.addr, &cookies[0]).await;

    assert_eq!(revoke(a, &["--all"]), 2);
    for cookie in &cookies[2..] {
        refused(b.addr, cookie).await;
    }
}

/// Managed Redis services (Azure Cache for Redis among them) speak TLS
/// only; a private CA is trusted through `session.redis_ca`.
#[tokio::test]
async fn sessions_kept_in_redis_over_tls_with_a_private_ca() {
    let ca = TestCa::new();
    let redis = Redis::start_tls(&ca);
    let session = format!(
        "store = \"redis\"\nredis_url = \"rediss://127.0.0.1:{}/0\"\nredis_ca = \"redis-ca.pem\"",
        redis.port
    );
    let stack = Stack::with(Options {
        session: &session,
        files: vec![("redis-ca.pem", ca.pem.clone().into_bytes())],
        ..Options::default()
    })
    .await;
    let cookie = sign_in(&stack, "alice").await;
    assert_eq!(
        visit(stack.gateway.addr, &cookie, "text/html")
            .await
            .1
            .as_deref(),
        Some("alice@contoso.example")
    );
    let out = sessions(&stack.gateway, &["list"]);
    assert!(out.contains("alice@contoso.example"), "{out}");
    let response = send(
        stack.gateway.addr,
        get("/oauth2/ready").body(empty()).unwrap(),
    )
    .await;
    let body: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(body["session_store"], "ok", "{body}");
    let finding = check_finding(&stack.gateway, "sessions");
    assert_eq!(finding["ok"], true, "{finding}");
}

/// The chain `addr` serves, if a client trusting only `root` accepts it
/// for `localhost`.
async fn trusted_leaf(addr: std::net::SocketAddr, root: &str) -> Option<Vec<u8>> {
    let stream = trusted_handshake(addr, root, &[]).await.ok()?;
    Some(stream.get_ref().1.peer_certificates()?[0].to_vec())
}

#[tokio::test]
async fn replicas_order_one_certificate_and_answer_each_others_challenges() {
    let _turn = Pebble::turn().await;
    let pebble = Pebble::shared();
    let root = pebble.issuing_root().await;
    let redis_url = Redis::shared().database();
    let session = redis_session(&redis_url);
    let tls = format!(
        "[tls]\nacme = true\nacme_directory = \"{}\"\nacme_ca = \"{}\"\n\
         acme_eab_kid = \"{}\"\nacme_eab_hmac_key = \"{}\"\n",
        pebble.directory,
        pebble.listener_ca().display(),
        Pebble::EAB_KID,
        Pebble::EAB_HMAC_KEY,
    );
    let stack = Stack::with(Options {
        session: &session,
        tables: &tls,
        ..Options::default()
    })
    .await;
    // A orders; the CA validates on the port B listens on, so only B can
    // answer, with what A shared.
    let a = &stack.gateway;
    a.log_line(|l| l["fields"]["message"] == "ordering a certificate from the ACME CA")
        .await;
    let tls_port = std::net::SocketAddr::from(([127, 0, 0, 1], pebble.tls_port));
    let b = a.replica_on(tls_port);

    let started = Instant::now();
    let (at_a, at_b) = loop {
        if let (Some(at_a), Some(at_b)) = (
            trusted_leaf(a.addr, &root).await,
            trusted_leaf(b.addr, &root).await,
        ) {
            break (at_a, at_b);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "A {:?}\nB {:?}\npebble {}",
            a.logs(),
            b.logs(),
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(at_a, at_b, "the replicas serve different certificates");
    a.metric("authgate_acme_orders_total{outcome=\"issued\"} 1")
        .await;
    b.log_line(|l| l["fields"]["message"] == "certificate adopted from another replica")
        .await;
    let ordered_at_b = b
        .logs()
        .iter()
        .any(|l| l["fields"]["message"] == "ordering a certificate from the ACME CA");
    assert!(!ordered_at_b, "B ordered too: {:?}", b.logs());

    // What Redis holds of it is sealed: a dump has no key, no certificate.
    let redis = Redis::shared();
    let db = redis_url.rsplit('/').next().unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "-n", db])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let keys = cli(&["--scan", "--pattern", "authgate:shared:*"]);
    // The account, the certificate, the (withdrawn) challenge answers.
    assert_eq!(keys.lines().count(), 3, "{keys}");
    for key in keys.lines() {
        let value = cli(&["GET", key]);
        assert!(!value.contains("BEGIN"), "{key} in the clear: {value}");
        assert!(!value.contains("localhost"), "{key} in the clear: {value}");
    }
}

#[tokio::test]
async fn a_failed_order_is_retried_on_time_while_replicas_look_for_certificates() {
    let session = redis_session(&Redis::shared().database());
    let tls = format!(
        "[tls]\nacme = true\nacme_directory = \"https://localhost:{}/dir\"\n",
        closed_port().port()
    );
    let stack = Stack::with(Options {
        session: &session,
        tables: &tls,
        ..Options::default()
    })
    .await;
    let gateway = &stack.gateway;
    gateway
        .log_line(|l| {
            l["fields"]["message"] == "ACME order failed; still serving a self-signed certificate"
        })
        .await;
    let status = gateway.dir.path().join("state/acme-status.json");
    let next_attempt = || {
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
        status["next_attempt"].as_str().unwrap().to_owned()
    };
    let planned = next_attempt();
    // The replica looks for the others' certificate every 5 s; the retry
    // (45 s to 75 s after the failure) must not move with each look.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(next_attempt(), planned);
    let retry = humantime::parse_rfc3339(&planned).unwrap();
    assert!(retry > std::time::SystemTime::now() + Duration::from_secs(30));
}

#[tokio::test]
async fn replicas_sign_identity_assertions_with_one_shared_key() {
    let session = redis_session(&Redis::shared().database());
    let stack = Stack::with(Options {
        tables: "[headers]\nassertion = true\n",
        session: &session,
        ..Options::default()
    })
    .await;
    let b = stack.gateway.replica();
    wait_ready(&b).await;
    let key_set = |addr| async move {
        let response = send(addr, get("/oauth2/jwks.json").body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        serde_json::from_str::<serde_json::Value>(&body_string(response).await).unwrap()
    };
    let published = key_set(stack.gateway.addr).await;
    assert_eq!(
        published["keys"].as_array().unwrap().len(),
        1,
        "{published}"
    );
    // An upstream behind a load balancer gets the same key set from
    // either, so an assertion made by one verifies with what the other
    // published.
    assert_eq!(key_set(b.addr).await, published);
    let (token, _) = stack.provider.user_tokens("alice@contoso.example").await;
    let echo = upstream_saw(
        send(
            b.addr,
            get("/api/devices")
                .header("authorization", format!("Bearer {token}"))
                .body(empty())
                .unwrap(),
        )
        .await,
    )
    .await;
    let assertion = echo.header("x-authgate-assertion").expect("an assertion");
    let verified = crate::common::peers::verify_jwt(
        assertion,
        &published,
        &stack.origin,
        &stack.upstream.url(),
    )
    .await;
    assert_eq!(
        verified["payload"]["preferred_username"], "alice@contoso.example",
        "{verified}"
    );
}

#[tokio::test]
async fn a_replica_that_cannot_reach_redis_for_the_shared_key_does_not_start() {
    let mut redis = Redis::start(false);
    let session = redis_session(&format!("redis://127.0.0.1:{}/0", redis.port));
    let stack = Stack::with(Options {
        tables: "[headers]\nassertion = true\n",
        session: &session,
        ..Options::default()
    })
    .await;
    redis.stop();
    // Another process beside it, as a replica starting now would.
    let (status, stdout, _) = stack.gateway.command(&[]);
    assert!(!status.success());
    assert!(
        stdout.contains("cannot share the assertion signing key"),
        "{stdout}"
    );
}
