//! ACME (RFC 8555): obtains the certificate for `public_url`'s host (and
//! `extra_hosts`) from a CA such as Let's Encrypt and renews it, proving
//! control with TLS-ALPN-01 on the HTTPS listener or HTTP-01 on the
//! port-80 listener. A new certificate is swapped in like a reloaded file;
//! until the first one arrives a self-signed stand-in is served. The
//! account, certificate and status are kept under `state_dir`.

mod challenge;
mod order;
mod schedule;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{Account, AuthorizationStatus, CertificateIdentifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, Signal, SignalKind};

pub use challenge::{Challenges, Resolver};

use super::tls::{self, ReloadableCert, TlsError};
use crate::auth::session::{Shared, StoreError};
use crate::ops::metrics::Metrics;
use crate::state::{StateDir, StateError, ACME_CERT_FILE, ACME_KEY_FILE, ACME_STATUS_FILE};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How the CA is to check that the gateway answers for the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ChallengeKind {
    /// A handshake on port 443 (RFC 8737).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// A plain-HTTP request on port 80 (RFC 8555 §8.3).
    #[serde(rename = "http-01")]
    Http01,
}

impl std::fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        })
    }
}

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    /// `mailto:` URIs.
    pub contact: Vec<String>,
    pub eab: Option<ExternalAccount>,
    /// Trusted for the directory's own TLS, besides the system's roots.
    pub ca: Option<PathBuf>,
    pub challenge: ChallengeKind,
    /// `public_url`'s host first, then `extra_hosts`.
    pub names: Vec<String>,
    /// How to reach the CA (`[outbound]`).
    pub egress: crate::outbound::Egress,
}

/// External account binding (RFC 8555 §7.3.4), as CAs such as ZeroSSL
/// hand it out.
#[derive(Clone)]
pub struct ExternalAccount {
    pub kid: String,
    pub hmac_key: Vec<u8>,
}

impl std::fmt::Debug for ExternalAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalAccount")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Orders tried in a row while the CA refuses nonces.
const BAD_NONCE_ATTEMPTS: u32 = 3;

/// With replicas sharing Redis: the challenge answers of the order under
/// way, which every replica mirrors each `ANSWERS_POLL`; the orderer waits
/// `ANSWERS_SPREAD` after publishing before the CA may validate.
const SHARED_ANSWERS: &str = "acme:challenges";
const ANSWERS_POLL: Duration = Duration::from_secs(1);
const ANSWERS_SPREAD: Duration = Duration::from_secs(5);
const ANSWERS_LIFETIME: Duration = Duration::from_secs(600);
/// How often a replica looks for a certificate another one obtained.
const SHARED_POLL: Duration = Duration::from_secs(5);
/// One replica orders at a time; a lock outlives one that died ordering
/// this long (an order takes seconds, its polls two minutes at most).
const ORDER_LOCK_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{}", said_by_ca(.0))]
    Ca(#[from] instant_acme::Error),
    #[error(
        "the CA offers no {kind} challenge for {name}; set tls.acme_challenge to the other kind"
    )]
    NoChallenge { name: String, kind: ChallengeKind },
    #[error("the CA's authorization for {name} is {status:?}")]
    Authorization {
        name: String,
        status: AuthorizationStatus,
    },
    #[error("validation failed: {0}")]
    Invalid(String),
    #[error("cannot make a key or certificate request: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("sharing with the other replicas: {0}")]
    Shared(#[from] StoreError),
}

/// What ACME last did and will do next, kept in `state_dir` for
/// `authgate check` (times RFC 3339, UTC).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Status {
    pub directory: String,
    pub names: Vec<String>,
    pub last_issued: Option<String>,
    pub expires: Option<String>,
    pub next_attempt: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

impl Status {
    /// The status the gateway last wrote, if any.
    pub fn read(state: &StateDir) -> Option<Status> {
        serde_json::from_slice(&state.read(ACME_STATUS_FILE).ok()??).ok()
    }
}

/// The certificate being served, as scheduling needs it.
struct Held {
    leaf: CertificateDer<'static>,
    lifetime: schedule::Lifetime,
}

impl Held {
    fn of(key: &CertifiedKey) -> Option<Held> {
        Held::of_leaf(key.cert.first()?.clone())
    }

