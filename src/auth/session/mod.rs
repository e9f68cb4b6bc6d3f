//! Sessions: who is signed in and their tokens, and the short-lived login
//! state of each sign-in in flight.
//!
//! Where they live is `session.store`:
//! - `embedded` (the default, one file under `state_dir`) or `redis`
//!   (shared by replicas): server-side. The cookie carries a random
//!   256-bit id; the store keeps the record under the id's SHA-256, sealed
//!   with the session key, so sign-out and revocation end a session
//!   wherever its cookie was copied.
//! - `cookie`: the whole session sealed into the cookie (the `cookie`
//!   crate's private jar: AEAD, the cookie's name bound in), split across
//!   `<name>`, `<name>.1`… when large. Nothing to keep, nothing to end.
//!
//! Several secrets are accepted for opening, so the secret can be rotated
//! without signing everyone out.

mod embedded;
mod redis;
mod shared;
mod store;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cookie::{Cookie, CookieJar, Key, SameSite};
use http::header::{HeaderValue, COOKIE};
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use self::embedded::Embedded;
pub use self::redis::RedisServers;
use self::redis::{Redis, RedisSettings};
pub use self::shared::Shared;
pub use self::store::StoreError;
use self::store::{Record, Store, StoreKey, Table, Tag};
use crate::auth::identity::{Identity, IdentityValues};
use crate::clock::now;
use crate::ops::metrics::Metrics;
use crate::state::{StateDir, StateError, SESSIONS_FILE, SESSION_SECRET_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A file under `state_dir`.
    Embedded,
    /// A Redis (or Valkey) server, shared by replicas.
    Redis,
    /// The session itself in the cookie; nothing server-side.
    Cookie,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub store: StoreKind,
    /// How long an opened session is used before the store is asked
    /// again.
    pub cache_ttl: Duration,
    /// Secrets for the keys; the first seals, all open. Empty: one is
    /// generated and kept under `state_dir`.
    pub secrets: Vec<Vec<u8>>,
    /// Renew the tokens this long before the ID token expires.
    pub refresh_before: Duration,
    pub cookie_name: String,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    /// Where Redis is, with `store = "redis"`.
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub servers: RedisServers,
    /// The data servers' password (a sentinel's is in its URL).
    pub password: Option<String>,
    /// PEM certificates to trust for `rediss://` (a private CA).
    pub ca: Option<std::path::PathBuf>,
}

/// Bytes of sealed value per cookie: browsers keep at least 4096 bytes
/// per cookie including name and attributes (RFC 6265 §6.1).
const CHUNK: usize = 3800;
/// More chunks than this is not a session we wrote.
const MAX_CHUNKS: usize = 10;
/// A sign-in has this long from the redirect to the callback.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Slide the idle timer (re-issue the cookie, or write the store) at most
/// this often.
const TOUCH_INTERVAL: u64 = 60;
/// Bytes each session cache (opened, re-issued) keeps: thousands of
/// signed-in browsers.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// A sealed value is replaced after `TOUCH_INTERVAL` of use, so one not
/// seen for this long is unlikely to come back.
const OPENED_IDLE: Duration = Duration::from_secs(5 * 60);
/// Expired records are removed from the store this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Serialize, Deserialize)]
pub struct Session {
    pub identity: Identity,
    pub id_token: String,
    pub refresh_token: Option<String>,
    /// When the ID token expires (Unix seconds).
    pub expires_at: u64,
    pub signed_in_at: u64,
    pub last_seen: u64,
    /// The identity headers, built by each thread at its first request of
    /// this session (see [`Session::identity_headers`]).
    #[serde(skip)]
    identity_headers: Mutex<Vec<(ThreadId, Arc<IdentityValues>)>>,
    /// The last signed identity assertion, while fresh.
    #[serde(skip)]
    pub assertion: std::sync::Mutex<Option<crate::auth::assertion::Signed>>,
    /// The provider's session, when its ID token said (`sid`): logouts
    /// from the provider name it.
    #[serde(default)]
    pub sid: Option<String>,
    /// Opened from a cookie and Graph asked again for its groups (see
    /// [`Session::regrouped`]): not asked once more until opened anew.
    #[serde(skip)]
    pub regrouped: bool,
    /// The provider's access token, kept only for `headers.easy_auth_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Where a server-side session is stored; `None` for a new one and
    /// in cookie mode.
    #[serde(skip)]
    key: Option<StoreKey>,
    #[serde(skip)]
    fate: Fate,
}

impl Session {
    pub fn new(
        identity: Identity,
        id_token: String,
        refresh_token: Option<String>,
        expires_at: u64,
    ) -> Session {
        Session {
            identity,
            id_token,
            refresh_token,
            expires_at,
            signed_in_at: now(),
            last_seen: now(),
            identity_headers: Mutex::default(),
            assertion: Default::default(),
            sid: None,
            regrouped: false,
            access_token: None,
            key: None,
            fate: Fate::default(),
        }
    }

    /// The identity headers for this thread's requests, built by `build`
    /// at its first. Their values are cloned into every request: one copy
    /// shared by all had the cores contend for its reference counts, a
    /// copy per connection missed the cache with hundreds of connections;
    /// a copy per worker thread does neither. Opened sessions are cached,
    /// so a thread builds them once per session.
    pub fn identity_headers(&self, build: impl FnOnce() -> IdentityValues) -> Arc<IdentityValues> {
        let thread = std::thread::current().id();
        let mut built = self
            .identity_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, values)) = built.iter().find(|(t, _)| *t == thread) {
            return values.clone();
        }
        let values = Arc::new(build());
        built.push((thread, values.clone()));
        values
    }

    /// The provider's session this one belongs to.
    pub fn with_sid(self, sid: Option<String>) -> Session {
        Session { sid, ..self }
    }

    /// The access token that came with the ID token, to keep.
    pub fn with_access_token(self, access_token: Option<String>) -> Session {
        Session {
            access_token,
            ..self
        }
    }

    /// The same session with new tokens, kept where it was.
    pub fn renewed(
        &self,
        identity: Identity,
        id_token: String,
        refresh_token: Option<String>,
        expires_at: u64,
    ) -> Session {
        Session {
            signed_in_at: self.signed_in_at,
            sid: self.sid.clone(),
            key: self.key,
            ..Session::new(identity, id_token, refresh_token, expires_at)
        }
    }

    /// This session with `identity` (its groups told by Graph again),
    /// nothing else changed.
    pub fn regrouped(&self, identity: Identity) -> Session {
        Session {
            last_seen: self.last_seen,
            regrouped: true,
            ..self
                .renewed(
                    identity,
                    self.id_token.clone(),
                    self.refresh_token.clone(),
                    self.expires_at,
                )
                .with_access_token(self.access_token.clone())
        }
    }

    /// This session, seen now.
    fn seen_now(&self) -> Session {
        self.renewed(
            self.identity.clone(),
            self.id_token.clone(),
            self.refresh_token.clone(),
            self.expires_at,
        )
        .with_access_token(self.access_token.clone())
    }
}

/// What became of an opened server-side session: still the stored one,
/// replaced by a newer copy (touched, renewed), or ended here. Opened
/// sessions are shared by the cache and connections, so ending one here
/// ends it for every request in this process at once.
#[derive(Debug, Default)]
struct Fate(AtomicU8);

const CURRENT: u8 = 0;
const SUPERSEDED: u8 = 1;
const ENDED: u8 = 2;

impl Fate {
    fn is_current(&self) -> bool {
        self.0.load(Ordering::Relaxed) == CURRENT
    }

    fn is_ended(&self) -> bool {
        self.0.load(Ordering::Relaxed) == ENDED
    }

    /// `true` for the one caller that replaced a current session.
    fn supersede(&self) -> bool {
        self.0
            .compare_exchange(CURRENT, SUPERSEDED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    fn end(&self) {
        self.0.store(ENDED, Ordering::Relaxed);
    }
}

/// What the callback needs to finish a sign-in this browser started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginState {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    /// A path on this origin, checked when it was recorded.
    pub return_to: String,
    /// The link asked for was too long to carry: `return_to` is its path
    /// without the query (or `/`), and the user is told.
    #[serde(default)]
    pub shortened: bool,
    /// The authentication contexts this sign-in asked for (a step-up),
    /// which its ID token must carry in `acrs`.
    #[serde(default)]
    pub step_up: Vec<String>,
    pub started_at: u64,
}

/// A session as the admin endpoint lists it: never its id or tokens.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// A short name of the session (from its key, not its id).
    pub handle: String,
    pub user: String,
    pub user_id: String,
    pub name: Option<String>,
    pub tenant: Option<String>,
    pub signed_in_at: u64,
    pub last_seen: u64,
    pub expires_at: u64,
    /// Whether its ID token named the provider's session (`sid`), which
    /// front-channel logout needs.
    pub provider_session: bool,
}

