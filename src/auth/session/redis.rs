//! The Redis store (`session.store = "redis"`), shared by replicas: one
//! server (or Valkey), the master that Redis Sentinel names, or a Redis
//! Cluster, through redis-rs. Connections are made at the first command
//! and remade on their own, so the gateway starts, and recovers, while
//! Redis is down.
//!
//! Keys, under `authgate:`: `session:<key>` and `login:<key>` hold a
//! record and expire with it (`EXAT`); `tag:<tag>` is the set of session
//! keys carrying a tag, expiring with the last of them; `lock:<key>` is
//! held by the one replica renewing a session. Every command names one
//! key (or, `MGET`, keys redis-rs splits by slot), so a cluster spreads
//! them over its shards.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ConnectionAddr, IntoConnectionInfo, RedisError, RedisResult, Script, TlsCertificates,
    TlsMode,
};

use super::store::{hex, Record, StoreError, StoreKey, Table, Tag};
use crate::clock::now;

/// Per command, and per connection attempt: a store that does not answer
/// in this time is down, and the request gets a 503 rather than waiting.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Which servers hold the sessions (`session.redis_url`,
/// `session.redis_sentinels` or `session.redis_cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisServers {
    /// One server, by URL.
    One(String),
    /// The master the sentinels (by URL) name for `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A cluster, found from these nodes' URLs.
    Cluster(Vec<String>),
}

impl RedisServers {
    /// Where the sessions are, for messages: no user or password.
    pub fn shown(&self) -> String {
        let hosts = |urls: &[String]| urls.iter().map(|u| shown(u)).collect::<Vec<_>>().join(", ");
        match self {
            RedisServers::One(url) => shown(url),
            RedisServers::Sentinel { sentinels, master } => {
                format!("master `{master}` of the sentinels {}", hosts(sentinels))
            }
            RedisServers::Cluster(nodes) => format!("the cluster of {}", hosts(nodes)),
        }
    }
}

#[derive(Clone)]
pub struct Redis {
    link: Link,
    /// Where, without credentials, for messages.
    shown: Arc<str>,
}

#[derive(Clone)]
enum Link {
    /// One server: the manager reconnects to it on its own.
    Server(ConnectionManager),
    /// The master the sentinels name, asked at the first command and
    /// again when it stops being one.
    Sentinel(Arc<Found>),
    /// A cluster's connection, made at the first command; it follows the
    /// cluster's slots and failovers on its own.
    Cluster(Arc<Found>),
}

struct Found {
    kept: std::sync::Mutex<Option<Connection>>,
    /// Held while a connection is being found, so one command asks.
    finder: tokio::sync::Mutex<Finder>,
}

impl Found {
    fn new(finder: Finder) -> Arc<Found> {
        Arc::new(Found {
            kept: std::sync::Mutex::default(),
            finder: tokio::sync::Mutex::new(finder),
        })
    }
}

enum Finder {
    Sentinel(Box<SentinelClient>),
    Cluster(Box<ClusterClient>),
}

