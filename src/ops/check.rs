//! `authgate check`: the troubleshooting section RustDesk's Azure guide
//! lacks. Each check says pass or fail and, when it fails, what to do:
//! the certificate (with ACME: whether the CA can reach the challenge,
//! its directory, the last order), the public URL (and the redirect URI
//! to register), the issuer, discovery and keys, the app's credential as
//! the token endpoint judges it, every upstream, the session store, and
//! (asking the running gateway) whether ID tokens carry what the
//! provider's logouts need.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::CertificateError;
use serde::Serialize;

use crate::auth::session::{SessionConfig, StoreKind};
use crate::config::Config;
use crate::idp::cloud::Cloud;
use crate::idp::explain;
use crate::idp::graph::PERMISSIONS;
use crate::idp::provider::{Oidc, SignInError};
use crate::net::acme::{self, AcmeSettings, ChallengeKind};
use crate::net::tls;
use crate::ops::admin;
use crate::outbound;
use crate::state::SESSIONS_FILE;

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn pass(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check for a configuration that loaded.
pub async fn run(config: &Config) -> Vec<Finding> {
    let mut findings = vec![Finding::pass("configuration", "valid")];
    findings.push(public_url(config));
    findings.push(certificate(config));
    if let Some(acme) = &config.tls.acme {
        findings.push(acme_reachable(
            acme,
            config.listen.port(),
            config.http_redirect_listen.map(|a| a.port()),
        ));
        findings.push(acme_directory(config, acme).await);
        findings.push(acme_status(config));
    }
    if let Some(oidc_config) = &config.oidc {
        findings.push(issuer_shape(&oidc_config.issuer));
        if let Some(proxy) = oidc_config
            .issuer
            .parse()
            .ok()
            .and_then(|issuer| config.outbound.proxy_for(&issuer))
        {
            findings.push(Finding::pass(
                "egress proxy",
                format!("the provider is reached through {proxy} (CONNECT)"),
            ));
        }
        match outbound::client(
            oidc_config.ca.as_deref(),
            &config.timeouts,
            &config.outbound,
        ) {
            Ok(http) => match Oidc::new(
                oidc_config.clone(),
                http,
                crate::ops::metrics::Metrics::default(),
            ) {
                Ok(oidc) => findings.extend(provider(&oidc, &oidc_config.redirect_uri).await),
                Err(e) => findings.push(Finding::fail(
                    "credential",
                    e.to_string(),
                    "fix the files named above",
                )),
            },
            Err(e) => findings.push(Finding::fail("discovery", e.to_string(), "fix oidc.ca")),
        }
    }
    findings.extend(upstreams(config).await);
    if let Some(session) = &config.session {
        findings.push(session_store(config, session).await);
        findings.push(provider_logout(config).await);
    }
    findings
}

async fn session_store(config: &Config, session: &SessionConfig) -> Finding {
    const CHECK: &str = "sessions";
    if let Some(answered) = crate::auth::session::ping_redis(session).await {
        return match answered {
            Ok(()) => Finding::pass(CHECK, "kept in Redis, which answers"),
            Err(e) => Finding::fail(
                CHECK,
                e.to_string(),
                "check session.redis_url, redis_sentinels and redis_sentinel_master, or \
                 redis_cluster (hosts, ports, database, credentials), that this host reaches \
                 them, and for rediss:// session.redis_ca",
            ),
        };
    }
    match session.store {
        StoreKind::Cookie => Finding::pass(
            CHECK,
            "kept in their cookies: a copied cookie works until it expires, and sign-outs at \
             the provider or `authgate sessions revoke` cannot end it (session.store = \
             \"embedded\" keeps sessions server-side)",
        ),
        _ => {
            let dir = config.state_dir.path();
            // Where the directory is yet to be made, its parent must take it.
            let probe = if dir.exists() {
                dir
            } else {
                dir.parent().unwrap_or(dir)
            };
            let writable = std::fs::metadata(probe).is_ok_and(|m| !m.permissions().readonly());
            if writable {
                Finding::pass(
                    CHECK,
                    format!("kept in {}", dir.join(SESSIONS_FILE).display()),
                )
            } else {
                Finding::fail(
                    CHECK,
                    format!("state_dir {} cannot be written", dir.display()),
                    "make state_dir a directory the gateway's user can write (the container's \
                     /state volume, systemd's StateDirectory=)",
                )
            }
        }
    }
}

/// Entra names the session it signs out (front-channel logout) by the ID
/// token's `sid`, an optional claim: the running gateway's live sessions
/// tell whether it arrives.
async fn provider_logout(config: &Config) -> Finding {
    const CHECK: &str = "provider logout";
    let listed = match admin::client::call(config, &admin::Ask::List(None)).await {
        Ok(answer) => answer["sessions"].as_array().cloned().unwrap_or_default(),
        Err(e) => {
            return Finding::pass(
                CHECK,
                format!("not checked: the live sessions could not be listed ({e})"),
            )
        }
    };
    let without = listed
        .iter()
        .filter(|s| s["provider_session"] == false)
        .count();
    match (listed.len(), without) {
        (0, _) => Finding::pass(CHECK, "not checked yet: no one is signed in"),
        (_, 0) => Finding::pass(
            CHECK,
            format!(
                "the ID tokens of all {} live sessions carry sid",
                listed.len()
            ),
        ),
        (all, without) => Finding::fail(
            CHECK,
            format!(
                "{without} of {all} live sessions came with no sid in their ID token: a sign-out \
                 elsewhere (Entra's front-channel logout) cannot end them"
            ),
            "in Entra, Token configuration → Add optional claim → ID → sid; each user's next \
             sign-in carries it",
        ),
    }
}

fn public_url(config: &Config) -> Finding {
    let url = &config.public_url;
    let redirect = config
        .oidc
        .as_ref()
        .map(|o| {
            format!(
                "; redirect URI to register in Entra (Authentication > Web): {}",
                o.redirect_uri
            )
        })
        .unwrap_or_default();
    if !url.acceptable_to_entra() {
        Finding::fail(
            "public_url",
            format!("{url} is plain http on a host that is not localhost"),
            "Microsoft Entra ID accepts only https:// (or http://localhost) redirect URIs: set public_url \
             to the https:// address users open",
        )
    } else {
        Finding::pass("public_url", format!("{url}{redirect}"))
    }
}

/// Whether the CA can reach the challenge's port: it connects to 443
/// (TLS-ALPN-01) or 80 (HTTP-01) of each name (RFC 8737 §3, RFC 8555
/// §8.3), whatever the configuration says.
fn acme_reachable(acme: &AcmeSettings, https: u16, plain: Option<u16>) -> Finding {
    const CHECK: &str = "acme challenge";
    let (needed, port) = match acme.challenge {
        ChallengeKind::TlsAlpn01 => (443, Some(https)),
        ChallengeKind::Http01 => (80, plain),
    };
    if port == Some(needed) {
        return Finding::pass(
            CHECK,
            format!(
                "{} is answered on port {needed}, where the CA connects",
                acme.challenge
            ),
        );
    }
    let other = match acme.challenge {
        ChallengeKind::TlsAlpn01 if plain == Some(80) => Some(ChallengeKind::Http01),
        ChallengeKind::Http01 if https == 443 => Some(ChallengeKind::TlsAlpn01),
        _ => None,
    };
    let shown = port.map_or("nowhere".to_owned(), |p| format!("on port {p}"));
    let detail = format!(
        "{} is answered {shown}, but the CA connects to port {needed} of {}",
        acme.challenge,
        acme.names.join(", ")
    );
    let fix = match other {
        Some(other) => {
            format!("set tls.acme_challenge = \"{other}\", which this configuration can answer")
        }
        None => {
            "no challenge can succeed unless a port mapping or forward sends 443 here (listen) \
                 or 80 to http_redirect_listen; listen on :443, or set http_redirect_listen on :80"
                .into()
        }
    };
    Finding::fail(CHECK, detail, fix)
}

/// The directory answers (no account or order is made).
async fn acme_directory(config: &Config, acme: &AcmeSettings) -> Finding {
    const CHECK: &str = "acme directory";
    let fetched = match outbound::client(acme.ca.as_deref(), &config.timeouts, &acme.egress) {
        Ok(http) => outbound::get_json(&http, &acme.directory, UPSTREAM_TIMEOUT)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match fetched {
        Ok(_) => Finding::pass(CHECK, format!("{} answers", acme.directory)),
        Err(e) => Finding::fail(
            CHECK,
            e,
            "check tls.acme_directory, the network path to it, and tls.acme_ca for a private CA",
        ),
    }
}

/// What the gateway last did with the CA, from the status it keeps.
fn acme_status(config: &Config) -> Finding {
    const CHECK: &str = "acme status";
    let Some(status) = acme::Status::read(&config.state_dir) else {
        return Finding::pass(CHECK, "no order yet: the gateway orders at its first start");
    };
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "never".into());
    let detail = format!(
        "last issued {}, expires {}, next attempt {}",
        show(&status.last_issued),
        show(&status.expires),
        show(&status.next_attempt),
    );
    match &status.last_error {
        None => Finding::pass(CHECK, detail),
        Some(error) => Finding::fail(
            CHECK,
            format!(
                "{detail}; the last order failed at {}: {error}",
                show(&status.last_error_at)
            ),
            "fix what the CA says (names resolving to this host, ports, tls.acme_eab_*), then \
             reload the gateway (SIGHUP) to order again at once",
        ),
    }
}

fn certificate(config: &Config) -> Finding {
    let tls = &config.tls;
    let path = tls.cert.display();
    if tls.acme.is_some() && !tls.cert.exists() {
        return Finding::fail(
            "certificate",
            "none from the ACME CA yet: a self-signed stand-in is served until the first order \
             completes",
            "see the acme findings; the order runs at start and is retried",
        );
    }
    if tls.may_self_sign && !tls.cert.exists() {
        return Finding::fail(
            "certificate",
            format!("no certificate at {path}: a self-signed one would be generated"),
            "put the certificate chain and key at tls.cert / tls.key (e.g. from Let's Encrypt); \
             browsers warn about self-signed ones and RustDesk clients refuse them",
        );
    }
    let key = match tls::load(&tls.cert, &tls.key) {
        Ok(key) => key,
        Err(e) => return Finding::fail("certificate", e.to_string(), "fix tls.cert and tls.key"),
    };
    let host = config.public_url.host().to_owned();
    judge_chain(&path.to_string(), &key.cert, &host)
}

/// The chain at `path` as a client would judge it for `host`, every
/// failure in plain words with its fix.
fn judge_chain(path: &str, chain: &[CertificateDer<'static>], host: &str) -> Finding {
    let error = match verify_chain(chain, host) {
        Ok(()) => {
            return Finding::pass(
                "certificate",
                format!("{path} covers {host}, is in date, and chains to a trusted CA"),
            )
        }
        Err(error) => error,
    };
    let leaf = chain
        .first()
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, leaf)| leaf);
    let is_ca = leaf.as_ref().is_some_and(|leaf| leaf.is_ca());
    let self_signed = leaf
        .as_ref()
        .is_some_and(|leaf| leaf.subject() == leaf.issuer());
    let dates = leaf.as_ref().map(|leaf| leaf.validity().clone());
    let full_chain = "use the full chain (fullchain.pem for Let's Encrypt) from a publicly \
                      trusted CA: RustDesk clients refuse others";
    let (detail, fix) = match error {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => (
            match dates {
                Some(dates) => format!("{path} expired on {}", dates.not_after),
                None => format!("{path} has expired"),
            },
            "renew it; authgate picks up the new files without a restart".to_owned(),
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => (
            match dates {
                Some(dates) => format!("{path} is not valid until {}", dates.not_before),
                None => format!("{path} is not valid yet"),
            },
            "check this host's clock, or wait until the certificate's start date".to_owned(),
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => (
            format!("{path} does not cover {host}"),
            format!("use a certificate for {host}, or set public_url to a name it covers"),
        ),
        _ if is_ca => (
            format!(
                "{path} is a CA certificate (basicConstraints CA:TRUE), which clients refuse \
                 as a server's own; `openssl req -x509` makes one unless told otherwise"
            ),
            format!(
                "{full_chain}; for a test certificate add `-addext basicConstraints=critical,CA:FALSE \
                 -addext subjectAltName=DNS:{host}` to openssl req"
            ),
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) if self_signed => (
            format!("{path} is self-signed: browsers warn and RustDesk clients refuse it"),
            full_chain.to_owned(),
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) if chain.len() == 1 => (
            format!(
                "{path} holds the server's certificate alone: its intermediate certificate is \
                 missing, or its CA is not one clients trust"
            ),
            full_chain.to_owned(),
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => (
            format!("{path} is from a CA clients do not trust"),
            full_chain.to_owned(),
        ),
        other => (
            format!("{path}: {other}"),
            "use a valid certificate for public_url".to_owned(),
        ),
    };
    Finding::fail("certificate", detail, fix)
}

/// The chain as a client would judge it: system roots, the host name, now.
fn verify_chain(chain: &[CertificateDer<'static>], host: &str) -> Result<(), rustls::Error> {
    let verifier = outbound::verifier(
        outbound::root_store(None).map_err(|e| rustls::Error::General(e.to_string()))?,
    )?;
    let name =
        ServerName::try_from(host.to_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(drop)
}

/// Entra issuers look like `https://<the cloud's login host>/<tenant>/v2.0`.
fn issuer_shape(issuer: &str) -> Finding {
    let cloud = Cloud::of_issuer(issuer);
    if crate::idp::cloud::is_multi_tenant(issuer) {
        return Finding::pass(
            "issuer",
            format!("{issuer}: {cloud}; several tenants, limited to oidc.allowed_tenants"),
        );
    }
    if !cloud.is_entra() {
        return Finding::pass("issuer", format!("{issuer} ({cloud})"));
    }
    let path = issuer
        .parse::<http::Uri>()
        .map(|uri| uri.path().to_owned())
        .unwrap_or_default();
    let mut parts = path.trim_matches('/').split('/');
    let (tenant, version) = (parts.next().unwrap_or(""), parts.next());
    if version != Some("v2.0") || parts.next().is_some() {
        return Finding::fail(
            "issuer",
            format!("{issuer} is not an Entra v2.0 issuer ({cloud})"),
            format!(
                "use https://{}/<Directory (tenant) ID>/v2.0",
                cloud.login_host()
            ),
        );
    }
    Finding::pass("issuer", format!("{issuer}: {cloud}; tenant {tenant}"))
}

async fn provider(oidc: &Oidc, redirect_uri: &str) -> Vec<Finding> {
    let discovered = match oidc.discover_once().await {
        Ok(discovered) => discovered,
        Err(e) => {
            return vec![Finding::fail(
                "discovery",
                e.to_string(),
                "check oidc.issuer (the Directory (tenant) ID) and that this host can reach the provider \
                 (DNS, firewall, proxy)",
            )]
        }
    };
    let mut findings = vec![
        Finding::pass("discovery", format!("issuer {}", discovered.issuer)),
        Finding::pass(
            "signing keys",
            format!("{} keys from {}", discovered.keys, discovered.jwks_uri),
        ),
    ];
    findings.push(match oidc.probe_credential().await {
        Ok(()) => Finding::pass(
            "credential",
            "the token endpoint accepted the app's credential",
        ),
        Err(SignInError::Refused { error, description }) => {
            let page = explain::provider_error(
                &error,
                description.as_deref(),
                redirect_uri,
                &Cloud::of_issuer(&oidc.config().issuer),
            );
            let detail = match description {
                Some(d) => format!("{error}: {}", d.lines().next().unwrap_or("")),
                None => error,
            };
            Finding::fail("credential", detail, page.advice.join(" "))
        }
        Err(other) => Finding::fail(
            "credential",
            other.to_string(),
            "check that the provider is reachable",
        ),
    });
    if let Some(finding) = graph(oidc).await {
        findings.push(finding);
    }
    findings
}

/// Whether Microsoft Graph tells the app the groups of users in overage,
/// when it is to be asked (`oidc.groups_overage = "graph"`, on Entra or
/// with `oidc.graph_url`: other providers have no overage).
async fn graph(oidc: &Oidc) -> Option<Finding> {
    let config = oidc.config();
    let graph = oidc.graph()?;
    let url = graph.base();
    let tenant = match config.allowed_tenants.first() {
        Some(tenant) if config.multi_tenant => tenant.clone(),
        _ => crate::idp::provider::issuer_tenant(&config.issuer).unwrap_or_default(),
    };
    Some(match graph.probe(oidc, &tenant).await {
        Ok(()) => Finding::pass(
            "graph",
            format!("{url} answers group look-ups for users in more groups than a token lists"),
        ),
        Err(e) => Finding::fail(
            "graph",
            e.to_string(),
            format!(
                "in the app registration, API permissions: add Microsoft Graph application \
                 permissions {PERMISSIONS} and grant admin consent; or set \
                 oidc.groups_overage = \"deny\""
            ),
        ),
    })
}

async fn upstreams(config: &Config) -> Vec<Finding> {
    let http = match outbound::client(
        config.proxy.ca.as_deref(),
        &config.timeouts,
        &config.proxy.egress,
    ) {
        Ok(http) => http,
        Err(e) => return vec![Finding::fail("upstreams", e.to_string(), "fix proxy.ca")],
    };
    let mut by_upstream: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for route in &config.routes {
        by_upstream
            .entry(route.upstream.to_string())
            .or_default()
            .push(&route.prefix);
    }
    let mut findings = Vec::new();
    for (upstream, prefixes) in by_upstream {
        let check = format!("upstream {upstream}");
        let request = http::Request::get(format!("{upstream}/"))
            .body(Vec::new())
            .expect("a valid URL");
        findings.push(
            match outbound::exchange(&http, request, UPSTREAM_TIMEOUT).await {
                Ok(response) => Finding::pass(
                    check,
                    format!(
                        "answered {} (routes {})",
                        response.status().as_u16(),
                        prefixes.join(", ")
                    ),
                ),
                Err(e) => Finding::fail(
                    check,
                    format!("{e} (routes {})", prefixes.join(", ")),
                    "start the service there, or correct the address in the configuration",
                ),
            },
        );
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    #[test]
    fn acme_says_when_no_challenge_can_reach_this_host() {
        let acme = |challenge| AcmeSettings {
            directory: acme::LETS_ENCRYPT.into(),
            contact: Vec::new(),
            eab: None,
            ca: None,
            challenge,
            names: vec!["console.example.com".into()],
            egress: crate::outbound::Egress::direct(),
        };
        let (alpn, http) = (acme(ChallengeKind::TlsAlpn01), acme(ChallengeKind::Http01));
        // The RustDesk preset: both ports.
        assert!(acme_reachable(&alpn, 443, Some(80)).ok);
        assert!(acme_reachable(&http, 443, Some(80)).ok);
        assert!(acme_reachable(&alpn, 443, None).ok);
        // The other challenge would work: say which.
        let finding = acme_reachable(&alpn, 8443, Some(80));
        assert!(!finding.ok);
        assert!(finding
            .fix
            .unwrap()
            .contains("tls.acme_challenge = \"http-01\""));
        let finding = acme_reachable(&http, 443, Some(8080));
        assert!(finding.fix.unwrap().contains("\"tls-alpn-01\""));
        // Neither.
        for (settings, plain) in [(&alpn, None), (&alpn, Some(8080)), (&http, Some(8080))] {
            let finding = acme_reachable(settings, 8443, plain);
            assert!(!finding.ok);
            assert!(
                finding.detail.contains("console.example.com"),
                "{}",
                finding.detail
            );
            assert!(finding.fix.unwrap().contains("no challenge can succeed"));
        }
    }

    fn judged(chain: Vec<CertificateDer<'static>>) -> Finding {
        judge_chain("certs/tls.crt", &chain, "console.example.com")
    }

    fn params() -> CertificateParams {
        CertificateParams::new(vec!["console.example.com".to_owned()]).unwrap()
    }

    #[test]
    fn every_certificate_failure_is_said_in_plain_words() {
        // What `openssl req -x509` makes: a self-signed CA certificate.
        let mut ca = params();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "A CA of one's own");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let finding = judged(vec![ca.der().clone()]);
        assert!(!finding.ok);
        assert!(
            finding.detail.contains("is a CA certificate"),
            "{}",
            finding.detail
        );
        assert!(finding.fix.unwrap().contains("CA:FALSE"));

        let leaf = params().self_signed(&KeyPair::generate().unwrap()).unwrap();
        let finding = judged(vec![leaf.der().clone()]);
        assert!(
            finding.detail.contains("is self-signed"),
            "{}",
            finding.detail
        );

        let key = KeyPair::generate().unwrap();
        let leaf = params().signed_by(&key, &ca).unwrap();
        let finding = judged(vec![leaf.der().clone()]);
        assert!(
            finding
                .detail
                .contains("intermediate certificate is missing"),
            "{}",
            finding.detail
        );
        let finding = judged(vec![leaf.der().clone(), ca.der().clone()]);
        assert!(
            finding.detail.contains("CA clients do not trust"),
            "{}",
            finding.detail
        );

        let mut old = params();
        old.not_before = rcgen::date_time_ymd(2019, 1, 1);
        old.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let finding = judged(vec![old
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()]);
        assert!(finding.detail.contains("expired on"), "{}", finding.detail);

        let mut early = params();
        early.not_before = rcgen::date_time_ymd(2090, 1, 1);
        early.not_after = rcgen::date_time_ymd(2091, 1, 1);
        let finding = judged(vec![early
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()]);
        assert!(
            finding.detail.contains("is not valid until"),
            "{}",
            finding.detail
        );
    }
}
