//! `authgate check`: the troubleshooting section RustDesk's Azure guide
//! lacks. Each check says pass or fail and, when it fails, what to do:
//! the certificate, the public URL (and the redirect URI to register),
//! the issuer, discovery and keys, the app's credential as the token
//! endpoint judges it, and every upstream.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::CertificateError;
use serde::Serialize;

use crate::config::Config;
use crate::idp::explain;
use crate::idp::provider::{Oidc, SignInError};
use crate::net::tls;
use crate::outbound;

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
    if let Some(oidc_config) = &config.oidc {
        findings.push(issuer_shape(&oidc_config.issuer));
        match outbound::client(oidc_config.ca.as_deref(), &config.timeouts) {
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
    findings
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

fn certificate(config: &Config) -> Finding {
    let tls = &config.tls;
    let path = tls.cert.display();
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
    match verify_chain(&key.cert, &host) {
        Ok(()) => Finding::pass(
            "certificate",
            format!("{path} covers {host}, is in date, and chains to a trusted CA"),
        ),
        Err(e) => {
            let (detail, fix) = match e {
                rustls::Error::InvalidCertificate(CertificateError::Expired) => (
                    format!("{path} has expired"),
                    "renew it; authgate picks up the new files without a restart".to_owned(),
                ),
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => (
                    format!("{path} does not cover {host}"),
                    format!("use a certificate for {host}, or set public_url to a name it covers"),
                ),
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => (
                    format!("{path} is self-signed, from an untrusted CA, or lacks its intermediate certificates"),
                    "use the full chain (fullchain.pem for Let's Encrypt) from a publicly trusted CA: \
                     RustDesk clients refuse others"
                        .to_owned(),
                ),
                other => (format!("{path}: {other}"), "use a valid certificate for public_url".to_owned()),
            };
            Finding::fail("certificate", detail, fix)
        }
    }
}

/// The chain as a client would judge it: system roots, the host name, now.
fn verify_chain(
    chain: &[rustls::pki_types::CertificateDer<'static>],
    host: &str,
) -> Result<(), rustls::Error> {
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

/// Entra issuers look like `https://login.microsoftonline.com/<tenant>/v2.0`.
fn issuer_shape(issuer: &str) -> Finding {
    let Some(rest) = issuer.strip_prefix("https://login.microsoftonline.com/") else {
        return Finding::pass(
            "issuer",
            format!("{issuer} (not Microsoft Entra ID; generic OpenID Connect)"),
        );
    };
    let mut parts = rest.trim_end_matches('/').split('/');
    let (tenant, version) = (parts.next().unwrap_or(""), parts.next());
    if version != Some("v2.0") || parts.next().is_some() {
        return Finding::fail(
            "issuer",
            format!("{issuer} is not an Entra v2.0 issuer"),
            "use https://login.microsoftonline.com/<Directory (tenant) ID>/v2.0",
        );
    }
    match tenant {
        "common" | "organizations" | "consumers" => Finding::pass(
            "issuer",
            format!("{issuer}: several tenants, limited to oidc.allowed_tenants"),
        ),
        _ => Finding::pass("issuer", format!("{issuer}: tenant {tenant}")),
    }
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
            let page = explain::provider_error(&error, description.as_deref(), redirect_uri);
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
    findings
}

async fn upstreams(config: &Config) -> Vec<Finding> {
    let http = match outbound::client(config.proxy.ca.as_deref(), &config.timeouts) {
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
