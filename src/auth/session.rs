//! Encrypted cookies, sealed with the `cookie` crate's private jar (AEAD,
//! the cookie's name bound in): the session — who is signed in and their
//! tokens — and the short-lived login state of each sign-in in flight.
//!
//! A session too large for one cookie (Entra tokens with many groups) is
//! split across `<name>`, `<name>.1`, `<name>.2`…; several secrets are
//! accepted for opening, so the secret can be rotated without signing
//! everyone out.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cookie::{Cookie, CookieJar, Key, SameSite};
use http::header::{HeaderValue, COOKIE};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::auth::identity::{Identity, IdentityValues};
use crate::clock::now;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Secrets for the cookie keys; the first encrypts, all decrypt.
    pub secrets: Vec<Vec<u8>>,
    /// Renew the tokens this long before the ID token expires.
    pub refresh_before: Duration,
    pub cookie_name: String,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

/// Bytes of sealed value per cookie: browsers keep at least 4096 bytes
/// per cookie including name and attributes (RFC 6265 §6.1).
const CHUNK: usize = 3800;
/// More chunks than this is not a session we wrote.
const MAX_CHUNKS: usize = 10;
/// A sign-in has this long from the redirect to the callback.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Re-issue the cookie (to slide the idle timeout) at most this often.
const TOUCH_INTERVAL: u64 = 60;
/// Bytes each session cache (opened, re-issued) keeps: thousands of
/// signed-in browsers.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// A sealed value is replaced after `TOUCH_INTERVAL` of use, so one not
/// seen for this long is unlikely to come back.
const OPENED_IDLE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub identity: Identity,
    pub id_token: String,
    pub refresh_token: Option<String>,
    /// When the ID token expires (Unix seconds).
    pub expires_at: u64,
    pub signed_in_at: u64,
    pub last_seen: u64,
    /// Built at the first request that needs them; opened sessions are
    /// cached, so later requests of this session copy them.
    #[serde(skip)]
    pub identity_headers: OnceLock<IdentityValues>,
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
    pub started_at: u64,
}

#[derive(Clone)]
pub struct Sessions {
    /// The first key seals; all open.
    keys: Vec<Key>,
    /// Sessions already opened, by sealed value. A browser sends the same
    /// cookie with every request, and opening it (base64, AES-GCM, JSON)
    /// was most of the per-request auth work. Only values that
    /// opened are kept and the lifetimes are checked at every use, so a
    /// hit answers exactly what opening again would.
    opened: moka::sync::Cache<String, Arc<Session>, foldhash::fast::RandomState>,
    /// Re-issued cookies by (ID token, last seen) of the session touched.
    reissued: moka::sync::Cache<(String, u64), Arc<Vec<HeaderValue>>, foldhash::fast::RandomState>,
    name: String,
    idle: Duration,
    lifetime: Duration,
    refresh_before: Duration,
}

/// The session cookie one connection sent last, opened, and its `Cookie`
/// header without the gateway's cookies. A browser sends the same header
/// with every request on a connection, so the next one costs a comparison
/// instead of parsing, a cache lookup and a rebuilt header. Over
/// HTTP/2 a browser may send it as several fields (RFC 9113 §8.2.3):
/// compared field by field.
///
/// Sessions live in their cookies alone, so a remembered one answers what
/// opening the cookie again would; its lifetimes are checked at every use.
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
pub enum Found {
    None,
    Valid(Arc<Session>),
    /// Present but expired, tampered with, or sealed with an unknown key.
    Unusable,
}

