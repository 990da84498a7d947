//! [`Services`]: what every instance shares (backend, tenancy, kv, keys, quotas, claims),
//! and the sealing of payloads at rest on their way to and from the backend.

use std::sync::Arc;

use super::context::op_error;
use super::session::Claims;
use crate::abi::types::{self, ErrorKind, OpError};
use crate::backend::{Backend, OutMessage};
use crate::crypto::{CryptoError, E2eKeys, KeyRing, KEY_PROPERTY};
use crate::kv::Kv;
use crate::names::tenant_of;
use crate::quota::Quotas;
use crate::tenancy::Tenancy;

/// What every instance shares: the backend and the tenancy.
pub struct Services {
    pub backend: Arc<Backend>,
    pub tenancy: Arc<Tenancy>,
    pub kv: Arc<Kv>,
    /// Keys claimed by connections (`claim`) and delayed wills, across all instances.
    pub claims: Claims,
    /// Tenants' data keys: payloads of encrypting tenants are sealed at rest.
    pub keys: Arc<KeyRing>,
    /// Rate limits, connection and subscription limits, usage.
    pub quotas: Arc<Quotas>,
    /// Tenants' key pairs for Pulsar's end-to-end encryption format, loaded on first use.
    pub pulsar_e2e: E2eKeys,
    /// Routes by filter (`routing.open-route`), one reader per source topic.
    pub router: super::router::Router,
    /// This gateway's feeders of durable routes, by source topic.
    pub feeders: super::feeder::Feeders,
    /// The counts of capped queues (`caps`), by queue topic.
    pub caps: super::caps::Caps,
    /// The append tasks of indexed topics (`indexed.append`), one per topic.
    pub appenders: super::appender::Appenders,
    /// The backend's admin API for `topics` calls; `None`: not reachable (an external
    /// cluster).
    pub topic_admin: Option<Arc<super::topics::TopicAdmin>>,
    /// Homes of the plugins (`homes.post`): where each shard lives, posts waiting.
    pub homes: super::homes::Homes,
}

impl Services {
    /// Seals a message's payload if the tenant of `topic` (a full URL) encrypts at rest.
    pub fn seal(&self, topic: &str, msg: &mut OutMessage) -> Result<(), OpError> {
        let Some(tenant) = tenant_of(topic) else {
            return Ok(());
        };
        if !self.tenancy.encrypts(tenant) {
            return Ok(());
        }
        if let Some(cfg) = self.tenancy.pulsar_encryption(tenant) {
            let sealed = self
                .pulsar_e2e
                .get(tenant, &cfg)
                .and_then(|k| k.seal(&msg.payload))
                .map_err(|e| {
                    tracing::error!(tenant, error = %e, "cannot seal a payload (Pulsar format)");
                    op_error(ErrorKind::Internal, "encryption at rest failed")
                })?;
            msg.payload = sealed.payload;
            msg.encryption = Some((sealed.encryption_keys, sealed.encryption_param));
            return Ok(());
        }
        let (sealed, key) = self.keys.seal(tenant, &msg.payload).map_err(|e| {
            tracing::error!(tenant, error = %e, "cannot seal a payload");
            op_error(ErrorKind::Internal, "encryption at rest failed")
        })?;
        msg.payload = sealed;
        msg.properties.insert(KEY_PROPERTY.to_string(), key);
        Ok(())
    }

    /// Opens a delivered payload that was sealed at rest (its properties name the key); the
    /// key property is removed. Plaintext payloads pass through.
    pub fn unseal(
        &self,
        topic: &str,
        properties: &mut Vec<types::Property>,
        pulsar_encryption: Option<(&[pulsar::proto::EncryptionKeys], &[u8])>,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, CryptoError> {
        if let Some((keys, iv)) = pulsar_encryption.filter(|(k, _)| !k.is_empty()) {
            let tenant = tenant_of(topic).unwrap_or_default();
            let cfg = self
                .tenancy
                .pulsar_encryption(tenant)
                .ok_or_else(|| CryptoError::NoKey {
                    tenant: tenant.to_string(),
                    key_id: "(no Pulsar encryption key pair configured)".into(),
                })?;
            return self.pulsar_e2e.get(tenant, &cfg)?.open(keys, iv, &payload);
        }
        let Some(i) = properties.iter().position(|p| p.key == KEY_PROPERTY) else {
            return Ok(payload);
        };
        let key = properties.remove(i).value;
        let tenant = tenant_of(topic).unwrap_or_default();
        self.keys.open(tenant, &key, &payload)
    }
}
