#![forbid(unsafe_code)]
//! The `xmpp-federator` command: `serve`, `demo`, `validate`, `check`, `load`,
//! and `status`, `domains` (a running server's federation, through its API).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xmpp_federator::config::Config;

// glibc's malloc was a fifth of the server's CPU under load (fragmentation and
// consolidation between the API, session and store threads); mimalloc is the
// well-kept drop-in. Measured with examples/api_load (see README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits' EX_USAGE: the configuration is bad.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "XMPP server-to-server federation for a chat backend's domain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults without --config: localhost, dev certificate).
    Serve {
        /// TOML configuration file.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Two domains federating on loopback in this process, with traffic to watch
    /// on their status pages (nothing kept: Ctrl-C removes it all).
    Demo(xmpp_federator::demo::DemoArgs),
    /// Check a configuration file and exit (status 64 if it is bad).
    Validate {
        /// TOML configuration file.
        config: PathBuf,
    },
    /// Connect to a remote domain as we would and print every step, then ping it.
    Check {
        /// The remote XMPP domain.
        domain: String,
        /// TOML configuration file (our domain, certificates, DNS).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Which hosted domain to connect as (default: the first).
        #[arg(long)]
        from: Option<String>,
    },
    /// Load-test an s2s target with pipelined XEP-0199 pings (plays a remote server).
    Load(xmpp_federator::load::LoadArgs),
    /// The running server's federation: streams, queues and errors per remote domain.
    Status {
        /// TOML configuration file (the API's address and token).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the status JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The running server's federation policy: list, allow, block or forget a domain.
    Domains {
        /// TOML configuration file (the API's address and token).
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: DomainsAction,
    },
}

#[derive(Subcommand)]
enum DomainsAction {
    /// Every domain the config file or a runtime entry names, and the mode.
    List,
    /// Allow DOMAIN (a runtime entry, kept across restarts).
    Allow {
        /// A remote domain.
        domain: String,
    },
    /// Block DOMAIN: its streams are closed and its queued messages bounced.
    Block {
        /// A remote domain.
        domain: String,
    },
    /// Forget DOMAIN's runtime entry (the config file's applies again).
    Forget {
        /// A remote domain.
        domain: String,
    },
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::default()),
        Some(p) => Config::load(p).map_err(|e| {
            eprintln!("error: {}: {e}", p.display());
            ExitCode::from(EXIT_CONFIG)
        }),
    }
}

/// Success, or the error printed (exit 1), for `serve` and `demo`.
fn finished(r: Result<(), impl std::fmt::Display>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Print what a `status`/`domains` command made, or its error (exit 1).
fn ctl_result(r: Result<String, xmpp_federator::ctl::CtlError>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Log to stderr at `XMPP_FEDERATOR_LOG`'s filter, else at `default`.
fn init_tracing_at(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("XMPP_FEDERATOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn init_tracing() {
    init_tracing_at("info")
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called
/// (not when the future is first polled), so a signal during start-up is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Validate { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} domain(s): {})",
                    config.display(),
                    c.domains.len(),
                    c.domains.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}: {e}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve { config } => {
            let config = match load_config(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing();
            finished(rt.block_on(async {
                let signal = shutdown_signal();
                xmpp_federator::app::run(config, signal).await
            }))
        }
        Command::Demo(args) => {
            // Its own output is on stdout; the two servers' logs would drown it.
            init_tracing_at("warn");
            finished(rt.block_on(async {
                let signal = shutdown_signal();
                xmpp_federator::demo::run(args, signal).await
            }))
        }
        Command::Check {
            domain,
            config,
            from,
        } => {
            let config = match load_config(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if std::env::var_os("XMPP_FEDERATOR_LOG").is_some() {
                init_tracing();
            }
            let r = rt.block_on(async {
                xmpp_federator::check::run(config, &domain, from.as_deref(), &mut |l| {
                    println!("{l}")
                })
                .await
                .context("check failed")
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("FAILED: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { config, json } => {
            let config = match load_config(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let r = rt.block_on(async {
                let client = xmpp_federator::ctl::Client::from_config(&config)?;
                let s = client.status().await?;
                Ok::<_, xmpp_federator::ctl::CtlError>(if json {
                    serde_json::to_string_pretty(&s).unwrap_or_default()
                } else {
                    xmpp_federator::ctl::format_status(&s)
                })
            });
            ctl_result(r)
        }
        Command::Domains { config, action } => {
            use xmpp_federator::ctl::DomainsCommand as D;
            let config = match load_config(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let cmd = match action {
                DomainsAction::List => D::List,
                DomainsAction::Allow { domain } => D::Allow(domain),
                DomainsAction::Block { domain } => D::Block(domain),
                DomainsAction::Forget { domain } => D::Forget(domain),
            };
            ctl_result(rt.block_on(async {
                xmpp_federator::ctl::Client::from_config(&config)?
                    .domains(&cmd)
                    .await
            }))
        }
        Command::Load(args) => {
            if std::env::var_os("XMPP_FEDERATOR_LOG").is_some() {
                init_tracing();
            }
            match rt.block_on(xmpp_federator::load::run(args)) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
