//! The configuration file (TOML) and its defaults.
//!
//! Every field has a default, so an empty file — or no file — runs the gateway standalone on
//! loopback. Unknown keys are errors: a typo must not silently fall back to a default. A
//! config error names the file, the key and what is wrong (the TOML parser reports the key
//! and its line).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What can go wrong reading the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the embedded broker keeps its log, and the gateway its certificate and caches.
    pub data_dir: PathBuf,
    pub broker: BrokerSection,
    pub backend: BackendSection,
    pub tls: TlsSection,
    pub auth: AuthSection,
    pub plugins: PluginsSection,
    pub listeners: Vec<ListenerConfig>,
}

/// The embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// Run the embedded broker in this process.
    pub embedded: bool,
    /// Its Pulsar-protocol port (Pulsar's default is 6650).
    pub listen: SocketAddr,
}

/// The Pulsar backend the gateway publishes to and consumes from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSection {
    /// `pulsar://host:6650` or `pulsar+ssl://...`; unset means the embedded broker.
    pub service_url: Option<String>,
    /// Token for Pulsar token authentication (the gateway's own, superuser role).
    pub token: Option<String>,
}

/// The server certificate of TLS listeners.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain; unset means a certificate generated in `data_dir/tls`.
    pub cert: Option<PathBuf>,
    /// PEM private key matching `cert`.
    pub key: Option<PathBuf>,
}

/// Who may connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Clients without credentials act in `public/default`.
    pub allow_anonymous: bool,
    pub users: Vec<UserConfig>,
}

/// A user and the namespace everything it does lives in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

/// How plugins run.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsSection {
    /// A directory of third-party plugins: each `NAME.wasm` becomes plugin `NAME`.
    pub dir: Option<PathBuf>,
    /// Instances per plugin (each on its own worker thread); 0 means one per CPU.
    pub workers: usize,
    /// Linear-memory limit of one instance, in MiB.
    pub memory_limit_mib: usize,
    /// CPU time one event may take before the instance is stopped, in milliseconds.
    pub event_deadline_ms: u64,
    /// Per-plugin configuration, handed to the plugin's `init` as TOML text.
    pub config: BTreeMap<String, toml::Table>,
}

/// One listening socket, served by one plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub plugin: String,
    #[serde(default)]
    pub tls: bool,
}

fn default_tenant() -> String {
    "public".into()
}

fn default_namespace() -> String {
    "default".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            broker: BrokerSection::default(),
            backend: BackendSection::default(),
            tls: TlsSection::default(),
            auth: AuthSection::default(),
            plugins: PluginsSection::default(),
            listeners: vec![
                ListenerConfig {
                    name: "mqtt".into(),
                    bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
                    plugin: "mqtt".into(),
                    tls: false,
                },
                ListenerConfig {
                    name: "mqtt-tls".into(),
                    bind: SocketAddr::from(([127, 0, 0, 1], 8883)),
                    plugin: "mqtt".into(),
                    tls: true,
                },
            ],
        }
    }
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            embedded: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 6650)),
        }
    }
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            allow_anonymous: true,
            users: Vec::new(),
        }
    }
}

impl Default for PluginsSection {
    fn default() -> Self {
        PluginsSection {
            dir: None,
            workers: 0,
            memory_limit_mib: 64,
            event_deadline_ms: 500,
            config: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and checks config text; the error says which key is wrong and why.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Checks what the types alone cannot.
    fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if !names.insert(&l.name) {
                return Err(format!(
                    "key `listeners[{i}].name`: listener name {:?} is used twice",
                    l.name
                ));
            }
        }
        if self.plugins.memory_limit_mib == 0 {
            return Err("key `plugins.memory_limit_mib`: must be at least 1".into());
        }
        if self.plugins.event_deadline_ms == 0 {
            return Err("key `plugins.event_deadline_ms`: must be at least 1".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("keys `tls.cert` and `tls.key`: set both or neither".into());
        }
        if !self.broker.embedded && self.backend.service_url.is_none() {
            return Err(
                "key `backend.service_url`: required when `broker.embedded` is false".into(),
            );
        }
        for (i, u) in self.auth.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(format!("key `auth.users[{i}].name`: must not be empty"));
            }
        }
        Ok(())
    }

    /// The config text handed to a plugin's `init`.
    pub fn plugin_config_text(&self, plugin: &str) -> String {
        self.plugins
            .config
            .get(plugin)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_standalone_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.broker.embedded);
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].bind.port(), 1883);
        assert_eq!(c.listeners[1].bind.port(), 8883);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[broker]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let err = Config::parse("[broker]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn half_tls_is_refused() {
        let err = Config::parse("[tls]\ncert = \"a.pem\"\n").unwrap_err();
        assert!(err.contains("tls.key"), "{err}");
    }
}
