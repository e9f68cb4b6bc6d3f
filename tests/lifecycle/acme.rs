//! ACME against Debian's `pebble`: issuance over TLS-ALPN-01 and HTTP-01,
//! the certificate kept across a restart, renewal while requests run,
//! and a CA that is down or refuses the account.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

use crate::common::peers::Pebble;
use crate::common::*;
use http::StatusCode;

/// A public gateway ordering from the shared pebble; `top` goes before
/// the `[tls]` table, `tls` into it.
fn config(pebble: &Pebble, upstream: &Upstream, listen: u16, top: &str, tls: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{listen}\"\npublic_url = \"https://localhost:{listen}\"\n\
         access = \"public\"\nupstream = \"{}\"\n{top}\n\
         [tls]\nacme = true\nacme_directory = \"{}\"\nacme_ca = \"{}\"\n\
         acme_contact = [\"admin@example.com\"]\nacme_eab_kid = \"{}\"\n{tls}\n",
        upstream.url(),
        pebble.directory,
        pebble.listener_ca().display(),
        Pebble::EAB_KID,
    )
}

fn good_key() -> String {
    format!("acme_eab_hmac_key = \"{}\"", Pebble::EAB_HMAC_KEY)
}

/// The chain the gateway serves, if a client trusting only `root`
/// accepts it.
async fn trusted_chain(
    addr: std::net::SocketAddr,
    root: &str,
) -> std::io::Result<Vec<CertificateDer<'static>>> {
    let stream = trusted_handshake(addr, root, &[b"http/1.1"]).await?;
    Ok(stream.get_ref().1.peer_certificates().unwrap().to_vec())
}

/// Waits until the gateway serves a chain `root` vouches for.
async fn wait_for_trusted(
    gateway: &Gateway,
    pebble: &Pebble,
    root: &str,
) -> Vec<CertificateDer<'static>> {
    let started = Instant::now();
    loop {
        if let Ok(chain) = trusted_chain(gateway.addr, root).await {
            return chain;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no trusted certificate; gateway {:?}\npebble {}",
            gateway.logs(),
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// Two threads: the clients below must not starve the test's own checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issues_a_chain_kept_across_restarts_and_renewed_under_load() {
    let _turn = Pebble::turn().await;
    let pebble = Pebble::shared();
    let root = pebble.issuing_root().await;
    let upstream = Upstream::start("console").await;
    let mut gateway = Gateway::start(&config(pebble, &upstream, pebble.tls_port, "", &good_key()));

    // Until the order completes a stand-in is served, and said to be.
    gateway
        .log_line(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no certificate from the ACME CA yet"))
        })
        .await;
    let chain = wait_for_trusted(&gateway, pebble, &root).await;
    // Leaf and intermediate: a client holding only the root accepts it.
    assert!(chain.len() >= 2, "no intermediate in the served chain");
    let response = send(gateway.addr, get("/through").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.path, "/through");
    gateway
        .metric("authgate_acme_orders_total{outcome=\"issued\"} 1")
        .await;
    let state = gateway.dir.path().join("state");
    for file in [
        "acme-account.json",
        "acme-certificate.key",
        "acme-certificate.pem",
    ] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }

    let (_, check, _) = gateway.command(&["check"]);
    assert!(check.contains("last issued 20"), "{check}");
    // The HTTPS port is not 443 and there is no port-80 listener.
    assert!(check.contains("no challenge can succeed unless"), "{check}");

    // A restart serves the kept certificate from its first handshake.
    gateway.restart();
    let kept = trusted_chain(gateway.addr, &root)
        .await
        .expect("the kept certificate is served at once");
    assert_eq!(kept[0], chain[0]);

    // Renewal (two thirds of the short lifetime) while clients keep
    // connecting and a kept-alive connection keeps asking.
    let failures = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = gateway.addr;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (failures, stop) = (failures.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let (mut send, _) = http1(addr).await;
                let mut req = get("/renewing").body(empty()).unwrap();
                req.headers_mut()
                    .insert("host", "localhost".parse().unwrap());
                let status = send.send_request(req).await.map(|r| r.status());
                sent += 1;
                if !matches!(status, Ok(StatusCode::OK)) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        }));
    }
    let (mut kept_alive, _) = http1(addr).await;
    let started = Instant::now();
    let renewed = loop {
        let mut req = get("/kept-alive").body(empty()).unwrap();
        req.headers_mut()
            .insert("host", "localhost".parse().unwrap());
        let status = kept_alive.send_request(req).await.unwrap().status();
        assert_eq!(status, StatusCode::OK);
        if let Ok(now) = trusted_chain(addr, &root).await {
            if now[0] != chain[0] {
                break now;
            }
        }
        assert!(
            started.elapsed() < Pebble::VALIDITY + DEADLINE,
            "never renewed: {:?}",
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for client in clients {
        sent += client.await.unwrap();
    }
    assert!(renewed.len() >= 2);
    assert!(sent > 0);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {sent} requests");
    // Renewed here (a slow run may have renewed again since).
    let metrics = gateway.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("authgate_acme_orders_total{outcome=\"issued\"} ")),
        "{metrics}"
    );
}

