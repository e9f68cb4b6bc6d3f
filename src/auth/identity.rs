//! Who is signed in, and the headers that tell the upstream. Every header
//! of those names is stripped from every client request first, so a
//! client can never claim an identity itself, on any route.

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::easy_auth::{EasyAuth, Tokens};

/// Names of the headers that carry the signed-in user to the upstream.
/// Defaults follow oauth2-proxy's `X-Forwarded-*` names.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaderNames {
    pub user: String,
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub tenant: String,
    pub groups: String,
    pub roles: String,
    /// At most this many groups in the groups header (for upstreams with
    /// small header limits); unset: all.
    pub groups_max: Option<usize>,
    pub preferred_username: String,
    /// Header that carries the signed-in user's raw ID token; empty: none.
    /// `Authorization` sends it as `Bearer <token>`.
    pub id_token: String,
    /// Whether each signed-in request also carries a short-lived ES256
    /// JWT saying who the user is, its keys at `jwks.json` under the
    /// gateway prefix.
    pub assertion: bool,
    /// The header that carries it; stripped from clients either way.
    pub assertion_header: String,
    /// How long each assertion signing key signs before the next.
    #[serde(with = "humantime_serde")]
    pub assertion_key_rotation: std::time::Duration,
    /// Whether signed-in requests also carry Azure App Service's
    /// `X-MS-CLIENT-PRINCIPAL*` headers, and `/.auth/*` is answered.
    pub easy_auth: bool,
    /// With `easy_auth`: the provider's tokens too (`X-MS-TOKEN-AAD-*`).
    pub easy_auth_tokens: bool,
}

impl Default for IdentityHeaderNames {
    fn default() -> Self {
        IdentityHeaderNames {
            user: "X-Forwarded-User".into(),
            user_id: "X-Forwarded-User-Id".into(),
            email: "X-Forwarded-Email".into(),
            name: "X-Forwarded-Name".into(),
            tenant: "X-Forwarded-Tenant".into(),
            groups: "X-Forwarded-Groups".into(),
            roles: "X-Forwarded-Roles".into(),
            groups_max: None,
            preferred_username: "X-Forwarded-Preferred-Username".into(),
            id_token: String::new(),
            assertion: false,
            assertion_header: "X-Authgate-Assertion".into(),
            assertion_key_rotation: std::time::Duration::from_secs(30 * 24 * 3600),
            easy_auth: false,
            easy_auth_tokens: false,
        }
    }
}

