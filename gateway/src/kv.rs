//! A small key-value store per namespace, kept in Pulsar.
//!
//! Plugins remember things between connections and across gateway restarts (MQTT persistent
//! sessions, AMQP bindings) through `kv-get`/`kv-put`. The values live in the namespace's
//! topic `__magnetar_kv`: a put is a message whose key is the kv key, a delete a message with
//! the property `kv.op=delete`. A gateway loads a namespace on first use by reading the topic
//! from the start up to a marker it wrote itself (so it has seen every write that was stored
//! before it asked), then keeps tailing it, so several gateways on one Pulsar cluster converge
//! on the same values. A value is applied only if its message id is newer than the one
//! already applied for that key, so a put's own receipt and the tail never reorder it.
//!
//! Not done yet: compaction of the topic (Pulsar's compacted topics do it on a cluster).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use tokio::sync::OnceCell;

use crate::backend::{Backend, BackendError, OutMessage, SubscribeOptions};

/// Short name of the kv topic in each namespace (reserved: plugins cannot name it).
pub const KV_TOPIC: &str = "__magnetar_kv";
const OP_PROPERTY: &str = "kv.op";
const MARKER_PROPERTY: &str = "kv.marker";

/// A kv failure.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("kv receipt from {topic}: {message}")]
    Receipt { topic: String, message: String },
    #[error("kv topic {topic} ended while loading")]
    Ended { topic: String },
    #[error("kv encryption at rest: {0}")]
    Crypto(String),
}

/// (ledger, entry, batch index): Pulsar's order of messages in one topic.
type Position = (u64, u64, i32);

/// The newest value seen for a key (`None`: deleted) and where it was written.
type Versioned = (Position, Option<Vec<u8>>);

#[derive(Default)]
struct Space {
    values: RwLock<HashMap<String, Versioned>>,
}

impl Space {
    fn apply(&self, key: String, at: Position, value: Option<Vec<u8>>) {
        let mut values = self.values.write().unwrap_or_else(|p| p.into_inner());
        match values.get(&key) {
            Some((seen, _)) if *seen >= at => {}
            _ => {
                values.insert(key, (at, value));
            }
        }
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let values = self.values.read().unwrap_or_else(|p| p.into_inner());
        values.get(key).and_then(|(_, v)| v.clone())
    }

    /// Live entries under `prefix` after `start_after`, in key order, at most `limit`.
    /// A full pass over the namespace's keys: fine for thousands of keys, a sorted index is
    /// the next step when a namespace holds millions.
    fn scan(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Vec<(String, Vec<u8>)> {
        let values = self.values.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<(&String, &Vec<u8>)> = values
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && start_after.is_none_or(|a| k.as_str() > a))
            .filter_map(|(k, (_, v))| v.as_ref().map(|v| (k, v)))
            .collect();
        found.sort_unstable_by(|a, b| a.0.cmp(b.0));
        found
            .into_iter()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The kv of every namespace this gateway has touched.
pub struct Kv {
    backend: Arc<Backend>,
    spaces: Mutex<HashMap<String, Arc<OnceCell<Arc<Space>>>>>,
    instance: String,
    /// Seals values of encrypting tenants before they reach Pulsar, opens them on load.
    at_rest: Option<AtRest>,
}

/// What the kv needs for encryption at rest.
#[derive(Clone)]
pub struct AtRest {
    pub keys: Arc<crate::crypto::KeyRing>,
    pub tenancy: Arc<crate::tenancy::Tenancy>,
}

impl AtRest {
    fn seal(&self, topic: &str, value: &[u8]) -> Result<Option<(Vec<u8>, String)>, KvError> {
        match crate::names::tenant_of(topic) {
            Some(t) if self.tenancy.encrypts(t) => self
                .keys
                .seal(t, value)
                .map(Some)
                .map_err(|e| KvError::Crypto(e.to_string())),
            _ => Ok(None),
        }
    }
}

impl Kv {
    pub fn new(backend: Arc<Backend>, at_rest: Option<AtRest>) -> Kv {
        // Unique per Kv, also when one process has several (tests of two gateways).
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let instance = format!("{}-{}-{n}", std::process::id(), crate::clock::now_ms());
        Kv {
            backend,
            spaces: Mutex::new(HashMap::new()),
            instance,
            at_rest,
        }
    }

    /// Reads a key of the kv topic `topic` (a full Pulsar topic URL).
    pub async fn get(&self, topic: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.space(topic).await?.get(key))
    }

    /// [`Kv::get`] without waiting, when the namespace is loaded already (`None`: it is not;
    /// use `get`). Sees every put that has completed, as `get` does.
    pub fn get_now(&self, topic: &str, key: &str) -> Option<Option<Vec<u8>>> {
        let cell = self
            .spaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)?
            .clone();
        cell.get().map(|space| space.get(key))
    }

