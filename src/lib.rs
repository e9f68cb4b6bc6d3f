//! authgate: a TLS-terminating sign-in gateway for self-hosted consoles.
//!
//! A request walks the folders in this order:
//!
//! | step | folder | what it owns |
//! |---|---|---|
//! | accept, TLS | [`net`] | listeners, worker threads, the TLS configuration and its reload, certificates from an ACME CA, hyper's server settings, the plain-HTTP listeners |
//! | route | [`pipeline`] | [`pipeline::Gateway::handle`], the request read top to bottom; the gateway's own endpoints; the access log |
//! | authenticate, authorize | [`auth`] | sessions and their cookies, bearer tokens, the sign-in flow, who the caller is, route policy |
//! | (verify) | [`idp`] | the identity provider: discovery, signing keys, token verification, the app's credential, Entra's error explanations |
//! | forward | [`forward`] | routes, the upstream connection pool, forwarding and hop-by-hop headers, WebSocket tunnels |
//!
//! Beside the path: [`config`] reads, layers and validates the settings;
//! [`outbound`] is the gateway's own HTTPS client (to the provider and
//! the ACME CA, and the connector upstreams use), direct or through an
//! egress proxy; `pages` is what the gateway answers
//! itself; [`clock`] the one wall clock; [`state`] what is kept between
//! runs under `state_dir`; [`ops`] metrics, logging, health, the `check`
//! doctor, memory and the admin listener.
//!
//! [`run`] wires the parts together.

#![deny(unsafe_code)]

pub mod auth;
pub mod clock;
pub mod config;
pub mod forward;
pub mod idp;
pub mod net;
pub mod ops;
pub mod outbound;
pub(crate) mod pages;
pub mod pipeline;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use config::Config;
use net::{OpenConnections, TlsListener};
use ops::{memory, metrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the gateway sends: streamed from a peer or built here.
pub type Body = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] net::tls::TlsError),
    #[error("cannot build the TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    #[error(transparent)]
    UpstreamClient(#[from] outbound::ClientError),
    #[error(transparent)]
    Credential(#[from] idp::credential::CredentialError),
    #[error(transparent)]
    Sessions(#[from] auth::session::OpenError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Acme(#[from] net::acme::AcmeStartError),
    #[error(transparent)]
    Assertion(#[from] auth::assertion::AssertionError),
    #[error("cannot listen on `{key}` = {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(#[source] std::io::Error),
}

/// Serves until SIGTERM or SIGINT, then drains in-flight requests.
pub async fn run(config: Config) -> Result<(), StartError> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if config.tls.acme.is_none()
        && config.tls.may_self_sign
        && net::tls::ensure_self_signed(
            &config.tls.cert,
            &config.tls.key,
            config.public_url.host(),
        )?
    {
        tracing::warn!(
            cert = %config.tls.cert.display(),
            host = config.public_url.host(),
            "NO CERTIFICATE CONFIGURED: generated a SELF-SIGNED one, for testing only. \
             Browsers will warn and RustDesk clients refuse it; set tls.cert and tls.key \
             to a real certificate (e.g. from Let's Encrypt) before going live"
        );
    }
    let metrics = metrics::Metrics::default();
    let oidc = match &config.oidc {
        Some(oidc_config) => {
            let http = outbound::client(
                oidc_config.ca.as_deref(),
                &config.timeouts,
                &config.outbound,
            )?;
            Some(idp::Oidc::new(oidc_config.clone(), http, metrics.clone())?)
        }
        None => {
            tracing::warn!("sign-in is not configured: every route is public");
            None
        }
    };
    let sessions = match (&oidc, &config.session) {
        (Some(_), Some(session)) => Some(auth::session::Sessions::open(
            session,
            &config.state_dir,
            &metrics,
        )?),
        _ => None,
    };
    // With Redis, replicas share the ACME certificate and the assertion
    // signing key too.
    let shared = sessions.as_ref().and_then(auth::session::Sessions::shared);
    let assertions = match config.headers.assertion {
        true => Some(Arc::new(
            auth::assertion::Assertions::load(
                &config.state_dir,
                shared.clone(),
                config.public_url.to_string(),
                config.headers.assertion_key_rotation,
            )
            .await?,
        )),
        false => None,
    };
    if let Some(assertions) = &assertions {
        tokio::spawn(assertions.clone().keep_current());
    }
    let certificates = Certificates::new(&config, &metrics, shared)?;
    let acceptor = TlsAcceptor::from(
        net::tls::server_config(certificates.resolver(), config.tls.acme.is_some())
            .map_err(StartError::TlsConfig)?,
    );
    let acme_answers = certificates.acme_answers();
    let gateway = pipeline::Gateway::new(
        &config,
        oidc.clone(),
        sessions.clone(),
        assertions,
        metrics.clone(),
    )?;
    if let Some(oidc) = oidc {
        tokio::spawn(oidc.discover_until_ready());
    }

    let workers = config.limits.worker_threads();
    let listeners =
        net::bind_workers(config.listen, workers).map_err(|source| StartError::Bind {
            key: "listen",
            addr: config.listen,
            source,
        })?;
    let redirect = match config.http_redirect_listen {
        Some(addr) => Some(bind("http_redirect_listen", addr).await?),
        None => None,
    };
    if let Some(sessions) = &sessions {
        tokio::spawn(sessions.clone().sweep_periodically());
    }
    // Its token is made (or read) only when there is a listener to want it.
    let admin = match config.admin_listen {
        Some(addr) => Some((
            bind("admin_listen", addr).await?,
            Arc::new(ops::admin::Admin {
                metrics: metrics.clone(),
                sessions,
                token: ops::admin::token(&config)?,
            }),
        )),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    certificates.keep_current();
    tokio::spawn(memory::collect_periodically());
    if let Some(addr) = redirect.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, to = %config.public_url, "redirecting plain HTTP");
    }
    if let Some(addr) = admin.as_ref().and_then(|(l, _)| l.local_addr().ok()) {
        tracing::info!(%addr, "serving metrics at /metrics");
        tracing::info!(%addr, "serving session administration at /sessions");
    }
    tracing::info!(
        addr = %listeners[0].local_addr().unwrap_or(config.listen),
        public_url = %config.public_url,
        workers,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );

    let (stop, shutdown) = watch::channel(false);
    let plain_connections = OpenConnections::default();
    let tls_workers = TlsListener {
        acceptor,
        gateway: gateway.clone(),
        handshake_failures: metrics.tls_handshake_failures.clone(),
    }
    .start(
        listeners,
        &config.timeouts,
        &config.limits,
        shutdown.clone(),
    )?;
    let origin = config.public_url.clone();
    tokio::join!(
        async {
            if let Some(listener) = redirect {
                let answer = move |req: http::Request<hyper::body::Incoming>| {
                    let acme = acme_answers.as_ref();
                    std::future::ready(
                        acme.and_then(|a| a.http_answer(req.uri().path()))
                            .unwrap_or_else(|| net::redirect(&origin, &req)),
                    )
                };
                net::run_plain(
                    listener,
                    &config.timeouts,
                    &config.limits,
                    shutdown.clone(),
                    &plain_connections,
                    answer,
                )
                .await;
            }
        },
        async {
            if let Some((listener, admin)) = admin {
                let answer = move |req| {
                    let admin = admin.clone();
                    async move { admin.answer(req).await }
                };
                net::run_plain(
                    listener,
                    &config.timeouts,
                    &config.limits,
                    shutdown.clone(),
                    &plain_connections,
                    answer,
                )
                .await;
            }
        },
        async {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
            }
            gateway.start_draining();
            let _ = stop.send(true);
        },
    );
    // The listeners are closed now; finish what is in flight.
    tokio::join!(
        tls_workers.finished(),
        plain_connections.drain(config.timeouts.shutdown_grace)
    );
    Ok(())
}