/// What `begin_renewal` found.
pub enum Renewal {
    /// Renew now, then `end_renewal`.
    Go(RenewalLock),
    /// Another instance renewed it: the result.
    Done(Arc<Session>),
    /// Another instance is renewing it now: go on with it as it is.
    Busy,
    /// It was ended elsewhere.
    Ended,
}

/// The renewal lock of a session, when the store has one.
pub struct RenewalLock {
    held: Option<(StoreKey, String)>,
}

/// Whose sessions to end.
#[derive(Debug, Clone)]
pub enum Who {
    /// A user by UPN (any case) or object id.
    User(String),
    /// One session by its listed handle.
    Session(String),
    /// Every session of the provider's user `sub` (a logout token's).
    Subject(String),
    /// The sessions of the provider's session `sid` (a logout's).
    ProviderSession(String),
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "sessions live in their cookies (session.store = \"cookie\"): there is nothing to list \
         or end on the server; set session.store = \"embedded\" (or \"redis\") to keep them \
         server-side"
    )]
    NoStore,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{} does not hold a session secret (32 bytes or more in base64)", .0.display())]
    KeptSecret(std::path::PathBuf),
}

/// A renewal lock outlives a replica that dies holding it this long.
const RENEWAL_LOCK_TTL: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Sessions {
    /// The first key seals; all open.
    keys: Arc<[Key]>,
    name: String,
    idle: Duration,
    lifetime: Duration,
    refresh_before: Duration,
    kept: Kept,
}

#[derive(Clone)]
enum Kept {
    InCookie(Sealed),
    InStore(Stored),
}

/// The caches of cookie mode.
#[derive(Clone)]
struct Sealed {
    /// Sessions already opened, by sealed value. A browser sends the same
    /// cookie with every request, and opening it (base64, AES-GCM, JSON)
    /// was most of the per-request auth work. Only values that
    /// opened are kept and the lifetimes are checked at every use, so a
    /// hit answers exactly what opening again would.
    opened: moka::sync::Cache<String, Arc<Session>, foldhash::fast::RandomState>,
    /// Re-issued cookies by (ID token, last seen) of the session touched.
    reissued: moka::sync::Cache<(String, u64), Arc<Vec<HeaderValue>>, foldhash::fast::RandomState>,
}

type Reading = std::collections::HashMap<
    StoreKey,
    Arc<tokio::sync::OnceCell<Found>>,
    foldhash::fast::RandomState,
>;

#[derive(Clone)]
struct Stored {
    store: Store,
    /// Sessions opened from the store, for at most `cache_ttl`: how long
    /// one ended elsewhere may still be used here.
    opened: moka::sync::Cache<StoreKey, Arc<Session>, foldhash::fast::RandomState>,
    /// Store reads in flight, by key: the connections that miss the cache
    /// for one session at once (its cached copy has just expired) wait
    /// for one read instead of each making its own.
    reading: Arc<Mutex<Reading>>,
    cache_ttl: u64,
    /// One per secret, the first for new tags.
    tag_keys: Arc<[hmac::Key]>,
    lookups: Counter,
    errors: Counter,
}

/// The session cookie one connection sent last, opened, and its `Cookie`
/// header without the gateway's cookies. A browser sends the same header
/// with every request on a connection, so the next one costs a comparison
/// instead of parsing, a cache lookup and a rebuilt header. Over
/// HTTP/2 a browser may send it as several fields (RFC 9113 §8.2.3):
/// compared field by field.
///
/// A remembered session is checked as the cache's are: its lifetimes at
/// every use, and a server-side one for at most `cache_ttl` and only while
/// it is the current copy.
pub struct LastCookie {
    last: Mutex<Option<Remembered>>,
    keep_fields: bool,
}

struct Remembered {
    /// Over HTTP/1.1, copies: slices of the request would keep hyper's
    /// read buffer. Over HTTP/2, the fields themselves: HPACK's table hands
    /// out the same bytes each time a field is repeated, so the next
    /// comparison finds the very same bytes and skips comparing ~2 KB
    /// (twice a request; 0.9% of the HTTP/2 profile).
    fields: Vec<HeaderValue>,
    session: Arc<Session>,
    /// `None` when only the gateway's cookies were in it.
    others: Option<HeaderValue>,
    at: u64,
    /// The session's identity headers for this connection's thread, once
    /// a request has told them.
    identity: Option<Arc<IdentityValues>>,
}

impl LastCookie {
    /// For a connection that speaks HTTP/2 when `http2`, else HTTP/1.1.
    pub fn new(http2: bool) -> LastCookie {
        LastCookie {
            last: Mutex::default(),
            keep_fields: http2,
        }
    }

    fn get<T>(&self, headers: &HeaderMap, f: impl FnOnce(&Remembered) -> T) -> Option<T> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|r| same_fields(headers, &r.fields))
            .map(f)
    }

    fn set(&self, remembered: Remembered) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(remembered);
    }

    /// Sets `session`'s identity headers in `headers`: this thread's copy
    /// (see [`Session::identity_headers`]), built by `build` if none is,
    /// and kept with the remembered session so that the connection's next
    /// requests need no look-up.
    pub fn tell_identity(
        &self,
        session: &Arc<Session>,
        build: impl FnOnce() -> IdentityValues,
        headers: &mut HeaderMap,
    ) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_mut().filter(|r| Arc::ptr_eq(&r.session, session)) {
            Some(remembered) => remembered
                .identity
                .get_or_insert_with(|| session.identity_headers(build))
                .apply(headers),
            None => {
                drop(last);
                session.identity_headers(build).apply(headers);
            }
        }
    }

    fn remember(&self, field: &HeaderValue) -> HeaderValue {
        if self.keep_fields {
            field.clone()
        } else {
            HeaderValue::from_bytes(field.as_bytes()).expect("was a header value")
        }
    }
}

/// Whether `headers` has the `Cookie` fields `kept`, in order. The same
/// bytes are not compared with themselves: a kept field holds its bytes,
/// so no other value can be at their address.
fn same_fields(headers: &HeaderMap, kept: &[HeaderValue]) -> bool {
    let mut sent = headers.get_all(COOKIE).iter().map(HeaderValue::as_bytes);
    kept.iter().map(HeaderValue::as_bytes).all(|kept| {
        sent.next()
            .is_some_and(|s| std::ptr::eq(s, kept) || s == kept)
    }) && sent.next().is_none()
}

/// What reading the session cookie found.
#[derive(Clone)]
pub enum Found {
    None,
    Valid(Arc<Session>),
    /// Present but expired, ended, tampered with, or sealed with an
    /// unknown key.
    Unusable,
    /// The store could not be asked.
    Unavailable,
}

impl Sessions {
    /// Sessions kept as `config.store` says, with their secret from
    /// `state` when the configuration has none.
    pub fn open(
        config: &SessionConfig,
        state: &StateDir,
        metrics: &Metrics,
    ) -> Result<Sessions, OpenError> {
        let mut secrets = config.secrets.clone();
        if secrets.is_empty() {
            let kept = state.secret(SESSION_SECRET_FILE)?;
            let bytes = URL_SAFE_NO_PAD
                .decode(kept.trim_end_matches('='))
                .ok()
                .filter(|b| b.len() >= 32)
                .ok_or_else(|| OpenError::KeptSecret(state.path().join(SESSION_SECRET_FILE)))?;
            secrets.push(bytes);
        }
        let config = SessionConfig {
            secrets,
            ..config.clone()
        };
        let mut sessions = Sessions::in_cookies(&config);
        let store = match (config.store, &config.redis) {
            (StoreKind::Cookie, _) => return Ok(sessions),
            (StoreKind::Embedded, _) => {
                let path = state.prepare()?.join(SESSIONS_FILE);
                Store::Embedded(Embedded::open(&path)?)
            }
            (StoreKind::Redis, redis) => Store::Redis(redis_of(
                redis.as_ref().expect("validated: redis_url is set"),
            )?),
        };
        sessions.kept = Kept::InStore(Stored::new(store, &config, metrics));
        Ok(sessions)
    }

    /// Sessions sealed into their cookies.
    pub fn in_cookies(config: &SessionConfig) -> Sessions {
        Sessions {
            keys: config.secrets.iter().map(|s| Key::derive_from(s)).collect(),
            kept: Kept::InCookie(Sealed {
                opened: moka::sync::Cache::builder()
                    .max_capacity(CACHE_BYTES)
                    // The opened session holds about what its sealed value
                    // (base64 of the same JSON) does: count both.
                    .weigher(|sealed: &String, _: &Arc<Session>| {
                        u32::try_from(2 * sealed.len()).unwrap_or(u32::MAX)
                    })
                    .time_to_idle(OPENED_IDLE)
                    .build_with_hasher(foldhash::fast::RandomState::default()),
                reissued: moka::sync::Cache::builder()
                    .max_capacity(CACHE_BYTES)
                    .weigher(
                        |(id_token, _): &(String, u64), cookies: &Arc<Vec<HeaderValue>>| {
                            let cookies: usize = cookies.iter().map(HeaderValue::len).sum();
                            u32::try_from(id_token.len() + cookies).unwrap_or(u32::MAX)
                        },
                    )
                    .time_to_live(Duration::from_secs(TOUCH_INTERVAL))
                    .build_with_hasher(foldhash::fast::RandomState::default()),
            }),
            name: config.cookie_name.clone(),
            idle: config.idle_timeout,
            lifetime: config.lifetime,
            refresh_before: config.refresh_before,
        }
    }