/// What a command is sent on.
#[derive(Clone)]
enum Connection {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Server(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Server(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// What `session.redis_*` configure.
pub struct RedisSettings<'a> {
    pub servers: &'a RedisServers,
    /// The data servers' password (not the sentinels').
    pub password: Option<&'a str>,
    /// PEM certificates to trust for `rediss://` instead of the system's.
    pub ca: Option<Vec<u8>>,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

impl Redis {
    /// Prepares the connection; it is made at the first command.
    pub fn new(settings: &RedisSettings<'_>) -> Result<Redis, StoreError> {
        let shown: Arc<str> = settings.servers.shown().into();
        let failed = |source: RedisError| StoreError::Redis {
            url: shown.to_string(),
            source,
        };
        let certificates = || TlsCertificates {
            client_tls: None,
            root_cert: settings.ca.clone(),
        };
        let link = match settings.servers {
            RedisServers::One(url) => {
                let mut info = url.as_str().into_connection_info().map_err(failed)?;
                if let Some(password) = settings.password {
                    let redis = info.redis_settings().clone().set_password(password);
                    info = info.set_redis_settings(redis);
                }
                let client = match settings.ca {
                    Some(_) => Client::build_with_tls(info, certificates()),
                    None => Client::open(info),
                }
                .map_err(failed)?;
                let manager = ConnectionManager::new_lazy_with_config(client, manager_config())
                    .map_err(failed)?;
                Link::Server(manager)
            }
            RedisServers::Sentinel { sentinels, master } => {
                let mut addrs = Vec::new();
                let mut sentinel_password = None;
                for url in sentinels {
                    let info = url.as_str().into_connection_info().map_err(failed)?;
                    sentinel_password =
                        sentinel_password.or(info.redis_settings().password().map(str::to_owned));
                    addrs.push(info.addr().clone());
                }
                let tls = matches!(addrs.first(), Some(ConnectionAddr::TcpTls { .. }));
                let mut builder =
                    SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                        .map_err(failed)?;
                if let Some(password) = sentinel_password {
                    builder = builder.set_client_to_sentinel_password(password);
                }
                if let Some(password) = settings.password {
                    builder = builder.set_client_to_redis_password(password);
                }
                // The master is spoken to as the sentinels are: over TLS
                // when they are.
                if tls {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                    if settings.ca.is_some() {
                        builder = builder
                            .set_client_to_redis_certificates(certificates())
                            .set_client_to_sentinel_certificates(certificates());
                    }
                }
                let client = builder.build().map_err(failed)?;
                Link::Sentinel(Found::new(Finder::Sentinel(Box::new(client))))
            }
            RedisServers::Cluster(nodes) => {
                let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(TIMEOUT)
                    .response_timeout(TIMEOUT);
                if let Some(password) = settings.password {
                    builder = builder.password(password);
                }
                if settings.ca.is_some() {
                    builder = builder.certs(certificates());
                }
                let client = builder.build().map_err(failed)?;
                Link::Cluster(Found::new(Finder::Cluster(Box::new(client))))
            }
        };
        Ok(Redis { link, shown })
    }

    fn failed(&self, source: RedisError) -> StoreError {
        StoreError::Redis {
            url: self.shown.to_string(),
            source,
        }
    }

    /// The connection the next command goes on.
    async fn connection(&self) -> RedisResult<Connection> {
        let found = match &self.link {
            Link::Server(manager) => return Ok(Connection::Server(manager.clone())),
            Link::Sentinel(found) | Link::Cluster(found) => found,
        };
        let kept = || found.kept.lock().expect("not poisoned").clone();
        if let Some(connection) = kept() {
            return Ok(connection);
        }
        let mut finder = found.finder.lock().await;
        // Found by another command while this one waited.
        if let Some(connection) = kept() {
            return Ok(connection);
        }
        let finding = async {
            match &mut *finder {
                Finder::Sentinel(sentinel) => {
                    let master = sentinel.async_get_client().await?;
                    ConnectionManager::new_lazy_with_config(master, manager_config())
                        .map(Connection::Server)
                }
                Finder::Cluster(cluster) => cluster
                    .get_async_connection()
                    .await
                    .map(Connection::Cluster),
            }
        };
        let connection = tokio::time::timeout(TIMEOUT, finding)
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        *found.kept.lock().expect("not poisoned") = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `op` on the connection. A master that stopped being one (it
    /// fails, or answers `READONLY` after a failover) is asked of the
    /// sentinels again, and `op` run once more on the new one: what this
    /// store writes can be written twice.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let connection = self.connection().await.map_err(|e| self.failed(e))?;
        match (op(connection).await, &self.link) {
            (Err(e), Link::Sentinel(found)) if master_may_have_moved(&e) => {
                tracing::info!(store = %self.shown, error = %e, "asking the sentinels for the master again");
                *found.kept.lock().expect("not poisoned") = None;
                let connection = self.connection().await.map_err(|e| self.failed(e))?;
                op(connection).await
            }
            (done, _) => done,
        }
        .map_err(|e| self.failed(e))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.run(|mut connection| async move { cmd.query_async(&mut connection).await })
            .await
    }

    async fn exec(&self, pipe: &redis::Pipeline) -> Result<(), StoreError> {
        self.run(|mut connection| async move { pipe.query_async::<()>(&mut connection).await })
            .await
    }

    pub async fn get(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        let value: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(record_key(table, key)))
            .await?;
        Ok(value
            .and_then(|v| decode(&v))
            .filter(|r| r.expires_at > now()))
    }

    /// The tags first, each set on its own (a cluster keeps them on
    /// other shards), then the record: a record is never kept without its
    /// tags, so revoking a user finds all of theirs.
    pub async fn put(&self, table: Table, key: StoreKey, record: Record) -> Result<(), StoreError> {
        for tag in &record.tags {
            let tag = tag_key(tag);
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("SADD")
                .arg(&tag)
                .arg(hex(&key.0))
                .ignore();
            // A new set has no expiry, which `GT` counts as infinite: set
            // one first, then only ever extend it.
            for when in ["NX", "GT"] {
                pipe.cmd("EXPIREAT")
                    .arg(&tag)
                    .arg(record.expires_at)
                    .arg(when)
                    .ignore();
            }
            self.exec(&pipe).await?;
        }
        self.query(
            redis::cmd("SET")
                .arg(record_key(table, key))
                .arg(encode(&record))
                .arg("EXAT")
                .arg(record.expires_at),
        )
        .await
    }

    pub async fn put_new(
        &self,
        table: Table,
        key: StoreKey,
        record: Record,
    ) -> Result<bool, StoreError> {
        let set: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(record_key(table, key))
                    .arg(encode(&record))
                    .arg("NX")
                    .arg("EXAT")
                    .arg(record.expires_at),
            )
            .await?;
        Ok(set.is_some())
    }

    pub async fn take(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        let value: Option<Vec<u8>> = self
            .query(redis::cmd("GETDEL").arg(record_key(table, key)))
            .await?;
        let Some(record) = value.and_then(|v| decode(&v)) else {
            return Ok(None);
        };
        for tag in &record.tags {
            self.query::<()>(redis::cmd("SREM").arg(tag_key(tag)).arg(hex(&key.0)))
                .await?;
        }
        Ok(Some(record).filter(|r| r.expires_at > now()))
    }

    pub async fn tagged(&self, tags: Vec<Tag>) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let mut keys: Vec<StoreKey> = Vec::new();
        for tag in &tags {
            let members: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(tag_key(tag))).await?;
            for key in members.iter().filter_map(|m| parse_key(m)) {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        self.records(keys).await
    }

    pub async fn sessions(&self) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let prefix = format!("authgate:{}:", Table::Sessions.name());
        let mut keys = Vec::new();
        for node in self.masters().await? {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(1000);
                let (next, found): (u64, Vec<String>) = self.query_on(&node, scan).await?;
                keys.extend(
                    found
                        .iter()
                        .filter_map(|k| k.strip_prefix(&prefix))
                        .filter_map(parse_key),
                );
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort_by_key(|k| k.0);
        keys.dedup();
        self.records(keys).await
    }

    async fn records(&self, keys: Vec<StoreKey>) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let mut found = Vec::new();
        for chunk in keys.chunks(500) {
            let names: Vec<String> = chunk
                .iter()
                .map(|k| record_key(Table::Sessions, *k))
                .collect();
            let values: Vec<Option<Vec<u8>>> = self.query(redis::cmd("MGET").arg(names)).await?;
            let now = now();
            found.extend(chunk.iter().zip(values).filter_map(|(key, value)| {
                let record = decode(&value?)?;
                (record.expires_at > now).then_some((*key, record))
            }));
        }
        Ok(found)
    }

    /// Takes the renewal lock of `key`: `Some(token)` when this replica
    /// holds it now.
    /// Where keys are scanned: the one server, or each master of a
    /// cluster (`None` is the one server).
    async fn masters(&self) -> Result<Vec<Option<SingleNodeRoutingInfo>>, StoreError> {
        if !matches!(self.link, Link::Cluster(_)) {
            return Ok(vec![None]);
        }
        let every = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let answers = self.routed(&redis::cmd("PING"), &every).await?;
        // Each master's answer under its address, `host:port`.
        let redis::Value::Map(answers) = answers else {
            return Ok(Vec::new());
        };
        Ok(answers
            .iter()
            .filter_map(|(addr, _)| match addr {
                redis::Value::BulkString(addr) => std::str::from_utf8(addr).ok(),
                _ => None,
            })
            .filter_map(|addr| {
                let (host, port) = addr.rsplit_once(':')?;
                Some(Some(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port: port.parse().ok()?,
                }))
            })
            .collect())
    }

