//! The signed identity assertion (`headers.assertion`): a short-lived
//! ES256 JWT on each signed-in request saying who the user is, for an
//! upstream that can be reached other than through the gateway and must
//! tell the gateway's word from a header anyone could send. The upstream
//! verifies it with the public keys published at `jwks.json` under the
//! gateway prefix, `iss` = `public_url`, `aud` = its own origin.
//!
//! Keys rotate (`headers.assertion_key_rotation`) with overlap: a new key
//! is published [`AHEAD`] before it signs, longer than upstreams may cache
//! the key set, and an old one stays published until the last assertion
//! it signed has expired. Which key signs and which are published follows
//! from the keys' ages alone, so replicas that keep the same key ring
//! agree without talking. The ring is kept under `state_dir`, so a restart
//! keeps what upstreams cached, or with the Redis session store there, so
//! that every replica signs with the same keys and publishes the same set.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::identity::Identity;
use super::session::{Shared, StoreError};
use crate::clock::now;
use crate::state::{StateDir, StateError};

/// The key ring under `state_dir`.
pub const KEYS_FILE: &str = "assertion-keys.json";
/// How long an assertion is valid: short, so that a leaked one is soon
/// worth nothing, and well within the 5 minutes upstreams are promised.
const LIFETIME: u64 = 4 * 60;
/// A cached assertion is signed anew once this little of it is left, so
/// that none reaches an upstream about to expire.
const RENEW_WITHIN: u64 = 60;
/// How long a new key is published before it signs: more than the
/// `max-age` of `jwks.json` (300 s), so every cached key set holds it.
pub const AHEAD: u64 = 10 * 60;
/// How long a key stays published after it stopped signing: its last
/// assertion's lifetime and a minute of clock skew.
const RETIRE_AFTER: u64 = LIFETIME + 60;
/// How often the ring is looked at for a key due, or one another replica
/// made.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// The ring's name among what replicas share, and its lock's.
const SHARED_KEYS: &str = "assertion-keys";
const SHARED_KEYS_LOCK: &str = "assertion-keys-lock";
/// How long a replica waits for another that is writing the shared ring.
const SHARED_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0} holds an assertion signing key that is not a P-256 PKCS#8 key; remove it to have new keys made")]
    BadKey(String),
    #[error("cannot share the assertion signing keys with the other replicas through the session store: {0}")]
    Shared(#[from] StoreError),
    #[error("another replica took the lock to write the shared assertion signing keys and wrote none within {0:?}")]
    SharedTimeout(Duration),
    #[error("cannot make an assertion signing key")]
    Generate,
}

/// The keys as kept: when each was made (Unix seconds) and its PKCS#8
/// DER, base64url; oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Kept {
    keys: Vec<KeptKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeptKey {
    made: u64,
    pkcs8: String,
}

/// One key, ready to sign.
struct Key {
    made: u64,
    encoding: EncodingKey,
    header: Header,
    /// The public key as a JWK (RFC 7517), for `jwks.json`.
    jwk: serde_json::Value,
}

/// The keys in use, oldest first, and the kept form they came from.
struct Ring {
    kept: Kept,
    keys: Vec<Key>,
}

/// Where the ring is kept.
enum Keeper {
    State(StateDir),
    Shared(Box<Shared>),
}

/// Signs assertions for one gateway.
pub struct Assertions {
    ring: RwLock<Arc<Ring>>,
    keeper: Keeper,
    /// How long a key signs before the next one takes over.
    rotation: u64,
    issuer: String,
}

/// An assertion made for a session, kept with it until it is due for
/// renewal.
#[derive(Debug)]
pub struct Signed {
    audience: Arc<str>,
    renew_at: u64,
    value: HeaderValue,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    oid: &'a str,
    preferred_username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tid: Option<&'a str>,
    /// Absent when the user's groups are unknown (overage unresolved),
    /// which `groups_overage` then says: never an empty list for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups_overage: Option<&'a str>,
    roles: &'a [String],
    iat: u64,
    exp: u64,
}

