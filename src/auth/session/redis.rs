//! The Redis store (`session.store = "redis"`), shared by replicas: redis-rs
//! with its connection manager, which connects lazily and reconnects on
//! its own, so the gateway starts, and recovers, while Redis is down.
//! Valkey speaks the same protocol.
//!
//! Keys, under `authgate:`: `session:<key>` and `login:<key>` hold a
//! record and expire with it (`EXAT`); `tag:<tag>` is the set of session
//! keys carrying a tag, expiring with the last of them; `lock:<key>` is
//! held by the one replica renewing a session.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, Script, TlsCertificates};

use super::store::{hex, Record, StoreError, StoreKey, Table, Tag};
use crate::clock::now;

/// Per command, and per connection attempt: a store that does not answer
/// in this time is down, and the request gets a 503 rather than waiting.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Redis {
    connection: ConnectionManager,
    /// The URL without credentials, for messages.
    shown: std::sync::Arc<str>,
}

/// What `session.redis_*` configure.
pub struct RedisSettings<'a> {
    pub url: &'a str,
    pub password: Option<&'a str>,
    /// PEM certificates to trust for `rediss://` instead of the system's.
    pub ca: Option<Vec<u8>>,
}

impl Redis {
    /// Prepares the connection; it is made at the first command.
    pub fn new(settings: &RedisSettings<'_>) -> Result<Redis, StoreError> {
        let shown: std::sync::Arc<str> = shown(settings.url).into();
        let failed = |source: redis::RedisError| StoreError::Redis {
            url: shown.to_string(),
            source,
        };
        let mut info = settings.url.into_connection_info().map_err(failed)?;
        if let Some(password) = settings.password {
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca {
            Some(ca) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => Client::open(info),
        }
        .map_err(failed)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, config).map_err(failed)?;
        Ok(Redis { connection, shown })
    }

    fn failed(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.shown.to_string(),
            source,
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        cmd.query_async(&mut connection)
            .await
            .map_err(|e| self.failed(e))
    }

    pub async fn get(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        let value: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(record_key(table, key)))
            .await?;
        Ok(value
            .and_then(|v| decode(&v))
            .filter(|r| r.expires_at > now()))
    }

    pub async fn put(&self, table: Table, key: StoreKey, record: Record) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(record_key(table, key))
            .arg(encode(&record))
            .arg("EXAT")
            .arg(record.expires_at)
            .ignore();
        for tag in &record.tags {
            let tag = tag_key(tag);
            pipe.cmd("SADD").arg(&tag).arg(hex(&key.0)).ignore();
            // A new set has no expiry, which `GT` counts as infinite: set
            // one first, then only ever extend it.
            for when in ["NX", "GT"] {
                pipe.cmd("EXPIREAT")
                    .arg(&tag)
                    .arg(record.expires_at)
                    .arg(when)
                    .ignore();
            }
        }
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(|e| self.failed(e))
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
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
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
        let mut connection = self.connection.clone();
        script
            .key(lock_key(key))
            .arg(token)
            .invoke_async::<i64>(&mut connection)
            .await
            .map(drop)
            .map_err(|e| self.failed(e))
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
    }
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