    fn of_leaf(leaf: CertificateDer<'static>) -> Option<Held> {
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().try_into().unwrap_or(0))
        };
        let lifetime = schedule::Lifetime {
            not_before: at(parsed.validity().not_before),
            not_after: at(parsed.validity().not_after),
        };
        Some(Held { leaf, lifetime })
    }
}

/// The task that keeps a certificate from the CA in `cert`.
pub struct Acme {
    settings: AcmeSettings,
    state: StateDir,
    http: order::Http,
    challenges: Arc<Challenges>,
    cert: Arc<ReloadableCert>,
    metrics: Metrics,
    held: Option<Held>,
    account: Option<Account>,
    /// Whether the CA answered a renewal information request: new orders
    /// then name the certificate they replace (RFC 9773 §5).
    renewal_info: bool,
    /// The kept certificate came from another directory or for other
    /// names (say, staging before production): replaced at once.
    stale: bool,
    /// When the held certificate is due, and when to ask the CA again.
    planned: Option<Planned>,
    status: Status,
    /// The status as last written to `state_dir`.
    status_written: Vec<u8>,
    /// SIGHUP: after a failure, try again at once.
    hangup: Signal,
    /// Replicas sharing Redis share the account, the certificate and the
    /// challenge answers, and order one at a time.
    shared: Option<Shared>,
}

struct Planned {
    leaf: CertificateDer<'static>,
    due: SystemTime,
    ask_again: Option<SystemTime>,
}

/// How an order attempt ended well.
enum Obtained {
    Issued,
    /// Another replica holds the order lock, or has just renewed.
    ByPeer,
}

