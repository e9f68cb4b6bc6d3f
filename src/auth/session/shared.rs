//! What replicas share besides sessions, through the session store when
//! it is Redis (the ACME account, certificate and challenge answers):
//! named values, sealed with the session key as sessions are (a dump of
//! the store holds no usable private key), and named locks.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::store::{Record, Store, StoreError, StoreKey, Table};
use super::{Kept, Sessions, Stored};
use crate::clock::now;

#[derive(Clone)]
pub struct Shared {
    sessions: Sessions,
    stored: Stored,
}

impl Sessions {
    /// What replicas share through Redis; `None` with the other stores,
    /// which one instance alone uses.
    pub fn shared(&self) -> Option<Shared> {
        match &self.kept {
            Kept::InStore(stored) if matches!(stored.store, Store::Redis(_)) => Some(Shared {
                sessions: self.clone(),
                stored: stored.clone(),
            }),
            _ => None,
        }
    }
}

impl Shared {
    /// The value kept under `name`, if any opens.
    pub async fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let key = StoreKey::of(name.as_bytes());
        let record = self
            .stored
            .checked(self.stored.store.get(Table::Shared, key).await)?;
        Ok(record.and_then(|r| self.sessions.open_record(Table::Shared, key, &r)))
    }

    /// Keeps `value` under `name` for `lifetime`.
    pub async fn put<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        lifetime: Duration,
    ) -> Result<(), StoreError> {
        let key = StoreKey::of(name.as_bytes());
        let json = serde_json::to_string(value).expect("shared values serialize");
        let record = Record {
            expires_at: now() + lifetime.as_secs(),
            tags: Vec::new(),
            sealed: self.sessions.seal_record(Table::Shared, key, json),
        };
        self.stored
            .checked(self.stored.store.put(Table::Shared, key, record).await)
    }

    /// Takes the lock `name` for at most `ttl`: `Some(token)` when this
    /// replica holds it now.
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let key = StoreKey::of(name.as_bytes());
        self.stored.checked(self.stored.store.lock(key, ttl).await)
    }

    /// Releases the lock if `token` still holds it; one not released
    /// expires on its own.
    pub async fn unlock(&self, name: &str, token: &str) {
        let key = StoreKey::of(name.as_bytes());
        let _ = self
            .stored
            .checked(self.stored.store.unlock(key, token).await);
    }
}
