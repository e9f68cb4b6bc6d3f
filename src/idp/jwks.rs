//! The provider's signing keys (JWKS), held in a moka cache so however many
//! requests miss at once, one fetch runs. Keys are refreshed in the
//! background; a token whose `kid` is unknown triggers a refetch (keys roll
//! over without notice), rate-limited for attacker-chosen tokens; and the
//! last good set keeps serving while the provider is unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::ops::metrics::Metrics;
use crate::outbound::{self, FetchError, HttpClient};

/// Least time between two refetches caused by unknown `kid`s in tokens
/// an attacker could have chosen (bearer tokens).
const MIN_REFETCH: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("cannot fetch the provider's signing keys: {0}")]
    Fetch(#[from] FetchError),
    #[error("the provider's key set at {uri} is not valid JSON: {message}")]
    Parse { uri: String, message: String },
}

/// Who picked the token being checked, which decides whether a `kid`
/// miss may always refetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Came back from the token endpoint over TLS: not attacker-chosen
    /// (OIDC Core §3.1.3.7), so a login right after a rollover succeeds.
    TokenEndpoint,
    /// Presented by a client: rate-limited.
    Client,
}

/// One usable key.
#[derive(Clone)]
pub struct Key {
    pub decoding: DecodingKey,
    /// The key's own `alg`, when it states one; a token must then match.
    pub algorithm: Option<Algorithm>,
}

#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Key>,
}

impl KeySet {
    fn parse(uri: &str, body: &[u8]) -> Result<KeySet, JwksError> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(body).map_err(|e| JwksError::Parse {
            uri: uri.to_owned(),
            message: e.to_string(),
        })?;
        let mut by_kid = HashMap::new();
        // Keys of other types or uses are skipped, not fatal: a set may
        // publish encryption keys too.
        for value in document.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let signing = matches!(
                jwk.common.public_key_use,
                None | Some(PublicKeyUse::Signature)
            );
            let symmetric = matches!(
                jwk.algorithm,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
            );
            let (Some(kid), true, false) = (jwk.common.key_id.clone(), signing, symmetric) else {
                continue;
            };
            let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let algorithm = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            by_kid.insert(
                kid,
                Key {
                    decoding,
                    algorithm,
                },
            );
        }
        Ok(KeySet { by_kid })
    }

    /// A set made in memory, for tests of what a real provider never
    /// publishes or signs.
    #[cfg(test)]
    pub fn from_keys(keys: Vec<(String, Key)>) -> KeySet {
        KeySet {
            by_kid: keys.into_iter().collect(),
        }
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.by_kid.get(kid)
    }

    pub fn len(&self) -> usize {
        self.by_kid.len()
    }
}

pub struct Jwks {
    metrics: Metrics,
    uri: String,
    http: HttpClient,
    cache: moka::future::Cache<(), Arc<KeySet>>,
    /// Serves while the provider is down.
    last_good: Mutex<Option<Arc<KeySet>>>,
    last_refetch: Mutex<Option<Instant>>,
}

impl Jwks {
    pub fn new(uri: String, http: HttpClient, metrics: Metrics) -> Jwks {
        Jwks {
            metrics,
            uri,
            http,
            cache: moka::future::Cache::new(1),
            last_good: Mutex::new(None),
            last_refetch: Mutex::new(None),
        }
    }

    /// A cache already holding `set`, whose refetches fail (its URI
    /// leads nowhere): for tests.
    #[cfg(test)]
    pub async fn preloaded(set: KeySet) -> Jwks {
        let http = crate::outbound::client(
            None,
            &crate::net::Timeouts::default(),
            &crate::outbound::Egress::direct(),
        )
        .unwrap();
        let jwks = Jwks::new("http://127.0.0.1:9/keys".into(), http, Metrics::default());
        let set = Arc::new(set);
        *jwks.last_good.lock().unwrap() = Some(set.clone());
        jwks.cache.insert((), set).await;
        jwks
    }

    async fn fetch(&self) -> Result<Arc<KeySet>, JwksError> {
        self.metrics.provider_request("keys");
        let fetched = outbound::get_json(&self.http, &self.uri, FETCH_TIMEOUT)
            .await
            .map_err(JwksError::from)
            .and_then(|body| KeySet::parse(&self.uri, &body));
        Metrics::outcome(
            &self.metrics.jwks_fetches,
            if fetched.is_ok() {
                "success"
            } else {
                "failure"
            },
        );
        let set = Arc::new(fetched?);
        tracing::info!(keys = set.len(), uri = %self.uri, "fetched the provider's signing keys");
        *self.last_good.lock().unwrap_or_else(|e| e.into_inner()) = Some(set.clone());
        Ok(set)
    }

    /// The cached set, fetched once if there is none.
    pub async fn current(&self) -> Result<Arc<KeySet>, JwksError> {
        match self.cache.try_get_with((), self.fetch()).await {
            Ok(set) => Ok(set),
            Err(e) => match self
                .last_good
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                Some(stale) => {
                    tracing::warn!(error = %e, "serving the last known signing keys");
                    Ok(stale)
                }
                None => Err((*e).clone()),
            },
        }
    }

    /// Fetches anew and replaces the cached set; on failure the old set
    /// stays.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let set = self.fetch().await?;
        self.cache.insert((), set).await;
        Ok(())
    }

    /// The key named `kid`, refetching the set once when it is unknown
    /// and the rate limit for `source` allows.
    pub async fn key(&self, kid: &str, source: Source) -> Result<Option<Key>, JwksError> {
        if let Some(key) = self.current().await?.get(kid) {
            return Ok(Some(key.clone()));
        }
        if source == Source::Client && !self.may_refetch() {
            return Ok(None);
        }
        tracing::info!(
            kid,
            "token signed with an unknown key; refetching the key set"
        );
        self.cache.invalidate(&()).await;
        Ok(self.current().await?.get(kid).cloned())
    }

    fn may_refetch(&self) -> bool {
        let mut last = self.last_refetch.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < MIN_REFETCH) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Keeps the keys fresh: refetches every `every`, logging failures.
    pub async fn refresh_periodically(self: Arc<Self>, every: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            ticks.tick().await;
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "signing key refresh failed; keeping the current keys");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_chosen_key_misses_refetch_at_a_limited_rate() {
        let jwks = Jwks::preloaded(KeySet::default()).await;
        assert!(jwks.may_refetch(), "the first miss may refetch");
        assert!(!jwks.may_refetch(), "a second miss right after may not");
        // Within the limit an unknown client-chosen kid finds no key and
        // sends nothing to the provider.
        assert!(jwks
            .key("forged-kid", Source::Client)
            .await
            .unwrap()
            .is_none());
    }
}
