//! Starting, reloading and stopping the real binary: certificates (from
//! files and from an ACME CA), signals, configuration errors and the
//! command line.

#[path = "lifecycle/acme.rs"]
mod acme;
mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// A gateway with a certificate of its own in `certs/`; returns it with
/// a function that replaces that certificate and the first one's DER.
fn start_with_cert(
    upstream: &Upstream,
    reload_check: &str,
) -> (Gateway, impl Fn() -> Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (
        dir.path().join("certs/tls.crt"),
        dir.path().join("certs/tls.key"),
    );
    let first = write_cert(&cert, &key);
    let config = format!(
        "listen = \"127.0.0.1:0\"\naccess = \"public\"\nupstream = \"{}\"\n\
         [tls]\ncert = \"certs/tls.crt\"\nkey = \"certs/tls.key\"\nreload_check = \"{reload_check}\"\n",
        upstream.url()
    );
    let gateway = Gateway::start_in(dir, &config);
    (gateway, move || write_cert(&cert, &key), first)
}

/// Opens new connections until the gateway presents `expected`.
async fn wait_for_cert(gateway: &Gateway, expected: &[u8]) {
    let started = Instant::now();
    loop {
        let (_, cert) = tls_connect(gateway.addr, &[b"http/1.1"]).await;
        if cert.as_ref() == expected {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_connection_works(send: &mut hyper::client::conn::http1::SendRequest<TestBody>) {
    let response = send
        .send_request(
            get("/still-here")
                .header("host", "localhost")
                .body(empty())
                .unwrap(),
        )
        .await
        .expect("the earlier connection was dropped");
    assert_eq!(upstream_saw(response).await.path, "/still-here");
}

#[tokio::test]
async fn replaced_certificate_is_served_on_next_handshake_and_old_connections_live_on() {
    let upstream = Upstream::start("console").await;
    let (gateway, replace_cert, first) = start_with_cert(&upstream, "100ms");

    let (mut earlier, served) = http1(gateway.addr).await;
    assert_eq!(served.as_ref(), first.as_slice());
    assert_connection_works(&mut earlier).await;

    let second = replace_cert();
    wait_for_cert(&gateway, &second).await;
    assert_connection_works(&mut earlier).await;
    gateway
        .log_line(|l| l["fields"]["message"] == "TLS certificate reloaded")
        .await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_at_once() {
    let upstream = Upstream::start("console").await;
    // With an hour between checks, only the signal can explain a reload.
    let (gateway, replace_cert, _) = start_with_cert(&upstream, "1h");
    let second = replace_cert();
    gateway.signal(libc::SIGHUP);
    wait_for_cert(&gateway, &second).await;
    let line = gateway
        .log_line(|l| l["fields"]["message"] == "TLS certificate reloaded")
        .await;
    assert_eq!(line["fields"]["reason"], "SIGHUP");
}

#[tokio::test]
async fn broken_replacement_keeps_the_old_certificate() {
    let upstream = Upstream::start("console").await;
    let (gateway, _, first) = start_with_cert(&upstream, "1h");
    std::fs::write(gateway.cert_path(), "not a certificate").unwrap();
    gateway.signal(libc::SIGHUP);
    gateway
        .log_line(|l| {
            l["fields"]["message"] == "TLS certificate not reloaded; still serving the previous one"
        })
        .await;
    let (_, served) = tls_connect(gateway.addr, &[b"http/1.1"]).await;
    assert_eq!(served.as_ref(), first.as_slice());
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_slow_response_finish() {
    let upstream = Upstream::start("console").await;
    let mut gateway = Gateway::start(&format!(
        "listen = \"127.0.0.1:0\"\naccess = \"public\"\nupstream = \"{}\"\n",
        upstream.url()
    ));
    let addr = gateway.addr;
    let in_flight = tokio::spawn(async move {
        let response = send(addr, get("/hold").body(empty()).unwrap()).await;
        (response.status(), body_string(response).await)
    });
    upstream.held().await;
    gateway.signal(libc::SIGTERM);
    // New connections are refused once the listener has closed...
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            started.elapsed() < DEADLINE,
            "listener still open after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while the request already in flight still gets its answer.
    upstream.release();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "released");
    assert!(gateway.wait_exit().success());
}

/// The worker threads share the port among themselves, but a second
/// gateway started on a port already in use is refused, not let in to
/// split the traffic.
#[test]
fn a_second_gateway_on_a_port_in_use_is_refused() {
    let first = Gateway::start("listen = \"127.0.0.1:0\"\naccess = \"public\"\n");
    let listen = first.addr.to_string();
    let (status, stdout, stderr) = run_authgate(
        first.dir.path(),
        &["--config", "authgate.toml", "serve"],
        &[
            ("AUTHGATE_LISTEN", &listen),
            ("AUTHGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`listen`") && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!stdout.contains("listening"), "{stdout}");
}

/// Memory freed when a burst of connections has closed goes back to the
/// system instead of staying with the allocator.
#[tokio::test]
async fn memory_freed_after_a_burst_goes_back_to_the_system() {
    const MIB: u64 = 1024 * 1024;
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&format!(
        "listen = \"127.0.0.1:0\"\naccess = \"public\"\nupstream = \"{}\"\n",
        upstream.url()
    ));
    let mut burst = Vec::new();
    for _ in 0..400 {
        let (mut connection, _) = http1(gateway.addr).await;
        let request = get("/").header("host", "localhost").body(empty()).unwrap();
        let response = connection.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        body_string(response).await;
        burst.push(connection);
    }
    let busy = gateway.rss();
    drop(burst);
    let started = Instant::now();
    loop {
        let now = gateway.rss();
        if now + 4 * MIB < busy {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "RSS {} MiB after the burst, {} MiB during it",
            now / MIB,
            busy / MIB
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn self_signed_certificate_is_generated_when_none_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start_in(dir, "listen = \"127.0.0.1:0\"\naccess = \"public\"\n");
    assert!(gateway.cert_path().exists());
    let key = gateway.dir.path().join("certs/tls.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let warning = gateway
        .logs()
        .into_iter()
        .find(|l| l["level"] == "WARN")
        .expect("a warning about the self-signed certificate");
    assert!(warning["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("SELF-SIGNED"));
}

/// Each bad configuration stops `serve` before it listens, with a message
/// naming the key.
#[test]
fn bad_configuration_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // (config file, environment, what the message must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[tls]\ncertificate = \"x.crt\"\n", &[], "tls.certificate"),
        ("upstream = \"127.0.0.1:21114\"\n", &[], "`upstream`"),
        (
            "[[routes]]\nprefix = \"/ws/id\"\nupstream = \"ws//hbbs\"\n",
            &[],
            "routes[0].upstream",
        ),
        (
            "[tls]\ncert = \"missing.crt\"\nkey = \"missing.key\"\n",
            &[],
            "tls.cert",
        ),
        (
            "",
            &[("AUTHGATE_PUBLIC_URL_FILE", "/run/secrets/absent")],
            "public_url_file",
        ),
        ("", &[("AUTHGATE_LISTEN", "localhost")], "AUTHGATE_LISTEN"),
        (
            "",
            &[("AUTHGATE_OIDC_CLIENTID", "app")],
            "did you mean AUTHGATE_OIDC_CLIENT_ID",
        ),
        ("listen = [\n", &[], "not valid TOML"),
    ];
    for (toml, env, expected) in cases {
        std::fs::write(dir.path().join("bad.toml"), toml).unwrap();
        let (status, stdout, stderr) =
            run_authgate(dir.path(), &["--config", "bad.toml", "serve"], env);
        assert_eq!(status.code(), Some(2), "{toml}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{toml}: expected {expected} in {stderr}"
        );
        assert!(!stdout.contains("listening"), "{toml}: it listened");
    }
    let (status, _, stderr) = run_authgate(dir.path(), &["--config", "absent.toml"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("absent.toml"), "{stderr}");
}

/// A Kubernetes Service named after the product puts `AUTHGATE_PORT` and
/// its kin into every pod of the namespace: not settings, not an error.
#[test]
fn kubernetes_service_links_do_not_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ok.toml"),
        "access = \"public\"\nupstream = \"http://127.0.0.1:21114\"\n",
    )
    .unwrap();
    let env = [
        ("AUTHGATE_PORT", "tcp://10.96.0.12:8443"),
        ("AUTHGATE_PORT_8443_TCP", "tcp://10.96.0.12:8443"),
        ("AUTHGATE_PORT_8443_TCP_ADDR", "10.96.0.12"),
        ("AUTHGATE_PORT_8443_TCP_PORT", "8443"),
        ("AUTHGATE_PORT_8443_TCP_PROTO", "tcp"),
        ("AUTHGATE_SERVICE_HOST", "10.96.0.12"),
        ("AUTHGATE_SERVICE_PORT", "8443"),
        ("AUTHGATE_SERVICE_PORT_HTTPS", "8443"),
        ("AUTHGATE_TLS_SERVICE_HOST", "10.96.0.13"),
        ("AUTHGATE_RELEASE_CHANNEL", "beta"),
    ];
    let (status, stdout, stderr) =
        run_authgate(dir.path(), &["check-config", "-c", "ok.toml"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(warnings[0].contains("AUTHGATE_RELEASE_CHANNEL"), "{stdout}");
}

#[test]
fn check_config_and_gen_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ok.toml"),
        "access = \"public\"\nupstream = \"http://127.0.0.1:21114\"\n[[routes]]\nprefix = \"/ws/id\"\nupstream = \"http://127.0.0.1:21118\"\n",
    )
    .unwrap();
    let (status, stdout, _) = run_authgate(dir.path(), &["check-config", "-c", "ok.toml"], &[]);
    assert!(status.success());
    assert!(
        stdout.contains("/ws/id") && stdout.contains("http://127.0.0.1:21118"),
        "{stdout}"
    );
    assert!(stdout.contains("self-signed"), "{stdout}");
    assert!(
        !dir.path().join("certs").exists(),
        "check-config must not write files"
    );

    let (status, first, _) = run_authgate(dir.path(), &["gen-secret"], &[]);
    assert!(status.success());
    let (_, second, _) = run_authgate(dir.path(), &["gen-secret"], &[]);
    assert_eq!(
        first.trim().len(),
        43,
        "32 bytes in unpadded base64url: {first}"
    );
    assert_ne!(first, second);

    let (status, version, _) = run_authgate(dir.path(), &["--version"], &[]);
    assert!(status.success());
    assert!(version.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn health_command_probes_the_running_gateway() {
    let mut gateway = Gateway::start("listen = \"127.0.0.1:0\"\naccess = \"public\"\n");
    let addr = gateway.addr.to_string();
    let dir = gateway.dir.path().to_owned();
    let args = ["health", "--config", "authgate.toml"];
    let (status, _, stderr) = run_authgate(&dir, &args, &[("AUTHGATE_LISTEN", &addr)]);
    assert!(status.success(), "{stderr}");

    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit().success());
    let (status, _, stderr) = run_authgate(&dir, &args, &[("AUTHGATE_LISTEN", &addr)]);
    assert!(!status.success());
    assert!(stderr.contains("unhealthy"), "{stderr}");
}
