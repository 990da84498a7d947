//! Which gateway owns each home shard, decided by the backend (docs/kafka.md section 2.2).
//!
//! A shard `(namespace, plugin, domain, shard)` has one topic in its namespace,
//! `__home-<plugin>-<domain>-<shard>`. Every gateway that needs the shard (the first post or
//! `owner` question for it) asks for a **`WaitForExclusive`** producer on that topic: the
//! broker gives the topic to one producer at a time and queues the others, first come first
//! served, handing it to the next one when the holder's producer or connection goes away (a
//! `kill -9` closes the connection at once). Holding that producer *is* owning the shard;
//! Pulsar's own documentation names this access mode for leader election, and it exists on
//! Apache Pulsar (2.8+) as on the embedded broker. No home-made cluster protocol: gateways
//! never talk to each other.
//!
//! - **Epoch**: on getting the topic, the owner appends a holder record (its node id and
//!   advertised endpoints) through that producer; the record's position (ledger, entry) is
//!   the ownership's epoch, strictly increasing from one owner to the next.
//! - **Fencing**: a gateway can believe it still owns a shard the broker gave to another (its
//!   connection was dropped and it has not noticed). So every answer of a home is *fenced*
//!   before it leaves: [`Ownership::fence`] appends a record through the same producer,
//!   sent after the answer was made, and the answer goes out only once the broker stored it
//!   (a detached producer's sends fail: then the answer is replaced by "not the owner", and
//!   the shard is given up and asked for again). Fences are batched per shard: one record
//!   vouches for every answer made before it was sent.
//! - **Directory**: the owner writes its holder record to the namespace kv, key
//!   `@homes/<plugin>/<domain>/<shard>` (no plugin key starts with `@`), which every gateway
//!   of the backend tails ([`crate::kv`]), so any gateway names any shard's owner. The owner
//!   looks every [`DIRECTORY_CHECK`] that the entry still names it and writes it again if
//!   not (a write of a previous owner that landed late).
//!
//! Guarantees: at most one gateway's home answers for a shard at a time, as far as the
//! broker's exclusive producer is exclusive; an answer made before ownership was lost is
//! never delivered after the next owner was chosen (its fence fails). Not guaranteed: that
//! the directory is current at every instant (it names the last owner that wrote it; a
//! client sent to a gateway that no longer owns the shard gets "not the owner" and asks
//! again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::Backend;
use crate::kv::{Kv, KV_TOPIC};

/// Prefix of the directory's keys in the namespace kv.
pub const DIRECTORY_PREFIX: &str = "@homes/";
/// Pause before asking for a shard again after losing it or failing to ask.
const RETRY: Duration = Duration::from_secs(1);
/// A fence (or the holder record) not stored within this means the shard is lost.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle owner checks that the directory still names it.
const DIRECTORY_CHECK: Duration = Duration::from_secs(30);
/// Fence requests waiting per shard.
const FENCE_QUEUE: usize = 4096;

/// Where clients reach a gateway on one of its listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub listener: String,
    pub host: String,
    pub port: u16,
}

/// Who this gateway is to the others: `[cluster] node_id`, a name unique to this process,
/// and its listeners' advertised addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: i32,
    pub gateway: String,
    pub endpoints: Vec<Endpoint>,
}

/// The position of an owner's holder record on the shard's topic: the ownership's epoch.
pub type Epoch = (u64, u64);

/// A directory entry: who holds a shard, since which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    #[serde(flatten)]
    pub identity: Identity,
    pub epoch: Epoch,
}

/// A shard of a plugin's home domain in one namespace (`tenant/namespace`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardKey {
    pub namespace: String,
    pub plugin: Arc<str>,
    pub domain: String,
    pub shard: u32,
}

impl ShardKey {
    /// The topic whose exclusive producer is the shard's ownership.
    pub fn topic(&self) -> String {
        format!(
            "persistent://{}/__home-{}-{}-{}",
            self.namespace, self.plugin, self.domain, self.shard
        )
    }

    fn kv_topic(&self) -> String {
        format!("persistent://{}/{}", self.namespace, KV_TOPIC)
    }

    fn directory_key(&self) -> String {
        directory_key(&self.plugin, &self.domain, Some(self.shard))
    }
}

fn directory_key(plugin: &str, domain: &str, shard: Option<u32>) -> String {
    match shard {
        Some(s) => format!("{DIRECTORY_PREFIX}{plugin}/{domain}/{s}"),
        None => format!("{DIRECTORY_PREFIX}{plugin}/{domain}/"),
    }
}

/// Who answers for a shard, as this gateway knows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This gateway: it holds the shard (`Some(epoch)`), or it is asking for it and the
    /// directory names nobody else.
    Me(Option<Epoch>),
    /// Another gateway, from the directory.
    Other(Holder),
}

