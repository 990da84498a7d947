//! The `magnetar` command: runs the gateway (standalone by default, with the embedded
//! broker) from an optional TOML config file.
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc malloc: with many threads allocating small, long-lived objects
/// (a TLS session, a socket task per connection), glibc's per-thread arenas fragment, and
/// 10,000 idle TLS connections measured ~2 KiB more each (docs/benchmarks.md, idle memory). Background
/// threads return freed pages to the system without waiting for the next allocation.
#[cfg(unix)]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Magnetar: MQTT (and more) at the edge, Apache Pulsar underneath.
///
/// With no arguments, runs standalone on loopback: the embedded Pulsar-protocol broker on
/// 127.0.0.1:6650, MQTT on 1883, MQTT over TLS on 8883, MQTT over WebSocket on 9001 and the
/// web port (Pulsar's WebSocket and admin REST APIs, /demo) on 8080, data in ./data.
#[derive(Parser, Debug)]
#[command(name = "magnetar", version, about, long_about)]
struct Cli {
    /// TOML config file (see examples/magnetar.toml).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Directory for the broker's data, the generated certificate and the compile cache
    /// (overrides `data_dir` of the config).
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Prints a JWT for a user of the config (as `pulsar tokens create` does), accepted by
    /// the gateway's listeners and by the embedded broker.
    Token {
        /// The user the token speaks for.
        #[arg(long)]
        user: String,
        /// How long the token is valid (`30m`, `12h`, `7d`, `1y`); unset: no expiry.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Reads a password from stdin and prints its argon2 hash for `auth.users.password_hash`.
    HashPassword,
    /// Reads a Mosquitto password file (`mosquitto_passwd`'s `user:$7$...` lines) and prints
    /// its users as `[[auth.users]]` entries of `tenant`/`namespace`, their hashes as they
    /// are: the devices keep their passwords.
    ImportMosquittoPasswd {
        /// The password file.
        file: PathBuf,
        #[arg(long, default_value = "public")]
        tenant: String,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = match &cli.config {
        Some(path) => magnetar::config::Config::load(path)?,
        None => magnetar::config::Config::default(),
    };
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    match cli.command {
        None => run(config),
        Some(Command::Token { user, expires_in }) => {
            let tenancy = magnetar::tenancy::Tenancy::from_config(&config)
                .context("loading users and token keys")?;
            // The superuser role's token is the admin API's and native superusers' key.
            if user != tenancy.superuser_role() && !tenancy.users().iter().any(|u| u.name == user) {
                anyhow::bail!("no user {user:?} in the config");
            }
            println!("{}", tenancy.sign_token(&user, expires_in)?);
            Ok(())
        }
        Some(Command::HashPassword) => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from stdin")?;
            let hash = magnetar::tenancy::hash_password(
                password.trim_end_matches(['\r', '\n']).as_bytes(),
            )
            .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
            println!("{hash}");
            Ok(())
        }
        Some(Command::ImportMosquittoPasswd {
            file,
            tenant,
            namespace,
        }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (users, refused) =
                magnetar::password::import_mosquitto_passwd(&text, &tenant, &namespace);
            for (line, reason) in &refused {
                eprintln!("{}:{line}: left out: {reason}", file.display());
            }
            print!(
                "{}",
                toml::to_string(&users).context("writing the users as TOML")?
            );
            eprintln!(
                "{} users imported, {} lines left out",
                users.auth.users.len(),
                refused.len()
            );
            Ok(())
        }
    }
}

fn run(config: magnetar::config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("magnetar-io")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let server = magnetar::server::Server::start(config).await?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r.context("waiting for ctrl-c")?; }
            r = terminate() => { r?; }
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    })
}

#[cfg(unix)]
async fn terminate() -> anyhow::Result<()> {
    let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    sig.recv().await;
    Ok(())
}

#[cfg(not(unix))]
async fn terminate() -> anyhow::Result<()> {
    std::future::pending().await
}