/// A certificate as replicas share it.
#[derive(Serialize, Deserialize)]
struct SharedCertificate {
    chain: String,
    key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeStartError {
    #[error("tls.acme_ca: {0}")]
    Client(#[from] crate::outbound::ClientError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signals(#[source] std::io::Error),
}

impl Acme {
    /// Serves the certificate kept from an earlier run, or a self-signed
    /// stand-in until the first order completes.
    pub fn new(
        settings: AcmeSettings,
        state: StateDir,
        timeouts: &super::Timeouts,
        metrics: Metrics,
        shared: Option<Shared>,
    ) -> Result<Acme, AcmeStartError> {
        let http = order::Http::new(&settings, timeouts)?;
        let hangup = signal(SignalKind::hangup()).map_err(AcmeStartError::Signals)?;
        let kept = match tls::load(&state.file(ACME_CERT_FILE), &state.file(ACME_KEY_FILE)) {
            Ok(key) => Some(key),
            Err(TlsError::Certificate { source, .. }) if is_missing(&source) => None,
            Err(e) => {
                tracing::warn!(error = %e, "the kept ACME certificate does not load; ordering a new one");
                None
            }
        };
        let held = kept.as_ref().and_then(Held::of);
        let first = match kept {
            Some(key) => key,
            None => {
                tracing::warn!(
                    host = settings.names[0],
                    "no certificate from the ACME CA yet: serving a SELF-SIGNED one until \
                     the first order completes"
                );
                tls::self_signed(&settings.names)?
            }
        };
        tls::record_expiry(&first, &metrics.certificate_expiry);
        let previous = Status::read(&state).unwrap_or_default();
        let stale = held.is_some()
            && (previous.directory != settings.directory || previous.names != settings.names);
        let status = Status {
            directory: settings.directory.clone(),
            names: settings.names.clone(),
            ..previous
        };
        Ok(Acme {
            settings,
            state,
            http,
            challenges: Arc::default(),
            cert: ReloadableCert::new(first),
            metrics,
            held,
            account: None,
            renewal_info: false,
            stale,
            planned: None,
            status,
            status_written: Vec::new(),
            hangup,
            shared,
        })
    }

    /// The TLS listener's certificate resolver.
    pub fn resolver(&self) -> Arc<Resolver> {
        Arc::new(Resolver {
            cert: self.cert.clone(),
            challenges: self.challenges.clone(),
        })
    }

    /// The answers the port-80 listener gives for HTTP-01.
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// Orders when there is no certificate or its renewal is due, forever.
    pub async fn run(mut self) {
        if let Some(shared) = &self.shared {
            tokio::spawn(mirror_answers(shared.clone(), self.challenges.clone()));
        }
        let mut failures = 0u32;
        // After a failure: when to try again (fixed once, so the looks
        // for the other replicas' certificate do not push it back).
        let mut retry_at = None;
        loop {
            if self.shared.is_some() {
                self.adopt_shared().await;
            }
            let (due, recheck) = match (&self.held, retry_at) {
                (_, Some(at)) => (at, None),
                (None, _) => (SystemTime::now(), None),
                _ if self.stale => (SystemTime::now(), None),
                (Some(_), _) => self.renewal_due().await,
            };
            self.status.next_attempt = Some(rfc3339(due));
            self.save_status();
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            // The CA's window may move (RFC 9773 §4.3.2): ask again then;
            // with replicas, look for their certificate meanwhile.
            let recheck = match self.shared {
                Some(_) => Some(recheck.map_or(SHARED_POLL, |r| r.min(SHARED_POLL))),
                None => recheck,
            }
            .filter(|r| *r < wait);
            tokio::select! {
                _ = tokio::time::sleep(recheck.unwrap_or(wait)) => {
                    if recheck.is_some() {
                        continue;
                    }
                }
                Some(()) = self.hangup.recv() => {
                    if retry_at.take().is_some() {
                        tracing::info!("SIGHUP: ordering again now");
                        failures = 0;
                    }
                    continue;
                }
            }
            match self.obtain(failures == 0).await {
                Ok(Obtained::Issued) => {
                    (failures, retry_at) = (0, None);
                    Metrics::outcome(&self.metrics.acme_orders, "issued");
                }
                Ok(Obtained::ByPeer) => {
                    (failures, retry_at) = (0, None);
                    tokio::time::sleep(SHARED_POLL).await;
                }
                Err(e) => {
                    failures += 1;
                    retry_at =
                        Some(SystemTime::now() + schedule::retry_delay(failures, unit_random()));
                    Metrics::outcome(&self.metrics.acme_orders, "failed");
                    let serving = if self.held.is_some() {
                        "the previous certificate"
                    } else {
                        "a self-signed certificate"
                    };
                    tracing::error!(
                        error = %e,
                        directory = %self.settings.directory,
                        names = ?self.settings.names,
                        "ACME order failed; still serving {serving}"
                    );
                    self.status.last_error = Some(e.to_string());
                    self.status.last_error_at = Some(rfc3339(SystemTime::now()));
                }
            }
        }
    }

    /// When the held certificate is to be replaced, and when to ask the CA
    /// again if it gave a renewal window.
    async fn renewal_due(&mut self) -> (SystemTime, Option<Duration>) {
        let held = self.held.as_ref().expect("called with a certificate");
        let now = SystemTime::now();
        if let Some(planned) = &self.planned {
            let asked_recently = planned.ask_again.is_none_or(|at| at > now);
            if planned.leaf == held.leaf && asked_recently {
                let recheck = planned
                    .ask_again
                    .map(|at| at.duration_since(now).unwrap_or_default());
                return (planned.due, recheck);
            }
        }
        let lifetime = held.lifetime;
        let id = CertificateIdentifier::try_from(&held.leaf).ok();
        let window = match (self.account().await, id) {
            (Ok(account), Some(id)) => match account.renewal_info(&id).await {
                Ok((info, recheck)) => Some((
                    schedule::Window {
                        start: info.suggested_window.start.into(),
                        end: info.suggested_window.end.into(),
                    },
                    recheck,
                )),
                Err(instant_acme::Error::Unsupported(_)) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "ACME renewal information unavailable");
                    None
                }
            },
            _ => None,
        };
        self.renewal_info = window.is_some();
        let due = schedule::renew_at(lifetime, window.map(|w| w.0), unit_random());
        let recheck = window.map(|w| w.1);
        self.planned = self.held.as_ref().map(|held| Planned {
            leaf: held.leaf.clone(),
            due,
            ask_again: recheck.map(|r| now + r),
        });
        (due, recheck)
    }

    async fn account(&mut self) -> Result<&Account, AcmeError> {
        if self.account.is_none() {
            let account = order::account(
                &self.settings,
                &self.state,
                &self.http,
                self.shared.as_ref(),
            )
            .await?;
            self.account = Some(account);
        }
        Ok(self.account.as_ref().expect("just set"))
    }

