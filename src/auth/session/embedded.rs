//! The embedded store: one `redb` file under `state_dir`. redb commits
//! are atomic and durable when `commit` returns (copy-on-write pages, a
//! checksummed root), so a process killed mid-write leaves the last
//! committed state, which the next open repairs to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};

use super::store::{Record, StoreError, StoreKey, Table, Tag};
use crate::clock::now;

/// key -> (expires at, tags, sealed record).
type Records = TableDefinition<'static, &'static [u8], (u64, &'static [u8], &'static [u8])>;
const SESSIONS: Records = TableDefinition::new("sessions");
const LOGINS: Records = TableDefinition::new("logins");
const SEEN: Records = TableDefinition::new("seen");
const SHARED: Records = TableDefinition::new("shared");
/// tag -> keys of the sessions carrying it.
const TAGS: MultimapTableDefinition<&[u8], &[u8]> = MultimapTableDefinition::new("tags");

fn definition(table: Table) -> Records {
    match table {
        Table::Sessions => SESSIONS,
        Table::Logins => LOGINS,
        Table::Seen => SEEN,
        Table::Shared => SHARED,
    }
}

#[derive(Clone)]
pub struct Embedded {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl Embedded {
    /// Opens (creating it when missing) the store at `path`.
    pub fn open(path: &Path) -> Result<Embedded, StoreError> {
        let failed = |source: redb::Error| match source {
            redb::Error::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.to_owned(),
            },
            source => StoreError::Embedded {
                path: path.to_owned(),
                source,
            },
        };
        let db = Database::create(path).map_err(|e| failed(e.into()))?;
        let create = || -> Result<(), redb::Error> {
            let tx = db.begin_write()?;
            tx.open_table(SESSIONS)?;
            tx.open_table(LOGINS)?;
            tx.open_table(SEEN)?;
            tx.open_multimap_table(TAGS)?;
            tx.commit()?;
            Ok(())
        };
        create().map_err(failed)?;
        Ok(Embedded {
            db: Arc::new(db),
            path: Arc::new(path.to_owned()),
        })
    }