impl Sessions {
    pub fn new(config: &SessionConfig) -> Sessions {
        Sessions {
            keys: config.secrets.iter().map(|s| Key::derive_from(s)).collect(),
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
            name: config.cookie_name.clone(),
            idle: config.idle_timeout,
            lifetime: config.lifetime,
            refresh_before: config.refresh_before,
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

    fn open(&self, name: &str, sealed: &str) -> Option<String> {
        let jar = CookieJar::new();
        self.keys.iter().find_map(|key| {
            jar.private(key)
                .decrypt(Cookie::new(name.to_owned(), sealed.to_owned()))
                .map(|c| c.value().to_owned())
        })
    }

    /// `read`, answered from the connection's last request when the
    /// `Cookie` header is the same.
    pub fn read_remembering(&self, headers: &HeaderMap, last: &LastCookie) -> Found {
        if let Some(session) = last.get(headers, |r| r.session.clone()) {
            return self.check_live(session);
        }
        let found = self.read(headers);
        if let Found::Valid(session) = &found {
            let fields = headers.get_all(COOKIE);
            last.set(Remembered {
                fields: fields.iter().map(|v| last.remember(v)).collect(),
                session: session.clone(),
                others: self.others(fields.iter()),
            });
        }
        found
    }

    pub fn read(&self, headers: &HeaderMap) -> Found {
        let cookies = request_cookies(headers);
        let Some(&(_, first)) = cookies.iter().find(|(n, _)| *n == self.name) else {
            return Found::None;
        };
        // Most sessions fit one cookie: then no copy is needed.
        let mut sealed = Cow::Borrowed(first);
        for i in 1..MAX_CHUNKS {
            match cookies.iter().find(|(n, _)| self.is_chunk(n, i)) {
                Some((_, value)) => sealed.to_mut().push_str(value),
                None => break,
            }
        }
        let session = match self.opened.get(sealed.as_ref()) {
            Some(session) => session,
            None => {
                let Some(session) = self
                    .open(&self.name, &sealed)
                    .and_then(|json| serde_json::from_str::<Session>(&json).ok())
                else {
                    return Found::Unusable;
                };
                let session = Arc::new(session);
                self.opened.insert(sealed.into_owned(), session.clone());
                session
            }
        };
        self.check_live(session)
    }

    fn check_live(&self, session: Arc<Session>) -> Found {
        if self.is_live(&session) {
            Found::Valid(session)
        } else {
            Found::Unusable
        }
    }

    fn is_live(&self, session: &Session) -> bool {
        let now = now();
        now < session.signed_in_at + self.lifetime.as_secs()
            && now < session.last_seen + self.idle.as_secs()
    }

    /// Whether the tokens should be renewed now: a refresh token is at
    /// hand and the ID token expires within `refresh_before`.
    pub fn due_for_refresh(&self, session: &Session) -> bool {
        session.refresh_token.is_some()
            && now() + self.refresh_before.as_secs() >= session.expires_at
    }

    /// `Set-Cookie` values re-issuing `session` to slide its idle timer,
    /// once it is `TOUCH_INTERVAL` old. The re-issued cookie is sealed once
    /// and handed out again for that interval: a client that keeps sending
    /// the old cookie (a script, a load test) would otherwise have it
    /// sealed anew on every request.
    pub fn touch(&self, session: &Session, request: &HeaderMap) -> Vec<HeaderValue> {
        if now() < session.last_seen + TOUCH_INTERVAL {
            return Vec::new();
        }
        // The ID token tells sign-ins (and renewals) apart.
        let key = (session.id_token.clone(), session.last_seen);
        let reissued = self.reissued.get_with(key, || {
            let mut touched = session.clone();
            touched.last_seen = now();
            Arc::new(self.write(&touched, request))
        });
        reissued.to_vec()
    }

    /// `Set-Cookie` values for `session`, also clearing chunks of a larger
    /// earlier session the request carried.
    pub fn write(&self, session: &Session, request: &HeaderMap) -> Vec<HeaderValue> {
        let json = serde_json::to_string(session).expect("a session serializes");
        let sealed = self.seal(&self.name, json);
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
        let present = request_cookies(request);
        for i in chunks.len()..MAX_CHUNKS {
            let name = self.chunk_name(i);
            if present.iter().any(|(n, _)| *n == name.as_str()) {
                out.push(removal(name));
            }
        }
        out
    }

    /// `Set-Cookie` values that remove every session cookie the request had.
    pub fn clear(&self, request: &HeaderMap) -> Vec<HeaderValue> {
        let present = request_cookies(request);
        (0..MAX_CHUNKS)
            .map(|i| self.chunk_name(i))
            .filter(|name| present.iter().any(|(n, _)| *n == name.as_str()))
            .map(removal)
            .collect()
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
    /// POST, which only carries `SameSite=None` cookies.
    pub fn write_login(&self, login: &LoginState, cross_site_post: bool) -> HeaderValue {
        let name = self.login_name(&login.state);
        let sealed = self.seal(
            &name,
            serde_json::to_string(login).expect("login state serializes"),
        );
        let mut cookie = Cookie::new(name, sealed);
        harden(
            &mut cookie,
            if cross_site_post {
                SameSite::None
            } else {
                SameSite::Lax
            },
        );
        cookie.set_max_age(cookie::time::Duration::seconds(LOGIN_TTL.as_secs() as i64));
        header(&cookie)
    }

    /// The login state for `state`, if this browser started that sign-in
    /// recently.
    pub fn read_login(&self, headers: &HeaderMap, state: &str) -> Option<LoginState> {
        let name = self.login_name(state);
        let (_, sealed) = request_cookies(headers)
            .into_iter()
            .find(|(n, _)| *n == name.as_str())?;
        let login: LoginState = serde_json::from_str(&self.open(&name, sealed)?).ok()?;
        (login.state == state && now() < login.started_at + LOGIN_TTL.as_secs()).then_some(login)
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

    fn sessions(secrets: &[&[u8]]) -> Sessions {
        Sessions::new(&SessionConfig {
            secrets: secrets.iter().map(|s| s.to_vec()).collect(),
            cookie_name: "__Host-authgate".into(),
            idle_timeout: Duration::from_secs(3600),
            lifetime: Duration::from_secs(8 * 3600),
            refresh_before: Duration::from_secs(300),
        })
    }

    fn session(groups: usize) -> Session {
        Session {
            identity: Identity {
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
                app: false,
            },
            id_token: "header.payload.signature".into(),
            refresh_token: Some("refresh".into()),
            expires_at: now() + 3600,
            signed_in_at: now(),
            last_seen: now(),
            identity_headers: Default::default(),
        }
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

    #[test]
    fn large_sessions_split_and_come_back_whole() {
        let jar = sessions(&[KEY_A]);
        let set = jar.write(&session(150), &HeaderMap::new());
        assert!(set.len() > 1, "150 groups should need more than one cookie");
        assert!(set.iter().all(|v| v.len() < 4096));
        let attrs = set[0].to_str().unwrap();
        for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(attrs.contains(attr), "{attrs}");
        }
        match jar.read(&browser_request(&set)) {
            Found::Valid(s) => assert_eq!(s.identity.groups.len(), 150),
            _ => panic!("split session did not read back"),
        }
        // A smaller session afterwards removes the extra chunks.
        let again = jar.write(&session(0), &browser_request(&set));
        assert!(again
            .iter()
            .any(|v| v.to_str().unwrap().starts_with("__Host-authgate.1=;")));
    }

    #[test]
    fn tampered_truncated_and_foreign_cookies_are_unusable() {
        let jar = sessions(&[KEY_A]);
        let set = jar.write(&session(0), &HeaderMap::new());
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
            assert!(matches!(jar.read(&headers), Found::Unusable), "{bad}");
        }
        assert!(matches!(sessions(&[KEY_B]).read(&good), Found::Unusable));
        assert!(matches!(jar.read(&HeaderMap::new()), Found::None));
    }

    #[test]
    fn rotated_secret_still_opens_old_sessions() {
        let old = sessions(&[KEY_A]).write(&session(0), &HeaderMap::new());
        let rotated = sessions(&[KEY_B, KEY_A]);
        assert!(matches!(
            rotated.read(&browser_request(&old)),
            Found::Valid(_)
        ));
    }

    #[test]
    fn an_opened_session_still_ends_on_time() {
        let jar = sessions(&[KEY_A]);
        let mut ending = session(0);
        // Live for one more second.
        ending.last_seen = now() - 3599;
        let request = browser_request(&jar.write(&ending, &HeaderMap::new()));
        let Found::Valid(first) = jar.read(&request) else {
            panic!("the session is live");
        };
        let Found::Valid(again) = jar.read(&request) else {
            panic!("the session is live");
        };
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second read was opened again"
        );
        let last = LastCookie::new(false);
        for _ in 0..2 {
            let Found::Valid(remembered) = jar.read_remembering(&request, &last) else {
                panic!("the session is live");
            };
            assert!(Arc::ptr_eq(&first, &remembered));
        }
        crate::clock::advance(2);
        assert!(matches!(jar.read(&request), Found::Unusable));
        assert!(matches!(
            jar.read_remembering(&request, &last),
            Found::Unusable
        ));
    }

    #[test]
    fn a_connection_remembers_only_the_very_same_cookie_header() {
        remembers_only_the_very_same_cookie_header(false);
    }

    /// HTTP/2 keeps the fields themselves: the repeated ones are the same
    /// bytes, as HPACK's table hands them out (the clones below).
    #[test]
    fn an_http2_connection_remembers_only_the_very_same_cookie_header() {
        remembers_only_the_very_same_cookie_header(true);
    }

    fn remembers_only_the_very_same_cookie_header(http2: bool) {
        let jar = sessions(&[KEY_A]);
        let last = LastCookie::new(http2);
        let own = browser_request(&jar.write(&session(0), &HeaderMap::new()))[COOKIE].clone();
        let mut request = HeaderMap::new();
        let with_others = format!("theme=dark; {}; lang=en", own.to_str().unwrap());
        request.insert(COOKIE, with_others.parse().unwrap());
        // The first request fills the connection's memory, the second is
        // answered from it.
        for _ in 0..2 {
            assert!(matches!(
                jar.read_remembering(&request, &last),
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
                jar.read_remembering(&split(own.clone()), &last),
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
            jar.read_remembering(&request, &last),
            Found::Unusable
        ));
        // Only the gateway's cookie: none goes upstream.
        let mut request = HeaderMap::new();
        request.insert(COOKIE, own);
        assert!(matches!(
            jar.read_remembering(&request, &last),
            Found::Valid(_)
        ));
        jar.strip_own(&mut request, &last);
        assert_eq!(request.get(COOKIE), None);
    }

    #[test]
    fn a_cookie_due_for_touching_is_resealed_once() {
        let jar = sessions(&[KEY_A]);
        let mut idle = session(0);
        idle.last_seen = now() - TOUCH_INTERVAL - 5;
        let request = browser_request(&jar.write(&idle, &HeaderMap::new()));
        let Found::Valid(read) = jar.read(&request) else {
            panic!("the session is live");
        };
        let first = jar.touch(&read, &request);
        assert!(!first.is_empty(), "a touch was due");
        // The same old cookie again: the same re-issued one, not a new seal.
        assert_eq!(jar.touch(&read, &request), first);
        let Found::Valid(touched) = jar.read(&browser_request(&first)) else {
            panic!("the re-issued cookie opens");
        };
        assert!(touched.last_seen >= now() - 1);
        assert!(jar.touch(&touched, &browser_request(&first)).is_empty());
    }

    #[test]
    fn idle_and_absolute_lifetimes_end_sessions() {
        let jar = sessions(&[KEY_A]);
        let mut idle = session(0);
        idle.last_seen = now() - 3601;
        let mut old = session(0);
        old.signed_in_at = now() - 8 * 3600 - 1;
        for s in [idle, old] {
            let set = jar.write(&s, &HeaderMap::new());
            assert!(!matches!(jar.read(&browser_request(&set)), Found::Valid(_)));
        }
    }

    #[test]
    fn login_state_is_per_sign_in_and_bound_to_its_state() {
        let jar = sessions(&[KEY_A]);
        let login = |state: &str| LoginState {
            state: state.into(),
            nonce: "n".into(),
            pkce_verifier: "v".into(),
            return_to: "/".into(),
            shortened: false,
            started_at: now(),
        };
        let one = jar.write_login(&login("aaaaaaaaaaaaaaaaaaaa1"), false);
        let two = jar.write_login(&login("bbbbbbbbbbbbbbbbbbbb2"), true);
        assert!(two.to_str().unwrap().contains("SameSite=None"));
        let request = browser_request(&[one, two]);
        assert_eq!(
            jar.read_login(&request, "aaaaaaaaaaaaaaaaaaaa1")
                .unwrap()
                .state,
            "aaaaaaaaaaaaaaaaaaaa1"
        );
        assert_eq!(
            jar.read_login(&request, "bbbbbbbbbbbbbbbbbbbb2")
                .unwrap()
                .state,
            "bbbbbbbbbbbbbbbbbbbb2"
        );
        // Same 16-character prefix, other state: refused.
        assert!(jar.read_login(&request, "aaaaaaaaaaaaaaaaXXXX").is_none());
        assert!(jar.read_login(&request, "unknown").is_none());
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
                let _ = jar.read(&headers);
                let _ = jar.read_login(&headers, "state");
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
    }
}