/// Where the served certificate comes from: files (reloaded when they
/// change) or an ACME CA.
enum Certificates {
    Files {
        watcher: net::tls::CertWatcher,
        cert: Arc<net::tls::ReloadableCert>,
    },
    Acme(Box<net::acme::Acme>),
}

impl Certificates {
    fn new(
        config: &Config,
        metrics: &metrics::Metrics,
        shared: Option<auth::session::Shared>,
    ) -> Result<Certificates, StartError> {
        if let Some(acme) = &config.tls.acme {
            return Ok(Certificates::Acme(Box::new(net::acme::Acme::new(
                acme.clone(),
                config.state_dir.clone(),
                &config.timeouts,
                metrics.clone(),
                shared,
            )?)));
        }
        let watcher = net::tls::CertWatcher::new(
            config.tls.cert.clone(),
            config.tls.key.clone(),
            config.tls.reload_check,
            metrics.certificate_expiry.clone(),
        )
        .map_err(StartError::Signals)?;
        let first = net::tls::load(&config.tls.cert, &config.tls.key)?;
        net::tls::record_expiry(&first, &metrics.certificate_expiry);
        Ok(Certificates::Files {
            watcher,
            cert: net::tls::ReloadableCert::new(first),
        })
    }

    fn resolver(&self) -> Arc<dyn rustls::server::ResolvesServerCert> {
        match self {
            Certificates::Files { cert, .. } => cert.clone(),
            Certificates::Acme(acme) => acme.resolver(),
        }
    }

    /// The HTTP-01 answers for the port-80 listener.
    fn acme_answers(&self) -> Option<Arc<net::acme::Challenges>> {
        match self {
            Certificates::Files { .. } => None,
            Certificates::Acme(acme) => Some(acme.challenges()),
        }
    }

    /// Reloads or renews from now on, in the background.
    fn keep_current(self) {
        match self {
            Certificates::Files { watcher, cert } => tokio::spawn(watcher.run(cert)),
            Certificates::Acme(acme) => tokio::spawn(acme.run()),
        };
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

/// Random bytes from the binary's one crypto provider (aws-lc-rs).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    net::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the system random generator failed");
    bytes
}
