//! The `magnetar` command: runs the gateway (standalone by default, with the embedded
//! broker) from an optional TOML config file.
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Magnetar: MQTT (and more) at the edge, Apache Pulsar underneath.
///
/// With no arguments, runs standalone on loopback: the embedded Pulsar-protocol broker on
/// 127.0.0.1:6650, MQTT on 1883 and MQTT over TLS on 8883, data in ./data.
#[derive(Parser, Debug)]
#[command(name = "magnetar", version, about, long_about)]
struct Cli {
    /// TOML config file (see examples/magnetar.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the broker's data, the generated certificate and the compile cache
    /// (overrides `data_dir` of the config).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
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
