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
    /// Tenants and their limits; a user's tenant that is not listed here gets the defaults.
    pub tenants: Vec<TenantConfig>,
    pub encryption: EncryptionSection,
    pub admin: AdminSection,
    pub plugins: PluginsSection,
    pub cluster: ClusterSection,
    pub listeners: Vec<ListenerConfig>,
}

/// This gateway among the gateways sharing one backend (docs/kafka.md section 2.2).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Unique per gateway sharing one backend: Kafka's `broker.id`, the node id its Metadata
    /// and FindCoordinator answers name.
    pub node_id: i32,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection { node_id: 1 }
    }
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
    /// The backend's admin REST API, `http://host:port` (Pulsar's `webServicePort`), for
    /// the plugins' `topics` calls when the broker is not embedded; unset: the embedded
    /// broker's, if any.
    pub admin_url: Option<String>,
}

/// The server certificate of TLS listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Issue TLS 1.3 session tickets (stateless, encrypted under a key that lives in memory
    /// only and rotates every 6 hours), so that a reconnecting client resumes its session
    /// instead of a full handshake: no certificate signature, no client-certificate check.
    /// `false`: every connection makes a full handshake.
    pub session_tickets: bool,
    /// PEM certificate chain; unset means a certificate generated in `data_dir/tls`.
    pub cert: Option<PathBuf>,
    /// PEM private key matching `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates that sign client certificates. Set: clients may present a
    /// certificate (mTLS); a verified one maps to the user whose `certificate_cn` is its
    /// subject's common name.
    pub client_ca: Option<PathBuf>,
    /// Refuse TLS clients without a verified certificate (needs `client_ca`).
    pub require_client_cert: bool,
    /// Certificates picked by the server name the client asks for (SNI), e.g. one per
    /// tenant; other names get `cert`.
    pub certificates: Vec<SniCertificate>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            session_tickets: true,
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            certificates: Vec::new(),
        }
    }
}

/// A certificate served to clients that ask for `server_name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    pub server_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who may connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Clients without credentials act in `anonymous_tenant/anonymous_namespace`.
    pub allow_anonymous: bool,
    pub anonymous_tenant: String,
    pub anonymous_namespace: String,
    pub users: Vec<UserConfig>,
    /// HS256 secret for tokens, base64 (as `pulsar tokens create-secret-key --base64`).
    pub token_secret: Option<String>,
    /// HS256 secret for tokens, a file of raw bytes. Unset (with no other token key): a
    /// secret is generated once in `data_dir/auth/token-secret.key`.
    pub token_secret_file: Option<PathBuf>,
    /// RS256 public key (PEM) that verifies tokens, instead of a secret.
    pub token_public_key_file: Option<PathBuf>,
    /// RS256 private key (PEM) with which `magnetar token` and the gateway sign tokens.
    pub token_private_key_file: Option<PathBuf>,
    /// The role the gateway itself uses on the backend; may do anything.
    pub superuser_role: String,
    /// Failed authentications from one address before each further attempt waits.
    pub failures_before_delay: u32,
    /// How long a verified password login is remembered (`login_cache`): a reconnect with
    /// the same password within this time skips argon2. 0 turns the cache off.
    pub login_cache_ttl_secs: u64,
    /// Most users remembered at once.
    pub login_cache_capacity: usize,
    /// The cache's HMAC key, 32 raw bytes. Unset: generated in `data_dir/auth`. Keep it apart
    /// from the data directory in production (docs/tenancy.md, "Login cache").
    pub login_cache_key_file: Option<PathBuf>,
    /// Whether the cache is saved to `data_dir/auth/login-cache` (periodically and at
    /// shutdown), so that the reconnect storm after a restart is served from it too.
    pub login_cache_persist: bool,
    /// Password verifications that may wait for a CPU at once; a login beyond them is refused
    /// as "server busy" (MQTT: CONNACK 3 / 0x89) rather than left to time out. 0: 200 per
    /// core (about 4 s of argon2 work).
    pub max_waiting_logins: usize,
}