#[tokio::test]
async fn http_01_is_answered_on_the_port_80_listener() {
    let _turn = Pebble::turn().await;
    let pebble = Pebble::shared();
    let root = pebble.issuing_root().await;
    let upstream = Upstream::start("console").await;
    // HTTPS elsewhere than the CA's TLS port: only HTTP-01 can work, and
    // is chosen because the port-80 listener exists.
    let top = format!("http_redirect_listen = \"127.0.0.1:{}\"", pebble.http_port);
    let mut gateway = Gateway::start(&config(pebble, &upstream, 0, &top, &good_key()));
    let chain = wait_for_trusted(&gateway, pebble, &root).await;
    assert!(chain.len() >= 2);

    // Between orders nothing is published, and other paths still redirect.
    let plain = gateway.redirect_addr.unwrap();
    let unknown = send_plain(
        plain,
        get("/.well-known/acme-challenge/guessed-token")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let other = send_plain(plain, get("/console").body(empty()).unwrap()).await;
    assert_eq!(other.status(), StatusCode::PERMANENT_REDIRECT);

    // A client posing as a TLS-ALPN-01 validation when none is under way
    // gets no certificate at all; one that offers it among others is an
    // ordinary client.
    assert!(trusted_handshake(gateway.addr, &root, &[b"acme-tls/1"])
        .await
        .is_err());
    assert_eq!(
        trusted_handshake(gateway.addr, &root, &[b"http/1.1", b"acme-tls/1"])
            .await
            .unwrap()
            .get_ref()
            .1
            .alpn_protocol(),
        Some(&b"http/1.1"[..])
    );

    // A name added to the configuration is ordered at the next start, not
    // at the kept certificate's renewal.
    let path = gateway.dir.path().join("authgate.toml");
    let more = format!(
        "extra_hosts = [\"127.0.0.1\"]\n{}",
        std::fs::read_to_string(&path).unwrap()
    );
    std::fs::write(&path, more).unwrap();
    gateway.restart();
    let started = Instant::now();
    let renamed = loop {
        if let Ok(now) = trusted_chain(gateway.addr, &root).await {
            if now[0] != chain[0] {
                break now;
            }
        }
        // Well before the kept certificate's own renewal.
        assert!(
            started.elapsed() < Pebble::VALIDITY / 3,
            "not reordered: {:?}",
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, leaf) = x509_parser::parse_x509_certificate(renamed[0].as_ref()).unwrap();
    let names = leaf.subject_alternative_name().unwrap().unwrap();
    let names = &names.value.general_names;
    assert!(
        names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::IPAddress(&[127, 0, 0, 1])
        )),
        "{names:?}"
    );

    // With the CA down at a start, the kept certificate goes on serving
    // (here while it is due for replacement: another directory).
    let config = std::fs::read_to_string(&path).unwrap();
    let down = format!("https://localhost:{}/dir", closed_port().port());
    std::fs::write(&path, config.replace(&pebble.directory, &down)).unwrap();
    gateway.restart();
    let started = Instant::now();
    let failed = "ACME order failed; still serving the previous certificate";
    while !gateway
        .logs()
        .iter()
        .any(|l| l["fields"]["message"] == failed)
    {
        assert!(
            started.elapsed() < Pebble::VALIDITY / 3,
            "no order: {:?}",
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served = trusted_chain(gateway.addr, &root).await.unwrap();
    assert_eq!(served[0], renamed[0]);
}

#[tokio::test]
async fn a_ca_that_is_down_leaves_the_stand_in_served_and_says_why() {
    let upstream = Upstream::start("console").await;
    let pebble = Pebble::shared();
    let mut down = config(pebble, &upstream, 0, "", &good_key());
    let closed = closed_port();
    down = down.replace(
        &pebble.directory,
        &format!("https://localhost:{}/dir", closed.port()),
    );
    let gateway = Gateway::start(&down);

    let failed = gateway
        .log_line(|l| {
            l["fields"]["message"] == "ACME order failed; still serving a self-signed certificate"
        })
        .await;
    let error = failed["fields"]["error"].as_str().unwrap();
    assert!(error.contains("Connection refused"), "{error}");
    gateway
        .metric("authgate_acme_orders_total{outcome=\"failed\"} 1")
        .await;
    // Still serving: the stand-in names the host.
    let response = send(gateway.addr, get("/anyway").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.path, "/anyway");

    let (_, check, _) = gateway.command(&["check"]);
    assert!(check.contains("Connection refused"), "{check}");
    assert!(check.contains("the last order failed at"), "{check}");

    // SIGHUP after a failure orders again at once instead of waiting.
    gateway.signal(libc::SIGHUP);
    gateway
        .log_line(|l| l["fields"]["message"] == "SIGHUP: ordering again now")
        .await;
    gateway
        .metric("authgate_acme_orders_total{outcome=\"failed\"} 2")
        .await;
}

#[tokio::test]
async fn a_refused_account_binding_is_logged_and_shown_by_check() {
    let upstream = Upstream::start("console").await;
    let pebble = Pebble::shared();
    let wrong = "acme_eab_hmac_key = \"c29tZXRoaW5nLWVsc2UtZW50aXJlbHktMzItYnl0ZXMh\"";
    let gateway = Gateway::start(&config(pebble, &upstream, 0, "", wrong));
    let failed = gateway
        .log_line(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ACME order failed"))
        })
        .await;
    let error = failed["fields"]["error"].as_str().unwrap();
    assert!(error.contains("external account binding"), "{error}");
    let (_, check, _) = gateway.command(&["check"]);
    assert!(check.contains("external account binding"), "{check}");
    // The key itself is never shown.
    assert!(!check.contains("c29tZXRoaW5n"), "{check}");
    assert!(!gateway
        .logs()
        .iter()
        .any(|l| l.to_string().contains("c29tZXRoaW5n")));
}