    /// `cmd` on `node` (from [`Redis::masters`]).
    async fn query_on<T: redis::FromRedisValue>(
        &self,
        node: &Option<SingleNodeRoutingInfo>,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let Some(node) = node else {
            return self.query(&cmd).await;
        };
        let value = self
            .routed(&cmd, &RoutingInfo::SingleNode(node.clone()))
            .await?;
        redis::from_redis_value(value).map_err(|e| self.failed(e.into()))
    }

    /// `cmd`, sent where `routing` says on a cluster, else to the server.
    async fn routed(
        &self,
        cmd: &redis::Cmd,
        routing: &RoutingInfo,
    ) -> Result<redis::Value, StoreError> {
        self.run(|connection| async move {
            match connection {
                Connection::Cluster(mut cluster) => {
                    cluster.route_command(cmd.clone(), routing.clone()).await
                }
                Connection::Server(mut server) => cmd.query_async(&mut server).await,
            }
        })
        .await
    }

    pub async fn lock(&self, key: StoreKey, ttl: Duration) -> Result<Option<String>, StoreError> {
        let token = hex(&crate::random_bytes::<16>());
        let taken: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(lock_key(key))
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(taken.map(|_| token))
    }

    /// Releases the lock if it is still the one `token` took.
    pub async fn unlock(&self, key: StoreKey, token: &str) -> Result<(), StoreError> {
        let script = Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let mut invocation = script.key(lock_key(key));
        invocation.arg(token);
        self.run(|mut connection| {
            let invocation = &invocation;
            async move { invocation.invoke_async::<i64>(&mut connection).await }
        })
        .await
        .map(drop)
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
    }
}

