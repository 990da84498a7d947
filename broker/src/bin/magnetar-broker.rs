//! `magnetar-broker --listen 127.0.0.1:6650 --data-dir DIR`: runs the embedded broker alone
//! (for tests with other clients, and for trying it out). Stops cleanly on Ctrl-C.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use magnetar_broker::{Broker, BrokerConfig};

const USAGE: &str = "usage: magnetar-broker [--listen ADDR:PORT] [--data-dir DIR]";

fn parse_args() -> Result<BrokerConfig, String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 6650).into();
    let mut data_dir = PathBuf::from("magnetar-data");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs a value")?;
                listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--data-dir" => {
                data_dir = args.next().ok_or("--data-dir needs a value")?.into();
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(BrokerConfig { listen, data_dir })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let broker = match Broker::start(config).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("magnetar-broker: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("listening on {}", broker.service_url());
    let _ = tokio::signal::ctrl_c().await;
    broker.shutdown().await;
    std::process::ExitCode::SUCCESS
}