impl IdentityHeaderNames {
    pub fn all(&self) -> [(&'static str, &str); 8] {
        [
            ("user", &self.user),
            ("user_id", &self.user_id),
            ("email", &self.email),
            ("name", &self.name),
            ("tenant", &self.tenant),
            ("groups", &self.groups),
            ("roles", &self.roles),
            ("preferred_username", &self.preferred_username),
        ]
    }
}

/// Why the groups header is short or missing; stripped from clients like
/// every identity header.
pub const GROUPS_OVERAGE: &str = "x-forwarded-groups-overage";

/// Identity headers of other gateways, and every spelling of the
/// `X-Forwarded-User` family: oauth2-proxy (`X-Auth-Request-*`,
/// `X-Forwarded-*`), Azure App Service's Easy Auth (`X-MS-CLIENT-PRINCIPAL*`,
/// `X-MS-TOKEN-*`), Pomerium (`X-Pomerium-*`).
const FOREIGN_PREFIXES: [&str; 5] = [
    "x-auth-request-",
    "x-ms-client-principal",
    "x-ms-token-",
    "x-pomerium-",
    "x-forwarded-user",
];
/// Whole names: Apache's and many apps' user headers.
const FOREIGN_NAMES: [&str; 4] = [
    "remote-user",
    "x-remote-user",
    "x-forwarded-email",
    "x-forwarded-groups",
];

/// Equal names as a CGI-style upstream reads them (PHP, WSGI, nginx's
/// variables), which turn every character but letters and digits into
/// `_`: `X_Forwarded_User` and `X.Forwarded.User` are `X-Forwarded-User`
/// there (both lower case).
fn dashed_eq(a: &str, b: &str) -> bool {
    let dash = |c: u8| if c.is_ascii_alphanumeric() { c } else { b'-' };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// The signed-in user, from a verified ID token (Entra v2 claim names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `sub`: per application in Entra.
    pub subject: String,
    /// `oid` (stable across an Entra tenant's apps), else `sub`.
    pub user_id: String,
    /// `preferred_username` (the UPN in Entra), else email, else `sub`.
    pub username: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub tenant: Option<String>,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
    /// The token listed no groups because the user is in too many (Entra
    /// sends `_claim_names` instead): `groups` is then unknown, not empty.
    #[serde(default)]
    pub groups_overage: bool,
    /// For a user in overage: `groups` came from Microsoft Graph, whole.
    #[serde(default)]
    pub groups_from_graph: bool,
    /// The authentication contexts the token says were satisfied (`acrs`).
    #[serde(default)]
    pub acrs: Vec<String>,
    /// A service principal's own (app-only) bearer token: no user.
    #[serde(default)]
    pub app: bool,
}

impl Identity {
    /// The user's groups are not known: in overage, and Graph did not
    /// tell them. Never the same as "in no group".
    pub fn groups_unknown(&self) -> bool {
        self.groups_overage && !self.groups_from_graph
    }
}

/// Header names, parsed once.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    user: HeaderName,
    user_id: HeaderName,
    email: HeaderName,
    name: HeaderName,
    tenant: HeaderName,
    groups: HeaderName,
    roles: HeaderName,
    preferred_username: HeaderName,
    /// Says why the groups header is short or missing: `cut` (at
    /// `groups_max`) or `unresolved` (in overage, Graph not answering).
    groups_overage: HeaderName,
    groups_max: Option<usize>,
    /// Where the raw ID token goes, if anywhere.
    id_token: Option<HeaderName>,
    /// Where the signed assertion goes (when on; stripped always).
    pub assertion: HeaderName,
    /// App Service's headers too, when on.
    pub easy_auth: Option<EasyAuth>,
    /// The first bytes of every name stripped (`_` counted as `-`): most
    /// of a request's headers start with none of them, and are passed
    /// over without a comparison.
    initials: Vec<u8>,
}

impl IdentityHeaders {
    /// `names` were validated as header names by the configuration.
    pub fn new(names: &IdentityHeaderNames) -> IdentityHeaders {
        // Made once per gateway and copied into every signed-in request: a
        // static name copies without a reference count to change.
        let parse = |n: &str| HeaderName::from_static(n.to_ascii_lowercase().leak());
        let mut initials: Vec<u8> = names
            .all()
            .iter()
            .map(|(_, name)| *name)
            .chain([names.id_token.as_str(), names.assertion_header.as_str()])
            .chain(FOREIGN_PREFIXES)
            .chain(FOREIGN_NAMES)
            .filter_map(|name| name.bytes().next())
            .map(|b| b.to_ascii_lowercase())
            .collect();
        initials.sort_unstable();
        initials.dedup();
        IdentityHeaders {
            initials,
            user: parse(&names.user),
            user_id: parse(&names.user_id),
            email: parse(&names.email),
            name: parse(&names.name),
            tenant: parse(&names.tenant),
            groups: parse(&names.groups),
            roles: parse(&names.roles),
            preferred_username: parse(&names.preferred_username),
            groups_overage: HeaderName::from_static(GROUPS_OVERAGE),
            groups_max: names.groups_max,
            id_token: (!names.id_token.is_empty()).then(|| parse(&names.id_token)),
            assertion: parse(&names.assertion_header),
            easy_auth: names.easy_auth.then_some(EasyAuth {
                tokens: names.easy_auth_tokens,
            }),
        }
    }

