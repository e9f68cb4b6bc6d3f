//! The gateway core as a user sees it: the real binary, real TLS, a real
//! upstream server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket handshake request (RFC 6455 §1.3's sample key).
fn websocket_upgrade(path: &str) -> Request<TestBody> {
    get(path)
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .unwrap()
}

type WebSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A WebSocket through the gateway, its handshake answered by the upstream.
async fn open_websocket(addr: std::net::SocketAddr, path: &str) -> WebSocket {
    let (mut send, _) = http1(addr).await;
    let response = send.send_request(websocket_upgrade(path)).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response.headers()["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await
}

/// A WebSocket to an echoing upstream through a gateway with
/// `timeouts.websocket_idle = idle`; the upstream lives as long as it.
async fn websocket_with_idle(idle: &str) -> (Upstream, Gateway, WebSocket) {
    let upstream = Upstream::start("hbbs").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        &format!("[timeouts]\nwebsocket_idle = \"{idle}\""),
    ));
    let ws = open_websocket(gateway.addr, "/ws/id").await;
    (upstream, gateway, ws)
}

/// Sends `message` and asserts the upstream's echo of it comes back.
async fn assert_echoes(ws: &mut WebSocket, message: Message) {
    ws.send(message.clone()).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), message);
}

/// The gateway in front of `upstream`, every route public; the console is
/// also opened as console.example.com.
fn config(upstream: &str, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\naccess = \"public\"\nupstream = \"{upstream}\"\n\
         extra_hosts = [\"console.example.com\"]\n{extra}\n"
    )
}

#[tokio::test]
async fn get_and_post_pass_with_headers_and_bodies_intact() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));

    let response = send(
        gateway.addr,
        get("/devices?page=2&q=a%20b")
            .header("host", "console.example.com")
            .header("x-custom", "kept")
            .header("cookie", "a=1")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.headers()["x-upstream"], "console");
    let echo = upstream_saw(response).await;
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.path, "/devices?page=2&q=a%20b");
    assert_eq!(
        echo.header("host"),
        Some("console.example.com"),
        "Host is preserved"
    );
    assert_eq!(echo.header("x-custom"), Some("kept"));
    assert_eq!(echo.header("cookie"), Some("a=1"));

    let payload = "{\"name\":\"ünïcode\",\"n\":1}";
    let response = send(
        gateway.addr,
        Request::post("/api/thing")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(full(payload))
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.body, payload);
    assert_eq!(echo.header("content-type"), Some("application/json"));
    assert_eq!(
        echo.header("content-length"),
        Some(payload.len().to_string().as_str())
    );
}

#[tokio::test]
async fn forwarding_headers_are_set_from_the_peer_not_the_client() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    let response = send(
        gateway.addr,
        get("/")
            .header("host", "console.example.com")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-real-ip", "6.6.6.6")
            .header("x-forwarded-proto", "http")
            .header("forwarded", "for=6.6.6.6")
            .header("x-request-id", "trace-42")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.headers()["x-request-id"], "trace-42");
    let seen = upstream_saw(response).await;
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("console.example.com"));
    assert_eq!(
        seen.header("forwarded"),
        Some("for=127.0.0.1;proto=https;host=\"console.example.com\"")
    );
    assert_eq!(seen.header("x-request-id"), Some("trace-42"));

    // A request id the gateway makes up reaches the upstream and the log.
    let response = send(gateway.addr, get("/logged").body(empty()).unwrap()).await;
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        upstream_saw(response).await.header("x-request-id"),
        Some(id.as_str())
    );
    let line = gateway
        .log_line(|l| l["fields"]["request_id"] == id.as_str())
        .await;
    assert_eq!(line["fields"]["method"], "GET");
    assert_eq!(line["fields"]["path"], "/logged");
    assert_eq!(line["fields"]["status"], 200);
    assert!(line["fields"]["latency_ms"].as_f64().is_some());
}