/// Whether `e` may mean the master is elsewhere now: it fails, or it
/// became a replica (`READONLY`).
fn master_may_have_moved(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
}

fn record_key(table: Table, key: StoreKey) -> String {
    format!("authgate:{}:{}", table.name(), hex(&key.0))
}

fn tag_key(tag: &Tag) -> String {
    format!("authgate:tag:{}", hex(tag))
}

fn lock_key(key: StoreKey) -> String {
    format!("authgate:lock:{}", hex(&key.0))
}

fn parse_key(hex_key: &str) -> Option<StoreKey> {
    let bytes: Option<Vec<u8>> = (0..hex_key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex_key.get(i..i + 2)?, 16).ok())
        .collect();
    Some(StoreKey(bytes?.try_into().ok()?))
}

/// The URL as messages show it: no user or password.
fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// expires at (8 bytes, big-endian), the tag count (1 byte), the tags,
/// the sealed record.
fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + 32 * record.tags.len() + record.sealed.len());
    out.extend_from_slice(&record.expires_at.to_be_bytes());
    out.push(u8::try_from(record.tags.len()).expect("a session has two tags"));
    for tag in &record.tags {
        out.extend_from_slice(tag);
    }
    out.extend_from_slice(&record.sealed);
    out
}

/// `None` for bytes `encode` did not write.
fn decode(bytes: &[u8]) -> Option<Record> {
    let (expires_at, rest) = bytes.split_first_chunk::<8>()?;
    let (&count, rest) = rest.split_first()?;
    let tags_len = 32 * usize::from(count);
    let tags = rest.get(..tags_len)?;
    Some(Record {
        expires_at: u64::from_be_bytes(*expires_at),
        tags: tags
            .chunks_exact(32)
            .map(|t| t.try_into().expect("chunks of 32"))
            .collect(),
        sealed: rest[tags_len..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            shown("rediss://user:p%40ss@redis.internal:6380/0"),
            "rediss://redis.internal:6380/0"
        );
        assert_eq!(shown("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        let sentinel = RedisServers::Sentinel {
            sentinels: vec![
                "redis://:hunter2@s1:26379".into(),
                "redis://s2:26379".into(),
            ],
            master: "mymaster".into(),
        };
        assert_eq!(
            sentinel.shown(),
            "master `mymaster` of the sentinels redis://s1:26379, redis://s2:26379"
        );
        let cluster = RedisServers::Cluster(vec!["rediss://u:hunter2@n1:6379".into()]);
        assert_eq!(cluster.shown(), "the cluster of rediss://n1:6379");
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let key = StoreKey::of(b"id");
        assert_eq!(parse_key(&hex(&key.0)), Some(key));
        assert_eq!(parse_key("zz"), None);
        assert_eq!(parse_key("é"), None);
    }

    proptest! {
        /// What another program (or a damaged value) left under our keys
        /// decodes to nothing or to a record, never a panic; ours come back.
        #[test]
        fn any_value_decodes_safely(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn records_round_trip(expires_at in any::<u64>(), tags in 0usize..3, sealed in proptest::collection::vec(any::<u8>(), 0..100)) {
            let record = Record { expires_at, tags: vec![[7; 32]; tags], sealed };
            prop_assert_eq!(decode(&encode(&record)), Some(record));
        }
    }
}
