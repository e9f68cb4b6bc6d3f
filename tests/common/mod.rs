//! Start/stop helpers shared by the integration tests: the real `authgate`
//! binary, a real upstream HTTP server, and a real TLS client.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

pub mod peers;
pub mod stack;

pub const DEADLINE: Duration = Duration::from_secs(30);
pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

// ---------------------------------------------------------------- gateway

/// The real binary, started in its own directory with a config file.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub redirect_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Starts `authgate` with `config` (TOML) and waits for its
    /// "listening" log line, which carries the bound address.
    pub fn start(config: &str) -> Gateway {
        Self::start_in(tempfile::tempdir().unwrap(), config)
    }

    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Gateway {
        Self::start_with_env(dir, config, &[])
    }

    /// `env` on top of the test defaults (JSON logs); a text log's lines
    /// are kept as `{"raw": line}`.
    pub fn start_with_env(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Gateway {
        let path = dir.path().join("authgate.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_authgate"))
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("AUTHGATE_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            // Tests run side by side: no fixed metrics port.
            .env("AUTHGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start authgate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap().push(value.clone());
                let _ = tx.send(value);
            }
        });
        let started = Instant::now();
        let mut redirect_addr = None;
        let mut admin_addr = None;
        loop {
            let remaining = DEADLINE.saturating_sub(started.elapsed());
            let line = match rx.recv_timeout(remaining) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let mut err = String::new();
                    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).ok();
                    panic!(
                        "authgate did not start: stderr {err}; logs {:?}",
                        logs.lock().unwrap()
                    );
                }
            };
            let fields = &line["fields"];
            if fields["message"] == "redirecting plain HTTP" {
                redirect_addr = fields["addr"].as_str().map(|a| a.parse().unwrap());
            }
            if fields["message"] == "serving metrics at /metrics" {
                admin_addr = fields["addr"].as_str().map(|a| a.parse().unwrap());
            }
            let text_addr = line["raw"]
                .as_str()
                .filter(|raw| raw.contains(" listening "))
                .and_then(|raw| raw.split(" addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned);
            if fields["message"] == "listening" || text_addr.is_some() {
                let addr = text_addr
                    .as_deref()
                    .or(fields["addr"].as_str())
                    .unwrap()
                    .parse()
                    .unwrap();
                return Gateway {
                    child,
                    dir,
                    addr,
                    redirect_addr,
                    admin_addr,
                    logs,
                    env: env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                };
            }
        }
    }

    /// Stops the process (SIGKILL: nothing is flushed on the way out) and
    /// starts it again in the same directory with the same configuration
    /// and environment.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let config = std::fs::read_to_string(dir.path().join("authgate.toml")).unwrap();
        let env = std::mem::take(&mut self.env);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        *self = Gateway::start_with_env(dir, &config, &env);
    }

    /// Another process with this one's configuration, environment and the
    /// files beside its configuration, on a port of its own: a replica.
    pub fn replica(&self) -> Gateway {
        self.replica_on(closed_port())
    }

    /// A replica listening on `listen`.
    pub fn replica_on(&self, listen: SocketAddr) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() && entry.file_name() != "authgate.toml" {
                std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        let config = std::fs::read_to_string(self.dir.path().join("authgate.toml")).unwrap();
        let own = format!("listen = \"{}\"", self.addr);
        assert!(config.contains(&own), "no `{own}` in the configuration");
        let config = config.replace(&own, &format!("listen = \"{listen}\""));
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Gateway::start_with_env(dir, &config, &env)
    }

    /// `authgate <args>` run as an admin would beside this gateway: same
    /// directory, configuration and environment, its admin listener.
    pub fn command(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let admin = self.admin_addr.expect("an admin listener").to_string();
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.push(("AUTHGATE_ADMIN_LISTEN", &admin));
        let args = [&["--config", "authgate.toml"], args].concat();
        run_authgate(self.dir.path(), &args, &env)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Peak resident memory of the gateway process, in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// Resident memory of the gateway process now, in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line matching `pred`.
    pub async fn log_line(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let started = Instant::now();
        loop {
            if let Some(line) = self.logs().into_iter().find(&pred) {
                return line;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no such log line in {:?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < DEADLINE, "authgate did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Prometheus exposition from the admin listener.
    pub async fn scrape(&self) -> String {
        let response = send_plain(
            self.admin_addr.expect("admin listener"),
            Request::get("/metrics").body(empty()).unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        body_string(response).await
    }

    /// Scrapes until `line` (a whole sample line) appears.
    pub async fn metric(&self, line: &str) -> String {
        let started = Instant::now();
        loop {
            let text = self.scrape().await;
            if text.lines().any(|l| l == line) {
                return text;
            }
            assert!(started.elapsed() < DEADLINE, "no `{line}` in\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("certs/tls.crt")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`, in `dir`, returning
/// (exit status, stdout, stderr).
pub fn run_authgate(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// --------------------------------------------------------------- upstream

/// A real HTTP/1.1 server standing in for the console (or hbbs/hbbr).
///
/// - `/download?bytes=N` streams N bytes; `/upload` counts the body;
/// - `/hold` answers only when the test calls [`Upstream::release`];
/// - `/hang` never answers;
/// - WebSocket upgrades are echoed;
/// - anything else echoes the request as JSON (see [`Echo`]).
pub struct Upstream {
    pub addr: SocketAddr,
    scheme: &'static str,
    held: Arc<Notify>,
    release: Arc<Notify>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Echo {
    pub upstream: String,
    /// The gateway's end of the connection the request came on.
    pub connection: String,
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: String,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v[0].as_str())
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_with(name, None).await
    }

    /// An upstream that speaks https with a certificate from `ca`.
    pub async fn start_tls(name: &str, ca: &TestCa) -> Upstream {
        let (cert, key) = ca.leaf();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        Self::start_with(
            name,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let state = (Arc::new(name.to_owned()), held.clone(), release.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = listener.accept().await.unwrap();
                let (name, held, release) = state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        upstream_handle(name.clone(), peer, held.clone(), release.clone(), req)
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(tls) => match tls.accept(tcp).await {
                            Ok(io) => {
                                builder
                                    .serve_connection(TokioIo::new(io), service)
                                    .with_upgrades()
                                    .await
                            }
                            Err(_) => return,
                        },
                        None => {
                            builder
                                .serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await
                        }
                    };
                });
            }
        });
        Upstream {
            addr,
            scheme,
            held,
            release,
        }
    }

    pub fn url(&self) -> String {
        format!("{}://localhost:{}", self.scheme, self.addr.port())
    }

    /// Waits until a `/hold` request has arrived.
    pub async fn held(&self) {
        tokio::time::timeout(DEADLINE, self.held.notified())
            .await
            .expect("no /hold request arrived");
    }

    pub fn release(&self) {
        self.release.notify_one();
    }
}

async fn upstream_handle(
    name: Arc<String>,
    peer: SocketAddr,
    held: Arc<Notify>,
    release: Arc<Notify>,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v == "websocket")
    {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .unwrap()
            .as_bytes()
            .to_vec();
        // Behind sign-in, the first message says who the gateway vouched for.
        let user = req
            .headers()
            .get("x-forwarded-user")
            .map(|v| v.to_str().unwrap().to_owned());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = upgrade.await.unwrap();
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            use futures_util::{SinkExt, StreamExt};
            if let Some(user) = user {
                let greeting = serde_json::json!({ "user": user }).to_string();
                let message = tokio_tungstenite::tungstenite::Message::text(greeting);
                ws.send(message).await.unwrap();
            }
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() || ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header(
                "sec-websocket-accept",
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key),
            )
            .body(empty())
            .unwrap());
    }
    match path.as_str() {
        "/download" => {
            let total: usize = query.trim_start_matches("bytes=").parse().unwrap();
            return Ok(Response::new(repeated_body(total)));
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut count = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    count += data.len();
                }
            }
            return Ok(Response::new(full(count.to_string())));
        }
        "/hold" => {
            held.notify_one();
            release.notified().await;
            return Ok(Response::new(full("released")));
        }
        "/hang" => std::future::pending::<()>().await,
        "/own-hsts" => {
            return Ok(Response::builder()
                .header("strict-transport-security", "max-age=60")
                .body(full("own"))
                .unwrap())
        }
        _ => {}
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let echo = serde_json::json!({
        "upstream": *name,
        "connection": peer.to_string(),
        "method": method,
        "path": path_and_query,
        "version": version,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", name.as_str())
        .body(full(echo.to_string()))
        .unwrap())
}

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// `total` bytes in 64 KiB chunks, produced as they are sent.
pub fn repeated_body(total: usize) -> TestBody {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let frames = (0..total.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(total - i * CHUNK);
        Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len)))
    });
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