/// A user and the namespace everything it does lives in.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password, hashed with argon2 when the config is loaded.
    #[serde(default)]
    pub password: Option<String>,
    /// A stored hash: an argon2 PHC string (`$argon2id$v=19$...`), as `magnetar
    /// hash-password` prints, or Mosquitto's sha512-pbkdf2 (`$7$...`), as `mosquitto_passwd`
    /// writes and `magnetar import-mosquitto-passwd` carries over (`crate::password`).
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Stored SCRAM-SHA-256 credential (`iterations:salt:stored_key:server_key`, base64),
    /// as the admin API saves it; derived from `password` when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_sha256: Option<String>,
    /// Stored SCRAM-SHA-512 credential, as `scram_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_sha512: Option<String>,
    /// Common name of the client certificate (mTLS) that authenticates as this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_cn: Option<String>,
    /// What the user may do; empty means produce and consume on every topic of its namespace.
    #[serde(default)]
    pub permissions: Vec<PermissionConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Actions on topics matching a pattern (`*` matches any run of characters).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PermissionConfig {
    pub topics: String,
    pub actions: Vec<ActionName>,
}

/// An action a permission grants.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ActionName {
    Produce,
    Consume,
    Manage,
}

/// Limits of a tenant or a user; unset means unlimited.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub publish_msgs_per_sec: Option<f64>,
    pub publish_bytes_per_sec: Option<f64>,
    pub max_connections: Option<u32>,
    pub max_subscriptions: Option<u32>,
    pub max_stored_bytes: Option<u64>,
}

/// A tenant: its namespaces, whether its payloads are encrypted at rest, its limits.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    #[serde(default = "default_namespaces")]
    pub namespaces: Vec<String>,
    /// Encrypt every payload at rest with the tenant's data key.
    #[serde(default)]
    pub encryption: bool,
    /// Write payloads in Pulsar's end-to-end encryption format instead, so that the
    /// tenant's own Pulsar clients decrypt them with a `CryptoKeyReader`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulsar_encryption: Option<PulsarEncryptionConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// The tenant's RSA key pair for Pulsar's end-to-end encryption format.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PulsarEncryptionConfig {
    /// The key name consumers' `CryptoKeyReader` is asked for.
    pub key_name: String,
    /// RSA public key (PEM, `openssl rsa -pubout`).
    pub public_key: PathBuf,
    /// RSA private key (PEM), for the gateway to decrypt what it delivers.
    pub private_key: PathBuf,
}

/// Where the master key that wraps tenants' data keys comes from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionSection {
    /// A file holding 32 random bytes (raw, or 64 hex digits).
    pub master_key_file: Option<PathBuf>,
    /// An environment variable holding 64 hex digits; wins over `master_key_file`. Neither
    /// set: a key is generated once in `data_dir/keys/master.key`.
    pub master_key_env: Option<String>,
}

/// The gateway's admin HTTP API (tenants, users, usage).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Where it listens; unset turns it off.
    pub listen: Option<SocketAddr>,
    /// A static bearer token for it; a token of `auth.superuser_role` works too.
    pub token: Option<String>,
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
    /// Speak WebSocket (RFC 6455) on this port, over TLS (`wss://`) if `tls` is set: the
    /// plugin sees the payloads of binary messages as its byte stream (see `websocket.rs`).
    #[serde(default)]
    pub websocket: bool,
    /// The only request path upgraded (e.g. `"/mqtt"`); unset upgrades every path, as
    /// Mosquitto does.
    #[serde(default)]
    pub websocket_path: Option<String>,
    /// Subprotocols a WebSocket client may ask for; it must offer one of them, which the
    /// gateway echoes. Empty: none is required.
    #[serde(default = "default_websocket_subprotocols")]
    pub websocket_subprotocols: Vec<String>,
    /// Largest incoming WebSocket message in bytes (a message is held whole before its bytes
    /// reach the plugin); keep it at least the plugin's largest packet. Also a web port's.
    #[serde(default = "default_websocket_max_message_size")]
    pub websocket_max_message_size: usize,
    /// Serve HTTP/1.1 as Pulsar's web port does (see `web.rs`): WebSocket upgrades under
    /// `/ws/` go to the plugin in message mode, `/admin/v2/...` is the admin REST API,
    /// `/demo` a demo page. Not with `websocket`.
    #[serde(default)]
    pub web: bool,
    /// Origins (`scheme://host[:port]`) whose pages may open WebSockets on a web port; empty
    /// allows any. Requests without `Origin` (non-browser clients) always pass.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// A web port's WebSocket without a frame either way (pings included) for this long is
    /// closed with 1001 `Idle Timeout`: Apache Pulsar's `webSocketSessionIdleTimeoutMillis`,
    /// default 300000 as there; 0 keeps idle WebSockets open.
    #[serde(default = "default_websocket_idle_timeout_ms")]
    pub websocket_idle_timeout_ms: u64,
    /// `host:port` other gateways send clients to for this listener (Kafka's
    /// `advertised.listeners`); unset: `bind`.
    #[serde(default)]
    pub advertised: Option<String>,
}

