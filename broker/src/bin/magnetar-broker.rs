//! `magnetar-broker --listen 127.0.0.1:6650 --data-dir DIR`: runs the embedded broker alone
//! (for tests with other clients, and for trying it out). Stops cleanly on Ctrl-C.
//!
//! Token authentication as Pulsar's `AuthenticationProviderToken`: `--token-secret-file`
//! (HS256; raw bytes, or `data:;base64,...`) or `--token-public-key-file` (RS256, PEM).
//! `--superuser ROLE` may do anything; `--tenant-role ROLE=TENANT` lets ROLE use TENANT;
//! `--anonymous-role ROLE` admits clients without a token as ROLE.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use magnetar_broker::auth::{secret_from_file_bytes, BrokerAuth, TenantRoles, VerifyKey};
use magnetar_broker::{Broker, BrokerConfig};

const USAGE: &str = "usage: magnetar-broker [--listen ADDR:PORT] [--data-dir DIR] [--deduplication]
       [--admin-listen ADDR:PORT|none]  (admin REST API, default 127.0.0.1:8080)
       [--retention-size BYTES] [--retention-time SECONDS] [--segment-bytes BYTES]
       [--failover-delay-ms MS]  (a Failover takeover's wait, default 1000)
       [--token-secret-file FILE | --token-public-key-file FILE] [--superuser ROLE]...
       [--tenant-role ROLE=TENANT]... [--anonymous-role ROLE]";

fn parse_args() -> Result<BrokerConfig, String> {
    let mut config = BrokerConfig::new(([127, 0, 0, 1], 6650).into(), "magnetar-data".into());
    config.admin_listen = Some(([127, 0, 0, 1], 8080).into());
    let mut key = None;
    let mut roles = TenantRoles::default();
    let mut anonymous_role = None;
    let mut args = std::env::args().skip(1);
    let value = |args: &mut std::iter::Skip<std::env::Args>, flag: &str| {
        args.next().ok_or_else(|| format!("{flag} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = value(&mut args, "--listen")?;
                config.listen = v
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--data-dir" => config.data_dir = PathBuf::from(value(&mut args, "--data-dir")?),
            "--deduplication" => config.deduplication = true,
            "--retention-size" => {
                let v = value(&mut args, "--retention-size")?;
                config.retention.max_bytes = Some(
                    v.parse()
                        .map_err(|e| format!("--retention-size {v}: {e}"))?,
                );
            }
            "--retention-time" => {
                let v = value(&mut args, "--retention-time")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|e| format!("--retention-time {v}: {e}"))?;
                config.retention.max_age = Some(std::time::Duration::from_secs(secs));
            }
            "--segment-bytes" => {
                let v = value(&mut args, "--segment-bytes")?;
                config.segment_bytes =
                    v.parse().map_err(|e| format!("--segment-bytes {v}: {e}"))?;
            }
            "--failover-delay-ms" => {
                let v = value(&mut args, "--failover-delay-ms")?;
                let ms: u64 = v
                    .parse()
                    .map_err(|e| format!("--failover-delay-ms {v}: {e}"))?;
                config.failover_delay = std::time::Duration::from_millis(ms);
            }
            "--admin-listen" => {
                let v = value(&mut args, "--admin-listen")?;
                config.admin_listen = match v.as_str() {
                    "none" => None,
                    _ => Some(
                        v.parse::<SocketAddr>()
                            .map_err(|e| format!("--admin-listen {v}: {e}"))?,
                    ),
                };
            }
            "--token-secret-file" => {
                let path = value(&mut args, "--token-secret-file")?;
                let bytes = std::fs::read(&path).map_err(|e| format!("reading {path}: {e}"))?;
                let secret = secret_from_file_bytes(&bytes).map_err(|e| format!("{path}: {e}"))?;
                key = Some(VerifyKey::Hs256(secret));
            }
            "--token-public-key-file" => {
                let path = value(&mut args, "--token-public-key-file")?;
                let pem = std::fs::read(&path).map_err(|e| format!("reading {path}: {e}"))?;
                key = Some(VerifyKey::Rs256(pem));
            }
            "--superuser" => roles.superusers.push(value(&mut args, "--superuser")?),
            "--tenant-role" => {
                let v = value(&mut args, "--tenant-role")?;
                let (role, tenant) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--tenant-role {v}: expected ROLE=TENANT"))?;
                roles
                    .tenants
                    .entry(role.to_string())
                    .or_default()
                    .push(tenant.to_string());
            }
            "--anonymous-role" => anonymous_role = Some(value(&mut args, "--anonymous-role")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    config.auth = key.map(|verify_key| BrokerAuth {
        verify_key,
        authorizer: Arc::new(roles),
        anonymous_role,
    });
    Ok(config)
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