    /// Runs `work` on the blocking pool: a commit waits for the disk.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await?
            .map_err(|source| StoreError::Embedded {
                path: path.to_path_buf(),
                source,
            })
    }

    pub async fn get(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        self.run(move |db| {
            let tx = db.begin_read()?;
            let records = tx.open_table(definition(table))?;
            let found = records.get(key.0.as_slice())?.map(|v| record(v.value()));
            Ok(found.filter(|r| r.expires_at > now()))
        })
        .await
    }

    pub async fn put(&self, table: Table, key: StoreKey, new: Record) -> Result<(), StoreError> {
        self.run(move |db| {
            let tx = db.begin_write()?;
            {
                let mut records = tx.open_table(definition(table))?;
                let mut tags = tx.open_multimap_table(TAGS)?;
                let tags_bytes = new.tags.concat();
                let old = records.insert(
                    key.0.as_slice(),
                    (new.expires_at, tags_bytes.as_slice(), new.sealed.as_slice()),
                )?;
                let old_tags = old.map(|v| record(v.value()).tags).unwrap_or_default();
                for tag in old_tags.iter().filter(|t| !new.tags.contains(t)) {
                    tags.remove(tag.as_slice(), key.0.as_slice())?;
                }
                for tag in &new.tags {
                    tags.insert(tag.as_slice(), key.0.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn put_new(
        &self,
        table: Table,
        key: StoreKey,
        new: Record,
    ) -> Result<bool, StoreError> {
        self.run(move |db| {
            let tx = db.begin_write()?;
            let fresh = {
                let mut records = tx.open_table(definition(table))?;
                let live = records
                    .get(key.0.as_slice())?
                    .is_some_and(|v| record(v.value()).expires_at > now());
                if !live {
                    records.insert(
                        key.0.as_slice(),
                        (new.expires_at, [].as_slice(), new.sealed.as_slice()),
                    )?;
                }
                !live
            };
            tx.commit()?;
            Ok(fresh)
        })
        .await
    }

    pub async fn take(&self, table: Table, key: StoreKey) -> Result<Option<Record>, StoreError> {
        self.run(move |db| {
            let tx = db.begin_write()?;
            let taken = {
                let mut records = tx.open_table(definition(table))?;
                let taken = records.remove(key.0.as_slice())?.map(|v| record(v.value()));
                if let Some(taken) = &taken {
                    untag(&mut tx.open_multimap_table(TAGS)?, key, &taken.tags)?;
                }
                taken
            };
            tx.commit()?;
            Ok(taken.filter(|r| r.expires_at > now()))
        })
        .await
    }

    pub async fn tagged(&self, wanted: Vec<Tag>) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.run(move |db| {
            let tx = db.begin_read()?;
            let tags = tx.open_multimap_table(TAGS)?;
            let records = tx.open_table(SESSIONS)?;
            let mut found = Vec::new();
            for tag in &wanted {
                for key in tags.get(tag.as_slice())? {
                    let key = key?;
                    let Ok(key) = <[u8; 32]>::try_from(key.value()) else {
                        continue;
                    };
                    let key = StoreKey(key);
                    if found.iter().any(|(k, _)| *k == key) {
                        continue;
                    }
                    if let Some(v) = records.get(key.0.as_slice())? {
                        found.push((key, record(v.value())));
                    }
                }
            }
            let now = now();
            found.retain(|(_, r)| r.expires_at > now);
            Ok(found)
        })
        .await
    }

    pub async fn sessions(&self) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read()?;
            let records = tx.open_table(SESSIONS)?;
            let now = now();
            let mut all = Vec::new();
            for entry in records.iter()? {
                let (key, value) = entry?;
                let Ok(key) = <[u8; 32]>::try_from(key.value()) else {
                    continue;
                };
                let record = record(value.value());
                if record.expires_at > now {
                    all.push((StoreKey(key), record));
                }
            }
            Ok(all)
        })
        .await
    }

    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.run(|db| {
            let now = now();
            let tx = db.begin_write()?;
            let mut swept = 0;
            {
                let mut tags = tx.open_multimap_table(TAGS)?;
                for table in [SESSIONS, LOGINS, SEEN] {
                    let mut records = tx.open_table(table)?;
                    let expired: Vec<(Vec<u8>, Record)> = records
                        .extract_if(.., |_, (expires_at, _, _)| expires_at <= now)?
                        .map(|entry| entry.map(|(k, v)| (k.value().to_vec(), record(v.value()))))
                        .collect::<Result<_, _>>()?;
                    for (key, expired) in &expired {
                        if let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) {
                            untag(&mut tags, StoreKey(key), &expired.tags)?;
                        }
                    }
                    swept += expired.len();
                }
            }
            tx.commit()?;
            Ok(swept)
        })
        .await
    }
}

fn untag(
    tags: &mut redb::MultimapTable<&[u8], &[u8]>,
    key: StoreKey,
    of: &[Tag],
) -> Result<(), redb::Error> {
    for tag in of {
        tags.remove(tag.as_slice(), key.0.as_slice())?;
    }
    Ok(())
}

