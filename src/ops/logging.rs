//! Logs: one line per request (target `authgate::access`) and everything
//! else on stdout, as text or JSON; audit lines (target `authgate::audit`:
//! sign-ins, sign-outs, refusals) there too, or, with `log.audit_log`, in a
//! file of their own as JSON.

use serde::Deserialize;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::Level;
use tracing_subscriber::filter::{filter_fn, FilterExt, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// A file for the audit lines (sign-ins, sign-outs, refusals), as
    /// JSON, apart from the request log; unset: they go to stdout too.
    pub audit_log: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            audit_log: None,
        }
    }
}

/// The target of audit lines.
pub const AUDIT: &str = "authgate::audit";
/// The target of the per-request lines.
pub const ACCESS: &str = "authgate::access";

#[derive(Debug, thiserror::Error)]
#[error("config key `log.audit_log`: cannot open `{path}`: {source}")]
pub struct LoggingError {
    path: String,
    source: std::io::Error,
}

pub fn init(config: &LogConfig) -> Result<(), LoggingError> {
    let audit_file = config
        .audit_log
        .as_ref()
        .map(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggingError {
                    path: path.display().to_string(),
                    source,
                })
        })
        .transpose()?;
    let separate_audit = audit_file.is_some();

    // RUST_LOG, when set, wins over log.level.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let stdout: Box<dyn Layer<Registry> + Send + Sync> = match config.format {
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stdout).boxed(),
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stdout)
            .with_ansi(ansi)
            .boxed(),
    };
    // One combined filter: `And` keeps the level filter's "never" for
    // callsites below the level, where a closure filter stacked on top
    // would make each one "sometimes", to be asked at every use.
    let stdout = stdout.with_filter(filter.and(filter_fn(move |meta| {
        !(separate_audit && meta.target() == AUDIT)
    })));
    let audit = audit_file.map(|file| {
        fmt::layer()
            .json()
            .with_writer(Mutex::new(file))
            .with_filter(Targets::new().with_target(AUDIT, Level::INFO))
    });
    // No `Option` layer for the absent audit file: `None` answers
    // "always" for every callsite, which had the registry create every
    // span of every dependency (h2 opens several per request) whatever the
    // level (see docs/performance.md).
    let registry = tracing_subscriber::registry().with(stdout);
    match audit {
        Some(audit) => registry.with(audit).init(),
        None => registry.init(),
    }
    Ok(())
}