// ----------------------------------------------------------------- client

/// Accepts any server certificate and keeps the one it saw: the tests
/// check *which* certificate the gateway serves, not the web PKI.
#[derive(Debug)]
struct RecordingVerifier {
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection to the gateway, with the certificate it presented.
pub async fn tls_connect(
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    tls_over(TcpStream::connect(addr).await.unwrap(), alpn).await
}

/// TLS over `tcp`, trusting any certificate, with the one presented.
pub async fn tls_over(
    tcp: TcpStream,
    alpn: &[&[u8]],
) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    let seen = Arc::new(Mutex::new(None));
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(RecordingVerifier { seen: seen.clone() }))
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let cert = seen.lock().unwrap().clone().unwrap();
    (tls, cert)
}

/// A TLS handshake by a client that trusts only the CA certificates in
/// `roots` (PEM), asks for `localhost` and offers `alpn`.
pub async fn trusted_handshake(
    addr: SocketAddr,
    roots: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(
        CertificateDer::pem_slice_iter(roots.as_bytes()).map(Result::unwrap),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// An HTTP/1.1 connection over TLS that can carry several requests.
pub async fn http1(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    CertificateDer<'static>,
) {
    let (tls, cert) = tls_connect(addr, &[b"http/1.1"]).await;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    (send, cert)
}

/// An HTTP/2 connection over TLS (ALPN `h2`).
pub async fn http2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let (tls, _) = tls_connect(addr, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "gateway did not negotiate h2"
    );
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// One request on a fresh HTTP/1.1 connection (`Host: localhost` unless
/// the request has one).
pub async fn send(addr: SocketAddr, mut req: Request<TestBody>) -> Response<Incoming> {
    if !req.headers().contains_key("host") {
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("localhost"));
    }
    let (mut send, _) = http1(addr).await;
    send.send_request(req).await.unwrap()
}

/// One request over plain HTTP/1.1 (the admin listener).
pub async fn send_plain(addr: SocketAddr, mut req: Request<TestBody>) -> Response<Incoming> {
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static("admin"));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send.send_request(req).await.unwrap()
}

pub fn get(path: &str) -> http::request::Builder {
    Request::get(path)
}

pub async fn body_string(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub async fn upstream_saw(response: Response<Incoming>) -> Echo {
    assert_eq!(response.status(), StatusCode::OK);
    let text = body_string(response).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not an echo ({e}): {text}"))
}

/// A port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Writes a fresh self-signed certificate and key for `localhost` to the
/// given paths (atomically: temporary file, then rename) and returns the
/// certificate's DER.
pub fn write_cert(cert: &Path, key: &Path) -> Vec<u8> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::create_dir_all(cert.parent().unwrap()).unwrap();
    for (path, content) in [
        (key, generated.signing_key.serialize_pem()),
        (cert, generated.cert.pem()),
    ] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    generated.cert.der().to_vec()
}

/// A certificate authority for test servers, written as PEM for the
/// gateway to trust.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "authgate test CA");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        TestCa {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// A leaf certificate for `localhost` and `127.0.0.1`.
    pub fn leaf(
        &self,
    ) -> (
        CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = self.leaf_pem();
        (
            CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
    }

    /// The same, as PEM (certificate, key), for servers in other languages.
    pub fn leaf_pem(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}