#[tokio::test]
async fn trusted_proxies_extend_the_chain() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]",
    ));
    let response = send(
        gateway.addr,
        get("/")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .body(empty())
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    assert_eq!(
        echo.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(echo.header("x-real-ip"), Some("203.0.113.9"));
}

#[tokio::test]
async fn hop_by_hop_and_connection_named_headers_do_not_reach_the_upstream() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    let response = send(
        gateway.addr,
        get("/")
            .header("connection", "keep-alive, x-hop-secret")
            .header("x-hop-secret", "must not pass")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("te", "gzip")
            .header("x-end-to-end", "passes")
            .body(empty())
            .unwrap(),
    )
    .await;
    let echo = upstream_saw(response).await;
    for name in [
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
    ] {
        assert_eq!(
            echo.header(name),
            None,
            "{name} reached the upstream: {:?}",
            echo.headers
        );
    }
    assert_ne!(echo.header("connection"), Some("keep-alive, x-hop-secret"));
    assert_eq!(echo.header("x-end-to-end"), Some("passes"));
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    let mut h2 = http2(gateway.addr).await;
    for i in 0..3 {
        let response = h2
            .send_request(
                Request::post(format!("https://console.example.com/h2/{i}"))
                    .body(full("over h2"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let echo = upstream_saw(response).await;
        assert_eq!(echo.path, format!("/h2/{i}"));
        assert_eq!(echo.body, "over h2");
        assert_eq!(
            echo.version, "HTTP/1.1",
            "upstream is spoken to in HTTP/1.1"
        );
        assert_eq!(
            echo.header("host"),
            Some("console.example.com"),
            ":authority becomes Host"
        );
    }
}

/// Values new with every response (the request id) or every second
/// (`Date`) are sent never-indexed (RFC 7541 §6.2.3), so they cannot push
/// a connection's reusable entries out of its HPACK table. nghttp, a real
/// HTTP/2 client, marks such fields "sensitive".
#[tokio::test]
async fn http2_responses_never_index_per_response_values() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    let url = format!("https://127.0.0.1:{}/h2", gateway.addr.port());
    let out = tokio::process::Command::new("nghttp")
        .args(["-nv", &url])
        .output()
        .await
        .expect("nghttp runs (Debian's nghttp2-client; scripts/peers installs it)");
    let out = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        out.lines()
            .find(|l| l.contains("recv (stream_id=") && l.contains(&format!(") {name}: ")))
            .unwrap_or_else(|| panic!("no {name} in the response:\n{out}"))
    };
    assert!(field(":status").contains(") :status: 200"), "{out}");
    assert!(field("x-request-id").contains("sensitive"), "{out}");
    assert!(field("date").contains("sensitive"), "{out}");
    assert!(
        !field("x-upstream").contains("sensitive"),
        "the upstream's other headers stay indexable:\n{out}"
    );
}

#[tokio::test]
async fn longest_prefix_chooses_the_upstream() {
    let console = Upstream::start("console").await;
    let hbbs = Upstream::start("hbbs").await;
    let hbbr = Upstream::start("hbbr").await;
    let ws = Upstream::start("ws").await;
    let gateway = Gateway::start(&config(
        &console.url(),
        &format!(
            "[[routes]]\nprefix = \"/ws\"\nupstream = \"{}\"\n\
             [[routes]]\nprefix = \"/ws/id\"\nupstream = \"{}\"\n\
             [[routes]]\nprefix = \"/ws/relay\"\nupstream = \"{}\"\n",
            ws.url(),
            hbbs.url(),
            hbbr.url()
        ),
    ));
    for (path, expected) in [
        ("/", "console"),
        ("/ws/id", "hbbs"),
        ("/ws/id/abc", "hbbs"),
        ("/ws/relay", "hbbr"),
        ("/ws/other", "ws"),
        ("/ws/identity", "ws"),
        ("/wsx", "console"),
    ] {
        let response = send(gateway.addr, get(path).body(empty()).unwrap()).await;
        assert_eq!(
            upstream_saw(response).await.upstream,
            expected,
            "for {path}"
        );
    }
}

#[tokio::test]
async fn websocket_echo_through_wss_on_ws_routes() {
    let console = Upstream::start("console").await;
    let hbbs = Upstream::start("hbbs").await;
    let gateway = Gateway::start(&config(
        &console.url(),
        &format!(
            "[[routes]]\nprefix = \"/ws/id\"\nupstream = \"{}\"\n",
            hbbs.url()
        ),
    ));
    let mut ws = open_websocket(gateway.addr, "/ws/id").await;
    for text in ["hello", "second message"] {
        assert_echoes(&mut ws, Message::text(text)).await;
    }
    assert_echoes(&mut ws, Message::binary(vec![7u8; 100_000])).await;
}

/// A tunnel in use stays open past `timeouts.websocket_idle`; once neither
/// side sends anything for that long, the gateway closes it.
#[tokio::test]
async fn silent_websockets_are_closed_after_the_idle_timeout() {
    let (_upstream, gateway, mut ws) = websocket_with_idle("1s").await;

    // A message every 300 ms for twice the idle timeout: never closed.
    let opened = Instant::now();
    let mut last_echo = opened;
    while opened.elapsed() < Duration::from_secs(2) {
        assert_echoes(&mut ws, Message::text("heartbeat")).await;
        last_echo = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    gateway.metric("authgate_websockets_active 1").await;

    // Then silence: closed after the timeout, not before.
    let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the gateway closes a silent WebSocket");
    assert!(
        !matches!(next, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{next:?}"
    );
    // The gateway counts from its own last read (in whole milliseconds),
    // a little before this client saw the echo: hence 0.9 s, not 1.
    let silent = last_echo.elapsed();
    assert!(
        silent >= Duration::from_millis(900),
        "closed {silent:?} after the last message, before the 1 s idle timeout"
    );
    gateway.metric("authgate_websockets_active 0").await;
}

/// `websocket_idle = "0s"` turns the deadline off: a silent tunnel stays.
#[tokio::test]
async fn a_zero_websocket_idle_keeps_silent_websockets_open() {
    let (_upstream, _gateway, mut ws) = websocket_with_idle("0s").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_echoes(&mut ws, Message::text("still there")).await;
}

#[tokio::test]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    const SIZE: usize = 64 * 1024 * 1024;
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));

    let response = send(
        gateway.addr,
        Request::post("/upload")
            .header("host", "localhost")
            .body(repeated_body(SIZE))
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_string(response).await, SIZE.to_string());

    let response = send(
        gateway.addr,
        get(&format!("/download?bytes={SIZE}"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
        }
    }
    assert_eq!(received, SIZE);

    let peak = gateway.peak_rss();
    eprintln!("gateway peak RSS: {} KiB", peak / 1024);
    assert!(
        peak < 64 * 1024 * 1024,
        "gateway peak RSS {} MiB while moving 64 MiB each way",
        peak / 1024 / 1024
    );
}

#[tokio::test]
async fn upstream_down_gives_502_page_for_browsers_and_json_for_clients() {
    let down = closed_port();
    let gateway = Gateway::start(&config(&format!("http://{down}"), ""));

    let response = send(
        gateway.addr,
        get("/")
            .header("accept", "text/html,*/*")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = body_string(response).await;
    assert!(page.contains("The console is not reachable"), "{page}");

    let response = send(
        gateway.addr,
        Request::post("/api/heartbeat")
            .header("host", "localhost")
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(json["error"], "upstream_unreachable");
}

#[tokio::test]
async fn without_preserve_host_the_upstream_is_sent_its_own_name() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), "[proxy]\npreserve_host = false"));
    let request = get("/x")
        .header("host", "console.example.com")
        .body(empty())
        .unwrap();
    let echo = upstream_saw(send(gateway.addr, request).await).await;
    let own = format!("localhost:{}", upstream.addr.port());
    assert_eq!(echo.header("host"), Some(own.as_str()));
    assert_eq!(echo.header("x-forwarded-host"), Some("console.example.com"));
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    // One client connection: one worker, whose pool is the one reused.
    let (mut client, _) = http1(gateway.addr).await;
    let mut seen = Vec::new();
    for method in ["GET", "HEAD", "POST", "GET"] {
        let response = client
            .send_request(
                Request::builder()
                    .method(method)
                    .uri("/echo")
                    .header("host", "localhost")
                    .body(full("x"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method}");
        if method == "HEAD" {
            // No body, yet the exchange is over and the connection free.
            assert!(body_string(response).await.is_empty());
        } else {
            seen.push(upstream_saw(response).await.connection);
        }
    }
    assert!(
        seen.iter().all(|c| *c == seen[0]),
        "each request should reuse the first upstream connection: {seen:?}"
    );
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that answers one request per connection and closes it
    // when told, without having said so (no `Connection: close`), as one
    // does whose keep-alive timeout is shorter than the gateway's.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, mut close) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for n in 1.. {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8];
                if tcp.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let body = format!("connection {n}");
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(answer.as_bytes()).await.unwrap();
            close.recv().await.unwrap();
            drop(tcp);
            closed_tx.send(n).unwrap();
        }
    });
    let gateway = Gateway::start(&config(&format!("http://{addr}"), ""));
    let (mut client, _) = http1(gateway.addr).await;
    for n in 1..=3 {
        let response = client
            .send_request(get("/").header("host", "localhost").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
        assert_eq!(body_string(response).await, format!("connection {n}"));
        // Idle in the gateway's pool now. On loopback the close has reached
        // the gateway's socket once the upstream's close has returned.
        close_tx.send(()).unwrap();
        assert_eq!(closed.recv().await, Some(n));
    }
}