    /// How many headers a signed-in request can be given.
    pub fn count(&self) -> usize {
        self.all().len()
            + usize::from(self.id_token.is_some())
            + self.easy_auth.map_or(0, |e| e.names().count())
    }

    fn all(&self) -> [&HeaderName; 9] {
        [
            &self.groups_overage,
            &self.user,
            &self.user_id,
            &self.email,
            &self.name,
            &self.tenant,
            &self.groups,
            &self.roles,
            &self.preferred_username,
        ]
    }

    /// Removes every identity header a client sent: ours, whatever their
    /// case and with any other punctuation for `-` (CGI-style upstreams
    /// read `X_Forwarded_User` and `X.Forwarded.User` as
    /// `X-Forwarded-User`), and those other gateways send
    /// (`FOREIGN_PREFIXES`), which an upstream moved behind authgate may
    /// still believe. `Authorization` is the exception when it carries the
    /// ID token: clients on public routes (RustDesk) send their own there,
    /// and on protected routes [`IdentityHeaders::inject_id_token`]
    /// overwrites it.
    pub fn strip(&self, headers: &mut HeaderMap) {
        // Requests rarely carry any: one pass over their names first
        // instead of a removal per name.
        if !headers.keys().any(|k| self.is_identity(k.as_str())) {
            return;
        }
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| self.is_identity(k.as_str()))
            .cloned()
            .collect();
        for name in &doomed {
            headers.remove(name);
        }
    }

    /// `name` is lower case, as every `HeaderName` is.
    fn is_identity(&self, name: &str) -> bool {
        if !name
            .bytes()
            .next()
            .is_some_and(|first| self.initials.contains(&first))
        {
            return false;
        }
        let id_token = self
            .id_token
            .as_ref()
            .filter(|n| **n != http::header::AUTHORIZATION);
        self.all()
            .into_iter()
            .chain(id_token)
            .chain([&self.assertion])
            .any(|ours| dashed_eq(ours.as_str(), name))
            || FOREIGN_PREFIXES.iter().any(|prefix| {
                name.len() >= prefix.len() && dashed_eq(prefix, &name[..prefix.len()])
            })
            || FOREIGN_NAMES.iter().any(|foreign| dashed_eq(foreign, name))
    }

    /// Passes the signed-in user's ID token on, when configured.
    pub fn inject_id_token(&self, headers: &mut HeaderMap, id_token: &str) {
        let Some(name) = &self.id_token else {
            return;
        };
        let value = if *name == http::header::AUTHORIZATION {
            format!("Bearer {id_token}")
        } else {
            id_token.to_owned()
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name.clone(), value);
        }
    }

    /// Sets every identity header `headers` lacks to an empty value: a
    /// forward-auth answer names each, so that a proxy copying them over
    /// the client's request overwrites whatever the client sent (Caddy 2.6
    /// copies an absent header as the text of its own placeholder).
    pub fn blank_missing(&self, headers: &mut HeaderMap) {
        let mut blank = |name: &HeaderName| {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), HeaderValue::from_static(""));
            }
        };
        let names = self.all().into_iter().chain(self.id_token.as_ref());
        names.chain([&self.assertion]).for_each(&mut blank);
        self.easy_auth
            .into_iter()
            .flat_map(EasyAuth::names)
            .for_each(blank);
    }

    /// Sets the headers for `identity`, proved by `tokens`.
    pub fn inject(&self, headers: &mut HeaderMap, identity: &Identity, tokens: &Tokens<'_>) {
        // Moved, not `apply`'s clones: a fresh value's first clone
        // allocates.
        let IdentityValues(values) = self.values(identity, tokens);
        for (name, value) in values {
            headers.insert(name, value);
        }
    }

    /// The headers for `identity`, proved by `tokens`. Values are UTF-8
    /// as the provider sent them; a value that cannot be a header (control
    /// characters) is left out rather than mangled.
    pub fn values(&self, identity: &Identity, tokens: &Tokens<'_>) -> IdentityValues {
        let mut values = Vec::with_capacity(self.count());
        let mut set = |name: &HeaderName, value: &str| {
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                values.push((name.clone(), value));
            }
        };
        set(&self.user, &identity.username);
        set(&self.preferred_username, &identity.username);
        set(&self.user_id, &identity.user_id);
        if let Some(email) = &identity.email {
            set(&self.email, email);
        }
        if let Some(name) = &identity.name {
            set(&self.name, name);
        }
        if let Some(tenant) = &identity.tenant {
            set(&self.tenant, tenant);
        }
        if identity.groups_unknown() {
            set(&self.groups_overage, "unresolved");
        } else if !identity.groups.is_empty() {
            let listed = match self.groups_max {
                Some(max) if identity.groups.len() > max => {
                    set(&self.groups_overage, "cut");
                    &identity.groups[..max]
                }
                _ => &identity.groups[..],
            };
            set(&self.groups, &listed.join(","));
        }
        if !identity.roles.is_empty() {
            set(&self.roles, &identity.roles.join(","));
        }
        if let Some(easy_auth) = &self.easy_auth {
            easy_auth.headers(identity, tokens, &mut values);
        }
        IdentityValues(values)
    }
}

