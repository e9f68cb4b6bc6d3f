//! Configuration: one TOML file, overridden key by key from `AUTHGATE_*`
//! environment variables, with `<key>_file` indirection for secrets, turned
//! into a validated, typed [`Config`]. Every error names the key, where its
//! value came from, the bad value and what is expected.
//!
//! This module reads, layers and validates; each feature owns the type of
//! its settings (`net::Timeouts`, `idp::OidcConfig`, `auth::session::
//! SessionConfig`…), and [`Config`] hands each its part.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::auth::identity::IdentityHeaderNames;
use crate::auth::policy::Policy;
use crate::auth::session::{RedisConfig, RedisServers, SessionConfig, StoreKind};
use crate::forward::routes::{Access, RouteConfig, UpstreamUrl};
use crate::forward::ProxyConfig;
use crate::idp::cloud::Cloud;
use crate::idp::{ClientAuth, GroupsOverage, OidcConfig, ResponseMode};
use hyper_util::client::proxy::matcher::Matcher;

use crate::net::acme::{self, AcmeSettings, ChallengeKind, ExternalAccount};
use crate::net::tls::TlsConfig;
use crate::net::{Limits, Timeouts};
use crate::ops::logging::LogConfig;
use crate::outbound::{Egress, ProxyEnv};
use crate::state::{StateDir, ACME_CERT_FILE, ACME_KEY_FILE, SESSION_SECRET_FILE};

/// Sections of the file; an environment variable `AUTHGATE_<SECTION>_<KEY>`
/// whose name starts with one of these targets a key inside it.
const SECTIONS: &[&str] = &[
    "tls", "proxy", "outbound", "timeouts", "limits", "log", "oidc", "session", "headers", "policy",
];
const ENV_PREFIX: &str = "AUTHGATE_";
/// Environment variables that steer the command line, not the file.
const ENV_NOT_KEYS: &[&str] = &["AUTHGATE_CONFIG"];
/// Set by Azure workload identity in pods that use it.
const AZURE_TOKEN_FILE_VAR: &str = "AZURE_FEDERATED_TOKEN_FILE";
const DEFAULT_CERT: &str = "certs/tls.crt";
const DEFAULT_KEY: &str = "certs/tls.key";
/// Algorithms an ID token may be signed with; asymmetric only (RFC 8725:
/// never `none`, never an HMAC keyed with a public key).
const SIGNING_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config key `{key}`{origin}: {message}")]
    Key {
        key: String,
        origin: Origin,
        message: String,
    },
    #[error(
        "environment variable {var} is not a setting; did you mean {meant} (config key `{key}`)?"
    )]
    NearMiss {
        var: String,
        meant: String,
        key: String,
    },
}

/// Where a key's value was set, so an error points at the right place.
#[derive(Debug, Clone, Default)]
pub enum Origin {
    #[default]
    File,
    Env(String),
    SecretFile(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File => Ok(()),
            Origin::Env(var) => write!(f, " (set by environment variable {var})"),
            Origin::SecretFile(path) => write!(f, " (read from {})", path.display()),
        }
    }
}

/// The validated configuration the gateway is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: PublicUrl,
    pub http_redirect_listen: Option<SocketAddr>,
    /// Plain-HTTP listener for `/metrics`; `None`: off.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token of the admin listener's session endpoints; `None`:
    /// one is generated and kept under `state_dir`.
    pub admin_token: Option<String>,
    pub gateway_prefix: String,
    /// Where the gateway keeps what must outlive a run: sessions, the
    /// generated session secret and admin token.
    pub state_dir: StateDir,
    /// Host names users may open besides `public_url`'s (lower case, no
    /// port, no trailing dot).
    pub extra_hosts: Vec<String>,
    /// Requests for any other host get 421 instead of being forwarded
    /// with `public_url`'s host.
    pub strict_host: bool,
    pub tls: TlsConfig,
    pub proxy: ProxyConfig,
    /// How the gateway's own requests (provider, ACME CA) leave: direct
    /// or through an HTTP proxy.
    pub outbound: Egress,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: LogConfig,
    /// Every route, the default `/` one (from `upstream`) included.
    pub routes: Vec<RouteConfig>,
    /// Sign-in; `None` when no route needs it.
    pub oidc: Option<OidcConfig>,
    pub session: Option<SessionConfig>,
    pub headers: IdentityHeaderNames,
    /// Problems worth a warning that do not stop the gateway.
    pub warnings: Vec<String>,
}

/// The origin users open, e.g. `https://console.example.com:8443`.
#[derive(Debug, Clone)]
pub struct PublicUrl {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl PublicUrl {
    /// Entra accepts only https:// redirect URIs, or http://localhost.
    pub fn acceptable_to_entra(&self) -> bool {
        self.scheme == Scheme::HTTPS || is_loopback_host(self.host())
    }

