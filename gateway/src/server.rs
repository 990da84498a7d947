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
use crate::host::Services;
use crate::kv::Kv;
use crate::listener::Listener;
use crate::plugin_host::{InstanceLimits, PluginHost};
use crate::tenancy::Tenancy;

/// How often the login cache is written to the data directory.
const LOGIN_CACHE_SAVE_INTERVAL: Duration = Duration::from_secs(10);

/// A started gateway.
pub struct Server {
    broker: Option<BrokerHandle>,
    listeners: Vec<(String, SocketAddr, tokio::task::JoinHandle<()>)>,
    /// Tasks that are not listeners (the storage-quota sampler, the login cache's saver).
    background: Vec<tokio::task::JoinHandle<()>>,
    tenancy: Arc<Tenancy>,
}

impl Server {
    /// Starts everything the config asks for; returns once every listener is bound.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;

        let tenancy =
            Tenancy::from_config(&config).context("loading tenants, users and token keys")?;
        let changes = crate::admin::Changes::load(&config.data_dir)?;
        changes
            .apply(&tenancy)
            .context("replaying the admin API's saved changes")?;
        let tenancy = Arc::new(tenancy);
        let broker = if config.broker.embedded {
            // The broker checks the same tokens and the same directory as the listeners:
            // a user's token reaches only its own tenant; anonymous clients (if allowed) only
            // the anonymous tenant; the gateway itself uses the superuser role.
            let mut broker_config =
                BrokerConfig::new(config.broker.listen, config.data_dir.join("broker"));
            broker_config.auth = Some(magnetar_broker::auth::BrokerAuth {
                verify_key: tenancy.token_keys().verify.clone(),
                authorizer: tenancy.clone(),
                anonymous_role: tenancy.allows_anonymous().then(String::new),
            });
            let handle = Broker::start(broker_config).await.with_context(|| {
                format!("starting the embedded broker on {}", config.broker.listen)
            })?;
            tracing::info!(addr = %handle.local_addr(), "embedded broker listening");
            Some(handle)
        } else {
            None
        };
        // The embedded broker is reached in-process (no loopback TCP) unless the config
        // names a URL.
        let (service_url, in_process) = match (&config.backend.service_url, &broker) {
            (Some(url), _) => (url.clone(), None),
            (None, Some(b)) => (b.service_url(), Some(b.in_process())),
            (None, None) => {
                return Err(anyhow!(
                    "no backend: set backend.service_url or broker.embedded"
                ))
            }
        };
        // On the embedded broker the gateway acts as the superuser role, with a token it signs
        // itself; on a Pulsar cluster, with the token the config gives it.
        let token = match (&config.backend.token, &broker) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(_)) => tenancy.sign_token(tenancy.superuser_role(), None).ok(),
            (None, None) => None,
        };
        let backend = Arc::new(
            Backend::connect(&service_url, token.as_deref(), in_process)
                .await
                .context("connecting to the backend")?,
        );
        let keys = Arc::new(
            crate::crypto::KeyRing::load(&config.encryption, &config.data_dir)
                .context("opening the key ring (encryption at rest)")?,
        );
        let at_rest = crate::kv::AtRest {
            keys: keys.clone(),
            tenancy: tenancy.clone(),
        };
        // `topics` calls reach the embedded broker's admin handlers in process.
        let topic_admin = match (&config.backend.admin_url, &broker) {
            (Some(url), _) => Some(Arc::new(
                crate::host::TopicAdmin::http(url, token.clone())
                    .map_err(|e| anyhow!(e))
                    .context("backend.admin_url")?,
            )),
            (None, Some(b)) => {
                let admin_token = tenancy.sign_token(tenancy.superuser_role(), None).ok();
                Some(Arc::new(crate::host::TopicAdmin::new(
                    b.admin_router(),
                    admin_token,
                )))
            }
            (None, None) => None,
        };
        let services = Arc::new(Services {
            topic_admin,
            appenders: Default::default(),
            kv: Arc::new(Kv::new(backend.clone(), Some(at_rest))),
            backend,
            tenancy,
            claims: Default::default(),
            keys,
            quotas: Arc::new(crate::quota::Quotas::default()),
            pulsar_e2e: Default::default(),
            router: Default::default(),
            feeders: Default::default(),
            caps: Default::default(),
            homes: Default::default(),
        });
        // Shards of homes are held through the backend, so that gateways sharing it agree
        // on one owner each (docs/kafka.md section 2.2).
        let identity = cluster_identity(&config).context("the [cluster] section")?;
        services
            .homes
            .set_ownership(Arc::new(crate::host::Ownership::new(
                services.backend.clone(),
                services.kv.clone(),
                identity,
                tokio::runtime::Handle::current(),
            )));

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
            let Some(wasm) = plugins.get(&l.plugin) else {
                if l.web {
                    // The admin API and the demo page need no plugin.
                    tracing::warn!(listener = %l.name, plugin = %l.plugin, "plugin not found: the web port serves no WebSocket endpoint");
                    continue;
                }
                return Err(anyhow!(
                    "listener {}: no plugin named {:?}",
                    l.name,
                    l.plugin
                ));
            };
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
            Some(crate::tls::server_config(&config.tls, &config.data_dir)?)
        } else {
            None
        };
        let mut listeners = Vec::new();
        let mut background = Vec::new();
        let pulsar_admin = Arc::new(crate::web_admin::PulsarAdmin::new(
            services.clone(),
            config.admin.token.clone(),
            broker.as_ref().map(|b| b.admin_router()),
        ));
        for l in &config.listeners {
            let pool = pools.get(&l.plugin).cloned();
            if pool.is_none() && !l.web {
                return Err(anyhow!(
                    "listener {}: plugin {} not started",
                    l.name,
                    l.plugin
                ));
            }
            let web = crate::web::WebOptions::from_listener(l)
                .map(|options| crate::web::WebPort::new(options, pulsar_admin.clone()));
            let bound = Listener::bind(
                &l.name,
                l.bind,
                if l.tls { tls.clone() } else { None },
                pool,
            )
            .await?
            .with_websocket(crate::websocket::WebSocketOptions::from_listener(l))
            .with_web(web);
            let addr = bound.local_addr().context("reading a bound address")?;
            tracing::info!(listener = %l.name, %addr, plugin = %l.plugin, tls = l.tls, websocket = l.websocket, web = l.web, "listening");
            listeners.push((l.name.clone(), addr, tokio::spawn(bound.serve())));
        }
        if let Some(addr) = config.admin.listen {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin API: cannot listen on {addr}"))?;
            let bound = tcp.local_addr().context("reading a bound address")?;
            tracing::info!(%bound, "admin API listening");
            let task = tokio::spawn(crate::admin::serve(
                tcp,
                services.clone(),
                config.admin.token.clone(),
                config.data_dir.clone(),
                changes,
            ));
            listeners.push(("admin".to_string(), bound, task));
        }
        if let Some(b) = &broker {
            // Storage quotas: the embedded broker's figures per tenant, sampled every 2 s.
            let storage = b.storage_probe();
            let quotas = services.quotas.clone();
            let tenancy = services.tenancy.clone();
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
                loop {
                    tick.tick().await;
                    for tenant in quotas.tenant_names() {
                        let limited = tenancy
                            .tenant(&tenant)
                            .is_some_and(|t| t.limits.max_stored_bytes.is_some());
                        if limited {
                            let bytes = storage.tenant_storage_bytes(&tenant).await;
                            quotas.set_stored_bytes(&tenant, bytes);
                        }
                    }
                }
            }));
        }
        // The login cache is saved every 10 s and at shutdown: after a restart (even a
        // `kill -9`) the returning fleet finds it.
        let tenancy = services.tenancy.clone();
        let saver = tenancy.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOGIN_CACHE_SAVE_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = saver.clone();
                let _ = tokio::task::spawn_blocking(move || t.save_login_cache()).await;
            }
        }));
        tracing::info!("magnetar ready");
        Ok(Server {
            broker,
            listeners,
            background,
            tenancy,
        })
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
        for task in &self.background {
            task.abort();
        }
        for (_, _, task) in &self.listeners {
            task.abort();
        }
        let tenancy = self.tenancy.clone();
        let _ = tokio::task::spawn_blocking(move || tenancy.save_login_cache()).await;
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

/// This gateway as the others see it: its node id, a name unique to this process, and
/// where its listeners are reached.
fn cluster_identity(config: &Config) -> anyhow::Result<crate::host::Identity> {
    let endpoints = config
        .listeners
        .iter()
        .map(|l| {
            let (host, port) = l.advertised_address().map_err(|e| anyhow!(e))?;
            Ok(crate::host::Endpoint {
                listener: l.name.clone(),
                host,
                port,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(crate::host::Identity {
        node_id: config.cluster.node_id,
        gateway: format!(
            "{}-{}-{}",
            config.cluster.node_id,
            std::process::id(),
            crate::clock::now_ms()
        ),
        endpoints,
    })
}