#[tokio::test]
async fn slow_upstream_gives_504() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[timeouts]\nupstream_response = \"300ms\"",
    ));
    let response = send(gateway.addr, get("/hang").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let json: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(json["error"], "upstream_timeout");
}

/// The deadline of a kept upstream connection counts from each request:
/// not tripped by one that passed while the connection was idle, not cut
/// short by an earlier request's, not stretched past its own.
#[tokio::test]
async fn each_request_on_a_kept_upstream_connection_gets_its_whole_deadline() {
    let deadline = Duration::from_millis(300);
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[timeouts]\nupstream_response = \"300ms\"",
    ));
    let (mut client, _) = http1(gateway.addr).await;
    let mut get_now = async |path: &str| {
        let request = get(path).header("host", "localhost").body(empty());
        client.send_request(request.unwrap()).await.unwrap()
    };
    let first = upstream_saw(get_now("/one").await).await;
    tokio::time::sleep(deadline + Duration::from_millis(100)).await;
    let second = upstream_saw(get_now("/two").await).await;
    let third = upstream_saw(get_now("/three").await).await;
    assert_eq!(
        [&first.connection, &second.connection],
        [&third.connection, &third.connection],
        "the gateway kept its upstream connection"
    );
    // The connection's timer is still set for the third request's
    // deadline, which comes while the next request waits.
    tokio::time::sleep(deadline / 2).await;
    let started = Instant::now();
    let hung = get_now("/hang").await;
    let waited = started.elapsed();
    assert_eq!(hung.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        waited >= deadline && waited < deadline + Duration::from_secs(2),
        "504 after {waited:?} for a deadline of {deadline:?}"
    );
}