    pub fn host(&self) -> &str {
        self.authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// The file's shape, before validation.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: String,
    public_url: String,
    upstream: String,
    http_redirect_listen: Option<String>,
    admin_listen: String,
    admin_token: Option<String>,
    gateway_prefix: String,
    state_dir: PathBuf,
    extra_hosts: Vec<String>,
    strict_host: bool,
    tls: RawTls,
    proxy: RawProxy,
    outbound: RawOutbound,
    timeouts: Timeouts,
    limits: Limits,
    log: LogConfig,
    access: Access,
    policy: Policy,
    routes: Vec<RawRoute>,
    oidc: RawOidc,
    session: RawSession,
    headers: IdentityHeaderNames,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawOidc {
    issuer: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_auth: ClientAuth,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    federated_token_path: Option<PathBuf>,
    scopes: Vec<String>,
    callback_path: String,
    response_mode: ResponseMode,
    pass_unknown_callbacks: bool,
    allowed_tenants: Vec<String>,
    algorithms: Vec<String>,
    #[serde(with = "humantime_serde")]
    clock_skew: Duration,
    ca: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    jwks_refresh: Duration,
    bearer: bool,
    bearer_audiences: Vec<String>,
    bearer_scopes: Vec<String>,
    bearer_app_tokens: bool,
    bearer_accept_v1: bool,
    bearer_v1_issuer: Option<String>,
    groups_overage: GroupsOverage,
    graph_url: Option<String>,
}

impl Default for RawOidc {
    fn default() -> Self {
        RawOidc {
            issuer: None,
            client_id: None,
            client_secret: None,
            client_auth: ClientAuth::ClientSecretBasic,
            client_certificate: None,
            client_key: None,
            federated_token_path: None,
            scopes: ["openid", "profile", "email", "offline_access"]
                .map(String::from)
                .to_vec(),
            callback_path: "/api/oidc/callback".into(),
            response_mode: ResponseMode::Query,
            pass_unknown_callbacks: false,
            allowed_tenants: Vec::new(),
            algorithms: vec!["RS256".into()],
            clock_skew: Duration::from_secs(60),
            ca: None,
            jwks_refresh: Duration::from_secs(3600),
            bearer: true,
            bearer_audiences: Vec::new(),
            bearer_scopes: Vec::new(),
            bearer_app_tokens: false,
            bearer_accept_v1: false,
            bearer_v1_issuer: None,
            groups_overage: GroupsOverage::Graph,
            graph_url: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawSession {
    store: StoreKind,
    #[serde(with = "humantime_serde")]
    cache_ttl: Duration,
    redis_url: Option<String>,
    redis_sentinels: Vec<String>,
    redis_sentinel_master: Option<String>,
    redis_cluster: Vec<String>,
    redis_password: Option<String>,
    redis_ca: Option<PathBuf>,
    secret: Option<String>,
    previous_secrets: Vec<String>,
    cookie_name: String,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    lifetime: Duration,
    #[serde(with = "humantime_serde")]
    refresh_before: Duration,
}

impl Default for RawSession {
    fn default() -> Self {
        RawSession {
            store: StoreKind::Embedded,
            cache_ttl: Duration::from_secs(5),
            redis_url: None,
            redis_sentinels: Vec::new(),
            redis_sentinel_master: None,
            redis_cluster: Vec::new(),
            redis_password: None,
            redis_ca: None,
            secret: None,
            previous_secrets: Vec::new(),
            cookie_name: "__Host-authgate".into(),
            idle_timeout: Duration::from_secs(8 * 3600),
            lifetime: Duration::from_secs(24 * 3600),
            refresh_before: Duration::from_secs(300),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "0.0.0.0:8443".into(),
            public_url: "https://localhost:8443".into(),
            upstream: "http://127.0.0.1:21114".into(),
            http_redirect_listen: None,
            admin_listen: "127.0.0.1:9464".into(),
            admin_token: None,
            gateway_prefix: "/oauth2/".into(),
            state_dir: "state".into(),
            extra_hosts: Vec::new(),
            strict_host: false,
            tls: RawTls::default(),
            proxy: RawProxy::default(),
            outbound: RawOutbound::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            access: Access::Protected,
            policy: Policy::default(),
            routes: Vec::new(),
            oidc: RawOidc::default(),
            session: RawSession::default(),
            headers: IdentityHeaderNames::default(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    reload_check: Duration,
    hsts: String,
    acme: bool,
    acme_directory: String,
    acme_contact: Vec<String>,
    acme_eab_kid: Option<String>,
    acme_eab_hmac_key: Option<String>,
    acme_ca: Option<PathBuf>,
    acme_challenge: Option<ChallengeKind>,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            cert: None,
            key: None,
            reload_check: Duration::from_secs(10),
            hsts: "max-age=31536000".into(),
            acme: false,
            acme_directory: acme::LETS_ENCRYPT.into(),
            acme_contact: Vec::new(),
            acme_eab_kid: None,
            acme_eab_hmac_key: None,
            acme_ca: None,
            acme_challenge: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    ca: Option<PathBuf>,
    trusted_proxies: Vec<String>,
    preserve_host: bool,
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            ca: None,
            trusted_proxies: Vec::new(),
            preserve_host: true,
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawOutbound {
    proxy: Option<String>,
    no_proxy: Option<String>,
    proxy_upstreams: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    upstream: String,
    access: Option<Access>,
    /// Replaces the top-level `[policy]` for this route.
    policy: Option<Policy>,
}

impl Config {
    /// Loads `path` (absent and not `required` → defaults), applies the
    /// environment, reads `*_file` secrets and validates the result.
    pub fn load(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.into(),
            source: Box::new(e),
        })?;
        let mut origins = Origins::default();
        let env: Vec<(String, String)> = env.into_iter().collect();
        let proxy_env = ProxyEnv::of(&env);
        let ignored = apply_env(&mut table, env, &mut origins)?;
        read_secret_files(&mut table, &mut origins)?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().to_owned();
                origins.error(&key, message)
            })?;
        let mut config = raw.validate(&origins, &proxy_env)?;
        config.warnings.extend(ignored.into_iter().map(|var| {
            format!("environment variable {var} is not a setting of authgate; ignored")
        }));
        Ok(config)
    }
}

/// Remembers which keys the environment or a secret file set.
#[derive(Debug, Default)]
struct Origins(HashMap<String, Origin>);

impl Origins {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let origin = self
            .0
            .iter()
            .find(|(k, _)| key == k.as_str() || key.starts_with(&format!("{k}.")))
            .map(|(_, o)| o.clone())
            .unwrap_or_default();
        ConfigError::Key {
            key: key.to_owned(),
            origin,
            message: message.into(),
        }
    }

    fn invalid(&self, key: &str, value: &str, expected: &str) -> ConfigError {
        self.error(key, format!("`{value}` is not valid; expected {expected}"))
    }
}

/// `AUTHGATE_TLS_CERT=x` sets `tls.cert`; `AUTHGATE_UPSTREAM=x` sets the
/// top-level `upstream`. Values that parse as TOML (numbers, booleans,
/// arrays, inline tables) keep that type, anything else is a string.
///
/// An `AUTHGATE_*` variable that names no setting is passed over: silently
/// when it has the shape of a Kubernetes service link (a Service named
/// `authgate` puts `AUTHGATE_PORT=tcp://…` into every pod of its
/// namespace), else returned to be warned about. One that nearly names a
/// setting (a known section's prefix, or two edits away) is a typo, and
/// stops start-up naming the setting meant.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    origins: &mut Origins,
) -> Result<Vec<String>, ConfigError> {
    let known = known_keys();
    let mut ignored = Vec::new();
    for (var, value) in env {
        if var == AZURE_TOKEN_FILE_VAR {
            // Azure workload identity's own variable, when ours is not set.
            if let toml::Value::Table(oidc) = table
                .entry("oidc".to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                if !oidc.contains_key("federated_token_path") {
                    oidc.insert("federated_token_path".into(), toml::Value::String(value));
                    origins
                        .0
                        .insert("oidc.federated_token_path".into(), Origin::Env(var));
                }
            }
            continue;
        }
        let Some(name) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_NOT_KEYS.contains(&var.as_str()) {
            continue;
        }
        let name = name.to_ascii_lowercase();
        let section = SECTIONS.iter().find(|s| {
            name.len() > s.len() + 1 && name.starts_with(*s) && name[s.len()..].starts_with('_')
        });
        let (target, key) = match section {
            Some(section) => {
                let entry = table
                    .entry(section.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(inner) = entry else {
                    return Err(origins.error(section, "must be a table"));
                };
                (inner, name[section.len() + 1..].to_owned())
            }
            None => (&mut *table, name.clone()),
        };
        let path = match section {
            Some(section) => format!("{section}.{key}"),
            None => key.clone(),
        };
        let setting = path.strip_suffix("_file").unwrap_or(&path);
        if !known.iter().any(|k| k == &path || k == setting) {
            if is_service_link(&var) {
                continue;
            }
            if let Some(meant) = meant_key(&var, section.copied(), &known) {
                return Err(ConfigError::NearMiss {
                    var,
                    meant: env_name(meant),
                    key: meant.clone(),
                });
            }
            ignored.push(var);
            continue;
        }
        target.insert(key, env_value(&value));
        origins.0.insert(path, Origin::Env(var.clone()));
    }
    Ok(ignored)
}

/// Every key the file and the environment may set (`key` or
/// `section.key`), read off the defaults, so the list follows the types.
fn known_keys() -> Vec<String> {
    let defaults = serde_json::to_value(RawConfig::default()).expect("the defaults serialize");
    let mut keys = Vec::new();
    for (key, value) in defaults.as_object().expect("the defaults are a table") {
        match value {
            serde_json::Value::Object(section) => {
                keys.extend(section.keys().map(|inner| format!("{key}.{inner}")));
            }
            _ => keys.push(key.clone()),
        }
    }
    keys
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// The shapes of the variables Kubernetes injects for every Service of a
/// namespace (`<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]`,
/// `<NAME>_PORT`, `<NAME>_PORT_<n>_<TCP|UDP|SCTP>[_PROTO|_PORT|_ADDR]`),
/// whatever the Service's name (`authgate-tls` gives `AUTHGATE_TLS_…`).
/// kubernetes.io/docs/concepts/services-networking/service/#environment-variables
fn is_service_link(var: &str) -> bool {
    let parts: Vec<&str> = var.split('_').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let protocol = |s: &str| matches!(s, "TCP" | "UDP" | "SCTP");
    parts.windows(2).enumerate().any(|(at, pair)| {
        let rest = &parts[at + 2..];
        match pair {
            ["SERVICE", "HOST"] => rest.is_empty(),
            ["SERVICE", "PORT"] => true,
            [_, "PORT"] => match rest {
                [] => true,
                [n, p] => numeric(n) && protocol(p),
                [n, p, field] => {
                    numeric(n) && protocol(p) && matches!(*field, "PROTO" | "PORT" | "ADDR")
                }
                _ => false,
            },
            _ => false,
        }
    })
}

/// The key a variable that names none was probably meant for: the nearest
/// key of the section it names, or one within two edits.
fn meant_key<'k>(var: &str, section: Option<&str>, known: &'k [String]) -> Option<&'k String> {
    let (distance, nearest) = known
        .iter()
        .filter(|key| section.is_none_or(|s| key.starts_with(&format!("{s}."))))
        .map(|key| (strsim::levenshtein(var, &env_name(key)), key))
        .min_by_key(|(distance, _)| *distance)?;
    (distance <= 2 || section.is_some()).then_some(nearest)
}

fn env_value(value: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

/// `x_file = "/run/secrets/x"` becomes `x = <file content>` (trailing
/// newline trimmed), at the top level and inside sections, so secrets can
/// come from Docker or Kubernetes secret mounts.
fn read_secret_files(table: &mut toml::Table, origins: &mut Origins) -> Result<(), ConfigError> {
    let mut sections: Vec<String> = vec![String::new()];
    sections.extend(
        table
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone()),
    );
    for section in sections {
        let target = if section.is_empty() {
            &mut *table
        } else {
            match table.get_mut(&section) {
                Some(toml::Value::Table(t)) => t,
                _ => continue,
            }
        };
        let file_keys: Vec<String> = target
            .keys()
            .filter(|k| k.ends_with("_file"))
            .cloned()
            .collect();
        for file_key in file_keys {
            let key = file_key.trim_end_matches("_file").to_owned();
            let path_of = |k: &str| {
                if section.is_empty() {
                    k.to_owned()
                } else {
                    format!("{section}.{k}")
                }
            };
            let file_path = path_of(&file_key);
            if target.contains_key(&key) {
                return Err(origins.error(
                    &file_path,
                    format!("set either `{}` or `{file_path}`, not both", path_of(&key)),
                ));
            }
            let Some(toml::Value::String(location)) = target.remove(&file_key) else {
                return Err(origins.error(&file_path, "expected a file path (a string)"));
            };
            let content = std::fs::read_to_string(&location).map_err(|e| {
                origins.error(
                    &file_path,
                    format!("cannot read secret file `{location}`: {e}"),
                )
            })?;
            let content = content.trim_end_matches(['\r', '\n']).to_owned();
            target.insert(key.clone(), toml::Value::String(content));
            origins
                .0
                .insert(path_of(&key), Origin::SecretFile(PathBuf::from(location)));
        }
    }
    Ok(())
}

impl RawOutbound {
    /// `outbound.proxy` (all destinations), else the environment's proxies;
    /// `outbound.no_proxy`, else `NO_PROXY`.
    fn egress(&self, origins: &Origins, env: &ProxyEnv) -> Result<Egress, ConfigError> {
        let check = |value: &str, source: &str| {
            let uri = Uri::from_str(value).ok();
            let plain = uri.as_ref().and_then(Uri::scheme) == Some(&Scheme::HTTP)
                && uri.as_ref().and_then(Uri::host).is_some();
            // The value is not shown: it may carry credentials.
            plain.then_some(()).ok_or_else(|| {
                origins.error(
                    "outbound.proxy",
                    format!(
                        "{source} is not an http:// proxy URL such as \
                         http://proxy.example.com:3128 (credentials as \
                         http://user:password@proxy.example.com:3128; a proxy spoken to \
                         over https is not supported)"
                    ),
                )
            })
        };
        let no = self
            .no_proxy
            .clone()
            .or_else(|| env.no.as_ref().map(|(_, v)| v.clone()))
            .unwrap_or_default();
        let builder = match self.proxy.as_deref().map(str::trim) {
            Some(proxy) if !proxy.is_empty() => {
                check(proxy, "the value")?;
                Matcher::builder().all(proxy.to_owned())
            }
            _ => {
                let mut builder = Matcher::builder();
                if env.http.is_none() && env.https.is_none() && env.all.is_none() {
                    return Ok(Egress::direct());
                }
                if let Some((name, value)) = &env.http {
                    check(value, &format!("the environment variable {name}"))?;
                    builder = builder.http(value.clone());
                }
                if let Some((name, value)) = &env.https {
                    check(value, &format!("the environment variable {name}"))?;
                    builder = builder.https(value.clone());
                }
                if let Some((name, value)) = &env.all {
                    check(value, &format!("the environment variable {name}"))?;
                    builder = builder.all(value.clone());
                }
                builder
            }
        };
        Ok(Egress::through(builder.no(no).build()))
    }
}

impl RawConfig {
    /// `tls.acme_*`, for `public_url`'s host and the extra hosts.
    fn acme_settings(
        &self,
        origins: &Origins,
        public_url: &PublicUrl,
        extra_hosts: &[String],
        listen: SocketAddr,
        http_redirect_listen: Option<SocketAddr>,
    ) -> Result<AcmeSettings, ConfigError> {
        let tls = &self.tls;
        let directory = tls.acme_directory.trim();
        let uri = Uri::from_str(directory).ok();
        if uri.as_ref().and_then(Uri::scheme) != Some(&Scheme::HTTPS)
            || uri.as_ref().and_then(Uri::host).is_none()
        {
            return Err(origins.invalid(
                "tls.acme_directory",
                directory,
                "the https:// URL of an ACME directory, such as \
                 https://acme-v02.api.letsencrypt.org/directory (Let's Encrypt) or \
                 https://acme-staging-v02.api.letsencrypt.org/directory (its staging)",
            ));
        }
        let contact = tls
            .acme_contact
            .iter()
            .enumerate()
            .map(|(i, value)| {
                let address = value.trim().trim_start_matches("mailto:");
                let parts: Vec<&str> = address.split('@').collect();
                let plain = |c: char| !c.is_whitespace() && !matches!(c, ',' | '<' | '>');
                match parts[..] {
                    [user, domain]
                        if !user.is_empty()
                            && domain.contains('.')
                            && address.chars().all(plain) =>
                    {
                        Ok(format!("mailto:{address}"))
                    }
                    _ => Err(origins.invalid(
                        &format!("tls.acme_contact[{i}]"),
                        value,
                        "an e-mail address for the CA's expiry and incident notices, \
                         such as admin@example.com",
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let eab = match (&tls.acme_eab_kid, &tls.acme_eab_hmac_key) {
            (None, None) => None,
            (Some(kid), Some(key)) => {
                use base64::Engine;
                let hmac_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim().trim_end_matches('='))
                    .ok()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| {
                        origins.error(
                            "tls.acme_eab_hmac_key",
                            "is not base64url: expected the HMAC key exactly as the CA gives it",
                        )
                    })?;
                Some(ExternalAccount {
                    kid: kid.trim().to_owned(),
                    hmac_key,
                })
            }
            (Some(_), None) => {
                return Err(origins.error(
                    "tls.acme_eab_hmac_key",
                    "missing: `tls.acme_eab_kid` is set, and the CA gives both",
                ))
            }
            (None, Some(_)) => {
                return Err(origins.error(
                    "tls.acme_eab_kid",
                    "missing: `tls.acme_eab_hmac_key` is set, and the CA gives both",
                ))
            }
        };
        if let Some(ca) = &tls.acme_ca {
            require_readable(origins, "tls.acme_ca", ca)?;
        }
        // TLS-ALPN-01 needs nothing on port 80; HTTP-01 is the one left
        // when port 80 is served here and HTTPS is not on 443.
        let challenge = tls.acme_challenge.unwrap_or(match http_redirect_listen {
            Some(_) if listen.port() != 443 => ChallengeKind::Http01,
            _ => ChallengeKind::TlsAlpn01,
        });
        if challenge == ChallengeKind::Http01 && http_redirect_listen.is_none() {
            return Err(origins.error(
                "tls.acme_challenge",
                "`http-01` is answered on `http_redirect_listen` (port 80 to the CA): set it, \
                 or use `tls-alpn-01`",
            ));
        }
        let mut names = vec![public_url.host().to_ascii_lowercase()];
        for host in extra_hosts {
            if !names.contains(host) {
                names.push(host.clone());
            }
        }
        Ok(AcmeSettings {
            directory: directory.to_owned(),
            contact,
            eab,
            ca: tls.acme_ca.clone(),
            challenge,
            names,
            egress: Egress::direct(),
        })
    }

    fn validate(self, origins: &Origins, proxy_env: &ProxyEnv) -> Result<Config, ConfigError> {
        let mut warnings = Vec::new();
        let outbound = self.outbound.egress(origins, proxy_env)?;
        let listen = parse_socket_addr(origins, "listen", &self.listen)?;
        let http_redirect_listen = self
            .http_redirect_listen
            .as_deref()
            .filter(|v| !v.is_empty())
            .map(|v| parse_socket_addr(origins, "http_redirect_listen", v))
            .transpose()?;
        let admin_listen = Some(self.admin_listen.as_str())
            .filter(|v| !v.is_empty())
            .map(|v| parse_socket_addr(origins, "admin_listen", v))
            .transpose()?;
        let public_url = parse_public_url(origins, &self.public_url)?;
        if !public_url.acceptable_to_entra() {
            warnings.push(format!(
                "public_url `{public_url}` is http:// on a host that is not localhost: \
                 Microsoft Entra ID accepts only https:// (or http://localhost) redirect URIs"
            ));
        }

        let extra_hosts: Vec<String> = self
            .extra_hosts
            .iter()
            .enumerate()
            .map(|(i, value)| {
                Authority::from_str(value)
                    .ok()
                    .filter(|a| !a.host().is_empty() && !value.contains('@'))
                    .map(|a| a.host().trim_end_matches('.').to_ascii_lowercase())
                    .ok_or_else(|| {
                        origins.invalid(
                            &format!("extra_hosts[{i}]"),
                            value,
                            "a host name or address users open, such as console.example.com",
                        )
                    })
            })
            .collect::<Result<_, _>>()?;

        let prefix = &self.gateway_prefix;
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 3 {
            return Err(origins.invalid(
                "gateway_prefix",
                prefix,
                "a path that starts and ends with `/`, such as /oauth2/",
            ));
        }

        let mut routes = vec![RouteConfig {
            prefix: "/".into(),
            upstream: parse_upstream(origins, "upstream", &self.upstream)?,
            access: self.access,
            policy: self.policy.clone(),
        }];
        for (i, raw) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            if !raw.prefix.starts_with('/') {
                return Err(origins.invalid(
                    &key("prefix"),
                    &raw.prefix,
                    "a path starting with `/`",
                ));
            }
            if let Some(earlier) = routes.iter().position(|r| r.prefix == raw.prefix) {
                let other = if earlier == 0 {
                    "`upstream`".to_owned()
                } else {
                    format!("routes[{}]", earlier - 1)
                };
                return Err(origins.error(
                    &key("prefix"),
                    format!("`{}` is already routed by {other}", raw.prefix),
                ));
            }
            let access = raw.access.unwrap_or(self.access);
            let step_up = raw
                .policy
                .as_ref()
                .is_some_and(|p| !p.require_acrs.is_empty());
            if access == Access::Public && step_up {
                return Err(origins.error(
                    &key("policy.require_acrs"),
                    "a public route has no sign-in to step up: remove require_acrs, \
                     or make the route protected",
                ));
            }
            routes.push(RouteConfig {
                prefix: raw.prefix.clone(),
                upstream: parse_upstream(origins, &key("upstream"), &raw.upstream)?,
                access,
                policy: raw.policy.clone().unwrap_or_else(|| self.policy.clone()),
            });
        }

        // [policy] is also every route's without one of its own: its
        // require_acrs must reach a protected route.
        let inherits = |r: &RouteConfig| r.access != Access::Public && r.policy == self.policy;
        if !self.policy.require_acrs.is_empty() && !routes.iter().any(inherits) {
            return Err(origins.error(
                "policy.require_acrs",
                "no protected route uses [policy], and a public route has no sign-in to step up",
            ));
        }

        let hsts = match self.tls.hsts.trim() {
            "" => None,
            value => Some(
                HeaderValue::from_str(value)
                    .ok()
                    .filter(|_| value.to_ascii_lowercase().contains("max-age="))
                    .ok_or_else(|| {
                        origins.invalid(
                            "tls.hsts",
                            value,
                            "a Strict-Transport-Security value such as `max-age=31536000`, \
                             or empty for none",
                        )
                    })?,
            ),
        };
        let acme = self.tls.acme.then(|| {
            self.acme_settings(
                origins,
                &public_url,
                &extra_hosts,
                listen,
                http_redirect_listen,
            )
            .map(|acme| AcmeSettings {
                egress: outbound.clone(),
                ..acme
            })
        });
        let tls = match (self.tls.cert, self.tls.key) {
            (Some(_), _) | (_, Some(_)) if acme.is_some() => {
                return Err(origins.error(
                    "tls.acme",
                    "`tls.acme = true` obtains the certificate itself: remove `tls.cert` and \
                     `tls.key`, or set `tls.acme = false` to serve those files",
                ))
            }
            (None, None) if acme.is_some() => TlsConfig {
                cert: self.state_dir.join(ACME_CERT_FILE),
                key: self.state_dir.join(ACME_KEY_FILE),
                may_self_sign: false,
                reload_check: self.tls.reload_check,
                hsts,
                acme: acme.transpose()?,
            },
            (None, None) => TlsConfig {
                cert: DEFAULT_CERT.into(),
                key: DEFAULT_KEY.into(),
                may_self_sign: true,
                reload_check: self.tls.reload_check,
                hsts,
                acme: None,
            },
            (Some(cert), Some(key)) => {
                require_readable(origins, "tls.cert", &cert)?;
                require_readable(origins, "tls.key", &key)?;
                TlsConfig {
                    cert,
                    key,
                    may_self_sign: false,
                    reload_check: self.tls.reload_check,
                    hsts,
                    acme: None,
                }
            }
            (Some(_), None) => {
                return Err(origins.error(
                    "tls.key",
                    "missing: `tls.cert` is set, so `tls.key` must be set too",
                ))
            }
            (None, Some(_)) => {
                return Err(origins.error(
                    "tls.cert",
                    "missing: `tls.key` is set, so `tls.cert` must be set too",
                ))
            }
        };
        if tls.reload_check.is_zero() {
            return Err(origins.invalid(
                "tls.reload_check",
                "0s",
                "a duration above zero, such as 10s",
            ));
        }

        if let Some(ca) = &self.proxy.ca {
            require_readable(origins, "proxy.ca", ca)?;
        }
        let trusted_proxies = self
            .proxy
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, v)| parse_net(origins, &format!("proxy.trusted_proxies[{i}]"), v))
            .collect::<Result<_, _>>()?;

        if !(8 * 1024..=1024 * 1024).contains(&self.limits.max_header_bytes) {
            return Err(origins.invalid(
                "limits.max_header_bytes",
                &self.limits.max_header_bytes.to_string(),
                "a size in bytes between 8192 and 1048576",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(origins.invalid("limits.max_connections", "0", "at least 1"));
        }
        for (key, value) in [
            ("timeouts.tls_handshake", self.timeouts.tls_handshake),
            ("timeouts.header_read", self.timeouts.header_read),
            ("timeouts.connect", self.timeouts.connect),
            (
                "timeouts.upstream_response",
                self.timeouts.upstream_response,
            ),
            ("timeouts.idle", self.timeouts.idle),
        ] {
            if value.is_zero() {
                return Err(origins.invalid(key, "0s", "a duration above zero, such as 30s"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(origins.invalid(
                "log.level",
                &self.log.level,
                "a level (error, warn, info, debug, trace) or a filter such as `info,authgate=debug`",
            ));
        }

        let signs_in = routes.iter().any(|r| r.access == Access::Protected);
        let oidc = match (&self.oidc.issuer, signs_in) {
            (None, false) => None,
            (None, true) => {
                return Err(origins.error(
                    "oidc.issuer",
                    "missing: routes with `access = \"protected\"` (the default) need sign-in. \
                     Set oidc.issuer, oidc.client_id and oidc.client_secret (see README, \"Entra set-up\"), \
                     or set `access = \"public\"` to run without sign-in",
                ))
            }
            (Some(_), _) => Some(validate_oidc(self.oidc, &public_url, origins)?),
        };
        if oidc.is_some() && self.session.secret.is_none() {
            warnings.push(format!(
                "session.secret is not set: using one generated and kept in {}, which instances \
                 that share sessions cannot share; set one from `authgate gen-secret`",
                self.state_dir.join(SESSION_SECRET_FILE).display()
            ));
        }
        let admin_token = self.admin_token.filter(|t| !t.is_empty());
        if admin_token.as_ref().is_some_and(|t| t.trim().len() < 16) {
            return Err(origins.invalid(
                "admin_token",
                "(hidden)",
                "at least 16 characters, such as the output of `authgate gen-secret`",
            ));
        }
        let session = oidc
            .as_ref()
            .map(|_| validate_session(self.session, origins))
            .transpose()?;
        let id_token = (!self.headers.id_token.is_empty())
            .then_some(("id_token", self.headers.id_token.as_str()));
        let assertion = ("assertion_header", self.headers.assertion_header.as_str());
        for (field, name) in self
            .headers
            .all()
            .into_iter()
            .chain(id_token)
            .chain([assertion])
        {
            if http::HeaderName::from_str(name).is_err() {
                return Err(origins.invalid(
                    &format!("headers.{field}"),
                    name,
                    "an HTTP header name",
                ));
            }
        }

        if self.headers.assertion_key_rotation < Duration::from_secs(3600) {
            return Err(origins.invalid(
                "headers.assertion_key_rotation",
                &humantime::format_duration(self.headers.assertion_key_rotation).to_string(),
                "at least 1h (a new key is published 10 minutes before it signs)",
            ));
        }
        if self.headers.groups_max == Some(0) {
            return Err(origins.invalid(
                "headers.groups_max",
                "0",
                "at least 1 (leave it unset to pass every group)",
            ));
        }
        if self.headers.easy_auth_tokens && !self.headers.easy_auth {
            return Err(origins.invalid(
                "headers.easy_auth_tokens",
                "true",
                "false unless headers.easy_auth = true (the tokens come with App Service's headers)",
            ));
        }

        Ok(Config {
            oidc,
            session,
            headers: self.headers,
            listen,
            public_url,
            http_redirect_listen,
            admin_listen,
            admin_token: admin_token.map(|t| t.trim().to_owned()),
            gateway_prefix: self.gateway_prefix,
            state_dir: StateDir::new(self.state_dir),
            extra_hosts,
            strict_host: self.strict_host,
            tls,
            proxy: ProxyConfig {
                ca: self.proxy.ca,
                trusted_proxies,
                preserve_host: self.proxy.preserve_host,
                egress: if self.outbound.proxy_upstreams {
                    outbound.clone()
                } else {
                    Egress::direct()
                },
            },
            outbound,
            timeouts: self.timeouts,
            limits: self.limits,
            log: self.log,
            routes,
            warnings,
        })
    }
}

fn validate_oidc(
    raw: RawOidc,
    public_url: &PublicUrl,
    origins: &Origins,
) -> Result<OidcConfig, ConfigError> {
    let issuer = raw.issuer.unwrap_or_default();
    if parse_issuer(&issuer).is_none() {
        return Err(origins.invalid(
            "oidc.issuer",
            &issuer,
            "an https:// issuer URL such as https://login.microsoftonline.com/<tenant id>/v2.0",
        ));
    }
    // Entra's multi-tenant issuers, in every cloud: discovery says
    // `https://<host>/{tenantid}/v2.0`, tokens carry the user's own tenant.
    let multi_tenant = crate::idp::cloud::is_multi_tenant(&issuer);
    if multi_tenant && raw.allowed_tenants.is_empty() {
        return Err(origins.error(
            "oidc.allowed_tenants",
            format!(
                "missing: the issuer `{issuer}` lets users of any Entra tenant sign in; \
                 list the tenant ids (Directory (tenant) ID) that may"
            ),
        ));
    }
    let client_id = raw.client_id.filter(|v| !v.is_empty()).ok_or_else(|| {
        origins.error(
            "oidc.client_id",
            "missing: the Application (client) ID of the app registration",
        )
    })?;
    let (mut client_secret, mut client_certificate, mut federated_token_path) = (None, None, None);
    match raw.client_auth {
        ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
            client_secret = Some(raw.client_secret.filter(|v| !v.is_empty()).ok_or_else(|| {
                origins.error(
                    "oidc.client_secret",
                    "missing: a client secret *value* of the app registration (or oidc.client_secret_file, \
                     or AUTHGATE_OIDC_CLIENT_SECRET)",
                )
            })?);
        }
        ClientAuth::PrivateKeyJwt => {
            let cert = raw.client_certificate.ok_or_else(|| {
                origins.error(
                    "oidc.client_certificate",
                    "missing: client_auth = \"private_key_jwt\" needs the certificate (PEM) uploaded to the app registration",
                )
            })?;
            let key = raw.client_key.ok_or_else(|| {
                origins.error(
                    "oidc.client_key",
                    "missing: the private key (PEM) of oidc.client_certificate",
                )
            })?;
            require_readable(origins, "oidc.client_certificate", &cert)?;
            require_readable(origins, "oidc.client_key", &key)?;
            client_certificate = Some((cert, key));
        }
        ClientAuth::Federated => {
            let path = raw.federated_token_path.ok_or_else(|| {
                origins.error(
                    "oidc.federated_token_path",
                    "missing: client_auth = \"federated\" needs the file holding the workload's token \
                     (AZURE_FEDERATED_TOKEN_FILE sets it on AKS)",
                )
            })?;
            require_readable(origins, "oidc.federated_token_path", &path)?;
            federated_token_path = Some(path);
        }
    }
    if !raw.scopes.iter().any(|s| s == "openid") {
        return Err(origins.error("oidc.scopes", "must include `openid`"));
    }
    if !raw.callback_path.starts_with('/') || raw.callback_path.contains(['?', '#']) {
        return Err(origins.invalid(
            "oidc.callback_path",
            &raw.callback_path,
            "a path such as /api/oidc/callback",
        ));
    }
    let algorithms = raw
        .algorithms
        .iter()
        .enumerate()
        .map(|(i, name)| {
            SIGNING_ALGORITHMS
                .contains(&name.as_str())
                .then(|| jsonwebtoken::Algorithm::from_str(name).ok())
                .flatten()
                .ok_or_else(|| {
                    origins.invalid(
                        &format!("oidc.algorithms[{i}]"),
                        name,
                        &format!("one of {}", SIGNING_ALGORITHMS.join(", ")),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if algorithms.is_empty() {
        return Err(origins.error(
            "oidc.algorithms",
            "must name at least one algorithm, such as RS256",
        ));
    }
    if let Some(ca) = &raw.ca {
        require_readable(origins, "oidc.ca", ca)?;
    }
    let graph_url = match raw.graph_url {
        Some(url) => {
            let valid = parse_issuer(&url).is_some_and(|(scheme, _)| scheme == Scheme::HTTPS);
            if !valid {
                return Err(origins.invalid(
                    "oidc.graph_url",
                    &url,
                    "an https:// URL such as https://graph.microsoft.com",
                ));
            }
            Some(url.trim_end_matches('/').to_owned())
        }
        None => Cloud::of_issuer(&issuer).graph_url().map(str::to_owned),
    };
    let bearer_v1_issuer = match (raw.bearer_accept_v1, raw.bearer_v1_issuer) {
        (false, _) => None,
        (true, Some(template)) => {
            let valid = template.contains("{tenantid}")
                && parse_issuer(&template.replace("{tenantid}", "t"))
                    .is_some_and(|(scheme, _)| scheme == Scheme::HTTPS);
            if !valid {
                return Err(origins.invalid(
                    "oidc.bearer_v1_issuer",
                    &template,
                    "an https:// issuer holding {tenantid}, such as https://sts.windows.net/{tenantid}/",
                ));
            }
            Some(template)
        }
        (true, None) => match Cloud::of_issuer(&issuer).v1_issuer() {
            Some(template) => Some(template.to_owned()),
            None => {
                return Err(origins.error(
                    "oidc.bearer_accept_v1",
                    "v1 access tokens are Entra's, and oidc.issuer names no Entra cloud; \
                     set oidc.bearer_v1_issuer to their issuer ({tenantid} for the tenant)",
                ))
            }
        },
    };
    // An API's v1 tokens are most often for its App ID URI.
    let bearer_audiences = match (raw.bearer_audiences.is_empty(), raw.bearer_accept_v1) {
        (true, false) => vec![client_id.clone()],
        (true, true) => vec![client_id.clone(), format!("api://{client_id}")],
        (false, _) => raw.bearer_audiences,
    };
    Ok(OidcConfig {
        bearer: raw.bearer,
        bearer_audiences,
        bearer_scopes: raw.bearer_scopes,
        bearer_app_tokens: raw.bearer_app_tokens,
        redirect_uri: format!("{public_url}{}", raw.callback_path),
        issuer,
        multi_tenant,
        client_id,
        client_secret,
        client_certificate,
        federated_token_path,
        client_auth: raw.client_auth,
        scopes: raw.scopes,
        callback_path: raw.callback_path,
        response_mode: raw.response_mode,
        pass_unknown_callbacks: raw.pass_unknown_callbacks,
        allowed_tenants: raw.allowed_tenants,
        algorithms,
        clock_skew: raw.clock_skew,
        ca: raw.ca,
        jwks_refresh: raw.jwks_refresh,
        bearer_v1_issuer,
        groups_overage: raw.groups_overage,
        graph_url,
    })
}

/// An issuer is an https URL (http only for a loopback test provider).
fn parse_issuer(value: &str) -> Option<(Scheme, Authority)> {
    let uri = Uri::from_str(value).ok()?;
    let scheme = uri.scheme()?.clone();
    let authority = uri.authority()?.clone();
    let allowed =
        scheme == Scheme::HTTPS || (scheme == Scheme::HTTP && is_loopback_host(authority.host()));
    (allowed && uri.query().is_none()).then_some((scheme, authority))
}

fn validate_session(mut raw: RawSession, origins: &Origins) -> Result<SessionConfig, ConfigError> {
    const EXPECTED: &str =
        "at least 32 random bytes in base64, such as the output of `authgate gen-secret`";
    let mut secrets = Vec::new();
    let Some(current) = raw.secret.take() else {
        // Generated at start and kept under state_dir.
        return session_config(raw, secrets, origins);
    };
    for (key, value) in std::iter::once(("session.secret".to_owned(), &current)).chain(
        raw.previous_secrets
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("session.previous_secrets[{i}]"), v)),
    ) {
        let shown = "(hidden)";
        let bytes = decode_secret(value).ok_or_else(|| origins.invalid(&key, shown, EXPECTED))?;
        secrets.push(bytes);
    }
    session_config(raw, secrets, origins)
}

fn session_config(
    raw: RawSession,
    secrets: Vec<Vec<u8>>,
    origins: &Origins,
) -> Result<SessionConfig, ConfigError> {
    let RawSession {
        store,
        cache_ttl,
        cookie_name,
        idle_timeout,
        lifetime,
        refresh_before,
        redis_url,
        redis_sentinels,
        redis_sentinel_master,
        redis_cluster,
        redis_password,
        redis_ca,
        ..
    } = raw;
    let servers = redis_servers(
        redis_url.filter(|u| !u.is_empty()),
        redis_sentinels,
        redis_sentinel_master.filter(|m| !m.is_empty()),
        redis_cluster,
        origins,
    )?;
    let redis = match (store, servers) {
        (StoreKind::Redis, None) => {
            return Err(origins.error(
                "session.redis_url",
                "missing: session.store = \"redis\" needs the server, such as \
                 redis://redis.internal:6379 or rediss:// for TLS (or session.redis_sentinels \
                 with session.redis_sentinel_master, or session.redis_cluster)",
            ))
        }
        (StoreKind::Redis, Some(servers)) => Some(RedisConfig {
            servers,
            password: redis_password.filter(|p| !p.is_empty()),
            ca: redis_ca,
        }),
        _ => None,
    };
    if !cookie_name.starts_with("__Host-") || http::HeaderName::from_str(&cookie_name).is_err() {
        return Err(origins.invalid(
            "session.cookie_name",
            &cookie_name,
            "a cookie name starting with __Host- (bound to this origin, Secure, Path=/)",
        ));
    }
    if idle_timeout.is_zero() || lifetime < idle_timeout {
        return Err(origins.error(
            "session.lifetime",
            "must be at least session.idle_timeout, and both above zero",
        ));
    }
    if cache_ttl.is_zero() || cache_ttl > Duration::from_secs(300) {
        return Err(origins.invalid(
            "session.cache_ttl",
            &format!("{cache_ttl:?}"),
            "a duration from 1s to 5m: how long a revoked session may still be used elsewhere",
        ));
    }
    Ok(SessionConfig {
        store,
        cache_ttl,
        secrets,
        refresh_before,
        cookie_name,
        idle_timeout,
        lifetime,
        redis,
    })
}

/// Which Redis servers `session.redis_*` name: one server, sentinels and
/// their master's name, or a cluster's nodes; at most one of them.
fn redis_servers(
    url: Option<String>,
    sentinels: Vec<String>,
    master: Option<String>,
    cluster: Vec<String>,
    origins: &Origins,
) -> Result<Option<RedisServers>, ConfigError> {
    // URLs may hold a password: never echoed.
    let check = |key: String, url: &str, schemes: &[&str], expected: &str| {
        let scheme_ok = schemes.iter().any(|s| url.starts_with(s));
        if scheme_ok && redis::IntoConnectionInfo::into_connection_info(url).is_ok() {
            Ok(())
        } else {
            Err(origins.invalid(&key, "(hidden)", expected))
        }
    };
    let check_all = |key: &str, urls: &[String], role: &str| {
        for (i, url) in urls.iter().enumerate() {
            check(
                format!("{key}[{i}]"),
                url,
                &["redis://", "rediss://"],
                &format!("a {role} URL: redis://host:port, or rediss:// for TLS"),
            )?;
        }
        // redis-rs speaks to all of them alike.
        if urls.iter().any(|u| u.starts_with("rediss://"))
            && !urls.iter().all(|u| u.starts_with("rediss://"))
        {
            return Err(origins.error(key, "all redis:// or all rediss://, not a mix"));
        }
        Ok(())
    };
    let named: Vec<&str> = [
        ("session.redis_url", url.is_some()),
        ("session.redis_sentinels", !sentinels.is_empty()),
        ("session.redis_cluster", !cluster.is_empty()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(key, _)| *key)
    .collect();
    if let [first, second, ..] = named[..] {
        return Err(origins.error(
            second,
            format!("set either {first} or {second}: they name the same store"),
        ));
    }
    if master.is_some() && sentinels.is_empty() {
        return Err(origins.error(
            "session.redis_sentinel_master",
            "needs session.redis_sentinels, the sentinels that know this master",
        ));
    }
    if let Some(url) = url {
        check(
            "session.redis_url".into(),
            &url,
            &["redis://", "rediss://", "redis+unix://", "unix://"],
            "a Redis URL: redis://host:6379, rediss://host:6380 (TLS), \
             redis+unix:///path/redis.sock; a password in it or in session.redis_password",
        )?;
        return Ok(Some(RedisServers::One(url)));
    }
    if !sentinels.is_empty() {
        check_all("session.redis_sentinels", &sentinels, "Sentinel")?;
        let master = master.ok_or_else(|| {
            origins.error(
                "session.redis_sentinel_master",
                "missing: the name the sentinels monitor the master by (`sentinel monitor \
                 <name> ...`), such as mymaster",
            )
        })?;
        return Ok(Some(RedisServers::Sentinel { sentinels, master }));
    }
    if !cluster.is_empty() {
        check_all("session.redis_cluster", &cluster, "cluster node")?;
        return Ok(Some(RedisServers::Cluster(cluster)));
    }
    Ok(None)
}

/// Standard or URL-safe base64, padded or not, of 32 bytes or more.
fn decode_secret(value: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let trimmed = value.trim().trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| STANDARD_NO_PAD.decode(trimmed))
        .ok()
        .filter(|b| b.len() >= 32)
}

fn parse_socket_addr(origins: &Origins, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    SocketAddr::from_str(value).map_err(|_| {
        origins.invalid(
            key,
            value,
            "an IP address and port, such as 0.0.0.0:8443 or [::]:8443",
        )
    })
}

/// Splits an absolute `http(s)://host[:port]` URL with no path beyond `/`.
fn parse_origin(value: &str) -> Option<(Scheme, Authority)> {
    let uri = Uri::from_str(value).ok()?;
    let scheme = uri.scheme()?.clone();
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return None;
    }
    let authority = uri.authority()?.clone();
    let no_path = matches!(
        uri.path_and_query().map(|p| p.as_str()),
        None | Some("/") | Some("")
    );
    let no_userinfo = !authority.as_str().contains('@');
    (no_path && no_userinfo && !authority.host().is_empty()).then_some((scheme, authority))
}

fn parse_upstream(origins: &Origins, key: &str, value: &str) -> Result<UpstreamUrl, ConfigError> {
    parse_origin(value)
        .map(|(scheme, authority)| UpstreamUrl { scheme, authority })
        .ok_or_else(|| {
            origins.invalid(
                key,
                value,
                "an http:// or https:// URL with a host and no path, such as http://127.0.0.1:21114",
            )
        })
}

fn parse_public_url(origins: &Origins, value: &str) -> Result<PublicUrl, ConfigError> {
    parse_origin(value)
        .map(|(scheme, authority)| PublicUrl { scheme, authority })
        .ok_or_else(|| {
            origins.invalid(
                "public_url",
                value,
                "the origin users open, such as https://console.example.com:8443 (no path)",
            )
        })
}

fn parse_net(origins: &Origins, key: &str, value: &str) -> Result<IpNet, ConfigError> {
    IpNet::from_str(value)
        .or_else(|_| IpAddr::from_str(value).map(IpNet::from))
        .map_err(|_| {
            origins.invalid(
                key,
                value,
                "an IP address or CIDR range, such as 10.0.0.0/8",
            )
        })
}

fn require_readable(origins: &Origins, key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| origins.error(key, format!("cannot read file `{}`: {e}", path.display())))
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || IpAddr::from_str(host).is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `toml` for a gateway without sign-in.
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        load_exactly(&format!("access = \"public\"\n{toml}"), env)
    }

    fn load_exactly(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authgate.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(
            &path,
            true,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn error_of(toml: &str, env: &[(&str, &str)]) -> String {
        load(toml, env).unwrap_err().to_string()
    }

    #[test]
    fn acme_settings_are_derived_and_checked() {
        let acme = |toml: &str, env: &[(&str, &str)]| load(toml, env).map(|c| (c.tls, c.state_dir));
        let (tls, state) = acme(
            "public_url = \"https://Console.Example.com\"\nextra_hosts = [\"console.example.com\", \"rd.example.com\"]\n\
             state_dir = \"/var/lib/authgate\"\n[tls]\nacme = true\nacme_contact = [\"admin@example.com\", \"mailto:ops@example.com\"]\n",
            &[],
        )
        .unwrap();
        let settings = tls.acme.unwrap();
        assert_eq!(settings.names, ["console.example.com", "rd.example.com"]);
        assert_eq!(
            settings.contact,
            ["mailto:admin@example.com", "mailto:ops@example.com"]
        );
        assert_eq!(settings.directory, acme::LETS_ENCRYPT);
        assert_eq!(settings.challenge, ChallengeKind::TlsAlpn01);
        assert!(settings.eab.is_none());
        assert_eq!(tls.cert, state.path().join(ACME_CERT_FILE));
        assert_eq!(tls.key, state.path().join(ACME_KEY_FILE));

        // The default challenge follows the ports; the environment sets it too.
        let challenge = |toml: &str| {
            acme(toml, &[("AUTHGATE_TLS_ACME", "true")])
                .unwrap()
                .0
                .acme
                .unwrap()
                .challenge
        };
        assert_eq!(
            challenge("http_redirect_listen = \"0.0.0.0:80\"\n"),
            ChallengeKind::Http01
        );
        assert_eq!(
            challenge("listen = \"0.0.0.0:443\"\nhttp_redirect_listen = \"0.0.0.0:80\"\n"),
            ChallengeKind::TlsAlpn01
        );
        assert_eq!(
            challenge(
                "http_redirect_listen = \"0.0.0.0:80\"\n[tls]\nacme_challenge = \"tls-alpn-01\"\n"
            ),
            ChallengeKind::TlsAlpn01
        );

        let eab = acme(
            "[tls]\nacme = true\nacme_eab_kid = \"kid-1\"\nacme_eab_hmac_key = \"c2VjcmV0LWtleQ\"\n",
            &[],
        )
        .unwrap()
        .0
        .acme
        .unwrap()
        .eab
        .unwrap();
        assert_eq!(
            (eab.kid.as_str(), eab.hmac_key.as_slice()),
            ("kid-1", &b"secret-key"[..])
        );
        assert!(!format!("{eab:?}").contains("secret"));
    }

    #[test]
    fn acme_mistakes_name_the_key() {
        let cases = [
            (
                "[tls]\nacme = true\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
                "`tls.acme`",
                "remove `tls.cert`",
            ),
            (
                "[tls]\nacme = true\nacme_challenge = \"http-01\"\n",
                "`tls.acme_challenge`",
                "http_redirect_listen",
            ),
            (
                "[tls]\nacme = true\nacme_challenge = \"dns-01\"\n",
                "tls.acme_challenge",
                "http-01",
            ),
            (
                "[tls]\nacme = true\nacme_directory = \"http://ca.example/dir\"\n",
                "`tls.acme_directory`",
                "https://",
            ),
            (
                "[tls]\nacme = true\nacme_contact = [\"admin\"]\n",
                "`tls.acme_contact[0]`",
                "e-mail address",
            ),
            (
                "[tls]\nacme = true\nacme_eab_kid = \"kid\"\n",
                "`tls.acme_eab_hmac_key`",
                "missing",
            ),
            (
                "[tls]\nacme = true\nacme_eab_hmac_key = \"a2V5\"\n",
                "`tls.acme_eab_kid`",
                "missing",
            ),
            (
                "[tls]\nacme = true\nacme_eab_kid = \"k\"\nacme_eab_hmac_key = \"not base64!\"\n",
                "`tls.acme_eab_hmac_key`",
                "base64url",
            ),
            (
                "[tls]\nacme = true\nacme_ca = \"/nonexistent/ca.pem\"\n",
                "`tls.acme_ca`",
                "cannot read",
            ),
        ];
        for (toml, key, expected) in cases {
            let error = error_of(toml, &[]);
            assert!(
                error.contains(key) && error.contains(expected),
                "{toml}: {error}"
            );
        }
        // A bad HMAC key is not echoed.
        assert!(!error_of(cases[7].0, &[]).contains("not base64!"));
    }

    #[test]
    fn the_egress_proxy_is_read_as_curl_reads_it_and_the_key_wins() {
        let provider: Uri = "https://login.microsoftonline.com/x".parse().unwrap();
        let internal: Uri = "https://idp.internal/x".parse().unwrap();
        let upstream: Uri = "http://127.0.0.1:21114/".parse().unwrap();
        let egress = |toml: &str, env: &[(&str, &str)]| load(toml, env).unwrap().outbound;
        assert_eq!(egress("", &[]).proxy_for(&provider), None);
        // What a CGI client can set through a `Proxy:` header: curl
        // ignores it, and so does authgate.
        let httpoxy = egress("", &[("HTTP_PROXY", "http://attacker.example:1")]);
        assert_eq!(httpoxy.proxy_for(&upstream), None);

        let env = [
            ("HTTPS_PROXY", "http://proxy.corp:3128"),
            ("NO_PROXY", ".internal"),
        ];
        let from_env = egress("", &env);
        assert_eq!(
            from_env.proxy_for(&provider).as_deref(),
            Some("http://proxy.corp:3128")
        );
        assert_eq!(from_env.proxy_for(&internal), None);

        let keyed = load("[outbound]\nproxy = \"http://ops:pw@other:8080\"\n", &env).unwrap();
        assert_eq!(
            keyed.outbound.proxy_for(&provider).as_deref(),
            Some("http://other:8080")
        );
        assert_eq!(keyed.outbound.proxy_for(&internal), None);
        // Upstreams stay direct unless asked.
        assert_eq!(keyed.proxy.egress.proxy_for(&upstream), None);
        let upstreams_too = load(
            "[outbound]\nproxy = \"http://other:8080\"\nproxy_upstreams = true\n",
            &[],
        )
        .unwrap();
        assert!(upstreams_too.proxy.egress.proxy_for(&upstream).is_some());
    }

    #[test]
    fn a_bad_proxy_url_names_where_it_came_from_and_hides_its_value() {
        let from_key = error_of(
            "[outbound]\nproxy = \"https://ops:s3cret@proxy.corp\"\n",
            &[],
        );
        assert!(
            from_key.contains("`outbound.proxy`") && from_key.contains("http://"),
            "{from_key}"
        );
        assert!(!from_key.contains("s3cret"), "{from_key}");
        let from_env = error_of("", &[("https_proxy", "proxy.corp:3128")]);
        assert!(from_env.contains("https_proxy"), "{from_env}");
        assert!(!from_env.contains("proxy.corp"), "{from_env}");
    }

    const SIGN_IN: &str = "[oidc]\nissuer = \"https://login.microsoftonline.com/11111111-2222-3333-4444-555555555555/v2.0\"\n\
        client_id = \"app\"\nclient_secret = \"s3cret\"\n\
        [session]\nsecret = \"0123456789abcdef0123456789abcdef0123456789A\"\n";

    #[test]
    fn hsts_is_on_by_default_and_checked() {
        let on = load("", &[]).unwrap();
        assert_eq!(on.tls.hsts.unwrap(), "max-age=31536000");
        assert!(load("[tls]\nhsts = \"\"\n", &[])
            .unwrap()
            .tls
            .hsts
            .is_none());
        let err = error_of("[tls]\nhsts = \"always\"\n", &[]);
        assert!(err.contains("tls.hsts") && err.contains("max-age"), "{err}");
    }

    #[test]
    fn protected_routes_need_sign_in_configured() {
        let err = load_exactly("", &[]).unwrap_err().to_string();
        assert!(
            err.contains("oidc.issuer") && err.contains("access = \"public\""),
            "{err}"
        );
        let config = load_exactly(SIGN_IN, &[]).unwrap();
        let oidc = config.oidc.unwrap();
        assert_eq!(
            oidc.redirect_uri,
            "https://localhost:8443/api/oidc/callback"
        );
        assert!(!oidc.multi_tenant);
        assert_eq!(config.session.unwrap().secrets[0].len(), 32);
    }

    #[test]
    fn session_store_state_dir_and_admin_token_are_checked() {
        let config = load_exactly(SIGN_IN, &[]).unwrap();
        let session = config.session.unwrap();
        assert_eq!(session.store, StoreKind::Embedded);
        assert_eq!(config.state_dir, StateDir::new("state"));
        assert!(config.admin_token.is_none());
        let config = load_exactly(
            SIGN_IN,
            &[
                ("AUTHGATE_SESSION_STORE", "cookie"),
                ("AUTHGATE_STATE_DIR", "/var/lib/authgate"),
                ("AUTHGATE_ADMIN_TOKEN", "a-long-enough-admin-token"),
            ],
        )
        .unwrap();
        assert_eq!(config.session.unwrap().store, StoreKind::Cookie);
        assert_eq!(config.state_dir, StateDir::new("/var/lib/authgate"));
        assert_eq!(
            config.admin_token.as_deref(),
            Some("a-long-enough-admin-token")
        );

        let err = load_exactly(SIGN_IN, &[("AUTHGATE_SESSION_STORE", "memcached")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("session.store") && err.contains("embedded") && err.contains("cookie"),
            "{err}"
        );
        for (url, wanted) in [
            (None, "missing"),
            (Some("http://user:hunter2@redis:6379"), "not valid"),
        ] {
            let mut env = vec![("AUTHGATE_SESSION_STORE", "redis")];
            env.extend(url.map(|u| ("AUTHGATE_SESSION_REDIS_URL", u)));
            let err = load_exactly(SIGN_IN, &env).unwrap_err().to_string();
            assert!(
                err.contains("session.redis_url") && err.contains(wanted),
                "{err}"
            );
            assert!(
                !err.contains("hunter2"),
                "a password must not be echoed: {err}"
            );
        }
        let config = load_exactly(
            SIGN_IN,
            &[
                ("AUTHGATE_SESSION_STORE", "redis"),
                (
                    "AUTHGATE_SESSION_REDIS_URL",
                    "rediss://redis.internal:6380/2",
                ),
            ],
        )
        .unwrap();
        let redis = config.session.unwrap().redis.unwrap();
        assert_eq!(
            redis.servers,
            RedisServers::One("rediss://redis.internal:6380/2".into())
        );
        let servers = |env: &[(&str, &str)]| {
            let env = [&[("AUTHGATE_SESSION_STORE", "redis")], env].concat();
            load_exactly(SIGN_IN, &env).map(|c| c.session.unwrap().redis.unwrap().servers)
        };
        assert_eq!(
            servers(&[
                (
                    "AUTHGATE_SESSION_REDIS_SENTINELS",
                    r#"["redis://s1:26379", "redis://:hunter2@s2:26379"]"#
                ),
                ("AUTHGATE_SESSION_REDIS_SENTINEL_MASTER", "mymaster"),
            ])
            .unwrap(),
            RedisServers::Sentinel {
                sentinels: vec![
                    "redis://s1:26379".into(),
                    "redis://:hunter2@s2:26379".into()
                ],
                master: "mymaster".into()
            }
        );
        assert_eq!(
            servers(&[("AUTHGATE_SESSION_REDIS_CLUSTER", r#"["rediss://n1:6379"]"#)]).unwrap(),
            RedisServers::Cluster(vec!["rediss://n1:6379".into()])
        );
        for (env, key, wanted) in [
            (
                vec![(
                    "AUTHGATE_SESSION_REDIS_SENTINELS",
                    r#"["redis://s1:26379"]"#,
                )],
                "session.redis_sentinel_master",
                "missing",
            ),
            (
                vec![("AUTHGATE_SESSION_REDIS_SENTINEL_MASTER", "mymaster")],
                "session.redis_sentinel_master",
                "needs session.redis_sentinels",
            ),
            (
                vec![
                    ("AUTHGATE_SESSION_REDIS_URL", "redis://r:6379"),
                    ("AUTHGATE_SESSION_REDIS_CLUSTER", r#"["redis://n1:6379"]"#),
                ],
                "session.redis_cluster",
                "set either session.redis_url or session.redis_cluster",
            ),
            (
                vec![(
                    "AUTHGATE_SESSION_REDIS_CLUSTER",
                    r#"["redis://n1:6379", "redis+unix:///:hunter2@x"]"#,
                )],
                "session.redis_cluster[1]",
                "not valid",
            ),
            (
                vec![(
                    "AUTHGATE_SESSION_REDIS_CLUSTER",
                    r#"["redis://n1:6379", "rediss://:hunter2@n2:6379"]"#,
                )],
                "session.redis_cluster",
                "not a mix",
            ),
        ] {
            let err = servers(&env).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(wanted), "{err}");
            assert!(
                !err.contains("hunter2"),
                "a password must not be echoed: {err}"
            );
        }
        let err = load_exactly(SIGN_IN, &[("AUTHGATE_SESSION_CACHE_TTL", "1h")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("session.cache_ttl") && err.contains("5m"),
            "{err}"
        );
        let err = load_exactly(SIGN_IN, &[("AUTHGATE_ADMIN_TOKEN", "short-token")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin_token") && err.contains("16"), "{err}");
        assert!(
            !err.contains("short-token"),
            "a secret must not be echoed: {err}"
        );
        // Unset, the session secret is generated at start: the config
        // warns where it is kept.
        let config = load_exactly(
            &SIGN_IN.replace(
                "secret = \"0123456789abcdef0123456789abcdef0123456789A\"\n",
                "",
            ),
            &[],
        )
        .unwrap();
        assert!(config.session.unwrap().secrets.is_empty());
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("state/session.secret")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn sign_in_settings_are_checked() {
        let err = load_exactly(&SIGN_IN.replace("client_secret = \"s3cret\"\n", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("oidc.client_secret") && err.contains("AUTHGATE_OIDC_CLIENT_SECRET"),
            "{err}"
        );
        let err = load_exactly(
            &SIGN_IN.replace("0123456789abcdef0123456789abcdef0123456789A", "short"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("session.secret") && err.contains("gen-secret"),
            "{err}"
        );
        assert!(!err.contains("short"), "a secret must not be echoed: {err}");
        let err = load_exactly(SIGN_IN, &[("AUTHGATE_OIDC_ALGORITHMS", "[\"HS256\"]")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("oidc.algorithms[0]") && err.contains("RS256"),
            "{err}"
        );
        let err = load_exactly(
            SIGN_IN,
            &[("AUTHGATE_OIDC_ISSUER", "http://idp.example/v2.0")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("oidc.issuer") && err.contains("https://"),
            "{err}"
        );
    }

    #[test]
    fn certificate_and_federated_credentials_need_their_files() {
        let err = load_exactly(SIGN_IN, &[("AUTHGATE_OIDC_CLIENT_AUTH", "private_key_jwt")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("oidc.client_certificate"), "{err}");
        let err = load_exactly(SIGN_IN, &[("AUTHGATE_OIDC_CLIENT_AUTH", "federated")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("oidc.federated_token_path") && err.contains("AZURE_FEDERATED_TOKEN_FILE"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("azure-identity-token");
        std::fs::write(&token, "eyJ...").unwrap();
        let env = [
            ("AUTHGATE_OIDC_CLIENT_AUTH", "federated"),
            ("AZURE_FEDERATED_TOKEN_FILE", token.to_str().unwrap()),
        ];
        let oidc = load_exactly(&SIGN_IN.replace("client_secret = \"s3cret\"\n", ""), &env)
            .unwrap()
            .oidc
            .unwrap();
        assert_eq!(oidc.federated_token_path.as_deref(), Some(token.as_path()));
        assert!(oidc.client_secret.is_none());
    }

    #[test]
    fn multi_tenant_issuers_need_a_tenant_allow_list() {
        let common = [(
            "AUTHGATE_OIDC_ISSUER",
            "https://login.microsoftonline.com/organizations/v2.0",
        )];
        let err = load_exactly(SIGN_IN, &common).unwrap_err().to_string();
        assert!(err.contains("oidc.allowed_tenants"), "{err}");
        let env = [
            common[0],
            (
                "AUTHGATE_OIDC_ALLOWED_TENANTS",
                "[\"11111111-2222-3333-4444-555555555555\"]",
            ),
        ];
        assert!(
            load_exactly(SIGN_IN, &env)
                .unwrap()
                .oidc
                .unwrap()
                .multi_tenant
        );
    }

    #[test]
    fn defaults_route_everything_to_the_rustdesk_console() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(
            config.routes[0].upstream.to_string(),
            "http://127.0.0.1:21114"
        );
        assert!(config.tls.may_self_sign);
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn environment_overrides_top_level_and_section_keys() {
        let config = load(
            "upstream = \"http://10.0.0.1:1\"\n[limits]\nmax_connections = 5\n",
            &[
                ("AUTHGATE_UPSTREAM", "http://10.0.0.2:2"),
                ("AUTHGATE_LIMITS_MAX_CONNECTIONS", "7"),
                ("AUTHGATE_TIMEOUTS_CONNECT", "250ms"),
                (
                    "AUTHGATE_PROXY_TRUSTED_PROXIES",
                    "[\"10.0.0.0/8\", \"192.168.1.1\"]",
                ),
                ("AUTHGATE_CONFIG", "ignored.toml"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(config.routes[0].upstream.to_string(), "http://10.0.0.2:2");
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(config.timeouts.connect, Duration::from_millis(250));
        assert_eq!(config.proxy.trusted_proxies.len(), 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = error_of("[tls]\ncret = \"x\"\n", &[]);
        assert!(err.contains("tls.cret"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn a_near_miss_in_the_environment_names_the_variable_and_the_setting_meant() {
        for (var, meant) in [
            (
                "AUTHGATE_UPSTREAMS",
                "AUTHGATE_UPSTREAM (config key `upstream`)",
            ),
            ("AUTHGATE_PUBLIC_UR", "AUTHGATE_PUBLIC_URL"),
            ("AUTHGATE_OIDC_CLIENTID", "AUTHGATE_OIDC_CLIENT_ID"),
            ("AUTHGATE_OIDC_CLIENT_SECRE", "AUTHGATE_OIDC_CLIENT_SECRET"),
            (
                "AUTHGATE_TIMEOUTS_HEADER_REED",
                "AUTHGATE_TIMEOUTS_HEADER_READ",
            ),
        ] {
            let err = error_of("", &[(var, "x")]);
            assert!(err.contains(var) && err.contains(meant), "{err}");
        }
    }

    #[test]
    fn kubernetes_service_links_are_passed_over_silently() {
        let links = [
            ("AUTHGATE_PORT", "tcp://10.0.0.1:8443"),
            ("AUTHGATE_PORT_8443_TCP", "tcp://10.0.0.1:8443"),
            ("AUTHGATE_PORT_8443_TCP_ADDR", "10.0.0.1"),
            ("AUTHGATE_PORT_8443_TCP_PORT", "8443"),
            ("AUTHGATE_PORT_8443_TCP_PROTO", "tcp"),
            ("AUTHGATE_SERVICE_HOST", "10.0.0.1"),
            ("AUTHGATE_SERVICE_PORT", "8443"),
            ("AUTHGATE_SERVICE_PORT_HTTPS", "8443"),
            ("AUTHGATE_TLS_SERVICE_HOST", "10.0.0.2"),
            ("AUTHGATE_TLS_PORT_443_TCP", "tcp://10.0.0.2:443"),
            ("AUTHGATE_METRICS_PORT_9464_UDP_ADDR", "10.0.0.3"),
        ];
        let config = load("", &links).unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn other_unknown_variables_are_ignored_with_a_warning() {
        let config = load(
            "",
            &[
                ("AUTHGATE_RELEASE_CHANNEL", "beta"),
                ("AUTHGATE_GATEWAY_PREFIX", "/gw/"),
            ],
        )
        .unwrap();
        assert_eq!(config.gateway_prefix, "/gw/");
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(config.warnings[0].contains("AUTHGATE_RELEASE_CHANNEL"));
    }

    #[test]
    fn malformed_upstream_names_key_value_and_expectation() {
        let err = error_of("upstream = \"htp:/console\"\n", &[]);
        assert!(err.contains("`upstream`"), "{err}");
        assert!(err.contains("htp:/console"), "{err}");
        assert!(err.contains("http:// or https://"), "{err}");
        let err = error_of(
            "[[routes]]\nprefix = \"/ws/id\"\nupstream = \"http://h:1/path\"\n",
            &[],
        );
        assert!(err.contains("routes[0].upstream"), "{err}");
    }

    #[test]
    fn a_public_route_cannot_require_a_step_up() {
        let err = error_of(
            "[[routes]]\nprefix = \"/pub\"\nupstream = \"http://h:1\"\naccess = \"public\"\n\
             [routes.policy]\nrequire_acrs = [\"c1\"]\n",
            &[],
        );
        assert!(err.contains("routes[0].policy.require_acrs"), "{err}");
        let err = error_of("[policy]\nrequire_acrs = [\"c1\"]\n", &[]);
        assert!(err.contains("policy.require_acrs"), "{err}");
    }

    #[test]
    fn easy_auth_tokens_need_easy_auth() {
        let err = error_of("[headers]\neasy_auth_tokens = true\n", &[]);
        assert!(
            err.contains("headers.easy_auth_tokens") && err.contains("headers.easy_auth = true"),
            "{err}"
        );
        let config = load(
            "[headers]\neasy_auth = true\neasy_auth_tokens = true\n",
            &[],
        )
        .unwrap();
        assert!(config.headers.easy_auth_tokens);
    }

    #[test]
    fn duplicate_route_prefix_is_refused() {
        let err = error_of(
            "[[routes]]\nprefix = \"/\"\nupstream = \"http://h:1\"\n",
            &[],
        );
        assert!(
            err.contains("routes[0].prefix") && err.contains("`upstream`"),
            "{err}"
        );
    }

    #[test]
    fn secret_file_is_read_and_unreadable_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("upstream");
        std::fs::write(&secret, "http://10.1.1.1:9\n").unwrap();
        let config = load(&format!("upstream_file = {:?}\n", secret), &[]).unwrap();
        assert_eq!(config.routes[0].upstream.to_string(), "http://10.1.1.1:9");

        let err = error_of("", &[("AUTHGATE_PUBLIC_URL_FILE", "/nonexistent/secret")]);
        assert!(
            err.contains("public_url_file") && err.contains("/nonexistent/secret"),
            "{err}"
        );
        assert!(err.contains("AUTHGATE_PUBLIC_URL_FILE"), "{err}");
    }

    #[test]
    fn wrong_types_and_durations_are_named() {
        let err = error_of("[timeouts]\nconnect = \"5 parsecs\"\n", &[]);
        assert!(err.contains("timeouts.connect"), "{err}");
        let err = error_of("[headers]\nassertion_key_rotation = \"5m\"\n", &[]);
        assert!(
            err.contains("headers.assertion_key_rotation") && err.contains("1h"),
            "{err}"
        );
        let err = error_of("[log]\nformat = \"xml\"\n", &[]);
        assert!(err.contains("log.format") && err.contains("json"), "{err}");
        let err = error_of("listen = \"8443\"\n", &[]);
        assert!(
            err.contains("`listen`") && err.contains("0.0.0.0:8443"),
            "{err}"
        );
    }

    #[test]
    fn explicit_certificate_must_exist() {
        let err = error_of(
            "[tls]\ncert = \"/missing.crt\"\nkey = \"/missing.key\"\n",
            &[],
        );
        assert!(
            err.contains("tls.cert") && err.contains("/missing.crt"),
            "{err}"
        );
        let err = error_of("[tls]\ncert = \"/missing.crt\"\n", &[]);
        assert!(err.contains("tls.key"), "{err}");
    }

    #[test]
    fn plain_http_public_url_warns_unless_localhost() {
        let config = load("public_url = \"http://console.example.com\"\n", &[]).unwrap();
        assert!(
            config.warnings[0].contains("Entra"),
            "{:?}",
            config.warnings
        );
        let config = load("public_url = \"http://localhost:8080\"\n", &[]).unwrap();
        assert!(config.warnings.is_empty());
        let err = error_of("public_url = \"https://h/console\"\n", &[]);
        assert!(err.contains("public_url"), "{err}");
    }
}
