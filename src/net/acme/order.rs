//! Talking to the CA: the account (made once, kept under `state_dir`),
//! and one order from new to certificate.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse,
    CertificateIdentifier, ChallengeType, ExternalAccountKey, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};

use super::{
    AcmeError, AcmeSettings, ChallengeKind, Challenges, ANSWERS_LIFETIME, ANSWERS_SPREAD,
    SHARED_ANSWERS,
};
use crate::auth::session::Shared;
use crate::outbound;
use crate::state::{StateDir, ACME_ACCOUNT_FILE};

/// Each request to the CA; an order polls with its own deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a shared account is kept unused (ACME accounts do not expire).
const ACCOUNT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Largest answer read from the CA (a chain is a few KiB).
const MAX_BODY: usize = 1024 * 1024;
/// How long the CA may take to validate, then to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);

/// The gateway's own HTTPS client (system roots plus `tls.acme_ca`) in
/// the shape the ACME crate asks for.
#[derive(Clone)]
pub(super) struct Http(Client<outbound::Connector, BodyWrapper<Bytes>>);

impl Http {
    pub(super) fn new(
        settings: &AcmeSettings,
        timeouts: &crate::net::Timeouts,
    ) -> Result<Http, outbound::ClientError> {
        Ok(Http(
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .build(outbound::connector(
                    settings.ca.as_deref(),
                    timeouts,
                    &settings.egress,
                )?),
        ))
    }
}

impl instant_acme::HttpClient for Http {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().to_string();
        let sent = self.0.request(req);
        Box::pin(async move {
            let failed =
                |message: String| instant_acme::Error::Other(format!("{uri}: {message}").into());
            match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
                Ok(Ok(response)) => Ok(BytesResponse::from(
                    response.map(|body| http_body_util::Limited::new(body, MAX_BODY)),
                )),
                Ok(Err(e)) => Err(failed(outbound::error_chain(&e))),
                Err(_) => Err(failed(format!("no answer within {REQUEST_TIMEOUT:?}"))),
            }
        })
    }
}

/// The account as kept in `state_dir`: its credentials and the directory
/// they belong to (another directory means another account).
#[derive(Serialize, Deserialize)]
struct KeptAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The account for the configured directory: the one kept here, else
/// the one replicas share, else a new one (with the contact and external
/// account binding), kept at once.
pub(super) async fn account(
    settings: &AcmeSettings,
    state: &StateDir,
    http: &Http,
    shared: Option<&Shared>,
) -> Result<Account, AcmeError> {
    let builder = || Account::builder_with_http(Box::new(http.clone()));
    let ours = |kept: &KeptAccount| kept.directory == settings.directory;
    let mut kept = state
        .read(ACME_ACCOUNT_FILE)?
        .and_then(|bytes| serde_json::from_slice::<KeptAccount>(&bytes).ok())
        .filter(ours);
    if let (None, Some(shared)) = (&kept, shared) {
        kept = shared
            .get::<KeptAccount>(&shared_account(settings))
            .await?
            .filter(ours);
        if let Some(kept) = &kept {
            state.write_private(ACME_ACCOUNT_FILE, &account_json(kept))?;
        }
    }
    if let Some(kept) = kept {
        return Ok(builder().from_credentials(kept.credentials).await?);
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let binding = settings
        .eab
        .as_ref()
        .map(|eab| ExternalAccountKey::new(eab.kid.clone(), &eab.hmac_key));
    let (account, credentials) = builder()
        .create(
            &NewAccount {
                contact: &contact,
                // Enabling ACME is the admin's agreement to the CA's terms
                // (the README says so).
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            binding.as_ref(),
        )
        .await?;
    let kept = KeptAccount {
        directory: settings.directory.clone(),
        credentials,
    };
    state.write_private(ACME_ACCOUNT_FILE, &account_json(&kept))?;
    if let Some(shared) = shared {
        shared
            .put(&shared_account(settings), &kept, ACCOUNT_LIFETIME)
            .await?;
    }
    tracing::info!(directory = %settings.directory, account = account.id(), "ACME account created");
    Ok(account)
}

fn account_json(kept: &KeptAccount) -> Vec<u8> {
    serde_json::to_vec(kept).expect("credentials serialize")
}

fn shared_account(settings: &AcmeSettings) -> String {
    format!("acme:account:{}", settings.directory)
}

/// A certificate chain and its key, both PEM.
pub(super) struct Issued {
    pub chain: String,
    pub key: String,
}

/// One order: answers each authorization's challenge, waits for the CA
/// to validate, sends a CSR for a fresh key and fetches the chain.
pub(super) async fn issue(
    account: &Account,
    settings: &AcmeSettings,
    challenges: &Challenges,
    shared: Option<&Shared>,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, AcmeError> {
    let identifiers: Vec<Identifier> = settings
        .names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => Identifier::Ip(ip),
            Err(_) => Identifier::Dns(name.clone()),
        })
        .collect();
    let mut new = NewOrder::new(&identifiers);
    if let Some(replaces) = replaces {
        new = new.replaces(replaces);
    }
    let mut order = account.new_order(&new).await?;
    let published = Published(challenges);

    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        let name = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            status => return Err(AcmeError::Authorization { name, status }),
        }
        let kind = settings.challenge;
        let mut challenge = authorization
            .challenge(match kind {
                ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
                ChallengeKind::Http01 => ChallengeType::Http01,
            })
            .ok_or_else(|| AcmeError::NoChallenge {
                name: name.clone(),
                kind,
            })?;
        let key_authorization = challenge.key_authorization();
        match kind {
            ChallengeKind::TlsAlpn01 => published
                .0
                .publish_tls_alpn(&name, key_authorization.digest().as_ref())?,
            ChallengeKind::Http01 => published
                .0
                .publish_http(&challenge.token, key_authorization.as_str()),
        }
        if let Some(shared) = shared {
            shared
                .put(SHARED_ANSWERS, &challenges.answers(), ANSWERS_LIFETIME)
                .await?;
            // The CA may reach any replica: let each mirror the answer.
            tokio::time::sleep(ANSWERS_SPREAD).await;
        }
        challenge.set_ready().await?;
    }

    let retries = RetryPolicy::new().timeout(VALIDATION_TIMEOUT);
    if order.poll_ready(&retries).await? != OrderStatus::Ready {
        return Err(AcmeError::Invalid(why_invalid(&mut order).await));
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(settings.names.clone())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await?;
    let chain = order.poll_certificate(&retries).await?;
    drop(published);
    Ok(Issued {
        chain,
        key: key.serialize_pem(),
    })
}

/// Takes the challenge answers down however the order ends.
struct Published<'a>(&'a Challenges);

impl Drop for Published<'_> {
    fn drop(&mut self) {
        self.0.withdraw();
    }
}

/// What the CA said about the challenges of a failed order, e.g.
/// "localhost: Connection refused".
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let name = authorization.identifier().to_string();
        if let Ok(state) = authorization.refresh().await {
            reasons.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|c| c.error.as_ref())
                    .map(|problem| format!("{name}: {problem}")),
            );
        }
    }
    if reasons.is_empty() {
        "the CA refused the order without saying why".into()
    } else {
        reasons.join("; ")
    }
}
