//! `state_dir`: what the gateway keeps between runs (the embedded session
//! store, the session secret and admin token it generates when the
//! configuration sets none, the ACME account and certificate). Readable
//! by the gateway's user alone.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The generated session secret, when `session.secret` is unset.
pub const SESSION_SECRET_FILE: &str = "session.secret";
/// The generated admin token, when `admin_token` is unset.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The embedded session store.
pub const SESSIONS_FILE: &str = "sessions.redb";
/// The ACME account (its key and URL at the CA).
pub const ACME_ACCOUNT_FILE: &str = "acme-account.json";
/// The certificate chain ACME issued, and its key.
pub const ACME_CERT_FILE: &str = "acme-certificate.pem";
pub const ACME_KEY_FILE: &str = "acme-certificate.key";
/// What ACME last did and will do next, for `authgate check`.
pub const ACME_STATUS_FILE: &str = "acme-status.json";

#[derive(Debug, thiserror::Error)]
#[error("state_dir `{}`: cannot {action}: {source}", path.display())]
pub struct StateError {
    path: PathBuf,
    action: &'static str,
    source: std::io::Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The directory, created (0700) when missing.
    pub fn prepare(&self) -> Result<&Path, StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0)
            .map_err(|source| self.error("create it", source))?;
        Ok(&self.0)
    }

    /// The secret kept in `name`, generated (32 random bytes, base64url,
    /// 0600) on first use. Two processes starting at once agree: the file
    /// is created exclusively, and the loser reads the winner's.
    pub fn secret(&self, name: &str) -> Result<String, StateError> {
        let path = self.prepare()?.join(name);
        let generated = URL_SAFE_NO_PAD.encode(crate::random_bytes::<32>());
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match created {
            Ok(mut file) => {
                file.write_all(generated.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|source| self.error("write a generated secret", source))?;
                Ok(generated)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let kept = std::fs::read_to_string(&path)
                    .map_err(|source| self.error("read a kept secret", source))?;
                let kept = kept.trim();
                if kept.is_empty() {
                    // A run killed between creating and writing it.
                    std::fs::remove_file(&path)
                        .map_err(|source| self.error("replace an empty secret", source))?;
                    return self.secret(name);
                }
                Ok(kept.to_owned())
            }
            Err(source) => Err(self.error("create a secret", source)),
        }
    }

    /// The secret kept in `name`, if one was made; nothing is created.
    pub fn kept_secret(&self, name: &str) -> Result<Option<String>, StateError> {
        match std::fs::read_to_string(self.0.join(name)) {
            Ok(kept) => Ok(Some(kept.trim().to_owned()).filter(|k| !k.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(self.error("read a kept secret", source)),
        }
    }

    /// Where `name` is kept.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Replaces `name` with `content` (0600) as a whole: a crash leaves
    /// the old file or the new one, never a mix.
    pub fn write_private(&self, name: &str, content: &[u8]) -> Result<(), StateError> {
        let path = self.prepare()?.join(name);
        let partial = self.0.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&partial);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|mut file| {
                file.write_all(content)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| self.error("write a file", source))
    }

    /// The content of `name`, if it exists.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        match std::fs::read(self.0.join(name)) {
            Ok(content) => Ok(Some(content)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(self.error("read a file", source)),
        }
    }

    fn error(&self, action: &'static str, source: std::io::Error) -> StateError {
        StateError {
            path: self.0.clone(),
            action,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_secret_is_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let first = state.secret(SESSION_SECRET_FILE).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&first).unwrap().len(), 32);
        assert_eq!(state.secret(SESSION_SECRET_FILE).unwrap(), first);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.path().join(SESSION_SECRET_FILE)), 0o600);
        assert_eq!(mode(state.path()), 0o700);
        assert_ne!(state.secret(ADMIN_TOKEN_FILE).unwrap(), first);
        assert_eq!(
            state.kept_secret(SESSION_SECRET_FILE).unwrap().as_deref(),
            Some(first.as_str())
        );
        let elsewhere = StateDir::new(dir.path().join("none"));
        assert_eq!(elsewhere.kept_secret(ADMIN_TOKEN_FILE).unwrap(), None);
        assert!(!elsewhere.path().exists(), "looking created it");
    }

    #[test]
    fn a_private_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert_eq!(state.read(ACME_STATUS_FILE).unwrap(), None);
        state.write_private(ACME_STATUS_FILE, b"first").unwrap();
        state.write_private(ACME_STATUS_FILE, b"second").unwrap();
        assert_eq!(state.read(ACME_STATUS_FILE).unwrap().unwrap(), b"second");
        let mode = std::fs::metadata(state.file(ACME_STATUS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_empty_kept_secret_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "").unwrap();
        assert_eq!(state.secret(ADMIN_TOKEN_FILE).unwrap().len(), 43);
    }
}