    /// Removes expired records from the store, every `SWEEP_INTERVAL`.
    pub async fn sweep_periodically(self) {
        let Kept::InStore(stored) = &self.kept else {
            return;
        };
        let mut every = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            every.tick().await;
            match stored.store.sweep().await {
                Ok(0) => {}
                Ok(swept) => tracing::debug!(swept, "expired sessions removed"),
                Err(e) => stored.failed(&e),
            }
        }
    }

    fn seal(&self, name: &str, value: String) -> String {
        let mut jar = CookieJar::new();
        jar.private_mut(&self.keys[0])
            .add(Cookie::new(name.to_owned(), value));
        jar.get(name)
            .map(|c| c.value().to_owned())
            .unwrap_or_default()
    }

    fn unseal(&self, name: &str, sealed: &str) -> Option<String> {
        let jar = CookieJar::new();
        self.keys.iter().find_map(|key| {
            jar.private(key)
                .decrypt(Cookie::new(name.to_owned(), sealed.to_owned()))
                .map(|c| c.value().to_owned())
        })
    }

    /// A record sealed for `key` of `table` (bound to both, so a record
    /// copied under another key does not open).
    fn seal_record(&self, table: Table, key: StoreKey, json: String) -> Vec<u8> {
        self.seal(&record_name(table, key), json).into_bytes()
    }

    fn open_record<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        key: StoreKey,
        record: &Record,
    ) -> Option<T> {
        let sealed = std::str::from_utf8(&record.sealed).ok()?;
        let json = self.unseal(&record_name(table, key), sealed)?;
        serde_json::from_str(&json).ok()
    }

    /// `read`, answered from the connection's last request when the
    /// `Cookie` header is the same.
    pub async fn read_remembering(&self, headers: &HeaderMap, last: &LastCookie) -> Found {
        let bound = match &self.kept {
            Kept::InCookie(_) => u64::MAX,
            Kept::InStore(stored) => stored.cache_ttl,
        };
        let remembered = last.get(headers, |r| {
            (r.session.fate.is_current() && now() < r.at.saturating_add(bound))
                .then(|| r.session.clone())
        });
        if let Some(Some(session)) = remembered {
            return self.check_live(session);
        }
        let found = self.read(headers).await;
        if let Found::Valid(session) = &found {
            self.remember(headers, last, session);
        }
        found
    }

    pub async fn read(&self, headers: &HeaderMap) -> Found {
        match &self.kept {
            Kept::InCookie(sealed) => self.read_sealed(sealed, headers),
            Kept::InStore(stored) => {
                let id = request_cookies(headers)
                    .into_iter()
                    .find(|(n, _)| *n == self.name)
                    .map(|(_, value)| store_key_of(value));
                match id {
                    None => Found::None,
                    Some(None) => Found::Unusable,
                    Some(Some(key)) => self.read_stored(stored, key).await,
                }
            }
        }
    }

    /// The sealed session a request's cookies carry, its chunks joined.
    fn sealed_value<'a>(&self, headers: &'a HeaderMap) -> Option<Cow<'a, str>> {
        let cookies = request_cookies(headers);
        let &(_, first) = cookies.iter().find(|(n, _)| *n == self.name)?;
        // Most sessions fit one cookie: then no copy is needed.
        let mut sealed = Cow::Borrowed(first);
        for i in 1..MAX_CHUNKS {
            match cookies.iter().find(|(n, _)| self.is_chunk(n, i)) {
                Some((_, value)) => sealed.to_mut().push_str(value),
                None => break,
            }
        }
        Some(sealed)
    }

    /// Whether sessions come back from their cookie without the groups
    /// Graph told (cookie mode), to be asked for again.
    pub fn without_graph_groups(&self) -> bool {
        matches!(self.kept, Kept::InCookie(_))
    }

    /// Keeps `session`, opened from `headers`' cookie and completed (its
    /// Graph groups asked for again), as that cookie's session: in the
    /// cache and as the connection's last.
    pub fn completed(&self, headers: &HeaderMap, last: &LastCookie, session: &Arc<Session>) {
        if let (Kept::InCookie(caches), Some(sealed)) = (&self.kept, self.sealed_value(headers)) {
            caches.opened.insert(sealed.into_owned(), session.clone());
        }
        self.remember(headers, last, session);
    }

    fn remember(&self, headers: &HeaderMap, last: &LastCookie, session: &Arc<Session>) {
        let fields = headers.get_all(COOKIE);
        last.set(Remembered {
            fields: fields.iter().map(|v| last.remember(v)).collect(),
            session: session.clone(),
            others: self.others(fields.iter()),
            at: now(),
            identity: None,
        });
    }

    fn read_sealed(&self, caches: &Sealed, headers: &HeaderMap) -> Found {
        let Some(sealed) = self.sealed_value(headers) else {
            return Found::None;
        };
        let session = match caches.opened.get(sealed.as_ref()) {
            Some(session) => session,
            None => {
                let Some(session) = self
                    .unseal(&self.name, &sealed)
                    .and_then(|json| serde_json::from_str::<Session>(&json).ok())
                else {
                    return Found::Unusable;
                };
                let session = Arc::new(session);
                caches.opened.insert(sealed.into_owned(), session.clone());
                session
            }
        };
        self.check_live(session)
    }

    async fn read_stored(&self, stored: &Stored, key: StoreKey) -> Found {
        match stored.opened.get(&key) {
            Some(session) => self.check_live(session),
            // Boxed: the wait and the store's future inline would grow
            // every request's.
            None => Box::pin(self.read_once(stored, key)).await,
        }
    }

    /// Reads `key`, or waits for the read of it in flight.
    async fn read_once(&self, stored: &Stored, key: StoreKey) -> Found {
        let read = stored
            .reading
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_default()
            .clone();
        // A reader dropped before its read ends leaves the cell empty, and
        // the next waiter reads instead.
        let found = read
            .get_or_init(|| self.read_store(stored, key))
            .await
            .clone();
        let mut reading = stored.reading.lock().expect("not poisoned");
        if reading.get(&key).is_some_and(|r| Arc::ptr_eq(r, &read)) {
            reading.remove(&key);
        }
        found
    }

    /// One read of `key` from the store; an opened session is cached
    /// before the read is let go, so no later reader misses both.
    async fn read_store(&self, stored: &Stored, key: StoreKey) -> Found {
        stored.lookups.inc();
        let record = match stored.checked(stored.store.get(Table::Sessions, key).await) {
            Ok(Some(record)) => record,
            Ok(None) => return Found::Unusable,
            Err(_) => return Found::Unavailable,
        };
        let Some(mut session) = self.open_record::<Session>(Table::Sessions, key, &record) else {
            tracing::debug!(session = key.handle(), "a stored session did not open");
            return Found::Unusable;
        };
        session.key = Some(key);
        let session = Arc::new(session);
        stored.opened.insert(key, session.clone());
        self.check_live(session)
    }

    fn check_live(&self, session: Arc<Session>) -> Found {
        if self.is_live(&session) && !session.fate.is_ended() {
            Found::Valid(session)
        } else {
            Found::Unusable
        }
    }

    fn is_live(&self, session: &Session) -> bool {
        now() < self.expiry(session)
    }

    /// When `session` ends unless it is used again.
    fn expiry(&self, session: &Session) -> u64 {
        (session.signed_in_at + self.lifetime.as_secs())
            .min(session.last_seen + self.idle.as_secs())
    }

    /// Whether the tokens should be renewed now: a refresh token is at
    /// hand and the ID token expires within `refresh_before`.
    pub fn due_for_refresh(&self, session: &Session) -> bool {
        session.refresh_token.is_some()
            && now() + self.refresh_before.as_secs() >= session.expires_at
    }

    /// Slides `session`'s idle timer once it is `TOUCH_INTERVAL` old: in
    /// cookie mode the `Set-Cookie` values re-issuing it, in the store a
    /// write in the background (and no cookie).
    ///
    /// A re-issued cookie is sealed once and handed out again for that
    /// interval: a client that keeps sending the old cookie (a script, a
    /// load test) would otherwise have it sealed anew on every request.
    pub fn touch(&self, session: &Arc<Session>, request: &HeaderMap) -> Vec<HeaderValue> {
        if now() < session.last_seen + TOUCH_INTERVAL {
            return Vec::new();
        }
        match &self.kept {
            Kept::InCookie(caches) => {
                // The ID token tells sign-ins (and renewals) apart.
                let key = (session.id_token.clone(), session.last_seen);
                let reissued = caches.reissued.get_with(key, || {
                    Arc::new(self.write_sealed(&Arc::new(session.seen_now()), request))
                });
                reissued.to_vec()
            }
            Kept::InStore(stored) => {
                if let Some(key) = session.key.filter(|_| session.fate.supersede()) {
                    let touched = Arc::new(session.seen_now());
                    stored.opened.insert(key, touched.clone());
                    let record = self.record(&touched, key, stored);
                    let stored = stored.clone();
                    tokio::spawn(async move {
                        if let Err(e) = stored.store.put(Table::Sessions, key, record).await {
                            stored.failed(&e);
                        }
                    });
                }
                Vec::new()
            }
        }
    }

    /// Keeps `session` (new at sign-in, or renewed) and returns it with
    /// the `Set-Cookie` values the response needs: in cookie mode the
    /// session itself; in the store, a new id for a new session and
    /// nothing for a renewed one.
    pub async fn save(
        &self,
        mut session: Session,
        request: &HeaderMap,
    ) -> Result<(Arc<Session>, Vec<HeaderValue>), StoreError> {
        let Kept::InStore(stored) = &self.kept else {
            let session = Arc::new(session);
            let cookies = self.write_sealed(&session, request);
            return Ok((session, cookies));
        };
        let mut cookies = Vec::new();
        let key = match session.key {
            Some(key) => key,
            None => {
                // Every sign-in a new id: one fixed before sign-in is useless.
                let id = crate::random_bytes::<32>();
                let mut cookie = Cookie::new(self.name.clone(), URL_SAFE_NO_PAD.encode(id));
                harden(&mut cookie, SameSite::Lax);
                cookie.set_max_age(cookie::time::Duration::seconds(
                    self.lifetime.as_secs() as i64
                ));
                cookies.push(header(&cookie));
                // Chunks a cookie-mode session left behind.
                cookies.extend(self.stale_chunks(request, 1));
                StoreKey::of(&id)
            }
        };
        session.key = Some(key);
        let record = self.record(&session, key, stored);
        stored.checked(stored.store.put(Table::Sessions, key, record).await)?;
        let session = Arc::new(session);
        if let Some(old) = stored.opened.get(&key) {
            old.fate.supersede();
        }
        stored.opened.insert(key, session.clone());
        Ok((session, cookies))
    }

    fn record(&self, session: &Session, key: StoreKey, stored: &Stored) -> Record {
        let json = serde_json::to_string(session).expect("a session serializes");
        Record {
            expires_at: self.expiry(session),
            tags: stored.session_tags(session),
            sealed: self.seal_record(Table::Sessions, key, json),
        }
    }

    /// Before renewing `session`'s tokens: with a shared store, only the
    /// instance holding the session's lock renews, and only when no other
    /// did meanwhile (a rotated refresh token is spent once).
    pub async fn begin_renewal(&self, session: &Arc<Session>) -> Result<Renewal, StoreError> {
        let (Kept::InStore(stored), Some(key)) = (&self.kept, session.key) else {
            return Ok(Renewal::Go(RenewalLock { held: None }));
        };
        let Some(token) = stored.checked(stored.store.lock(key, RENEWAL_LOCK_TTL).await)? else {
            return Ok(Renewal::Busy);
        };
        let lock = RenewalLock {
            held: Some((key, token)),
        };
        let latest = match stored.checked(stored.store.get(Table::Sessions, key).await) {
            Ok(latest) => latest,
            Err(e) => {
                self.end_renewal(lock).await;
                return Err(e);
            }
        };
        let latest = latest.and_then(|r| self.open_record::<Session>(Table::Sessions, key, &r));
        match latest {
            Some(latest) if latest.refresh_token == session.refresh_token => Ok(Renewal::Go(lock)),
            Some(mut latest) => {
                self.end_renewal(lock).await;
                latest.key = Some(key);
                let latest = Arc::new(latest);
                session.fate.supersede();
                stored.opened.insert(key, latest.clone());
                Ok(Renewal::Done(latest))
            }
            None => {
                self.end_renewal(lock).await;
                stored.forget(key);
                session.fate.end();
                Ok(Renewal::Ended)
            }
        }
    }

    /// Releases what `begin_renewal` took.
    pub async fn end_renewal(&self, lock: RenewalLock) {
        if let (Kept::InStore(stored), Some((key, token))) = (&self.kept, lock.held) {
            // A lock not released expires on its own.
            let _ = stored.checked(stored.store.unlock(key, &token).await);
        }
    }

    /// `true` the first time `marker` is seen before `expires_at` (a
    /// logout token's `jti`: a replayed one is refused), across every
    /// instance sharing the store.
    pub async fn first_use(&self, marker: &[u8], expires_at: u64) -> Result<bool, AdminError> {
        let Kept::InStore(stored) = &self.kept else {
            return Err(AdminError::NoStore);
        };
        let record = Record {
            expires_at,
            tags: Vec::new(),
            sealed: Vec::new(),
        };
        let first = stored
            .store
            .put_new(Table::Seen, StoreKey::of(marker), record)
            .await;
        Ok(stored.checked(first)?)
    }

    /// Whether the store answers; `None` in cookie mode.
    pub async fn store_health(&self) -> Option<Result<(), StoreError>> {
        let Kept::InStore(stored) = &self.kept else {
            return None;
        };
        Some(stored.store.ping().await)
    }

    /// Ends `session` (sign-out, a refused renewal): gone from the store,
    /// and refused from now on by every request of this process that
    /// holds it. Nothing to do in cookie mode.
    pub async fn end(&self, session: &Session) -> Result<(), StoreError> {
        session.fate.end();
        let (Kept::InStore(stored), Some(key)) = (&self.kept, session.key) else {
            return Ok(());
        };
        stored.forget(key);
        stored
            .checked(stored.store.take(Table::Sessions, key).await)
            .map(drop)
    }

    /// The live server-side sessions, of one user (UPN or object id) or
    /// all.
    pub async fn list(&self, user: Option<&str>) -> Result<Vec<Listed>, AdminError> {
        let Kept::InStore(stored) = &self.kept else {
            return Err(AdminError::NoStore);
        };
        let who = user.map_or(Who::All, |user| Who::User(user.to_owned()));
        let records = stored.records_of(&who).await?;
        let mut listed: Vec<Listed> = records
            .iter()
            .filter_map(|(key, record)| {
                let session: Session = self.open_record(Table::Sessions, *key, record)?;
                Some(Listed {
                    handle: key.handle(),
                    user: session.identity.username,
                    user_id: session.identity.user_id,
                    name: session.identity.name,
                    tenant: session.identity.tenant,
                    signed_in_at: session.signed_in_at,
                    last_seen: session.last_seen,
                    expires_at: record.expires_at,
                    provider_session: session.sid.is_some(),
                })
            })
            .collect();
        listed.sort_by(|a, b| {
            a.user
                .cmp(&b.user)
                .then(a.signed_in_at.cmp(&b.signed_in_at))
        });
        Ok(listed)
    }

    /// Ends the sessions of `who`; how many.
    pub async fn revoke(&self, who: &Who) -> Result<usize, AdminError> {
        let Kept::InStore(stored) = &self.kept else {
            return Err(AdminError::NoStore);
        };
        let mut ended = 0;
        for (key, _) in stored.records_of(who).await? {
            stored.forget(key);
            if stored
                .checked(stored.store.take(Table::Sessions, key).await)?
                .is_some()
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Cookie mode's `Set-Cookie` values for `session`, also clearing
    /// chunks of a larger earlier session the request carried.
    /// Groups from Microsoft Graph stay out of the cookie (a user in
    /// thousands of groups would not fit): the session as opened keeps
    /// them, and after it is forgotten they are asked for again
    /// ([`Sessions::without_graph_groups`]).
    fn write_sealed(&self, session: &Arc<Session>, request: &HeaderMap) -> Vec<HeaderValue> {
        let json = if session.identity.groups_from_graph {
            let mut value = serde_json::to_value(&**session).expect("a session serializes");
            value["identity"]["groups"] = serde_json::Value::Array(Vec::new());
            value["identity"]["groups_from_graph"] = false.into();
            value.to_string()
        } else {
            serde_json::to_string(&**session).expect("a session serializes")
        };
        let sealed = self.seal(&self.name, json);
        if let (Kept::InCookie(caches), true) = (&self.kept, session.identity.groups_from_graph) {
            caches.opened.insert(sealed.clone(), session.clone());
        }
        let remaining = (session.signed_in_at + self.lifetime.as_secs()).saturating_sub(now());
        let mut out = Vec::new();
        let chunks: Vec<&str> = sealed
            .as_bytes()
            .chunks(CHUNK)
            .map(|c| std::str::from_utf8(c).expect("sealed values are base64"))
            .collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut cookie = Cookie::new(self.chunk_name(i), *chunk);
            harden(&mut cookie, SameSite::Lax);
            cookie.set_max_age(cookie::time::Duration::seconds(remaining as i64));
            out.push(header(&cookie));
        }
        out.extend(self.stale_chunks(request, chunks.len()));
        out
    }

    /// Removals of the session cookies from the `from`th on that the
    /// request carried.
    fn stale_chunks(&self, request: &HeaderMap, from: usize) -> Vec<HeaderValue> {
        let present = request_cookies(request);
        (from..MAX_CHUNKS)
            .map(|i| self.chunk_name(i))
            .filter(|name| present.iter().any(|(n, _)| *n == name.as_str()))
            .map(removal)
            .collect()
    }

    /// `Set-Cookie` values that remove every session cookie the request had.
    pub fn clear(&self, request: &HeaderMap) -> Vec<HeaderValue> {
        self.stale_chunks(request, 0)
    }
    /// Removes the gateway's own cookies from a request before it goes
    /// upstream: the console has no use for them, and a split session can
    /// be large enough to hit its header limits.
    /// `last` is the connection's, filled by `read_remembering`.
    pub fn strip_own(&self, headers: &mut HeaderMap, last: &LastCookie) {
        let others = last
            .get(headers, |r| r.others.clone())
            .unwrap_or_else(|| self.others(headers.get_all(COOKIE).iter()));
        headers.remove(COOKIE);
        if let Some(others) = others {
            headers.insert(COOKIE, others);
        }
    }

    /// The cookies in `values` that are not the gateway's, as one header.
    fn others<'a>(&self, values: impl Iterator<Item = &'a HeaderValue>) -> Option<HeaderValue> {
        let mut kept = String::new();
        let pairs = values
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim);
        for pair in pairs.filter(|p| !p.is_empty() && !p.starts_with(self.name.as_str())) {
            if !kept.is_empty() {
                kept.push_str("; ");
            }
            kept.push_str(pair);
        }
        (!kept.is_empty())
            .then(|| HeaderValue::try_from(kept).ok())
            .flatten()
    }

    /// Whether `name` is `<name>.<i>`.
    fn is_chunk(&self, name: &str, i: usize) -> bool {
        name.strip_prefix(self.name.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| n.parse() == Ok(i))
    }

    fn chunk_name(&self, i: usize) -> String {
        if i == 0 {
            self.name.clone()
        } else {
            format!("{}.{i}", self.name)
        }
    }

    /// One cookie per sign-in in flight, named after its state, so several
    /// tabs can sign in at once. A `form_post` callback is a cross-site
    /// POST, which only carries `SameSite=None` cookies. With a store the
    /// cookie holds an id and the store the state, so a return path of any
    /// length fits.
    pub async fn write_login(
        &self,
        login: &LoginState,
        cross_site_post: bool,
    ) -> Result<HeaderValue, StoreError> {
        let name = self.login_name(&login.state);
        let json = serde_json::to_string(login).expect("login state serializes");
        let value = match &self.kept {
            Kept::InCookie(_) => self.seal(&name, json),
            Kept::InStore(stored) => {
                let id = crate::random_bytes::<32>();
                let key = StoreKey::of(&id);
                let record = Record {
                    expires_at: login.started_at + LOGIN_TTL.as_secs(),
                    tags: Vec::new(),
                    sealed: self.seal_record(Table::Logins, key, json),
                };
                stored.checked(stored.store.put(Table::Logins, key, record).await)?;
                URL_SAFE_NO_PAD.encode(id)
            }
        };
        let mut cookie = Cookie::new(name, value);
        harden(
            &mut cookie,
            if cross_site_post {
                SameSite::None
            } else {
                SameSite::Lax
            },
        );
        cookie.set_max_age(cookie::time::Duration::seconds(LOGIN_TTL.as_secs() as i64));
        Ok(header(&cookie))
    }

    /// The login state for `state`, if this browser started that sign-in
    /// recently. From the store it is taken: a callback replayed with the
    /// same cookie finds nothing.
    pub async fn take_login(
        &self,
        headers: &HeaderMap,
        state: &str,
    ) -> Result<Option<LoginState>, StoreError> {
        let name = self.login_name(state);
        let Some(value) = request_cookies(headers)
            .into_iter()
            .find(|(n, _)| *n == name.as_str())
            .map(|(_, v)| v.to_owned())
        else {
            return Ok(None);
        };
        let login: Option<LoginState> = match &self.kept {
            Kept::InCookie(_) => self
                .unseal(&name, &value)
                .and_then(|json| serde_json::from_str(&json).ok()),
            Kept::InStore(stored) => {
                let Some(key) = store_key_of(&value) else {
                    return Ok(None);
                };
                stored
                    .checked(stored.store.take(Table::Logins, key).await)?
                    .and_then(|r| self.open_record(Table::Logins, key, &r))
            }
        };
        Ok(login.filter(|l| l.state == state && now() < l.started_at + LOGIN_TTL.as_secs()))
    }

    pub fn clear_login(&self, state: &str) -> HeaderValue {
        removal(self.login_name(state))
    }

    fn login_name(&self, state: &str) -> String {
        // The state is random base64url; a prefix tells sign-ins apart.
        let id: String = state
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect();
        format!("{}-login-{id}", self.name)
    }

    /// Whether sessions live server-side, where they can be listed and
    /// ended.
    pub fn is_stored(&self) -> bool {
        matches!(self.kept, Kept::InStore(_))
    }
}

