//! The running gateway: the embedded broker, the backend, the plugins and the listeners,
//! started in that order and stopped in the reverse one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use magnetar_broker::{Broker, BrokerConfig, BrokerHandle};

use crate::backend::Backend;
use crate::config::Config;
use crate::host_api::Services;
use crate::kv::Kv;
use crate::listener::Listener;
use crate::plugin_host::{InstanceLimits, PluginHost};
use crate::tenancy::Tenancy;

/// A started gateway.
pub struct Server {
    broker: Option<BrokerHandle>,
    listeners: Vec<(String, SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl Server {
    /// Starts everything the config asks for; returns once every listener is bound.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;

        let broker = if config.broker.embedded {
            let handle = Broker::start(BrokerConfig {
                listen: config.broker.listen,
                data_dir: config.data_dir.join("broker"),
            })
            .await
            .with_context(|| format!("starting the embedded broker on {}", config.broker.listen))?;
            tracing::info!(addr = %handle.local_addr(), "embedded broker listening");
            Some(handle)
        } else {
            None
        };
        let service_url = match (&config.backend.service_url, &broker) {
            (Some(url), _) => url.clone(),
            (None, Some(b)) => b.service_url(),
            (None, None) => {
                return Err(anyhow!(
                    "no backend: set backend.service_url or broker.embedded"
                ))
            }
        };
        let backend = Arc::new(
            Backend::connect(&service_url, config.backend.token.as_deref())
                .await
                .context("connecting to the backend")?,
        );
        let services = Arc::new(Services {
            kv: Arc::new(Kv::new(backend.clone())),
            backend,
            tenancy: Arc::new(Tenancy::from_config(&config.auth)),
        });

        let plugins = load_plugins(&config)?;
        let host = PluginHost::new(
            InstanceLimits {
                memory_bytes: config.plugins.memory_limit_mib * 1024 * 1024,
                event_deadline: Duration::from_millis(config.plugins.event_deadline_ms),
            },
            Some(&config.data_dir.join("cache")),
        )?;
        let workers = match config.plugins.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let mut pools = HashMap::new();
        for l in &config.listeners {
            if pools.contains_key(&l.plugin) {
                continue;
            }
            let wasm = plugins
                .get(&l.plugin)
                .ok_or_else(|| anyhow!("listener {}: no plugin named {:?}", l.name, l.plugin))?;
            let component = host.compile(&l.plugin, wasm)?;
            let pool = host.start_pool(
                &l.plugin,
                component,
                config.plugin_config_text(&l.plugin),
                workers,
                services.clone(),
            )?;
            pools.insert(l.plugin.clone(), pool);
        }

        let tls = if config.listeners.iter().any(|l| l.tls) {
            Some(crate::tls::server_config(
                config.tls.cert.as_deref(),
                config.tls.key.as_deref(),
                &config.data_dir,
            )?)
        } else {
            None
        };
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let pool = pools
                .get(&l.plugin)
                .cloned()
                .ok_or_else(|| anyhow!("listener {}: plugin {} not started", l.name, l.plugin))?;
            let bound = Listener::bind(
                &l.name,
                l.bind,
                if l.tls { tls.clone() } else { None },
                pool,
            )
            .await?;
            let addr = bound.local_addr().context("reading a bound address")?;
            tracing::info!(listener = %l.name, %addr, plugin = %l.plugin, tls = l.tls, "listening");
            listeners.push((l.name.clone(), addr, tokio::spawn(bound.serve())));
        }
        tracing::info!("magnetar ready");
        Ok(Server { broker, listeners })
    }

    /// Bound listener addresses by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(n, a, _)| (n.clone(), *a))
            .collect()
    }

    /// Stops accepting, then stops the broker (which flushes its storage).
    pub async fn shutdown(self) {
        for (_, _, task) in &self.listeners {
            task.abort();
        }
        if let Some(broker) = self.broker {
            broker.shutdown().await;
        }
    }
}

/// Built-in plugins, then `NAME.wasm` files of the plugin directory (which may override them).
fn load_plugins(config: &Config) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let mut plugins: HashMap<String, Vec<u8>> = crate::builtin::BUILTIN_PLUGINS
        .iter()
        .map(|(name, wasm)| (name.to_string(), wasm.to_vec()))
        .collect();
    if let Some(dir) = &config.plugins.dir {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("reading plugin directory {}", dir.display()))?;
        for entry in entries {
            let path = entry.context("listing the plugin directory")?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let wasm = std::fs::read(&path)
                .with_context(|| format!("reading plugin {}", path.display()))?;
            tracing::info!(plugin = name, path = %path.display(), "loaded plugin");
            plugins.insert(name.to_string(), wasm);
        }
    }
    Ok(plugins)
}