#[tokio::test]
async fn health_endpoints_live_under_the_gateway_prefix() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    let response = send(gateway.addr, get("/oauth2/ping").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = send(gateway.addr, get("/oauth2/ready").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_string(response).await, "{\"ready\":true}");
    let response = send(gateway.addr, get("/oauth2/nothing").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // Paths outside the prefix are the console's, even similar ones.
    let response = send(gateway.addr, get("/oauth2x/ping").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.upstream, "console");
}

#[tokio::test]
async fn plain_http_listener_redirects_to_the_public_origin_with_308() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "public_url = \"https://console.example.com:8443\"\nhttp_redirect_listen = \"127.0.0.1:0\"",
    ));
    let addr = gateway
        .redirect_addr
        .expect("redirect listener address logged");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = send
        .send_request(
            Request::post("/api/oidc/auth?x=1")
                .header("host", "evil.example")
                .body(full("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        response.headers()["location"],
        "https://console.example.com:8443/api/oidc/auth?x=1"
    );
}

#[tokio::test]
async fn https_upstream_is_trusted_through_the_configured_ca() {
    let ca = TestCa::new();
    let upstream = Upstream::start_tls("secure-console", &ca).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let gateway = Gateway::start_in(dir, &config(&upstream.url(), "[proxy]\nca = \"ca.pem\""));
    let response = send(gateway.addr, get("/over-tls").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.upstream, "secure-console");

    // Without that CA the upstream's certificate is refused: 502, not a
    // silently unverified connection.
    let untrusting = Gateway::start(&config(&upstream.url(), ""));
    let response = send(untrusting.addr, get("/over-tls").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[limits]\nmax_header_bytes = 16384",
    ));
    let big = "x".repeat(20_000);
    let (mut connection, _) = http1(gateway.addr).await;
    let refused = connection
        .send_request(
            get("/")
                .header("host", "localhost")
                .header("x-big", big)
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        refused.unwrap().status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let response = send(
        gateway.addr,
        get("/").header("x-small", "y").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(upstream_saw(response).await.upstream, "console");
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_listener_only() {
    let upstream = Upstream::start("console").await;
    let down = closed_port();
    let gateway = Gateway::start(&config(
        &upstream.url(),
        &format!(
            "[[routes]]\nprefix = \"/down\"\nupstream = \"http://{down}\"\naccess = \"public\""
        ),
    ));
    for _ in 0..2 {
        let response = send(gateway.addr, get("/").body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let response = send(gateway.addr, get("/down").body(empty()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);

    // An open WebSocket, and a client that speaks no TLS.
    let (mut ws_send, _) = http1(gateway.addr).await;
    let upgraded = ws_send
        .send_request(websocket_upgrade("/ws"))
        .await
        .unwrap();
    let _open = hyper::upgrade::on(upgraded).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
    }

    gateway
        .metric("authgate_requests_total{route=\"/\",status=\"200\"} 2")
        .await;
    gateway
        .metric("authgate_requests_total{route=\"/down\",status=\"502\"} 1")
        .await;
    gateway
        .metric("authgate_requests_total{route=\"/\",status=\"101\"} 1")
        .await;
    // Two requests and the upgrade.
    gateway
        .metric("authgate_upstream_latency_seconds_count{route=\"/\"} 3")
        .await;
    gateway.metric("authgate_websockets_active 1").await;
    let text = gateway
        .metric("authgate_tls_handshake_failures_total 1")
        .await;
    let expiry: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("authgate_certificate_expiry_timestamp_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        expiry > now,
        "certificate expiry {expiry} is not in the future"
    );

    // Not on the public port: there /metrics is the console's path.
    let response = send(gateway.addr, get("/metrics").body(empty()).unwrap()).await;
    assert_eq!(upstream_saw(response).await.upstream, "console");
}

#[tokio::test]
async fn silent_clients_are_closed_after_the_header_read_timeout_on_http2_too() {
    use tokio::io::AsyncReadExt;
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[timeouts]\nheader_read = \"300ms\"",
    ));
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let (mut tls, _) = tls_connect(gateway.addr, &[alpn]).await;
        // Send nothing: the gateway must hang up, not wait for ever.
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(DEADLINE, async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // e.g. HTTP/2 settings, or a 408
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{} connection left open",
            String::from_utf8_lossy(alpn)
        );
    }
}

#[tokio::test]
async fn every_response_says_https_only_and_the_gateways_own_pages_guard_themselves() {
    let upstream = Upstream::start("console").await;
    let gateway = Gateway::start(&config(&upstream.url(), ""));
    let response = send(gateway.addr, get("/devices").body(empty()).unwrap()).await;
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    // The upstream's own policy wins.
    let response = send(gateway.addr, get("/own-hsts").body(empty()).unwrap()).await;
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=60"
    );
    // The gateway's own answers: a page, JSON, a redirect's kin.
    for path in ["/oauth2/ping", "/oauth2/nothing-here"] {
        for accept in ["text/html", "application/json"] {
            let response = send(
                gateway.addr,
                get(path).header("accept", accept).body(empty()).unwrap(),
            )
            .await;
            let headers = response.headers();
            assert_eq!(headers["strict-transport-security"], "max-age=31536000");
            assert_eq!(headers["content-security-policy"], "frame-ancestors 'none'");
            assert_eq!(headers["x-content-type-options"], "nosniff");
            assert_eq!(headers["referrer-policy"], "no-referrer");
            assert_eq!(headers["cache-control"], "no-store");
        }
    }

    let without = Gateway::start(&config(&upstream.url(), "[tls]\nhsts = \"\""));
    let response = send(without.addr, get("/devices").body(empty()).unwrap()).await;
    assert!(!response.headers().contains_key("strict-transport-security"));
}

/// Reads until the gateway closes the connection (or errs), and how long
/// that took.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the gateway keeps the connection open");
    started.elapsed()
}