impl Stored {
    fn new(store: Store, config: &SessionConfig, metrics: &Metrics) -> Stored {
        Stored {
            store,
            opened: moka::sync::Cache::builder()
                .max_capacity(CACHE_BYTES)
                .weigher(|_: &StoreKey, s: &Arc<Session>| {
                    // The tokens are most of it.
                    let tokens = s.id_token.len() + s.refresh_token.as_ref().map_or(0, String::len);
                    u32::try_from(tokens + 512).unwrap_or(u32::MAX)
                })
                .time_to_live(config.cache_ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            reading: Arc::default(),
            cache_ttl: config.cache_ttl.as_secs().max(1),
            tag_keys: config
                .secrets
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s))
                .collect(),
            lookups: metrics.session_store_lookups.clone(),
            errors: metrics.session_store_errors.clone(),
        }
    }

    /// The tags of a new or renewed session, under the first secret.
    fn session_tags(&self, session: &Session) -> Vec<Tag> {
        let identity = &session.identity;
        let mut marks = vec![
            Mark::ObjectId(&identity.user_id),
            Mark::Upn(&identity.username),
            Mark::Subject(&identity.subject),
        ];
        marks.extend(session.sid.as_deref().map(Mark::ProviderSession));
        marks
            .iter()
            .map(|mark| tag(&self.tag_keys[0], mark))
            .collect()
    }

    /// The tags that find sessions by `marks`, under every secret still
    /// accepted (a session tagged before a rotation is found after it).
    fn lookup_tags(&self, marks: &[Mark<'_>]) -> Vec<Tag> {
        self.tag_keys
            .iter()
            .flat_map(|key| marks.iter().map(move |mark| tag(key, mark)))
            .collect()
    }

    /// Drops the cached copy of `key`, ending it for requests holding it.
    fn forget(&self, key: StoreKey) {
        if let Some(session) = self.opened.remove(&key) {
            session.fate.end();
        }
    }

    fn failed(&self, error: &StoreError) {
        self.errors.inc();
        tracing::error!(%error, "session store");
    }

    /// `result` of a store call, its failure counted and logged: every
    /// call goes through here, so callers only decide what to answer.
    fn checked<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        result.inspect_err(|e| self.failed(e))
    }

    /// The live records of `who`'s sessions.
    async fn records_of(&self, who: &Who) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let marks = match who {
            Who::User(user) => vec![Mark::ObjectId(user), Mark::Upn(user)],
            Who::Subject(sub) => vec![Mark::Subject(sub)],
            Who::ProviderSession(sid) => vec![Mark::ProviderSession(sid)],
            Who::Session(handle) => {
                let mut all = self.checked(self.store.sessions().await)?;
                all.retain(|(key, _)| key.handle() == handle.to_ascii_lowercase());
                return Ok(all);
            }
            Who::All => return self.checked(self.store.sessions().await),
        };
        self.checked(self.store.tagged(self.lookup_tags(&marks)).await)
    }
}