/// One user's identity headers, built once per opened session and thread
/// (`Session::identity_headers`): building them (eight values checked and
/// copied, groups joined) had cost a signed-in request more than finding
/// its session.
#[derive(Debug, Clone, Default)]
pub struct IdentityValues(Vec<(HeaderName, HeaderValue)>);

impl IdentityValues {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.0 {
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENS: Tokens<'static> = Tokens {
        claims_of: "e30.eyJzdWIiOiJzdWItMSJ9.c2ln",
        id_token: Some("e30.eyJzdWIiOiJzdWItMSJ9.c2ln"),
        access_token: None,
    };

    fn alice() -> Identity {
        Identity {
            subject: "sub-1".into(),
            user_id: "oid-1".into(),
            username: "alice@contoso.example".into(),
            email: Some("alice@contoso.example".into()),
            name: Some("Alïce Example".into()),
            tenant: Some("tid-1".into()),
            groups: vec!["g1".into(), "g2".into()],
            roles: vec![],
            groups_overage: false,
            groups_from_graph: false,
            acrs: Vec::new(),
            app: false,
        }
    }

    #[test]
    fn spoofed_headers_are_stripped_in_any_case_and_repetition() {
        let headers_config = IdentityHeaders::new(&IdentityHeaderNames::default());
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-user", HeaderValue::from_static("admin"));
        headers.append("X-Forwarded-User", HeaderValue::from_static("root"));
        headers.append("x-forwarded-groups", HeaderValue::from_static("admins"));
        headers.append("x-forwarded-email", HeaderValue::from_static("a@b"));
        headers.append(
            "authorization",
            HeaderValue::from_static("Bearer rustdesk-token"),
        );
        headers_config.strip(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(
            headers.contains_key("authorization"),
            "a client's own token is not ours to strip"
        );
    }

    #[test]
    fn the_id_token_goes_where_configured() {
        let names = IdentityHeaderNames {
            id_token: "X-Id-Token".into(),
            ..IdentityHeaderNames::default()
        };
        let headers_config = IdentityHeaders::new(&names);
        let mut headers = HeaderMap::new();
        headers.insert("x-id-token", HeaderValue::from_static("forged"));
        headers_config.strip(&mut headers);
        assert!(headers.is_empty());
        headers_config.inject_id_token(&mut headers, "a.b.c");
        assert_eq!(headers["x-id-token"], "a.b.c");

        let bearer = IdentityHeaders::new(&IdentityHeaderNames {
            id_token: "Authorization".into(),
            ..IdentityHeaderNames::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer rustdesk"));
        bearer.strip(&mut headers);
        assert_eq!(
            headers["authorization"], "Bearer rustdesk",
            "public routes keep their own"
        );
        bearer.inject_id_token(&mut headers, "a.b.c");
        assert_eq!(headers["authorization"], "Bearer a.b.c");
    }

    #[test]
    fn identity_becomes_headers() {
        let headers_config = IdentityHeaders::new(&IdentityHeaderNames::default());
        let mut headers = HeaderMap::new();
        headers_config.inject(&mut headers, &alice(), &TOKENS);
        assert_eq!(headers["x-forwarded-user"], "alice@contoso.example");
        assert_eq!(headers["x-forwarded-user-id"], "oid-1");
        assert_eq!(headers["x-forwarded-groups"], "g1,g2");
        assert_eq!(
            headers["x-forwarded-name"].as_bytes(),
            "Alïce Example".as_bytes()
        );
        assert!(!headers.contains_key("x-forwarded-roles"));
        assert!(!headers.contains_key("x-ms-client-principal"));
    }

    #[test]
    fn groups_cut_or_unknown_say_so() {
        let cut = IdentityHeaders::new(&IdentityHeaderNames {
            groups_max: Some(1),
            ..IdentityHeaderNames::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert(GROUPS_OVERAGE, HeaderValue::from_static("forged"));
        cut.strip(&mut headers);
        assert!(headers.is_empty());
        cut.inject(&mut headers, &alice(), &TOKENS);
        assert_eq!(headers["x-forwarded-groups"], "g1");
        assert_eq!(headers[GROUPS_OVERAGE], "cut");

        let unknown = Identity {
            groups: vec![],
            groups_overage: true,
            ..alice()
        };
        let mut headers = HeaderMap::new();
        cut.inject(&mut headers, &unknown, &TOKENS);
        assert!(!headers.contains_key("x-forwarded-groups"));
        assert_eq!(headers[GROUPS_OVERAGE], "unresolved");

        let resolved = Identity {
            groups_from_graph: true,
            ..alice()
        };
        let mut headers = HeaderMap::new();
        IdentityHeaders::new(&IdentityHeaderNames::default()).inject(
            &mut headers,
            &resolved,
            &TOKENS,
        );
        assert_eq!(headers["x-forwarded-groups"], "g1,g2");
        assert!(!headers.contains_key(GROUPS_OVERAGE));
    }

    #[test]
    fn easy_auth_headers_replace_what_a_client_sent() {
        let names = IdentityHeaderNames {
            easy_auth: true,
            ..IdentityHeaderNames::default()
        };
        let headers_config = IdentityHeaders::new(&names);
        let mut headers = HeaderMap::new();
        for forged in [
            "X-MS-CLIENT-PRINCIPAL",
            "x-ms-client-principal-name",
            "X_MS_CLIENT_PRINCIPAL_ID",
            "x-ms-token-aad-id-token",
        ] {
            headers.insert(
                HeaderName::from_bytes(forged.as_bytes()).unwrap(),
                HeaderValue::from_static("forged"),
            );
        }
        headers_config.strip(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
        headers_config.inject(&mut headers, &alice(), &TOKENS);
        assert_eq!(
            headers["x-ms-client-principal-name"],
            "alice@contoso.example"
        );
        assert_eq!(headers["x-ms-client-principal-id"], "oid-1");
        assert_eq!(headers["x-ms-client-principal-idp"], "aad");
        assert!(headers.contains_key("x-ms-client-principal"));
        assert!(
            !headers.contains_key("x-ms-token-aad-id-token"),
            "tokens only with easy_auth_tokens"
        );

        let with_tokens = IdentityHeaders::new(&IdentityHeaderNames {
            easy_auth_tokens: true,
            ..names
        });
        let mut headers = HeaderMap::new();
        with_tokens.inject(&mut headers, &alice(), &TOKENS);
        assert_eq!(headers["x-ms-token-aad-id-token"], TOKENS.claims_of);
        assert!(!headers.contains_key("x-ms-token-aad-access-token"));
        assert_eq!(with_tokens.count(), 15);
    }
}