impl Assertions {
    /// `issuer`: `public_url`; `rotation`: how long each key signs. The
    /// ring is `shared`'s when given (Redis), else the one under `state`;
    /// a key is made when none is kept or one is due.
    pub async fn load(
        state: &StateDir,
        shared: Option<Shared>,
        issuer: String,
        rotation: Duration,
    ) -> Result<Assertions, AssertionError> {
        let keeper = match shared {
            Some(shared) => Keeper::Shared(Box::new(shared)),
            None => Keeper::State(state.clone()),
        };
        let rotation = rotation.as_secs();
        let kept = keeper.current(None, rotation).await?;
        let ring = Ring::open(kept, &keeper)?;
        Ok(Assertions {
            ring: RwLock::new(Arc::new(ring)),
            keeper,
            rotation,
            issuer,
        })
    }

    /// Looks at the ring every minute: makes the next key when one is due,
    /// takes up one another replica made, lets retired keys go. A ring that
    /// cannot be read or written is logged and the keys in hand serve on.
    pub async fn keep_current(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if let Err(e) = self.rotate().await {
                tracing::warn!(error = %e, "assertion signing keys not brought up to date; trying again in a minute");
            }
        }
    }

    /// One look at the ring.
    async fn rotate(&self) -> Result<(), AssertionError> {
        let ring = self.ring();
        let kept = self.keeper.current(Some(&ring.kept), self.rotation).await?;
        if kept != ring.kept {
            let ring = Ring::open(kept, &self.keeper)?;
            *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        }
        Ok(())
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The key set upstreams verify with: every key not yet retired.
    pub fn jwks(&self) -> serde_json::Value {
        let ring = self.ring();
        let keys: Vec<&serde_json::Value> = ring.published(now()).map(|k| &k.jwk).collect();
        serde_json::json!({ "keys": keys })
    }

    /// An assertion about `identity` for the upstream at `audience`
    /// (its origin), valid from now.
    pub fn sign(&self, identity: &Identity, audience: &str) -> Option<Signed> {
        let iat = now();
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            sub: &identity.subject,
            oid: &identity.user_id,
            preferred_username: &identity.username,
            email: identity.email.as_deref(),
            name: identity.name.as_deref(),
            tid: identity.tenant.as_deref(),
            groups: (!identity.groups_unknown()).then_some(&identity.groups[..]),
            groups_overage: identity.groups_unknown().then_some("unresolved"),
            roles: &identity.roles,
            iat,
            exp: iat + LIFETIME,
        };
        let ring = self.ring();
        let key = ring.signing(iat);
        let token = jsonwebtoken::encode(&key.header, &claims, &key.encoding)
            .inspect_err(|e| tracing::error!(error = %e, "cannot sign an identity assertion"))
            .ok()?;
        Some(Signed {
            audience: audience.into(),
            renew_at: iat + LIFETIME - RENEW_WITHIN,
            value: HeaderValue::try_from(token).ok()?,
        })
    }

    /// The assertion kept in `kept` for `audience` while it is fresh,
    /// else a new one, kept there for the next request.
    pub fn for_session(
        &self,
        kept: &std::sync::Mutex<Option<Signed>>,
        identity: &Identity,
        audience: &str,
    ) -> Option<HeaderValue> {
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(signed) = kept
            .as_ref()
            .filter(|s| &*s.audience == audience && now() < s.renew_at)
        {
            return Some(signed.value.clone());
        }
        let signed = self.sign(identity, audience)?;
        let value = signed.value.clone();
        *kept = Some(signed);
        Some(value)
    }

    /// A new assertion, not kept (bearer requests).
    pub fn once(&self, identity: &Identity, audience: &str) -> Option<HeaderValue> {
        self.sign(identity, audience).map(|s| s.value)
    }
}

