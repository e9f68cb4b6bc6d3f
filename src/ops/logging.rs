//! Logs: one line per request (target `authgate::access`) and everything
//! else on stdout, as text or JSON; audit lines (target `authgate::audit`:
//! sign-ins, sign-outs, refusals) there too, or, with `log.audit_log`, in a
//! file of their own as JSON.

use serde::Deserialize;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::Level;
use tracing_subscriber::filter::{filter_fn, FilterExt, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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

/// The stdout log in `format`, written through `out`. JSON escapes every
/// control character itself; text lines go through [`Escaped`], so no
/// value a client chose (a path, a token's header, a reason) can start a
/// line of its own or steer a terminal. Hence no ANSI colours either.
fn stdout_layer<W>(format: LogFormat, out: W) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => fmt::layer().json().with_writer(out).boxed(),
        LogFormat::Text => fmt::layer()
            .with_writer(Escaped(out))
            .with_ansi(false)
            .boxed(),
    }
}

/// Writes each formatted event with its control characters escaped
/// (`\n`, `\u{1b}`…), but for the newline that ends it. The formatter
/// hands over one whole event per `write_all`.
struct Escaped<W>(W);

impl<'w, W: MakeWriter<'w>> MakeWriter<'w> for Escaped<W> {
    type Writer = Escaped<W::Writer>;

    fn make_writer(&'w self) -> Self::Writer {
        Escaped(self.0.make_writer())
    }
}

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, event: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match event.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (event, &b""[..]),
        };
        if !body.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
            self.0.write_all(event)?;
            return Ok(event.len());
        }
        let mut escaped = Vec::with_capacity(event.len() + 16);
        for &byte in body {
            match byte {
                b'\n' => escaped.extend_from_slice(b"\\n"),
                b'\r' => escaped.extend_from_slice(b"\\r"),
                b'\t' => escaped.push(byte),
                byte if byte.is_ascii_control() => {
                    escaped.extend_from_slice(format!("\\u{{{byte:x}}}").as_bytes())
                }
                byte => escaped.push(byte),
            }
        }
        escaped.extend_from_slice(end);
        self.0.write_all(&escaped)?;
        Ok(event.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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
    let stdout = stdout_layer(config.format, std::io::stdout);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the layer wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, value: &str) -> String {
        let captured = Captured::default();
        let out = captured.clone();
        let subscriber =
            tracing_subscriber::registry().with(stdout_layer(format, move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: AUDIT, reason = value, "bearer token refused");
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn client_values_cannot_start_a_line_of_their_own() {
        let forged = "alg RS256\nFORGED authgate::audit: signed in user=admin\r\u{1b}[2K";
        for format in [LogFormat::Text, LogFormat::Json] {
            let written = logged(format, forged);
            assert_eq!(written.lines().count(), 1, "{format:?}: {written:?}");
            assert!(written.ends_with('\n'));
            assert!(!written.contains('\u{1b}'), "{format:?}: {written:?}");
            assert!(
                written.contains("FORGED"),
                "{format:?}: the value is still there"
            );
        }
    }
}