    /// One order, then the new certificate kept and served. A nonce the
    /// CA refused is tried again at once, a few times (RFC 8555 §6.5: the
    /// client retries; CAs refuse some nonces, Pebble on purpose).
    async fn obtain(&mut self, name_replaced: bool) -> Result<Obtained, AcmeError> {
        let Some(shared) = self.shared.clone() else {
            return self.order_retrying(name_replaced).await;
        };
        let lock = self.order_lock();
        let Some(token) = shared.lock(&lock, ORDER_LOCK_TTL).await? else {
            tracing::debug!("another replica is ordering the certificate");
            return Ok(Obtained::ByPeer);
        };
        let before = self.held.as_ref().map(|h| h.leaf.clone());
        self.adopt_shared().await;
        let adopted = self.held.as_ref().map(|h| &h.leaf) != before.as_ref();
        let result = if adopted {
            Ok(Obtained::ByPeer)
        } else {
            self.order_retrying(name_replaced).await
        };
        let withdrawn = shared
            .put(
                SHARED_ANSWERS,
                &challenge::Answers::default(),
                ANSWERS_LIFETIME,
            )
            .await;
        if let Err(e) = withdrawn {
            tracing::warn!(error = %e, "ACME challenge answers not withdrawn from the other replicas");
        }
        shared.unlock(&lock, &token).await;
        result
    }

    async fn order_retrying(&mut self, name_replaced: bool) -> Result<Obtained, AcmeError> {
        let mut attempts = 1;
        loop {
            match self.order_once(name_replaced).await {
                Err(e) if e.is_bad_nonce() && attempts < BAD_NONCE_ATTEMPTS => {
                    tracing::debug!(error = %e, "ACME nonce refused; ordering again");
                    attempts += 1;
                }
                done => return done.map(|()| Obtained::Issued),
            }
        }
    }

    /// The lock one replica holds while ordering for these names.
    fn order_lock(&self) -> String {
        format!("acme:order:{}", self.settings.names.join(","))
    }

    /// Where replicas share the certificate for this directory and these
    /// names.
    fn shared_certificate(&self) -> String {
        format!(
            "acme:certificate:{} {}",
            self.settings.directory,
            self.settings.names.join(",")
        )
    }

    /// Serves the certificate another replica obtained, when it is newer
    /// than the held one.
    async fn adopt_shared(&mut self) {
        let Some(shared) = &self.shared else { return };
        let found = shared
            .get::<SharedCertificate>(&self.shared_certificate())
            .await;
        match found {
            Ok(Some(found)) => {
                if let Err(e) = self.install(&found.chain, &found.key, false) {
                    tracing::warn!(error = %e, "the other replicas' certificate does not load");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot look for the other replicas' certificate"),
        }
    }

    /// Keeps and serves `chain` and `key`, unless another replica's
    /// (`ours` false) is what is served already, or older.
    fn install(&mut self, chain: &str, key: &str, ours: bool) -> Result<(), AcmeError> {
        if !ours {
            use rustls_pki_types::pem::PemObject;
            let offered = CertificateDer::pem_slice_iter(chain.as_bytes())
                .next()
                .and_then(Result::ok)
                .and_then(Held::of_leaf);
            let newer = match (&self.held, offered) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(held), Some(offered)) => {
                    offered.leaf != held.leaf
                        && offered.lifetime.not_after > held.lifetime.not_after
                }
            };
            if !newer {
                return Ok(());
            }
        }
        self.state.write_private(ACME_KEY_FILE, key.as_bytes())?;
        self.state.write_private(ACME_CERT_FILE, chain.as_bytes())?;
        let certified = tls::load(
            &self.state.file(ACME_CERT_FILE),
            &self.state.file(ACME_KEY_FILE),
        )?;
        tls::record_expiry(&certified, &self.metrics.certificate_expiry);
        self.held = Held::of(&certified);
        let expires = self.held.as_ref().map(|h| rfc3339(h.lifetime.not_after));
        self.cert.replace(certified);
        let how = if ours {
            "certificate obtained from the ACME CA"
        } else {
            "certificate adopted from another replica"
        };
        tracing::info!(
            names = ?self.settings.names,
            directory = %self.settings.directory,
            expires = expires.as_deref().unwrap_or("?"),
            "{how}"
        );
        self.stale = false;
        self.status.last_issued = Some(rfc3339(SystemTime::now()));
        self.status.expires = expires;
        self.status.last_error = None;
        self.status.last_error_at = None;
        Ok(())
    }

