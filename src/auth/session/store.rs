//! Where server-side sessions and login states live: records of sealed
//! bytes under keys derived from what the browser holds, with an expiry
//! and tags (keyed hashes of the user) to find them by.
//!
//! The store sees only hashes and ciphertext: the key is SHA-256 of the
//! id in the cookie, so a copy of the store holds no usable cookie, and
//! the value is sealed with the session key.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::embedded::Embedded;
use super::redis::Redis;

/// The SHA-256 of the id a browser holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoreKey(pub [u8; 32]);

impl StoreKey {
    pub fn of(id: &[u8]) -> StoreKey {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id);
        StoreKey(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// A short name for lists and logs: not the id, and not enough of
    /// the key to find the record.
    pub fn handle(&self) -> String {
        hex(&self.0[..6])
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", self.handle())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A keyed hash that finds records (a user's sessions).
pub type Tag = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Sessions,
    Logins,
    /// Markers of what may be used once (logout tokens' `jti`).
    Seen,
    /// What replicas share besides sessions (the ACME account,
    /// certificate and challenge answers), by name.
    Shared,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Sessions => "sessions",
            Table::Logins => "logins",
            Table::Seen => "seen",
            Table::Shared => "shared",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Unix seconds after which the record is gone.
    pub expires_at: u64,
    pub tags: Vec<Tag>,
    pub sealed: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the session store `{}` failed: {source}", path.display())]
    Embedded { path: PathBuf, source: redb::Error },
    #[error("the session store `{}` is in use by another process (another authgate with the same state_dir?)", path.display())]
    InUse { path: PathBuf },
    #[error("the session store {url} failed: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot read session.redis_ca `{}`: {source}", path.display())]
    RedisCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a session store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The configured store. Every call is async: the embedded database
/// works on the blocking pool, Redis over the network (its futures boxed:
/// they nest deep, and would grow every caller's).
#[derive(Clone)]
pub enum Store {
    Embedded(Embedded),
    Redis(Redis),
}

impl Store {
    pub async fn get(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Embedded(db) => db.get(table, key).await,
            Store::Redis(db) => Box::pin(db.get(table, key)).await,
        }
    }

    pub async fn put(&self, table: Table, key: StoreKey, record: Record) -> Result<(), StoreError> {
        match self {
            Store::Embedded(db) => db.put(table, key, record).await,
            Store::Redis(db) => Box::pin(db.put(table, key, record)).await,
        }
    }

    /// Puts `record` only where no live one is: `false` when one was.
    pub async fn put_new(
        &self,
        table: Table,
        key: StoreKey,
        record: Record,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(db) => db.put_new(table, key, record).await,
            Store::Redis(db) => Box::pin(db.put_new(table, key, record)).await,
        }
    }

    /// Removes the record and returns what it was.
    pub async fn take(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Embedded(db) => db.take(table, key).await,
            Store::Redis(db) => Box::pin(db.take(table, key)).await,
        }
    }

    /// The live sessions carrying any of `tags`.
    pub async fn tagged(&self, tags: Vec<Tag>) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        match self {
            Store::Embedded(db) => db.tagged(tags).await,
            Store::Redis(db) => Box::pin(db.tagged(tags)).await,
        }
    }

    /// Every live session.
    pub async fn sessions(&self) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        match self {
            Store::Embedded(db) => db.sessions().await,
            Store::Redis(db) => Box::pin(db.sessions()).await,
        }
    }

    /// Takes the lock that makes one instance at a time work on `key` (a
    /// session's renewal: rotating refresh tokens are spent once; an ACME
    /// order) for at most `ttl`: `Some(token)` when taken. This process
    /// alone uses the embedded store, and works on a key once however
    /// many ask.
    pub async fn lock(&self, key: StoreKey, ttl: Duration) -> Result<Option<String>, StoreError> {
        match self {
            Store::Embedded(_) => Ok(Some(String::new())),
            Store::Redis(db) => Box::pin(db.lock(key, ttl)).await,
        }
    }

    pub async fn unlock(&self, key: StoreKey, token: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Redis(db) => Box::pin(db.unlock(key, token)).await,
        }
    }

    /// Whether the store answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Redis(db) => Box::pin(db.ping()).await,
        }
    }

    /// Removes expired records; how many.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        match self {
            Store::Embedded(db) => db.sweep().await,
            // Redis expires what it holds on its own.
            Store::Redis(_) => Ok(0),
        }
    }
}