fn redis_of(config: &RedisConfig) -> Result<Redis, StoreError> {
    let ca = match &config.ca {
        Some(path) => Some(std::fs::read(path).map_err(|source| StoreError::RedisCa {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    Redis::new(&RedisSettings {
        servers: &config.servers,
        password: config.password.as_deref(),
        ca,
    })
}

/// Whether the configured Redis answers, for `authgate check`; `None`
/// with another store.
pub async fn ping_redis(config: &SessionConfig) -> Option<Result<(), StoreError>> {
    let redis = config
        .redis
        .as_ref()
        .filter(|_| config.store == StoreKind::Redis)?;
    Some(match redis_of(redis) {
        Ok(redis) => redis.ping().await,
        Err(e) => Err(e),
    })
}

/// What a tag finds sessions by.
enum Mark<'a> {
    ObjectId(&'a str),
    /// Any case.
    Upn(&'a str),
    Subject(&'a str),
    /// The provider's session id (`sid`), which its logout messages name.
    ProviderSession(&'a str),
}

/// A keyed hash of `mark`: the store never holds a name or an id in the
/// clear.
fn tag(key: &hmac::Key, mark: &Mark<'_>) -> Tag {
    let upn;
    let (kind, value) = match mark {
        Mark::ObjectId(oid) => ("oid", *oid),
        Mark::Upn(name) => {
            upn = name.to_lowercase();
            ("upn", upn.as_str())
        }
        Mark::Subject(sub) => ("sub", *sub),
        Mark::ProviderSession(sid) => ("sid", *sid),
    };
    let mut message = format!("authgate session tag\0{kind}\0").into_bytes();
    message.extend_from_slice(value.as_bytes());
    let tag = hmac::sign(key, &message);
    Tag::try_from(tag.as_ref()).expect("HMAC-SHA256 is 32 bytes")
}

/// The store key of the id in a session or login cookie.
fn store_key_of(cookie_value: &str) -> Option<StoreKey> {
    let id = URL_SAFE_NO_PAD.decode(cookie_value).ok()?;
    (id.len() == 32).then(|| StoreKey::of(&id))
}

/// What a record is sealed under: its table and key.
fn record_name(table: Table, key: StoreKey) -> String {
    format!("{}:{}", table.name(), store::hex(&key.0))
}

/// `__Host-` cookies: Secure, Path=/, no Domain; never readable by scripts.
fn harden(cookie: &mut Cookie<'_>, same_site: SameSite) {
    cookie.set_secure(true);
    cookie.set_http_only(true);
    cookie.set_path("/");
    cookie.set_same_site(same_site);
}

fn removal(name: String) -> HeaderValue {
    let mut cookie = Cookie::new(name, "");
    harden(&mut cookie, SameSite::Lax);
    cookie.set_max_age(cookie::time::Duration::ZERO);
    header(&cookie)
}

fn header(cookie: &Cookie<'_>) -> HeaderValue {
    HeaderValue::from_str(&cookie.to_string())
        .expect("cookie names and sealed values are header-safe")
}

/// The request's cookies as (name, value), borrowed from its headers.
fn request_cookies(headers: &HeaderMap) -> Vec<(&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter_map(|c| Some((c.name_raw()?, c.value_raw()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(store: StoreKind, secrets: &[&[u8]]) -> SessionConfig {
        SessionConfig {
            store,
            cache_ttl: Duration::from_secs(5),
            secrets: secrets.iter().map(|s| s.to_vec()).collect(),
            cookie_name: "__Host-authgate".into(),
            idle_timeout: Duration::from_secs(3600),
            lifetime: Duration::from_secs(8 * 3600),
            refresh_before: Duration::from_secs(300),
            redis: None,
        }
    }

    fn sessions(secrets: &[&[u8]]) -> Sessions {
        Sessions::in_cookies(&config(StoreKind::Cookie, secrets))
    }

    fn session(groups: usize) -> Session {
        Session::new(
            Identity {
                subject: "s".into(),
                user_id: "oid".into(),
                username: "alice@contoso.example".into(),
                email: None,
                name: None,
                tenant: None,
                groups: (0..groups)
                    .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
                    .collect(),
                roles: vec![],
                groups_overage: false,
                groups_from_graph: false,
                acrs: Vec::new(),
                app: false,
            },
            "header.payload.signature".into(),
            Some("refresh".into()),
            now() + 3600,
        )
    }

    /// The request a browser sends back after `set_cookies`.
    fn browser_request(set_cookies: &[HeaderValue]) -> HeaderMap {
        let pairs: Vec<String> = set_cookies
            .iter()
            .map(|v| Cookie::parse(v.to_str().unwrap().to_owned()).unwrap())
            .filter(|c| c.max_age() != Some(cookie::time::Duration::ZERO))
            .map(|c| format!("{}={}", c.name(), c.value()))
            .collect();
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
        headers
    }

    const KEY_A: &[u8] = &[1; 32];
    const KEY_B: &[u8] = &[2; 32];

    #[tokio::test]
    async fn large_sessions_split_and_come_back_whole() {
        let jar = sessions(&[KEY_A]);
        let set = jar.write_sealed(&Arc::new(session(150)), &HeaderMap::new());
        assert!(set.len() > 1, "150 groups should need more than one cookie");
        assert!(set.iter().all(|v| v.len() < 4096));
        let attrs = set[0].to_str().unwrap();
        for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(attrs.contains(attr), "{attrs}");
        }
        match jar.read(&browser_request(&set)).await {
            Found::Valid(s) => assert_eq!(s.identity.groups.len(), 150),
            _ => panic!("split session did not read back"),
        }
        // A smaller session afterwards removes the extra chunks.
        let again = jar.write_sealed(&Arc::new(session(0)), &browser_request(&set));
        assert!(again
            .iter()
            .any(|v| v.to_str().unwrap().starts_with("__Host-authgate.1=;")));
    }

    #[tokio::test]
    async fn tampered_truncated_and_foreign_cookies_are_unusable() {
        let jar = sessions(&[KEY_A]);
        let set = jar.write_sealed(&Arc::new(session(0)), &HeaderMap::new());
        let good = browser_request(&set);
        let value = good[COOKIE].to_str().unwrap().to_owned();

        let mut flipped = value.clone().into_bytes();
        let last = flipped.len() - 5;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        for bad in [
            String::from_utf8(flipped).unwrap(),
            value[..value.len() - 10].to_owned(),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(COOKIE, HeaderValue::from_str(&bad).unwrap());
            assert!(matches!(jar.read(&headers).await, Found::Unusable), "{bad}");
        }
        assert!(matches!(
            sessions(&[KEY_B]).read(&good).await,
            Found::Unusable
        ));
        assert!(matches!(jar.read(&HeaderMap::new()).await, Found::None));
    }

    #[tokio::test]
    async fn rotated_secret_still_opens_old_sessions() {
        let old = sessions(&[KEY_A]).write_sealed(&Arc::new(session(0)), &HeaderMap::new());
        let rotated = sessions(&[KEY_B, KEY_A]);
        assert!(matches!(
            rotated.read(&browser_request(&old)).await,
            Found::Valid(_)
        ));
    }

    #[tokio::test]
    async fn an_opened_session_still_ends_on_time() {
        let jar = sessions(&[KEY_A]);
        let mut ending = session(0);
        // Live for one more second.
        ending.last_seen = now() - 3599;
        let request = browser_request(&jar.write_sealed(&Arc::new(ending), &HeaderMap::new()));
        let Found::Valid(first) = jar.read(&request).await else {
            panic!("the session is live");
        };
        let Found::Valid(again) = jar.read(&request).await else {
            panic!("the session is live");
        };
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second read was opened again"
        );
        let last = LastCookie::new(false);
        for _ in 0..2 {
            let Found::Valid(remembered) = jar.read_remembering(&request, &last).await else {
                panic!("the session is live");
            };
            assert!(Arc::ptr_eq(&first, &remembered));
        }
        crate::clock::advance(2);
        assert!(matches!(jar.read(&request).await, Found::Unusable));
        assert!(matches!(
            jar.read_remembering(&request, &last).await,
            Found::Unusable
        ));
    }

    #[tokio::test]
    async fn a_connection_remembers_only_the_very_same_cookie_header() {
        remembers_only_the_very_same_cookie_header(false).await;
    }

    /// HTTP/2 keeps the fields themselves: the repeated ones are the same
    /// bytes, as HPACK's table hands them out (the clones below).
    #[tokio::test]
    async fn an_http2_connection_remembers_only_the_very_same_cookie_header() {
        remembers_only_the_very_same_cookie_header(true).await;
    }

    async fn remembers_only_the_very_same_cookie_header(http2: bool) {
        let jar = sessions(&[KEY_A]);
        let last = LastCookie::new(http2);
        let own = browser_request(&jar.write_sealed(&Arc::new(session(0)), &HeaderMap::new()))
            [COOKIE]
            .clone();
        let mut request = HeaderMap::new();
        let with_others = format!("theme=dark; {}; lang=en", own.to_str().unwrap());
        request.insert(COOKIE, with_others.parse().unwrap());
        // The first request fills the connection's memory, the second is
        // answered from it.
        for _ in 0..2 {
            assert!(matches!(
                jar.read_remembering(&request, &last).await,
                Found::Valid(_)
            ));
            let mut upstream = request.clone();
            jar.strip_own(&mut upstream, &last);
            assert_eq!(upstream[COOKIE], "theme=dark; lang=en");
        }
        // Over HTTP/2 the cookies may come as several fields.
        let split = |session: HeaderValue| {
            let mut request = HeaderMap::new();
            request.append(COOKIE, "theme=dark".parse().unwrap());
            request.append(COOKIE, session);
            request
        };
        for _ in 0..2 {
            assert!(matches!(
                jar.read_remembering(&split(own.clone()), &last).await,
                Found::Valid(_)
            ));
            let mut upstream = split(own.clone());
            jar.strip_own(&mut upstream, &last);
            assert_eq!(upstream[COOKIE], "theme=dark");
        }
        // One character of the sealed value changed: opened, and refused.
        let mut forged = own.as_bytes().to_vec();
        let i = forged.len() - 5;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let request = split(HeaderValue::from_bytes(&forged).unwrap());
        assert!(matches!(
            jar.read_remembering(&request, &last).await,
            Found::Unusable
        ));
        // Only the gateway's cookie: none goes upstream.
        let mut request = HeaderMap::new();
        request.insert(COOKIE, own);
        assert!(matches!(
            jar.read_remembering(&request, &last).await,
            Found::Valid(_)
        ));
        jar.strip_own(&mut request, &last);
        assert_eq!(request.get(COOKIE), None);
    }

    #[tokio::test]
    async fn a_cookie_due_for_touching_is_resealed_once() {
        let jar = sessions(&[KEY_A]);
        let mut idle = session(0);
        idle.last_seen = now() - TOUCH_INTERVAL - 5;
        let request = browser_request(&jar.write_sealed(&Arc::new(idle), &HeaderMap::new()));
        let Found::Valid(read) = jar.read(&request).await else {
            panic!("the session is live");
        };
        let first = jar.touch(&read, &request);
        assert!(!first.is_empty(), "a touch was due");
        // The same old cookie again: the same re-issued one, not a new seal.
        assert_eq!(jar.touch(&read, &request), first);
        let Found::Valid(touched) = jar.read(&browser_request(&first)).await else {
            panic!("the re-issued cookie opens");
        };
        assert!(touched.last_seen >= now() - 1);
        assert!(jar.touch(&touched, &browser_request(&first)).is_empty());
    }

    #[tokio::test]
    async fn idle_and_absolute_lifetimes_end_sessions() {
        let jar = sessions(&[KEY_A]);
        let mut idle = session(0);
        idle.last_seen = now() - 3601;
        let mut old = session(0);
        old.signed_in_at = now() - 8 * 3600 - 1;
        for s in [idle, old] {
            let set = jar.write_sealed(&Arc::new(s), &HeaderMap::new());
            assert!(!matches!(
                jar.read(&browser_request(&set)).await,
                Found::Valid(_)
            ));
        }
    }

    #[tokio::test]
    async fn login_state_is_per_sign_in_and_bound_to_its_state() {
        let jar = sessions(&[KEY_A]);
        let login = |state: &str| LoginState {
            state: state.into(),
            nonce: "n".into(),
            pkce_verifier: "v".into(),
            return_to: "/".into(),
            shortened: false,
            step_up: Vec::new(),
            started_at: now(),
        };
        let one = jar
            .write_login(&login("aaaaaaaaaaaaaaaaaaaa1"), false)
            .await
            .unwrap();
        let two = jar
            .write_login(&login("bbbbbbbbbbbbbbbbbbbb2"), true)
            .await
            .unwrap();
        assert!(two.to_str().unwrap().contains("SameSite=None"));
        let request = browser_request(&[one, two]);
        assert_eq!(
            jar.take_login(&request, "aaaaaaaaaaaaaaaaaaaa1")
                .await
                .unwrap()
                .unwrap()
                .state,
            "aaaaaaaaaaaaaaaaaaaa1"
        );
        assert_eq!(
            jar.take_login(&request, "bbbbbbbbbbbbbbbbbbbb2")
                .await
                .unwrap()
                .unwrap()
                .state,
            "bbbbbbbbbbbbbbbbbbbb2"
        );
        // Same 16-character prefix, other state: refused.
        assert!(jar
            .take_login(&request, "aaaaaaaaaaaaaaaaXXXX")
            .await
            .unwrap()
            .is_none());
        assert!(jar.take_login(&request, "unknown").await.unwrap().is_none());
    }

    mod stored {
        use super::*;

        fn open(dir: &std::path::Path, secrets: &[&[u8]]) -> Sessions {
            let config = config(StoreKind::Embedded, secrets);
            Sessions::open(&config, &StateDir::new(dir), &Metrics::default()).unwrap()
        }

        async fn signed_in(jar: &Sessions, who: &str) -> HeaderMap {
            let mut s = session(150);
            s.identity.username = format!("{who}@Contoso.example");
            s.identity.user_id = format!("oid-{who}");
            let (_, cookies) = jar.save(s, &HeaderMap::new()).await.unwrap();
            browser_request(&cookies)
        }

        #[tokio::test]
        async fn the_cookie_is_a_small_id_and_the_session_survives_a_restart() {
            let dir = tempfile::tempdir().unwrap();
            let jar = open(dir.path(), &[]);
            let request = signed_in(&jar, "alice").await;
            // 150 groups: several cookies in cookie mode, one id here.
            let cookie = request[COOKIE].to_str().unwrap();
            assert!(cookie.len() <= 100, "{cookie}");
            assert!(matches!(jar.read(&request).await, Found::Valid(_)));
            drop(jar);
            // A new process with the generated secret kept under state_dir.
            let again = open(dir.path(), &[]);
            let Found::Valid(session) = again.read(&request).await else {
                panic!("the session did not survive a restart");
            };
            assert_eq!(session.identity.groups.len(), 150);
        }

        /// Alice signed in to a store under `dir`, her cookie, and a
        /// connection that has read her session.
        async fn remembered(
            dir: &std::path::Path,
        ) -> (Sessions, HeaderMap, LastCookie, Arc<Session>) {
            let jar = open(dir, &[KEY_A]);
            let request = signed_in(&jar, "alice").await;
            let last = LastCookie::new(false);
            let Found::Valid(session) = jar.read_remembering(&request, &last).await else {
                panic!("signed in");
            };
            (jar, request, last, session)
        }

        /// Many connections of one session missing the cache together
        /// (its cached copy just expired) cost the store one read.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn connections_missing_the_cache_at_once_read_the_store_once() {
            let dir = tempfile::tempdir().unwrap();
            let request = signed_in(&open(dir.path(), &[KEY_A]), "alice").await;
            let metrics = Metrics::default();
            let config = config(StoreKind::Embedded, &[KEY_A]);
            let jar = Sessions::open(&config, &StateDir::new(dir.path()), &metrics).unwrap();
            let reads: Vec<_> = (0..64)
                .map(|_| {
                    let (jar, request) = (jar.clone(), request.clone());
                    tokio::spawn(async move { jar.read(&request).await })
                })
                .collect();
            for read in reads {
                assert!(matches!(read.await.unwrap(), Found::Valid(_)));
            }
            assert_eq!(metrics.session_store_lookups.get(), 1);
        }

        /// Each thread tells a session's identity from a copy of its own,
        /// built once there and shared by its connections, so threads
        /// never touch the same bytes.
        #[tokio::test]
        async fn each_thread_tells_the_identity_from_its_own_copy() {
            use crate::auth::easy_auth::Tokens;
            use crate::auth::identity::{IdentityHeaderNames, IdentityHeaders};
            use std::sync::atomic::AtomicUsize;
            let dir = tempfile::tempdir().unwrap();
            let (jar, request, last, session) = remembered(dir.path()).await;
            let (other, elsewhere) = (LastCookie::new(false), LastCookie::new(false));
            for connection in [&other, &elsewhere] {
                assert!(matches!(
                    jar.read_remembering(&request, connection).await,
                    Found::Valid(_)
                ));
            }
            let names = IdentityHeaders::new(&IdentityHeaderNames::default());
            let builds = AtomicUsize::new(0);
            let build = || {
                builds.fetch_add(1, Ordering::Relaxed);
                let tokens = Tokens {
                    claims_of: &session.id_token,
                    id_token: Some(&session.id_token),
                    access_token: None,
                };
                names.values(&session.identity, &tokens)
            };
            let told = |connection: &LastCookie| {
                let mut headers = HeaderMap::new();
                connection.tell_identity(&session, build, &mut headers);
                headers
            };
            let bytes = |h: &HeaderMap| h["x-forwarded-user"].as_bytes().as_ptr() as usize;

            let (first, again, next_connection) = (told(&last), told(&last), told(&other));
            assert_eq!(
                first["x-forwarded-user"],
                session.identity.username.as_str()
            );
            assert_eq!(bytes(&first), bytes(&again));
            assert_eq!(
                bytes(&first),
                bytes(&next_connection),
                "one copy per thread"
            );
            let elsewhere = std::thread::scope(|s| s.spawn(|| told(&elsewhere)).join().unwrap());
            assert_eq!(elsewhere, first);
            assert_ne!(
                bytes(&elsewhere),
                bytes(&first),
                "another thread's own copy"
            );
            assert_eq!(builds.load(Ordering::Relaxed), 2);
        }

        #[tokio::test]
        async fn an_ended_session_is_refused_at_once_even_where_it_was_remembered() {
            let dir = tempfile::tempdir().unwrap();
            let (jar, request, last, session) = remembered(dir.path()).await;
            jar.end(&session).await.unwrap();
            assert!(matches!(
                jar.read_remembering(&request, &last).await,
                Found::Unusable
            ));
            assert!(matches!(jar.read(&request).await, Found::Unusable));
            // Gone from the store too: a restarted gateway refuses it.
            drop(jar);
            let again = open(dir.path(), &[KEY_A]);
            assert!(matches!(again.read(&request).await, Found::Unusable));
        }

        #[tokio::test]
        async fn sessions_are_listed_and_revoked_by_user_handle_or_all() {
            let dir = tempfile::tempdir().unwrap();
            // Tagged under the old secret, found after rotation.
            let old = open(dir.path(), &[KEY_A]);
            let alice = signed_in(&old, "alice").await;
            drop(old);
            let jar = open(dir.path(), &[KEY_B, KEY_A]);
            let alice_again = signed_in(&jar, "alice").await;
            let bob = signed_in(&jar, "bob").await;
            let carol = signed_in(&jar, "carol").await;

            let listed = jar.list(Some("ALICE@contoso.EXAMPLE")).await.unwrap();
            assert_eq!(listed.len(), 2, "{listed:?}");
            assert!(listed.iter().all(|l| l.user == "alice@Contoso.example"));
            assert_eq!(jar.list(None).await.unwrap().len(), 4);

            assert_eq!(jar.revoke(&Who::User("oid-alice".into())).await.unwrap(), 2);
            for request in [&alice, &alice_again] {
                assert!(matches!(jar.read(request).await, Found::Unusable));
            }
            let handle = jar.list(Some("bob@contoso.example")).await.unwrap()[0]
                .handle
                .clone();
            assert_eq!(jar.revoke(&Who::Session(handle)).await.unwrap(), 1);
            assert!(matches!(jar.read(&bob).await, Found::Unusable));
            assert!(matches!(jar.read(&carol).await, Found::Valid(_)));
            assert_eq!(jar.revoke(&Who::All).await.unwrap(), 1);
            assert!(matches!(jar.read(&carol).await, Found::Unusable));
            assert!(jar.list(None).await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn a_corrupted_or_moved_record_is_a_signed_out_user() {
            let dir = tempfile::tempdir().unwrap();
            let jar = open(dir.path(), &[KEY_A]);
            let request = signed_in(&jar, "alice").await;
            let Kept::InStore(stored) = &jar.kept else {
                unreachable!()
            };
            let key =
                store_key_of(request[COOKIE].to_str().unwrap().split_once('=').unwrap().1).unwrap();
            let mut record = stored
                .store
                .get(Table::Sessions, key)
                .await
                .unwrap()
                .unwrap();
            // The same record under another key (another user's id).
            let other_id = [9u8; 32];
            let other = StoreKey::of(&other_id);
            stored
                .store
                .put(Table::Sessions, other, record.clone())
                .await
                .unwrap();
            let mut forged = HeaderMap::new();
            forged.insert(
                COOKIE,
                format!("__Host-authgate={}", URL_SAFE_NO_PAD.encode(other_id))
                    .parse()
                    .unwrap(),
            );
            assert!(matches!(jar.read(&forged).await, Found::Unusable));
            // Bytes flipped on disk.
            let last = record.sealed.len() - 3;
            record.sealed[last] ^= 1;
            stored
                .store
                .put(Table::Sessions, key, record)
                .await
                .unwrap();
            stored.opened.invalidate_all();
            assert!(matches!(jar.read(&request).await, Found::Unusable));
            // Not an id at all.
            let mut junk = HeaderMap::new();
            junk.insert(COOKIE, "__Host-authgate=%00;;".parse().unwrap());
            assert!(matches!(jar.read(&junk).await, Found::Unusable));
        }

        #[tokio::test]
        async fn a_marker_is_used_once_while_it_lives_even_across_a_restart() {
            let dir = tempfile::tempdir().unwrap();
            let jar = open(dir.path(), &[KEY_A]);
            assert!(jar.first_use(b"jti-1", now() + 60).await.unwrap());
            assert!(!jar.first_use(b"jti-1", now() + 60).await.unwrap());
            assert!(jar.first_use(b"jti-2", now() + 60).await.unwrap());
            drop(jar);
            let jar = open(dir.path(), &[KEY_A]);
            assert!(!jar.first_use(b"jti-1", now() + 60).await.unwrap());
            // One whose time is up is no longer remembered.
            assert!(jar.first_use(b"jti-old", now() - 1).await.unwrap());
            assert!(jar.first_use(b"jti-old", now() + 60).await.unwrap());
            // Without a store there is nowhere to remember it.
            assert!(matches!(
                sessions(&[KEY_A]).first_use(b"jti-3", now() + 60).await,
                Err(AdminError::NoStore)
            ));
        }

        #[tokio::test]
        async fn login_state_of_any_length_is_kept_and_taken_once() {
            let dir = tempfile::tempdir().unwrap();
            let jar = open(dir.path(), &[KEY_A]);
            let login = LoginState {
                state: "cccccccccccccccccccc3".into(),
                nonce: "n".into(),
                pkce_verifier: "v".into(),
                return_to: format!("/deep?q={}", "x".repeat(8000)),
                shortened: false,
                step_up: Vec::new(),
                started_at: now(),
            };
            let cookie = jar.write_login(&login, false).await.unwrap();
            assert!(cookie.len() < 200, "{cookie:?}");
            let request = browser_request(&[cookie]);
            let taken = jar
                .take_login(&request, &login.state)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(taken.return_to, login.return_to);
            // A replayed callback finds nothing.
            assert!(jar
                .take_login(&request, &login.state)
                .await
                .unwrap()
                .is_none());
        }
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// Cookie headers a client could send: pairs of ours and others,
        /// broken ones, stray separators and quotes.
        fn cookie_header() -> impl Strategy<Value = String> {
            let pair = prop_oneof![
                "[a-z]{1,6}=[a-zA-Z0-9%]{0,12}",
                "__Host-authgate(\\.[0-9]|-login-[a-z]{1,4})?=[a-zA-Z0-9]{0,20}",
                // Shaped like a stored session's or login's id.
                "__Host-authgate(-login-[a-z]{1,4})?=[A-Za-z0-9_-]{43}",
                "[ -~]{0,12}",
            ];
            proptest::collection::vec(pair, 0..8).prop_map(|p| p.join("; "))
        }

        proptest! {
            /// Opening any header never panics, and what the gateway passes
            /// on holds every other cookie, in order, and none of its own.
            #[test]
            fn the_upstream_gets_every_other_cookie_and_none_of_ours(header in cookie_header()) {
                let jar = sessions(&[KEY_A]);
                let mut headers = HeaderMap::new();
                let Ok(value) = HeaderValue::from_str(&header) else {
                    return Ok(());
                };
                headers.insert(COOKIE, value);
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let _ = runtime.block_on(jar.read(&headers));
                let _ = runtime.block_on(jar.take_login(&headers, "state"));
                jar.strip_own(&mut headers, &LastCookie::new(false));
                let passed = headers
                    .get(COOKIE)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let expected: Vec<&str> = header
                    .split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty() && !p.starts_with("__Host-authgate"))
                    .collect();
                prop_assert_eq!(passed, expected.join("; "));
            }
        }

        /// The same headers against the embedded store: read, taken as a
        /// login, ended; never a panic, never a session.
        #[test]
        fn any_cookie_header_is_read_safely_from_the_store() {
            let dir = tempfile::tempdir().unwrap();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .build()
                .unwrap();
            let jar = Sessions::open(
                &config(StoreKind::Embedded, &[KEY_A]),
                &StateDir::new(dir.path()),
                &Metrics::default(),
            )
            .unwrap();
            let mut runner = proptest::test_runner::TestRunner::default();
            runner
                .run(&cookie_header(), |header| {
                    let Ok(value) = HeaderValue::from_str(&header) else {
                        return Ok(());
                    };
                    let mut headers = HeaderMap::new();
                    headers.insert(COOKIE, value);
                    let found = runtime.block_on(jar.read(&headers));
                    prop_assert!(!matches!(found, Found::Valid(_)), "{header}");
                    let login = runtime.block_on(jar.take_login(&headers, "state")).unwrap();
                    prop_assert!(login.is_none(), "{header}");
                    Ok(())
                })
                .unwrap();
        }
    }
}