impl ListenerConfig {
    /// A listener with the defaults for everything but its name, address, plugin and TLS.
    pub fn new(name: &str, bind: SocketAddr, plugin: &str, tls: bool) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            bind,
            plugin: plugin.into(),
            tls,
            websocket: false,
            websocket_path: None,
            websocket_subprotocols: default_websocket_subprotocols(),
            websocket_max_message_size: default_websocket_max_message_size(),
            web: false,
            allowed_origins: Vec::new(),
            websocket_idle_timeout_ms: default_websocket_idle_timeout_ms(),
            advertised: None,
        }
    }

    /// Where clients reach this listener: `advertised`, else `bind`.
    pub fn advertised_address(&self) -> Result<(String, u16), String> {
        match &self.advertised {
            None => Ok((self.bind.ip().to_string(), self.bind.port())),
            Some(a) => {
                let (host, port) = a
                    .rsplit_once(':')
                    .ok_or_else(|| format!("advertised address {a:?}: host:port expected"))?;
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("advertised address {a:?}: bad port"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(format!("advertised address {a:?}: no host"));
                }
                Ok((host.to_string(), port))
            }
        }
    }
}

/// `mqtt` (MQTT 3.1.1 and 5.0, §6.0) and `mqttv3.1` (MQTT 3.1 clients), as Mosquitto accepts.
fn default_websocket_subprotocols() -> Vec<String> {
    vec!["mqtt".into(), "mqttv3.1".into()]
}

/// 1 MiB: the MQTT plugin's default `max_packet_size`.
fn default_websocket_max_message_size() -> usize {
    1024 * 1024
}

/// Apache Pulsar's `webSocketSessionIdleTimeoutMillis` default: 5 minutes.
fn default_websocket_idle_timeout_ms() -> u64 {
    300_000
}

fn default_tenant() -> String {
    "public".into()
}

fn default_namespace() -> String {
    "default".into()
}