impl Ring {
    /// The keys of `kept`, checked.
    fn open(kept: Kept, keeper: &Keeper) -> Result<Ring, AssertionError> {
        let keys = kept
            .keys
            .iter()
            .map(|k| Key::open(k).ok_or_else(|| AssertionError::BadKey(keeper.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Ring { kept, keys })
    }

    /// The key that signs at `now`.
    fn signing(&self, now: u64) -> &Key {
        let made: Vec<u64> = self.keys.iter().map(|k| k.made).collect();
        &self.keys[signing(&made, now)]
    }

    fn published(&self, now: u64) -> impl Iterator<Item = &Key> {
        let made: Vec<u64> = self.keys.iter().map(|k| k.made).collect();
        let from = first_published(&made, now);
        self.keys[from..].iter()
    }
}

/// Which of the keys made at `made` (oldest first, never empty) signs at
/// `now`: the newest published at least [`AHEAD`] ago; the oldest if
/// none is (a clock set back).
fn signing(made: &[u64], now: u64) -> usize {
    made.iter().rposition(|&m| m + AHEAD <= now).unwrap_or(0)
}

/// The first of the keys made at `made` still published at `now`: every
/// key from the one signing on, and before it those whose successor
/// started signing less than [`RETIRE_AFTER`] ago.
fn first_published(made: &[u64], now: u64) -> usize {
    let signing = signing(made, now);
    (0..signing)
        .find(|&i| now < made[i + 1] + AHEAD + RETIRE_AFTER)
        .unwrap_or(signing)
}

/// `kept`, with a new key when none is or the newest has signed for
/// `rotation`, and without the keys retired at `now`; `None` when
/// nothing changes. The first key signs at once (no upstream has a key
/// set yet): it is dated [`AHEAD`] back.
fn next(kept: &Kept, now: u64, rotation: u64) -> Result<Option<Kept>, AssertionError> {
    let made: Vec<u64> = kept.keys.iter().map(|k| k.made).collect();
    let due = match made.last() {
        None => Some(now.saturating_sub(AHEAD)),
        Some(&newest) if newest + AHEAD + rotation <= now => Some(now),
        Some(_) => None,
    };
    let retired = if made.is_empty() {
        0
    } else {
        first_published(&made, now)
    };
    if due.is_none() && retired == 0 {
        return Ok(None);
    }
    let mut keys = kept.keys[retired..].to_vec();
    if let Some(made) = due {
        keys.push(KeptKey {
            made,
            pkcs8: URL_SAFE_NO_PAD.encode(new_key()?),
        });
    }
    Ok(Some(Kept { keys }))
}

impl Key {
    fn open(kept: &KeptKey) -> Option<Key> {
        let der = URL_SAFE_NO_PAD.decode(&kept.pkcs8).ok()?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).ok()?;
        // An uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 65 {
            return None;
        }
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..]),
        );
        // RFC 7638: the thumbprint hashes the required members, sorted.
        let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            thumbprint.as_bytes(),
        ));
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.clone());
        Some(Key {
            made: kept.made,
            encoding: EncodingKey::from_ec_der(&der),
            header,
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": x, "y": y,
                "kid": kid, "alg": "ES256", "use": "sig",
            }),
        })
    }
}

impl std::fmt::Display for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keeper::State(state) => write!(f, "{}", state.file(KEYS_FILE).display()),
            Keeper::Shared(_) => f.write_str("the session store"),
        }
    }
}

impl Keeper {
    /// The ring as kept, brought up to date (see [`next`]) and kept so.
    /// `in_hand`: the ring this process last read or wrote; under
    /// `state_dir` no one else writes it, so it is not read again.
    async fn current(&self, in_hand: Option<&Kept>, rotation: u64) -> Result<Kept, AssertionError> {
        match self {
            Keeper::State(state) => {
                let kept = match in_hand {
                    Some(kept) => kept.clone(),
                    None => match state.read(KEYS_FILE)? {
                        Some(text) => serde_json::from_slice(&text)
                            .map_err(|_| AssertionError::BadKey(self.to_string()))?,
                        None => Kept::default(),
                    },
                };
                match next(&kept, now(), rotation)? {
                    Some(next) => {
                        let text = serde_json::to_vec(&next).expect("keys serialize");
                        state.write_private(KEYS_FILE, &text)?;
                        Ok(next)
                    }
                    None => Ok(kept),
                }
            }
            Keeper::Shared(shared) => shared_current(shared, rotation).await,
        }
    }
}