/// A stored value back as a record; tags that are not whole are dropped.
fn record((expires_at, tags, sealed): (u64, &[u8], &[u8])) -> Record {
    Record {
        expires_at,
        tags: tags
            .chunks_exact(32)
            .map(|t| t.try_into().expect("chunks of 32"))
            .collect(),
        sealed: sealed.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> StoreKey {
        StoreKey([n; 32])
    }

    fn rec(expires_at: u64, tags: &[Tag], sealed: &[u8]) -> Record {
        Record {
            expires_at,
            tags: tags.to_vec(),
            sealed: sealed.to_vec(),
        }
    }

    #[tokio::test]
    async fn records_are_found_by_key_and_tag_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let db = Embedded::open(&path).unwrap();
        let later = now() + 100;
        db.put(Table::Sessions, key(1), rec(later, &[[7; 32]], b"one"))
            .await
            .unwrap();
        db.put(
            Table::Sessions,
            key(2),
            rec(later, &[[7; 32], [8; 32]], b"two"),
        )
        .await
        .unwrap();
        db.put(Table::Sessions, key(3), rec(now() - 1, &[[7; 32]], b"old"))
            .await
            .unwrap();
        db.put(Table::Logins, key(1), rec(later, &[], b"login"))
            .await
            .unwrap();
        let got = db.get(Table::Sessions, key(1)).await.unwrap().unwrap();
        assert_eq!(got.sealed, b"one");
        assert_eq!(
            db.get(Table::Logins, key(1)).await.unwrap().unwrap().sealed,
            b"login"
        );
        assert_eq!(db.get(Table::Sessions, key(3)).await.unwrap(), None);
        let mut tagged = db.tagged(vec![[7; 32]]).await.unwrap();
        tagged.sort_by_key(|(k, _)| k.0);
        assert_eq!(
            tagged.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [key(1), key(2)]
        );
        assert_eq!(db.sessions().await.unwrap().len(), 2);

        // Taken once; the tag no longer finds it.
        assert!(db.take(Table::Sessions, key(2)).await.unwrap().is_some());
        assert!(db.take(Table::Sessions, key(2)).await.unwrap().is_none());
        assert!(db.tagged(vec![[8; 32]]).await.unwrap().is_empty());
        // Re-tagging replaces the old tags.
        db.put(Table::Sessions, key(1), rec(later, &[[9; 32]], b"one"))
            .await
            .unwrap();
        assert!(db.tagged(vec![[7; 32]]).await.unwrap().is_empty());

        assert_eq!(db.sweep().await.unwrap(), 1);
        drop(db);
        // Reopened: what was committed is there.
        let db = Embedded::open(&path).unwrap();
        assert_eq!(
            db.get(Table::Sessions, key(1))
                .await
                .unwrap()
                .unwrap()
                .sealed,
            b"one"
        );
    }

    #[test]
    fn a_second_process_is_told_the_store_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = Embedded::open(&path).unwrap();
        let err = Embedded::open(&path).err().expect("opened twice");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_store_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, b"not a database at all, just text").unwrap();
        let err = Embedded::open(&path).err().expect("opened garbage");
        assert!(err.to_string().contains("s.redb"), "{err}");
    }

    /// A writer killed with SIGKILL mid-commit leaves a store that opens
    /// with every commit that returned. The writer is this test binary,
    /// run again as a child that writes until killed.
    #[test]
    fn a_store_killed_while_writing_still_opens() {
        const CHILD: &str = "AUTHGATE_TEST_STORE_WRITER";
        if let Ok(path) = std::env::var(CHILD) {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let db = Embedded::open(Path::new(&path)).unwrap();
                for n in 0u64.. {
                    let k = StoreKey::of(&n.to_be_bytes());
                    let value = vec![b'x'; 2000 + (n % 500) as usize];
                    db.put(Table::Sessions, k, rec(now() + 3600, &[[1; 32]], &value))
                        .await
                        .unwrap();
                    // Tells the parent this commit returned.
                    println!("{n}");
                }
            });
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "auth::session::embedded::tests::a_store_killed_while_writing_still_opens",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        let mut committed = None;
        for line in lines.by_ref() {
            if let Ok(n) = line.unwrap().trim().parse::<u64>() {
                committed = Some(n);
                if n >= 300 {
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let committed = committed.expect("the writer committed nothing");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let db = Embedded::open(&path).unwrap();
            for n in 0..=committed {
                let k = StoreKey::of(&n.to_be_bytes());
                assert!(
                    db.get(Table::Sessions, k).await.unwrap().is_some(),
                    "commit {n} of {committed} was lost"
                );
            }
        });
    }
}