    async fn order_once(&mut self, name_replaced: bool) -> Result<(), AcmeError> {
        let replaces = self
            .held
            .as_ref()
            .filter(|_| name_replaced && self.renewal_info)
            .and_then(|held| CertificateIdentifier::try_from(&held.leaf).ok())
            .map(CertificateIdentifier::into_owned);
        let account = self.account().await?.clone();
        tracing::info!(
            names = ?self.settings.names,
            challenge = %self.settings.challenge,
            "ordering a certificate from the ACME CA"
        );
        let issued = order::issue(
            &account,
            &self.settings,
            &self.challenges,
            self.shared.as_ref(),
            replaces,
        )
        .await?;
        self.install(&issued.chain, &issued.key, true)?;
        if let Some(shared) = &self.shared {
            let lifetime = self
                .held
                .as_ref()
                .and_then(|h| h.lifetime.not_after.duration_since(SystemTime::now()).ok())
                .unwrap_or_default();
            let certificate = SharedCertificate {
                chain: issued.chain,
                key: issued.key,
            };
            shared
                .put(&self.shared_certificate(), &certificate, lifetime)
                .await?;
        }
        Ok(())
    }

    /// Writes the status when it changed (the loop comes by every few
    /// seconds with replicas).
    fn save_status(&mut self) {
        let status = serde_json::to_vec_pretty(&self.status).expect("the status serializes");
        if status == self.status_written {
            return;
        }
        match self.state.write_private(ACME_STATUS_FILE, &status) {
            Ok(()) => self.status_written = status,
            Err(e) => tracing::warn!(error = %e, "ACME status not kept"),
        }
    }
}

impl AcmeError {
    fn is_bad_nonce(&self) -> bool {
        matches!(self, AcmeError::Ca(instant_acme::Error::Api(problem))
            if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
    }
}

/// Mirrors the answers the ordering replica shares, while the gateway
/// runs (a look-up a second: the CA may come to this replica).
async fn mirror_answers(shared: Shared, challenges: Arc<Challenges>) {
    let mut ticks = tokio::time::interval(ANSWERS_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // A store failure is logged and counted by the store.
        if let Ok(answers) = shared.get::<challenge::Answers>(SHARED_ANSWERS).await {
            if let Err(e) = challenges.mirror(answers.unwrap_or_default()) {
                tracing::warn!(error = %e, "cannot answer the other replica's ACME challenge");
            }
        }
    }
}

/// "the CA refused: <its words> (<problem type>)", or what went wrong
/// on the way to it.
fn said_by_ca(error: &instant_acme::Error) -> String {
    match error {
        instant_acme::Error::Api(problem) => format!(
            "the CA refused: {}",
            problem.to_string().trim_start_matches("API error: ")
        ),
        other => format!("the CA: {other}"),
    }
}

fn is_missing(error: &rustls_pki_types::pem::Error) -> bool {
    matches!(error, rustls_pki_types::pem::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A uniformly random number in [0, 1], for jitter.
fn unit_random() -> f64 {
    u64::from_le_bytes(crate::random_bytes::<8>()) as f64 / u64::MAX as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(kind: &str) -> AcmeError {
        let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": format!("urn:ietf:params:acme:error:{kind}"),
            "detail": "JWS has an invalid anti-replay nonce",
            "status": 400,
        }))
        .unwrap();
        AcmeError::Ca(instant_acme::Error::Api(problem))
    }

    #[test]
    fn only_a_refused_nonce_is_ordered_again_at_once() {
        assert!(refused("badNonce").is_bad_nonce());
        assert!(!refused("unauthorized").is_bad_nonce());
        assert!(!AcmeError::Invalid("localhost: connection refused".into()).is_bad_nonce());
        assert_eq!(
            refused("unauthorized").to_string(),
            "the CA refused: JWS has an invalid anti-replay nonce \
             (urn:ietf:params:acme:error:unauthorized)"
        );
    }
}
