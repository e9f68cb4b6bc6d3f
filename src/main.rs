//! The `authgate` command: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use clap::{Parser, Subcommand};

use authgate::config::Config;

const DEFAULT_CONFIG: &str = "config/authgate.toml";

/// mimalloc rather than glibc's malloc: cheaper per request with many
/// connections (figures in docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A sign-in gateway for self-hosted consoles: terminates TLS and forwards
/// every request to the console behind it.
#[derive(Debug, Parser)]
#[command(name = "authgate", version, propagate_version = true)]
#[command(
    after_help = "Every config key can also be set by an environment variable \
    AUTHGATE_<SECTION>_<KEY> (e.g. AUTHGATE_UPSTREAM, AUTHGATE_TLS_CERT), and read \
    from a file with the key suffix _file (e.g. AUTHGATE_PUBLIC_URL_FILE)."
)]
struct Cli {
    /// Configuration file (TOML). When the default file is missing,
    /// built-in defaults and the environment are used.
    #[arg(
        long,
        short,
        global = true,
        env = "AUTHGATE_CONFIG",
        value_name = "PATH"
    )]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the configuration and print what the gateway would do.
    CheckConfig,
    /// Troubleshoot a set-up: certificate, public URL, issuer, discovery,
    /// the app's credential, upstreams; each check with its fix. Exit 0
    /// only when all pass.
    Check {
        /// One JSON array of {check, ok, detail, fix} for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Probe the running gateway's liveness endpoint over TLS (for a
    /// container HEALTHCHECK); exit 0 when it answers.
    Health,
    /// Print a fresh random secret (32 bytes, base64url), e.g. for session keys.
    GenSecret,
    /// List or end sign-in sessions (same configuration and environment as
    /// the gateway): in Redis directly, else through the running gateway's
    /// admin listener.
    Sessions {
        #[command(subcommand)]
        action: SessionsAction,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsAction {
    /// The live sessions: user, when signed in, last seen, when they end.
    List {
        /// Only this user's (UPN, any case, or object id).
        #[arg(long, value_name = "UPN|OID")]
        user: Option<String>,
        /// The admin endpoint's JSON as it came.
        #[arg(long)]
        json: bool,
    },
    /// End sessions at once: a signed-out user must sign in again.
    #[command(group(clap::ArgGroup::new("whose").required(true).args(["user", "session", "all"])))]
    Revoke {
        /// Every session of this user (UPN, any case, or object id).
        #[arg(long, value_name = "UPN|OID")]
        user: Option<String>,
        /// One session, by the handle `sessions list` shows.
        #[arg(long, value_name = "HANDLE")]
        session: Option<String>,
        /// Every session.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::GenSecret => {
            let secret = authgate::random_bytes::<32>();
            println!(
                "{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
            );
            ExitCode::SUCCESS
        }
        Command::Health => {
            let config = match load(cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let probed = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(authgate::ops::health::probe(&config))
                        .map_err(|e| e.to_string())
                });
            match probed {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("authgate: unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { json } => troubleshoot(cli.config, json),
        Command::Sessions { action } => match load(cli.config) {
            Ok(config) => sessions(&config, action),
            Err(code) => code,
        },
        Command::CheckConfig => match load(cli.config) {
            Ok(config) if print_summary(&config) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(code) => code,
        },
        Command::Serve => {
            let config = match load(cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            if let Err(e) = authgate::ops::logging::init(&config.log) {
                eprintln!("authgate: {e}");
                return ExitCode::from(2);
            }
            // This thread runs the background work (keys, certificates,
            // signals, the admin listener); worker threads of their own
            // serve HTTPS.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("authgate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(authgate::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "authgate stopped");
                    eprintln!("authgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    load_quietly(path).map_err(|e| {
        eprintln!("authgate: {e}");
        ExitCode::from(2)
    })
}

fn load_quietly(path: Option<PathBuf>) -> Result<Config, authgate::config::ConfigError> {
    let required = path.is_some();
    let path = path.unwrap_or_else(|| DEFAULT_CONFIG.into());
    Config::load(&path, required, std::env::vars())
}

/// Prints what the gateway would do; false when the certificate is unusable.
fn print_summary(config: &Config) -> bool {
    println!("configuration is valid");
    println!("  listen        https://{}", config.listen);
    if let Some(addr) = config.http_redirect_listen {
        println!("  redirect      http://{addr} -> {}", config.public_url);
    }
    println!("  public_url    {}", config.public_url);
    match config.admin_listen {
        Some(addr) => println!("  admin         http://{addr}/metrics, http://{addr}/sessions"),
        None => println!("  admin         off"),
    }
    if let Some(session) = &config.session {
        let store = config.state_dir.path().join(authgate::state::SESSIONS_FILE);
        match session.store {
            authgate::auth::session::StoreKind::Embedded => {
                println!("  sessions      kept in {}", store.display())
            }
            authgate::auth::session::StoreKind::Redis => {
                let redis = session.redis.as_ref().map(|r| r.servers.shown());
                println!(
                    "  sessions      kept in Redis: {}",
                    redis.unwrap_or_default()
                )
            }
            authgate::auth::session::StoreKind::Cookie => {
                println!("  sessions      in their cookies (nothing kept, nothing to revoke)")
            }
        }
    }
    match &config.oidc {
        Some(oidc) => {
            println!(
                "  sign-in       {} (client {})",
                oidc.issuer, oidc.client_id
            );
            println!(
                "  redirect URI  {}   <- register this in Entra (Authentication > Web)",
                oidc.redirect_uri
            );
            println!(
                "  sign-out URI  {}{}signed_out",
                config.public_url, config.gateway_prefix
            );
        }
        None => println!("  sign-in       none: every route is public"),
    }
    let tls = &config.tls;
    let cert_ok = match authgate::net::tls::load(&tls.cert, &tls.key) {
        _ if tls.acme.is_some() => {
            let acme = tls.acme.as_ref().expect("matched");
            println!(
                "  certificate   from the ACME CA {} for {} ({}), kept at {}",
                acme.directory,
                acme.names.join(", "),
                acme.challenge,
                tls.cert.display()
            );
            true
        }
        Ok(_) => {
            println!("  certificate   {} (loads)", tls.cert.display());
            true
        }
        Err(_) if tls.may_self_sign && !tls.cert.exists() && !tls.key.exists() => {
            println!(
                "  certificate   none yet: a self-signed one will be generated at {} (testing only)",
                tls.cert.display()
            );
            true
        }
        Err(e) => {
            println!("  certificate   PROBLEM: {e}");
            false
        }
    };
    println!("  routes (longest prefix wins):");
    let mut routes = config.routes.clone();
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    for route in routes {
        let access = match route.access {
            authgate::forward::routes::Access::Protected => "sign-in",
            authgate::forward::routes::Access::Public => "public",
            authgate::forward::routes::Access::UpstreamToken => "own token or sign-in",
        };
        println!(
            "    {:<20} -> {:<28} {access}",
            route.prefix,
            route.upstream.to_string()
        );
    }
    for warning in &config.warnings {
        println!("warning: {warning}");
    }
    cert_ok
}

/// `authgate check`: every finding printed, exit 0 only when all pass.
fn troubleshoot(path: Option<PathBuf>, json: bool) -> ExitCode {
    let findings = match load_quietly(path) {
        Ok(config) => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(authgate::ops::check::run(&config)),
            Err(e) => {
                eprintln!("authgate: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        },
        Err(e) => vec![authgate::ops::check::Finding {
            check: "configuration".into(),
            ok: false,
            detail: e.to_string(),
            fix: Some("correct the key named above; config/authgate.toml documents each".into()),
        }],
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings).expect("findings serialize")
        );
    } else {
        for finding in &findings {
            let mark = if finding.ok { "PASS" } else { "FAIL" };
            println!("{mark}  {:<16} {}", finding.check, finding.detail);
            if let Some(fix) = &finding.fix {
                println!("      {:<16} fix: {fix}", "");
            }
        }
    }
    if findings.iter().all(|f| f.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `authgate sessions list|revoke`.
fn sessions(config: &Config, action: SessionsAction) -> ExitCode {
    use authgate::auth::session::Who;
    use authgate::ops::admin::{client, Ask};
    let (ask, json) = match action {
        SessionsAction::List { user, json } => (Ask::List(user), json),
        SessionsAction::Revoke { user, session, .. } => {
            let who = match (user, session) {
                (Some(user), _) => Who::User(user),
                (_, Some(session)) => Who::Session(session),
                _ => Who::All,
            };
            (Ask::Revoke(who), false)
        }
    };
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(client::call(config, &ask))
                .map_err(|e| e.to_string())
        });
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("authgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{answer:#}");
    } else if let Some(revoked) = answer["revoked"].as_u64() {
        println!("{revoked} session(s) ended");
    } else {
        let listed = answer["sessions"].as_array().cloned().unwrap_or_default();
        println!(
            "{:<14} {:<36} {:<22} {:<22} {:<22}",
            "HANDLE", "USER", "SIGNED IN", "LAST SEEN", "ENDS BY"
        );
        let at = |v: &serde_json::Value| {
            let secs = v.as_u64().unwrap_or(0);
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            )
            .to_string()
        };
        for s in &listed {
            println!(
                "{:<14} {:<36} {:<22} {:<22} {:<22}",
                s["handle"].as_str().unwrap_or(""),
                s["user"].as_str().unwrap_or(""),
                at(&s["signed_in_at"]),
                at(&s["last_seen"]),
                at(&s["expires_at"]),
            );
        }
        println!("{} session(s)", listed.len());
    }
    ExitCode::SUCCESS
}