fn default_namespaces() -> Vec<String> {
    vec![default_namespace()]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            broker: BrokerSection::default(),
            backend: BackendSection::default(),
            tls: TlsSection::default(),
            auth: AuthSection::default(),
            tenants: Vec::new(),
            encryption: EncryptionSection::default(),
            admin: AdminSection::default(),
            plugins: PluginsSection::default(),
            cluster: ClusterSection::default(),
            listeners: vec![
                ListenerConfig::new(
                    "mqtt",
                    SocketAddr::from(([127, 0, 0, 1], 1883)),
                    "mqtt",
                    false,
                ),
                ListenerConfig::new(
                    "mqtt-tls",
                    SocketAddr::from(([127, 0, 0, 1], 8883)),
                    "mqtt",
                    true,
                ),
                // Mosquitto's customary WebSocket port (8080 is Pulsar's admin port).
                ListenerConfig {
                    websocket: true,
                    ..ListenerConfig::new(
                        "mqtt-ws",
                        SocketAddr::from(([127, 0, 0, 1], 9001)),
                        "mqtt",
                        false,
                    )
                },
                // Where Apache Pulsar serves its WebSocket and admin REST APIs. Without its
                // plugin the port still serves /admin/v2 and /demo (see `web.rs`).
                ListenerConfig {
                    web: true,
                    ..ListenerConfig::new(
                        "web",
                        SocketAddr::from(([127, 0, 0, 1], 8080)),
                        "pulsar-ws",
                        false,
                    )
                },
                // RabbitMQ's port: AMQP 0-9-1 applications change only their URL.
                ListenerConfig::new(
                    "amqp",
                    SocketAddr::from(([127, 0, 0, 1], 5672)),
                    "amqp",
                    false,
                ),
                // Kafka's customary port.
                ListenerConfig::new(
                    "kafka",
                    SocketAddr::from(([127, 0, 0, 1], 9092)),
                    "kafka",
                    false,
                ),
                // RabbitMQ's TLS port (`amqps://`).
                ListenerConfig::new(
                    "amqps",
                    SocketAddr::from(([127, 0, 0, 1], 5671)),
                    "amqp",
                    true,
                ),
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
            anonymous_tenant: default_tenant(),
            anonymous_namespace: default_namespace(),
            users: Vec::new(),
            token_secret: None,
            token_secret_file: None,
            token_public_key_file: None,
            token_private_key_file: None,
            superuser_role: "magnetar-gateway".into(),
            failures_before_delay: 3,
            login_cache_ttl_secs: 24 * 3600,
            login_cache_capacity: 1_000_000,
            login_cache_key_file: None,
            login_cache_persist: true,
            max_waiting_logins: 0,
        }
    }
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            token: None,
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
            if let Err(e) = l.advertised_address() {
                return Err(format!("key `listeners[{i}].advertised`: {e}"));
            }
            if !names.insert(&l.name) {
                return Err(format!(
                    "key `listeners[{i}].name`: listener name {:?} is used twice",
                    l.name
                ));
            }
            let ws_options_set = l.websocket_path.is_some()
                || l.websocket_subprotocols != default_websocket_subprotocols()
                || (l.websocket_max_message_size != default_websocket_max_message_size() && !l.web);
            if ws_options_set && !l.websocket {
                return Err(format!(
                    "key `listeners[{i}].websocket_*`: set only with `websocket = true`"
                ));
            }
            if l.web && l.websocket {
                return Err(format!(
                    "key `listeners[{i}].web`: a web port serves WebSocket itself; \
                     set `web` or `websocket`, not both"
                ));
            }
            if !l.allowed_origins.is_empty() && !l.web {
                return Err(format!(
                    "key `listeners[{i}].allowed_origins`: set only with `web = true`"
                ));
            }
            if l.websocket_idle_timeout_ms != default_websocket_idle_timeout_ms() && !l.web {
                return Err(format!(
                    "key `listeners[{i}].websocket_idle_timeout_ms`: set only with `web = true`"
                ));
            }
            if l.web && l.websocket_max_message_size < 16 {
                return Err(format!(
                    "key `listeners[{i}].websocket_max_message_size`: must be at least 16"
                ));
            }
            if l.websocket_path
                .as_ref()
                .is_some_and(|p| !p.starts_with('/'))
            {
                return Err(format!(
                    "key `listeners[{i}].websocket_path`: must start with `/`"
                ));
            }
            if l.websocket && l.websocket_max_message_size < 16 {
                return Err(format!(
                    "key `listeners[{i}].websocket_max_message_size`: must be at least 16"
                ));
            }
        }
        if self.plugins.memory_limit_mib == 0 {
            return Err("key `plugins.memory_limit_mib`: must be at least 1".into());
        }
        if self.plugins.event_deadline_ms == 0 {
            return Err("key `plugins.event_deadline_ms`: must be at least 1".into());
        }
        if self.tls.require_client_cert && self.tls.client_ca.is_none() {
            return Err("key `tls.require_client_cert`: needs `tls.client_ca`".into());
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
            if u.password.is_some() && u.password_hash.is_some() {
                return Err(format!(
                    "keys `auth.users[{i}].password` and `password_hash`: set one, not both"
                ));
            }
            if u.name == self.auth.superuser_role {
                return Err(format!(
                    "key `auth.users[{i}].name`: {:?} is the superuser role",
                    u.name
                ));
            }
            for (what, name) in [("tenant", &u.tenant), ("namespace", &u.namespace)] {
                crate::names::validate_segment(name)
                    .map_err(|e| format!("key `auth.users[{i}].{what}`: {e}"))?;
            }
        }
        let mut tenants = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            crate::names::validate_segment(&t.name)
                .map_err(|e| format!("key `tenants[{i}].name`: {e}"))?;
            if !tenants.insert(&t.name) {
                return Err(format!(
                    "key `tenants[{i}].name`: tenant {:?} is listed twice",
                    t.name
                ));
            }
            for ns in &t.namespaces {
                crate::names::validate_segment(ns)
                    .map_err(|e| format!("key `tenants[{i}].namespaces`: {e}"))?;
            }
        }
        let keys = [
            self.auth.token_secret.is_some(),
            self.auth.token_secret_file.is_some(),
            self.auth.token_public_key_file.is_some() || self.auth.token_private_key_file.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            return Err("keys `auth.token_secret`, `auth.token_secret_file` and `auth.token_*_key_file`: set one kind of token key".into());
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
        assert_eq!(c.listeners.len(), 7);
        assert_eq!(c.listeners[0].bind.port(), 1883);
        assert_eq!(c.listeners[1].bind.port(), 8883);
        assert_eq!(c.listeners[2].bind.port(), 9001);
        assert!(c.listeners[2].websocket && !c.listeners[2].tls);
        assert_eq!(c.listeners[3].bind.port(), 8080);
        assert!(c.listeners[3].web && !c.listeners[3].websocket);
        assert_eq!(c.listeners[4].bind.port(), 5672);
        assert_eq!(c.listeners[4].plugin, "amqp");
        assert!(!c.listeners[4].tls);
        assert_eq!(
            (c.listeners[5].bind.port(), c.listeners[5].plugin.as_str()),
            (9092, "kafka")
        );
        assert_eq!(
            (c.listeners[6].bind.port(), c.listeners[6].plugin.as_str()),
            (5671, "amqp")
        );
        assert!(c.listeners[6].tls);
    }

    #[test]
    fn example_config_is_valid_and_lists_the_default_listeners() {
        let c = Config::parse(include_str!("../../examples/magnetar.toml")).unwrap();
        let ports: Vec<_> = c.listeners.iter().map(|l| l.bind.port()).collect();
        assert_eq!(ports, [1883, 8883, 9001, 8080, 5672, 9092, 5671]);
        assert!(c.listeners[2].websocket);
        assert!(c.listeners[3].web);
    }

    #[test]
    fn web_listener_options() {
        let base = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\nplugin = \"p\"\n";
        let c = Config::parse(&format!(
            "{base}web = true\nallowed_origins = [\"http://a\"]\nwebsocket_max_message_size = 4096\n"
        ))
        .unwrap();
        let l = &c.listeners[0];
        assert!(l.web && !l.websocket);
        assert_eq!(l.allowed_origins, ["http://a"]);
        assert_eq!(l.websocket_max_message_size, 4096);
        let both = Config::parse(&format!("{base}web = true\nwebsocket = true\n")).unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let origins = Config::parse(&format!("{base}allowed_origins = [\"http://a\"]\n"));
        assert!(origins.unwrap_err().contains("allowed_origins"));
    }

    #[test]
    fn websocket_listener_options() {
        let c = Config::parse(
            "[[listeners]]\nname = \"ws\"\nbind = \"127.0.0.1:1\"\nplugin = \"mqtt\"\n\
             tls = true\nwebsocket = true\nwebsocket_path = \"/mqtt\"\n",
        )
        .unwrap();
        let l = &c.listeners[0];
        assert!(l.websocket && l.tls);
        assert_eq!(l.websocket_path.as_deref(), Some("/mqtt"));
        assert_eq!(l.websocket_subprotocols, ["mqtt", "mqttv3.1"]);
        let err = Config::parse(
            "[[listeners]]\nname = \"ws\"\nbind = \"127.0.0.1:1\"\nplugin = \"mqtt\"\n\
             websocket_path = \"/mqtt\"\n",
        )
        .unwrap_err();
        assert!(err.contains("websocket = true"), "{err}");
        let err = Config::parse(
            "[[listeners]]\nname = \"ws\"\nbind = \"127.0.0.1:1\"\nplugin = \"mqtt\"\n\
             websocket = true\nwebsocket_path = \"mqtt\"\n",
        )
        .unwrap_err();
        assert!(err.contains("websocket_path"), "{err}");
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
    fn cluster_node_and_advertised_addresses() {
        let standalone = Config::parse("").unwrap();
        assert_eq!(standalone.cluster.node_id, 1);
        let kafka = |c: &Config| {
            c.listeners
                .iter()
                .find(|l| l.name == "kafka")
                .unwrap()
                .advertised_address()
                .unwrap()
        };
        assert_eq!(kafka(&standalone), ("127.0.0.1".to_string(), 9092));
        let listener = |advertised: &str| {
            format!(
                "[cluster]\nnode_id = 2\n[[listeners]]\nname = \"kafka\"\n\
                 bind = \"0.0.0.0:9092\"\nplugin = \"kafka\"\nadvertised = \"{advertised}\"\n"
            )
        };
        let c = Config::parse(&listener("gw2.example:19092")).unwrap();
        assert_eq!(c.cluster.node_id, 2);
        assert_eq!(kafka(&c), ("gw2.example".to_string(), 19092));
        assert_eq!(
            kafka(&Config::parse(&listener("[::1]:9093")).unwrap()),
            ("::1".to_string(), 9093)
        );
        for bad in ["gw2.example", "gw2.example:0", ":9092", "gw2:port"] {
            let err = Config::parse(&listener(bad)).unwrap_err();
            assert!(err.contains("listeners[0].advertised"), "{bad}: {err}");
        }
    }

    #[test]
    fn half_tls_is_refused() {
        let err = Config::parse("[tls]\ncert = \"a.pem\"\n").unwrap_err();
        assert!(err.contains("tls.key"), "{err}");
    }
}