/// The replicas' ring: as kept in the store when up to date, else brought
/// up to date by this replica under a lock, so that two at once do not
/// each make a key.
async fn shared_current(shared: &Shared, rotation: u64) -> Result<Kept, AssertionError> {
    let started = Instant::now();
    loop {
        let kept = shared.get::<Kept>(SHARED_KEYS).await?.unwrap_or_default();
        if next(&kept, now(), rotation)?.is_none() {
            return Ok(kept);
        }
        if let Some(token) = shared.lock(SHARED_KEYS_LOCK, SHARED_WAIT).await? {
            let written = write_shared(shared, rotation).await;
            shared.unlock(SHARED_KEYS_LOCK, &token).await;
            return written;
        }
        if started.elapsed() > SHARED_WAIT {
            return Err(AssertionError::SharedTimeout(SHARED_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Under the lock: the ring as another replica may just have written it,
/// brought up to date and kept for two rotations (each rotation writes it
/// anew).
async fn write_shared(shared: &Shared, rotation: u64) -> Result<Kept, AssertionError> {
    let kept = shared.get::<Kept>(SHARED_KEYS).await?.unwrap_or_default();
    let Some(next) = next(&kept, now(), rotation)? else {
        return Ok(kept);
    };
    let lifetime = Duration::from_secs(2 * (rotation + AHEAD));
    shared.put(SHARED_KEYS, &next, lifetime).await?;
    Ok(next)
}

/// A new P-256 key, PKCS#8 DER.
fn new_key() -> Result<Vec<u8>, AssertionError> {
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| AssertionError::Generate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::advance;

    const DAY: u64 = 24 * 3600;

    fn alice() -> Identity {
        Identity {
            subject: "sub-1".into(),
            user_id: "oid-1".into(),
            username: "alice@contoso.example".into(),
            email: None,
            name: None,
            tenant: None,
            groups: vec![],
            roles: vec![],
            groups_overage: false,
            groups_from_graph: false,
            acrs: Vec::new(),
            app: false,
        }
    }

    fn kids(assertions: &Assertions) -> Vec<String> {
        let jwks = assertions.jwks();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    fn signer(assertions: &Assertions) -> String {
        let signed = assertions.once(&alice(), "http://console").unwrap();
        jsonwebtoken::decode_header(signed.to_str().unwrap())
            .unwrap()
            .kid
            .unwrap()
    }

    #[test]
    fn a_key_is_published_before_it_signs_and_after_it_stopped() {
        let made = [1_000, 1_000 + DAY];
        let second_signs = made[1] + AHEAD;
        assert_eq!(signing(&made, second_signs - 1), 0);
        assert_eq!(first_published(&made, second_signs - 1), 0);
        assert_eq!(signing(&made, second_signs), 1);
        assert_eq!(first_published(&made, second_signs), 0, "still verifiable");
        assert_eq!(first_published(&made, second_signs + RETIRE_AFTER - 1), 0);
        assert_eq!(first_published(&made, second_signs + RETIRE_AFTER), 1);
        // A clock set back before every key: the oldest signs.
        assert_eq!(signing(&made, 0), 0);
    }

    #[tokio::test]
    async fn the_ring_under_state_dir_rotates_with_overlap_and_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let rotation = Duration::from_secs(DAY);
        let load = || Assertions::load(&state, None, "https://gw".into(), rotation);
        let assertions = load().await.unwrap();
        let first = kids(&assertions);
        assert_eq!(first.len(), 1);
        assert_eq!(signer(&assertions), first[0], "the first key signs at once");

        advance(DAY);
        assertions.rotate().await.unwrap();
        let both = kids(&assertions);
        assert_eq!(both.len(), 2, "the next key is published ahead");
        assert_eq!(signer(&assertions), first[0], "but does not sign yet");

        advance(AHEAD);
        assertions.rotate().await.unwrap();
        assert_eq!(signer(&assertions), both[1]);
        assert_eq!(
            kids(&assertions),
            both,
            "the old key verifies what it signed"
        );

        advance(RETIRE_AFTER);
        assertions.rotate().await.unwrap();
        assert_eq!(kids(&assertions), vec![both[1].clone()], "then it goes");

        let restarted = load().await.unwrap();
        assert_eq!(kids(&restarted), kids(&assertions));
        assert_eq!(signer(&restarted), both[1]);
    }

    #[tokio::test]
    async fn a_ring_that_is_not_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state
            .write_private(KEYS_FILE, b"{\"keys\":[{\"made\":1,\"pkcs8\":\"AAAA\"}]}")
            .unwrap();
        let error = Assertions::load(&state, None, "https://gw".into(), Duration::from_secs(DAY))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains(KEYS_FILE) && error.contains("P-256"),
            "{error}"
        );
    }
}