/// A request to vouch for answers made under `Epoch`.
type Fence = (Epoch, oneshot::Sender<bool>);

struct Shard {
    owned: watch::Receiver<Option<Epoch>>,
    fences: mpsc::Sender<Fence>,
}

/// The shards this gateway holds or asks for, and the directory of everyone's.
pub struct Ownership {
    backend: Arc<Backend>,
    kv: Arc<Kv>,
    me: Identity,
    runtime: tokio::runtime::Handle,
    shards: Mutex<HashMap<ShardKey, Arc<Shard>>>,
}

impl Ownership {
    pub fn new(
        backend: Arc<Backend>,
        kv: Arc<Kv>,
        me: Identity,
        runtime: tokio::runtime::Handle,
    ) -> Ownership {
        Ownership {
            backend,
            kv,
            me,
            runtime,
            shards: Mutex::new(HashMap::new()),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// The shard's state, asking the backend for it on first use.
    fn join(&self, key: &ShardKey) -> Arc<Shard> {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shards.get(key) {
            return s.clone();
        }
        let (owned_tx, owned) = watch::channel(None);
        let (fences, fence_rx) = mpsc::channel(FENCE_QUEUE);
        let shard = Arc::new(Shard { owned, fences });
        shards.insert(key.clone(), shard.clone());
        let holding = Holding {
            backend: self.backend.clone(),
            kv: self.kv.clone(),
            me: self.me.clone(),
            key: key.clone(),
            owned: owned_tx,
            fences: fence_rx,
        };
        self.runtime.spawn(holding.run());
        // Load the namespace's kv (the directory) if it is not yet.
        let kv = self.kv.clone();
        let kv_topic = key.kv_topic();
        self.runtime.spawn(async move {
            if let Err(e) = kv.get(&kv_topic, "").await {
                tracing::warn!(topic = %kv_topic, error = %e, "homes: cannot load the directory");
            }
        });
        shard
    }

    /// The epoch under which this gateway holds the shard now, if it does (asking for it if
    /// it has not yet).
    pub fn epoch(&self, key: &ShardKey) -> Option<Epoch> {
        *self.join(key).owned.borrow()
    }

    /// Waits up to `within` for this gateway to hold the shard.
    pub async fn acquired(&self, key: &ShardKey, within: Duration) -> Option<Epoch> {
        let mut owned = self.join(key).owned.clone();
        let wait = async { owned.wait_for(|e| e.is_some()).await.ok().and_then(|e| *e) };
        tokio::time::timeout(within, wait).await.ok().flatten()
    }

    /// Who answers for the shard.
    pub fn owner(&self, key: &ShardKey) -> Owner {
        if let Some(e) = self.epoch(key) {
            return Owner::Me(Some(e));
        }
        // An entry of this node id is this gateway's or an earlier run's of it (node ids
        // are unique per gateway of a backend): this gateway is asking for the shard.
        match self.directory_entry(key) {
            Some(h) if h.identity.node_id != self.me.node_id => Owner::Other(h),
            _ => Owner::Me(None),
        }
    }

    fn directory_entry(&self, key: &ShardKey) -> Option<Holder> {
        let value = self
            .kv
            .get_now(&key.kv_topic(), &key.directory_key())
            .flatten()?;
        serde_json::from_slice(&value).ok()
    }

    /// Every gateway the directory names as holding a shard of the domain in the
    /// namespace, and this one, one entry per node id (the newest epoch).
    pub fn holders(&self, namespace: &str, plugin: &str, domain: &str) -> Vec<Identity> {
        let kv_topic = format!("persistent://{namespace}/{KV_TOPIC}");
        let mut by_node: HashMap<i32, Holder> = HashMap::new();
        for (_, value) in self
            .kv
            .scan_now(&kv_topic, &directory_key(plugin, domain, None))
            .unwrap_or_default()
        {
            let Ok(h) = serde_json::from_slice::<Holder>(&value) else {
                continue;
            };
            match by_node.get(&h.identity.node_id) {
                Some(seen) if seen.epoch >= h.epoch => {}
                _ => {
                    by_node.insert(h.identity.node_id, h);
                }
            }
        }
        by_node.remove(&self.me.node_id);
        let mut all: Vec<Identity> = by_node.into_values().map(|h| h.identity).collect();
        all.push(self.me.clone());
        all.sort_by_key(|i| i.node_id);
        all
    }

    /// Whether this gateway still held the shard under `epoch` after this call: true once a
    /// record sent through the shard's exclusive producer after the call was stored.
    pub async fn fence(&self, key: &ShardKey, epoch: Epoch) -> bool {
        let shard = self.join(key);
        let (tx, rx) = oneshot::channel();
        if shard.fences.send((epoch, tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// The task that asks for one shard, holds it and vouches for its answers.
struct Holding {
    backend: Arc<Backend>,
    kv: Arc<Kv>,
    me: Identity,
    key: ShardKey,
    owned: watch::Sender<Option<Epoch>>,
    fences: mpsc::Receiver<Fence>,
}

/// Why a holding ended.
enum Ended {
    /// The shard was lost (or never got): ask again.
    Lost(String),
    /// The gateway let go of the shard (the [`Ownership`] was dropped).
    Stopped,
}

type ShardProducer = pulsar::Producer<pulsar::TokioExecutor>;

impl Holding {
    async fn run(mut self) {
        loop {
            match self.hold().await {
                Ended::Stopped => return,
                Ended::Lost(why) => {
                    tracing::info!(topic = %self.key.topic(), %why, "homes: shard not held");
                    self.owned.send_replace(None);
                }
            }
            let pause = tokio::time::sleep(RETRY);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    f = self.fences.recv() => match f {
                        Some((_, tx)) => { let _ = tx.send(false); }
                        None => return,
                    },
                }
            }
        }
    }

    /// Asks for the shard, then holds it until it is lost or let go.
    async fn hold(&mut self) -> Ended {
        let topic = self.key.topic();
        let client = self.backend.client().clone();
        let asking = client
            .producer()
            .with_topic(topic.clone())
            .with_options(pulsar::ProducerOptions {
                access_mode: Some(pulsar::proto::ProducerAccessMode::WaitForExclusive as i32),
                ..Default::default()
            })
            .build();
        tokio::pin!(asking);
        // Waiting for the topic may last as long as another gateway holds it: answer the
        // fences of an earlier epoch meanwhile. The wait itself is never given up while the
        // gateway runs (a queued producer dropped half-way could be handed the topic later).
        let mut producer = loop {
            tokio::select! {
                p = &mut asking => match p {
                    Ok(p) => break p,
                    Err(e) => return Ended::Lost(format!("asking for the topic: {e}")),
                },
                f = self.fences.recv() => match f {
                    Some((_, tx)) => { let _ = tx.send(false); }
                    None => return Ended::Stopped,
                },
            }
        };
        let record = match serde_json::to_vec(&self.me) {
            Ok(r) => r,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let epoch = match append(&mut producer, record, "holder").await {
            Ok(e) => e,
            Err(why) => return Ended::Lost(why),
        };
        let holder = Holder {
            identity: self.me.clone(),
            epoch,
        };
        let entry = match serde_json::to_vec(&holder) {
            Ok(e) => e,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        self.publish_directory(&entry).await;
        tracing::info!(%topic, ?epoch, "homes: shard held");
        self.owned.send_replace(Some(epoch));
        let mut check = tokio::time::interval(DIRECTORY_CHECK);
        check.tick().await;
        loop {
            tokio::select! {
                f = self.fences.recv() => {
                    let Some(first) = f else { return Ended::Stopped };
                    let mut batch = vec![first];
                    while let Ok(f) = self.fences.try_recv() {
                        batch.push(f);
                    }
                    let ok = append(&mut producer, Vec::new(), "fence").await;
                    for (e, tx) in batch {
                        let _ = tx.send(ok.is_ok() && e == epoch);
                    }
                    if let Err(why) = ok {
                        return Ended::Lost(why);
                    }
                }
                _ = check.tick() => {
                    let kv_topic = self.key.kv_topic();
                    let current = self.kv.get_now(&kv_topic, &self.key.directory_key()).flatten();
                    if current.as_deref() != Some(&entry[..]) {
                        self.publish_directory(&entry).await;
                    }
                }
            }
        }
    }

    async fn publish_directory(&self, entry: &[u8]) {
        let kv_topic = self.key.kv_topic();
        let key = self.key.directory_key();
        if let Err(e) = self.kv.put(&kv_topic, &key, Some(entry.to_vec())).await {
            tracing::warn!(topic = %kv_topic, error = %e, "homes: cannot write the directory");
        }
    }
}

/// Appends one record through the shard's producer; its position once stored.
async fn append(
    producer: &mut ShardProducer,
    payload: Vec<u8>,
    kind: &str,
) -> Result<Epoch, String> {
    let mut properties = HashMap::new();
    properties.insert("home.record".to_string(), kind.to_string());
    let message = pulsar::producer::Message {
        payload,
        properties,
        ..Default::default()
    };
    let sent = async {
        let receipt = producer
            .send_non_blocking(message)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        receipt
            .message_id
            .map(|id| (id.ledger_id, id.entry_id))
            .ok_or_else(|| "a receipt without a position".to_string())
    };
    match tokio::time::timeout(FENCE_TIMEOUT, sent).await {
        Ok(r) => r.map_err(|e| format!("appending a {kind} record: {e}")),
        Err(_) => Err(format!(
            "a {kind} record not stored within {FENCE_TIMEOUT:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use magnetar_broker::{Broker, BrokerConfig};

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(15);

    /// A gateway's ownership service on its own client (its own connection to the broker).
    async fn gateway(url: &str, node_id: i32) -> Ownership {
        let backend = Arc::new(Backend::connect(url, None, None).await.unwrap());
        let kv = Arc::new(Kv::new(backend.clone(), None));
        let me = Identity {
            node_id,
            gateway: format!("gw{node_id}"),
            endpoints: vec![Endpoint {
                listener: "kafka".into(),
                host: "127.0.0.1".into(),
                port: 9090 + node_id as u16,
            }],
        };
        Ownership::new(backend, kv, me, tokio::runtime::Handle::current())
    }

    fn key(shard: u32) -> ShardKey {
        ShardKey {
            namespace: "public/default".into(),
            plugin: Arc::from("kafka"),
            domain: "groups".into(),
            shard,
        }
    }

    /// Waits for `what` to hold, polling, for at most [`PATIENCE`].
    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(start.elapsed() < PATIENCE, "waited {PATIENCE:?} for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_split_shards_fence_a_stale_owner_and_the_survivor_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(BrokerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().into(),
        ))
        .await
        .unwrap();
        let url = broker.service_url();
        let a = gateway(&url, 1).await;
        let b = gateway(&url, 2).await;

        // A asks first for shards 0-3 and gets them all.
        let mut a_epochs = Vec::new();
        for s in 0..4 {
            a_epochs.push(a.acquired(&key(s), PATIENCE).await.expect("A holds"));
        }
        // B asks for 2-5: it gets 4 and 5, which nobody held, and waits for 2 and 3.
        for s in 2..6 {
            b.epoch(&key(s));
        }
        for s in 4..6 {
            assert!(b.acquired(&key(s), PATIENCE).await.is_some(), "B holds {s}");
        }
        assert_eq!(b.acquired(&key(2), Duration::from_millis(500)).await, None);
        assert_eq!(b.epoch(&key(3)), None);
        // The directory names the holders on both sides.
        until("B names A as the owner of shard 2", || {
            matches!(b.owner(&key(2)), Owner::Other(h) if h.identity.node_id == 1 && h.epoch == a_epochs[2])
        })
        .await;
        until(
            "A names B as the owner of shard 5",
            || matches!(a.owner(&key(5)), Owner::Other(h) if h.identity.node_id == 2),
        )
        .await;
        assert_eq!(a.owner(&key(1)), Owner::Me(Some(a_epochs[1])));
        until("both gateways in B's holders", || {
            let nodes: Vec<i32> = b
                .holders("public/default", "kafka", "groups")
                .iter()
                .map(|i| i.node_id)
                .collect();
            nodes == [1, 2]
        })
        .await;
        let holders = b.holders("public/default", "kafka", "groups");
        assert_eq!(holders[0].endpoints[0].port, 9091);

        // Fences: A vouches under its epoch, not under another.
        assert!(a.fence(&key(0), a_epochs[0]).await);
        assert!(!a.fence(&key(0), (u64::MAX, 0)).await);
        // A stale owner: another producer takes shard 0's topic by fencing (as a gateway
        // that thinks the topic is free would); A's next fence fails and it lets go.
        let client = b.backend.client().clone();
        let mut thief = client
            .producer()
            .with_topic(key(0).topic())
            .with_options(pulsar::ProducerOptions {
                access_mode: Some(pulsar::proto::ProducerAccessMode::ExclusiveWithFencing as i32),
                ..Default::default()
            })
            .build()
            .await
            .unwrap();
        assert!(
            !a.fence(&key(0), a_epochs[0]).await,
            "a fenced owner vouches"
        );
        until("A no longer holds shard 0", || a.epoch(&key(0)).is_none()).await;
        // Once the other producer leaves, A (queued again) holds it under a newer epoch.
        thief.close().await.unwrap();
        drop(thief);
        let again = a
            .acquired(&key(0), PATIENCE)
            .await
            .expect("A holds shard 0 again");
        assert!(again > a_epochs[0]);

        // A stops: B, queued for 2 and 3, holds them under newer epochs and says so.
        let started = Instant::now();
        drop(a);
        for s in 2..4 {
            let e = b.acquired(&key(s), PATIENCE).await.expect("B takes over");
            assert!(e > a_epochs[s as usize], "shard {s}: {e:?}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        until(
            "B's directory names B for shard 2",
            || matches!(b.directory_entry(&key(2)), Some(h) if h.identity.node_id == 2),
        )
        .await;
        assert!(matches!(b.owner(&key(3)), Owner::Me(Some(_))));
    }
}