/// One keep-alive HTTP/1.1 exchange written and read at the wire.
async fn exchange_raw<S>(stream: &mut S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /devices HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if body.len() >= length {
                return head.lines().next().unwrap().to_owned();
            }
        }
    }
}

#[tokio::test]
async fn connections_are_bounded_in_time_whatever_the_client_sends() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start("console").await;
    let header_read = Duration::from_millis(500);
    let client_idle = Duration::from_millis(1500);
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[timeouts]\nheader_read = \"500ms\"\nclient_idle = \"1500ms\"",
    ));

    // One byte of HTTP/2's preface, then nothing.
    let (mut tls, _) = tls_connect(gateway.addr, &[b"h2"]).await;
    tls.write_all(b"P").await.unwrap();
    assert!(closed_after(&mut tls).await < client_idle);

    // An HTTP/1.1 request head begun and never finished, on a fresh
    // connection and on one that served a request before.
    for served_before in [false, true] {
        let (mut tls, _) = tls_connect(gateway.addr, &[b"http/1.1"]).await;
        if served_before {
            assert_eq!(exchange_raw(&mut tls).await, "HTTP/1.1 200 OK");
        }
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(closed_after(&mut tls).await < client_idle);
    }

    // A head trickled a byte at a time: each byte is progress, yet the
    // whole head is due within header_read.
    let (tls, _) = tls_connect(gateway.addr, &[b"http/1.1"]).await;
    let (mut read, mut write) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        let mut sent = write.write_all(b"GET / HTTP/1.1\r\nX").await;
        while sent.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sent = write.write_all(b"a").await;
        }
    });
    assert!(closed_after(&mut read).await < client_idle);
    trickle.abort();

    // Idle keep-alive: open past header_read, closed after client_idle.
    let (mut tls, _) = tls_connect(gateway.addr, &[b"http/1.1"]).await;
    assert_eq!(exchange_raw(&mut tls).await, "HTTP/1.1 200 OK");
    tokio::time::sleep(header_read * 2).await;
    assert_eq!(exchange_raw(&mut tls).await, "HTTP/1.1 200 OK");
    let idle = closed_after(&mut tls).await;
    assert!(idle >= client_idle - Duration::from_millis(100), "{idle:?}");

    // HTTP/2 with no open stream likewise.
    let mut h2 = http2(gateway.addr).await;
    for pause in [Duration::ZERO, header_read * 2] {
        tokio::time::sleep(pause).await;
        let response = h2
            .send_request(get("/devices").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    let quiet = Instant::now();
    while !h2.is_closed() {
        assert!(
            quiet.elapsed() < DEADLINE,
            "an idle HTTP/2 connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(quiet.elapsed() >= client_idle - Duration::from_millis(100));
}

/// A WebSocket tunnel keeps its connection's permit: with one allowed, a
/// second client waits until the tunnel closes.
#[tokio::test]
async fn websocket_tunnels_count_against_max_connections() {
    let upstream = Upstream::start("hbbs").await;
    let gateway = Gateway::start(&config(
        &upstream.url(),
        "[limits]\nmax_connections = 1\nworkers = 1",
    ));
    let mut ws = open_websocket(gateway.addr, "/ws/id").await;
    assert_echoes(&mut ws, Message::text("hello")).await;
    let second = tokio::spawn(send(gateway.addr, get("/devices").body(empty()).unwrap()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "served while the tunnel held the only permit"
    );
    drop(ws);
    let response = tokio::time::timeout(DEADLINE, second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
