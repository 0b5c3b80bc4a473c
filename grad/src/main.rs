// Tunnel frames are buffers of up to 256 KiB: glibc's malloc hands such
// blocks back to the kernel and faults them in again (a tenth of grad's time
// relaying a tunnel); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use grad::{
    config::{Cli, Command, LogFormat, UserCommand},
    server,
    store::{Plan, Role},
};
use tokio_util::sync::CancellationToken;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => {
            config.validate().map_err(anyhow::Error::msg)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
            let shutdown = CancellationToken::new();
            let signals = shutdown.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                signals.cancel();
            });
            server::serve(listener, &config, shutdown).await?;
        }
        Command::User(UserCommand::Add {
            name,
            admin,
            plan,
            ttl,
            store,
        }) => {
            if !valid_user_name(&name) {
                anyhow::bail!(
                    "invalid user name '{name}': use 1-32 lowercase letters, digits, '-', '_' or '.'"
                );
            }
            let (db, keys) = server::open(&store.data_dir, &store.database_url()).await?;
            let role = if admin { Role::Admin } else { Role::User };
            let plan: Plan = plan.parse().map_err(anyhow::Error::msg)?;
            let user = db.insert_user(&name, role, plan).await?;
            println!("{}", keys.issue_user(&user, ttl)?);
            db.close().await;
        }
        Command::User(UserCommand::Plan { name, plan, store }) => {
            let (db, _) = server::open(&store.data_dir, &store.database_url()).await?;
            let plan: Plan = plan.parse().map_err(anyhow::Error::msg)?;
            if !db.set_user_plan(&name, plan).await? {
                anyhow::bail!("no user named '{name}'");
            }
            println!("user {name} is on the {plan} plan");
            db.close().await;
        }
        Command::User(UserCommand::Token { name, ttl, store }) => {
            let (db, keys) = server::open(&store.data_dir, &store.database_url()).await?;
            let user = db
                .user_by_name(&name)
                .await?
                .with_context(|| format!("no user named '{name}'"))?;
            println!("{}", keys.issue_user(&user, ttl)?);
            db.close().await;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // Two TLS providers are compiled in (ring, and aws-lc-rs under the AWS
    // SDK); rustls then makes the process pick one: the Kubernetes client
    // asks for the default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