    /// The live entries under `prefix` (at most 1,000), without waiting, when the namespace
    /// is loaded already (`None`: it is not).
    pub fn scan_now(&self, topic: &str, prefix: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let cell = self
            .spaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)?
            .clone();
        cell.get().map(|space| space.scan(prefix, None, 1000))
    }

    /// Writes (`Some`) or deletes (`None`) a key; returns once Pulsar stored it.
    pub async fn put(&self, topic: &str, key: &str, value: Option<Vec<u8>>) -> Result<(), KvError> {
        let space = self.space(topic).await?;
        let mut properties = HashMap::new();
        properties.insert(
            OP_PROPERTY.to_string(),
            if value.is_some() { "put" } else { "delete" }.to_string(),
        );
        let mut payload = value.clone().unwrap_or_default();
        if let (Some(at_rest), Some(v)) = (&self.at_rest, &value) {
            if let Some((sealed, key_id)) = at_rest.seal(topic, v)? {
                payload = sealed;
                properties.insert(crate::crypto::KEY_PROPERTY.to_string(), key_id);
            }
        }
        let msg = OutMessage {
            key: Some(key.to_string()),
            payload,
            properties,
            encryption: None,
            event_time: None,
        };
        let receipt = self.backend.enqueue(topic, msg).await?;
        let receipt = receipt.await.map_err(|e| KvError::Receipt {
            topic: topic.to_string(),
            message: e.to_string(),
        })?;
        if let Some(id) = receipt.message_id {
            space.apply(
                key.to_string(),
                (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1)),
                value,
            );
        }
        Ok(())
    }

    /// Lists up to `limit` live entries whose keys start with `prefix`, after `start_after`,
    /// in key order.
    pub async fn scan(
        &self,
        topic: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        Ok(self.space(topic).await?.scan(prefix, start_after, limit))
    }

    async fn space(&self, topic: &str) -> Result<Arc<Space>, KvError> {
        let cell = {
            let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
            spaces.entry(topic.to_string()).or_default().clone()
        };
        let space = cell.get_or_try_init(|| self.load(topic)).await?;
        Ok(space.clone())
    }

    /// Reads the topic up to a fresh marker, then tails it in the background.
    async fn load(&self, topic: &str) -> Result<Arc<Space>, KvError> {
        let mut consumer = self
            .backend
            .subscribe(&SubscribeOptions {
                topic: topic.to_string(),
                subscription: format!("kv-reader-{}", self.instance),
                sub_type: pulsar::SubType::Exclusive,
                durable: false,
                earliest: true,
                receiver_queue: 1000,
                start_message_id: None,
                dead_letter: None,
                consumer_name: None,
            })
            .await?;
        let marker = format!("{}-{}", self.instance, crate::clock::now_ms());
        let mut properties = HashMap::new();
        properties.insert(MARKER_PROPERTY.to_string(), marker.clone());
        let receipt = self
            .backend
            .enqueue(
                topic,
                OutMessage {
                    key: None,
                    payload: Vec::new(),
                    properties,
                    encryption: None,
                    event_time: None,
                },
            )
            .await?;
        receipt.await.map_err(|e| KvError::Receipt {
            topic: topic.to_string(),
            message: e.to_string(),
        })?;
        let space = Arc::new(Space::default());
        loop {
            let Some(msg) = consumer.next().await else {
                return Err(KvError::Ended {
                    topic: topic.to_string(),
                });
            };
            let msg = msg.map_err(|e| KvError::Receipt {
                topic: topic.to_string(),
                message: e.to_string(),
            })?;
            let _ = consumer.ack(&msg).await;
            if apply_message(&space, &msg, self.at_rest.as_ref(), topic).as_deref()
                == Some(marker.as_str())
            {
                break;
            }
        }
        let tail = space.clone();
        let at_rest = self.at_rest.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = consumer.next().await {
                let _ = consumer.ack(&msg).await;
                apply_message(&tail, &msg, at_rest.as_ref(), &topic);
            }
        });
        Ok(space)
    }
}

/// Applies one kv message; returns the marker it carries, if it is one.
fn apply_message(
    space: &Space,
    msg: &pulsar::consumer::Message<Vec<u8>>,
    at_rest: Option<&AtRest>,
    topic: &str,
) -> Option<String> {
    let meta = msg.metadata();
    let prop = |name: &str| {
        meta.properties
            .iter()
            .find(|kv| kv.key == name)
            .map(|kv| kv.value.clone())
    };
    if let Some(marker) = prop(MARKER_PROPERTY) {
        return Some(marker);
    }
    let key = meta.partition_key.clone()?;
    let id = &msg.message_id.id;
    let at = (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1));
    let value = match prop(OP_PROPERTY).as_deref() {
        Some("delete") => None,
        _ => match (prop(crate::crypto::KEY_PROPERTY), at_rest) {
            (None, _) => Some(msg.payload.data.clone()),
            (Some(key_id), Some(at_rest)) => {
                let tenant = crate::names::tenant_of(topic).unwrap_or_default();
                match at_rest.keys.open(tenant, &key_id, &msg.payload.data) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        // Shredded: the value is gone for good, like the tenant's messages.
                        tracing::warn!(%topic, %key, error = %e, "kv value does not decrypt; treated as deleted");
                        None
                    }
                }
            }
            (Some(_), None) => None,
        },
    };
    space.apply(key, at, value);
    None
}
