//! The set of topics: opens a topic's storage on first use and hands out handles to its
//! actor. Topics found on disk at start-up are listed (for `CommandGetTopicsOfNamespace`)
//! but only opened when a client uses them.
//!
//! Also the broker's metadata: tenants and namespaces created through the admin API, and
//! partitioned topics (a partitioned topic `t` with `n` partitions is the `n` ordinary topics
//! `t-partition-0` .. `t-partition-{n-1}`, as in Pulsar). It lives in
//! `<data dir>/metadata.json`, rewritten atomically (temp file, fsync, rename) on change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex as StdMutex;

use serde::{Deserialize, Serialize};

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::task::TaskTracker;

use crate::naming::{TopicName, NAME_FILE};
use crate::topic::{self, TopicCommand, TopicHandle, TopicSettings, TopicStats, COMMAND_QUEUE};

/// Most topics one broker serves (topic names come from clients).
pub const MAX_TOPICS: usize = 10_000;
/// Most partitions of one partitioned topic.
pub const MAX_PARTITIONS: u32 = 1_000;
/// Most tenants, namespaces and partitioned topics the metadata holds.
const MAX_METADATA_ITEMS: usize = 100_000;

/// Why a topic could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("too many topics (limit {MAX_TOPICS})")]
    TooManyTopics,
    #[error("opening topic storage: {0}")]
    Storage(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} is in use")]
    Busy(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// What the admin API created, persisted in `metadata.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Metadata {
    tenants: BTreeSet<String>,
    /// `tenant/namespace`.
    namespaces: BTreeSet<String>,
    /// Canonical topic name → partitions.
    partitioned: BTreeMap<String, u32>,
}

/// All topics of the broker.
pub struct Registry {
    topics_dir: PathBuf,
    /// Held while opening, so a topic is opened once.
    open: Mutex<HashMap<TopicName, TopicHandle>>,
    known: StdMutex<BTreeSet<TopicName>>,
    tasks: TaskTracker,
    settings: TopicSettings,
    metadata_path: PathBuf,
    metadata: StdMutex<Metadata>,
    /// The non-persistent topics (nothing on disk; see `non_persistent`).
    pub non_persistent: crate::non_persistent::Topics,
}

impl Registry {
    /// Scans `<data_dir>/topics` for existing topics and loads the metadata.
    pub fn new(data_dir: &Path, settings: TopicSettings) -> std::io::Result<Registry> {
        let topics_dir = data_dir.join("topics");
        let metadata_path = data_dir.join("metadata.json");
        let metadata = match std::fs::read(&metadata_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", metadata_path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Metadata::default(),
            Err(e) => return Err(e),
        };
        std::fs::create_dir_all(&topics_dir)?;
        let mut known = BTreeSet::new();
        for item in std::fs::read_dir(&topics_dir)? {
            let item = item?;
            let file_name = item.file_name();
            let Some(dir) = file_name.to_str() else {
                continue;
            };
            let name = if TopicName::is_shortened_dir(dir) {
                std::fs::read_to_string(item.path().join(NAME_FILE))
                    .ok()
                    .and_then(|n| TopicName::parse(&n).ok())
                    .filter(|n| n.dir_name() == dir)
            } else {
                TopicName::from_dir_name(dir)
            };
            if let Some(name) = name {
                known.insert(name);
            }
        }
        Ok(Registry {
            topics_dir,
            open: Mutex::new(HashMap::new()),
            known: StdMutex::new(known),
            tasks: TaskTracker::new(),
            settings,
            metadata_path,
            metadata: StdMutex::new(metadata),
            non_persistent: crate::non_persistent::Topics::default(),
        })
    }

    /// The running topic `name`, opening (and creating) it if needed.
    pub async fn get(&self, name: &TopicName) -> Result<TopicHandle, RegistryError> {
        let mut open = self.open.lock().await;
        if let Some(h) = open.get(name) {
            if !h.tx.is_closed() {
                return Ok(h.clone());
            }
        }
        if open.len() >= MAX_TOPICS {
            return Err(RegistryError::TooManyTopics);
        }
        let dir = self.topics_dir.join(name.dir_name());
        let topic_name = name.clone();
        let settings = self.settings;
        let topic = tokio::task::spawn_blocking(move || {
            claim_dir(&topic_name, &dir)?;
            topic::open(topic_name, dir, settings).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| RegistryError::Storage(e.to_string()))?
        .map_err(RegistryError::Storage)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        self.tasks.spawn(topic.run(rx));
        let handle = TopicHandle { tx };
        open.insert(name.clone(), handle.clone());
        if let Ok(mut known) = self.known.lock() {
            known.insert(name.clone());
        }
        Ok(handle)
    }

    /// Canonical names of the topics in namespace `tenant/ns`, with every partition of its
    /// partitioned topics (as Pulsar lists them).
    pub fn topics_of_namespace(&self, namespace: &str) -> Vec<String> {
        let mut out: BTreeSet<String> = match self.known.lock() {
            Ok(known) => known
                .iter()
                .filter(|t| t.namespace() == namespace)
                .map(|t| t.as_str().to_string())
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        for (name, n) in self.partitioned_in(namespace) {
            out.extend((0..n).map(|i| format!("{name}-partition-{i}")));
        }
        out.into_iter().collect()
    }

    /// Bytes stored by every topic of `tenant` (what a storage quota counts).
    pub async fn tenant_storage_bytes(&self, tenant: &str) -> u64 {
        let names: Vec<TopicName> = match self.known.lock() {
            Ok(known) => known
                .iter()
                .filter(|t| t.tenant_and_namespace().0 == tenant)
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut total = 0;
        for name in names {
            if let Ok(stats) = self.stats(&name).await {
                total += stats.storage_bytes;
            }
        }
        total
    }

    /// Partitioned topics of `tenant/ns` and their partition counts.
    pub fn partitioned_in(&self, namespace: &str) -> Vec<(String, u32)> {
        self.with_metadata(|m| {
            m.partitioned
                .iter()
                .filter(|(t, _)| TopicName::parse(t).is_ok_and(|t| t.namespace() == namespace))
                .map(|(t, n)| (t.clone(), *n))
                .collect()
        })
    }

    /// Partitions of `name` (0: not a partitioned topic).
    pub fn partitions(&self, name: &TopicName) -> u32 {
        self.with_metadata(|m| m.partitioned.get(name.as_str()).copied().unwrap_or(0))
    }

    fn with_metadata<T>(&self, f: impl FnOnce(&Metadata) -> T) -> T {
        match self.metadata.lock() {
            Ok(m) => f(&m),
            Err(p) => f(&p.into_inner()),
        }
    }

    /// Changes the metadata with `f` and persists it; nothing changes if `f` fails.
    async fn update_metadata(
        &self,
        f: impl FnOnce(&mut Metadata) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut next = self.with_metadata(Metadata::clone);
        f(&mut next)?;
        if next.tenants.len() + next.namespaces.len() + next.partitioned.len() > MAX_METADATA_ITEMS
        {
            return Err(RegistryError::Invalid(
                "too many tenants, namespaces or topics".into(),
            ));
        }
        let bytes =
            serde_json::to_vec_pretty(&next).map_err(|e| RegistryError::Storage(e.to_string()))?;
        let path = self.metadata_path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| RegistryError::Storage(e.to_string()))?
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        if let Ok(mut m) = self.metadata.lock() {
            *m = next;
        }
        Ok(())
    }

    /// Tenants: created ones and those that have topics.
    pub fn tenants(&self) -> Vec<String> {
        let mut out = self.with_metadata(|m| m.tenants.clone());
        for ns in self.namespaces_all() {
            if let Some((t, _)) = ns.split_once('/') {
                out.insert(t.to_string());
            }
        }
        out.into_iter().collect()
    }

    /// Every namespace: created ones and those that have topics.
    fn namespaces_all(&self) -> BTreeSet<String> {
        let mut out = self.with_metadata(|m| {
            let mut s = m.namespaces.clone();
            s.extend(
                m.partitioned
                    .keys()
                    .filter_map(|t| TopicName::parse(t).ok().map(|t| t.namespace().to_string())),
            );
            s
        });
        if let Ok(known) = self.known.lock() {
            out.extend(known.iter().map(|t| t.namespace().to_string()));
        }
        out
    }

    /// Namespaces (`tenant/ns`) of `tenant`.
    pub fn namespaces(&self, tenant: &str) -> Vec<String> {
        self.namespaces_all()
            .into_iter()
            .filter(|ns| ns.split_once('/').is_some_and(|(t, _)| t == tenant))
            .collect()
    }

    pub async fn create_tenant(&self, tenant: &str) -> Result<(), RegistryError> {
        let exists = self.tenants().iter().any(|t| t == tenant);
        self.update_metadata(|m| {
            if exists {
                return Err(RegistryError::Exists(format!("tenant {tenant}")));
            }
            m.tenants.insert(tenant.to_string());
            Ok(())
        })
        .await
    }

    pub async fn delete_tenant(&self, tenant: &str) -> Result<(), RegistryError> {
        if !self.namespaces(tenant).is_empty() {
            return Err(RegistryError::Busy(format!(
                "tenant {tenant} has namespaces"
            )));
        }
        self.update_metadata(|m| {
            if m.tenants.remove(tenant) {
                Ok(())
            } else {
                Err(RegistryError::NotFound(format!("tenant {tenant}")))
            }
        })
        .await
    }

    pub async fn create_namespace(&self, namespace: &str) -> Result<(), RegistryError> {
        let exists = self.namespaces_all().contains(namespace);
        self.update_metadata(|m| {
            if exists {
                return Err(RegistryError::Exists(format!("namespace {namespace}")));
            }
            m.namespaces.insert(namespace.to_string());
            Ok(())
        })
        .await
    }

    pub async fn delete_namespace(&self, namespace: &str) -> Result<(), RegistryError> {
        if !self.topics_of_namespace(namespace).is_empty() {
            return Err(RegistryError::Busy(format!(
                "namespace {namespace} has topics"
            )));
        }
        self.update_metadata(|m| {
            if m.namespaces.remove(namespace) {
                Ok(())
            } else {
                Err(RegistryError::NotFound(format!("namespace {namespace}")))
            }
        })
        .await
    }

    /// Creates partitioned topic `name` with `partitions` partitions.
    pub async fn create_partitioned(
        &self,
        name: &TopicName,
        partitions: u32,
    ) -> Result<(), RegistryError> {
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(RegistryError::Invalid(format!(
                "partitions must be 1..={MAX_PARTITIONS}"
            )));
        }
        // Partition names must themselves be valid topic names.
        name.partition(partitions - 1)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let plain = self.known.lock().is_ok_and(|k| k.contains(name));
        self.update_metadata(|m| {
            if plain || m.partitioned.contains_key(name.as_str()) {
                return Err(RegistryError::Exists(format!("topic {name}")));
            }
            m.partitioned.insert(name.as_str().to_string(), partitions);
            Ok(())
        })
        .await
    }

    /// Deletes partitioned topic `name` and its partitions.
    pub async fn delete_partitioned(&self, name: &TopicName) -> Result<(), RegistryError> {
        let n = self.partitions(name);
        if n == 0 {
            return Err(RegistryError::NotFound(format!("partitioned topic {name}")));
        }
        for p in partition_names(name, n) {
            not_found_is_done(self.delete(&p).await)?;
        }
        self.update_metadata(|m| {
            m.partitioned.remove(name.as_str());
            Ok(())
        })
        .await
    }

    /// Raises the partition count of partitioned topic `name` to `partitions`, as Apache
    /// Pulsar's `POST .../partitions` does: never lowers it, and the new partitions are
    /// created on first use like the others.
    pub async fn update_partitioned(
        &self,
        name: &TopicName,
        partitions: u32,
    ) -> Result<(), RegistryError> {
        if partitions > MAX_PARTITIONS {
            return Err(RegistryError::Invalid(format!(
                "partitions must be 1..={MAX_PARTITIONS}"
            )));
        }
        name.partition(partitions.max(1) - 1)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.update_metadata(|m| match m.partitioned.get_mut(name.as_str()) {
            None => Err(RegistryError::NotFound(format!("partitioned topic {name}"))),
            Some(n) if partitions <= *n => Err(RegistryError::Invalid(format!(
                "the number of partitions must be more than the existing {n}"
            ))),
            Some(n) => {
                *n = partitions;
                Ok(())
            }
        })
        .await
    }

    /// Whether topic `name` exists (stored, or a partitioned topic).
    pub fn exists(&self, name: &TopicName) -> bool {
        self.known.lock().is_ok_and(|k| k.contains(name)) || self.partitions(name) > 0
    }

    /// `NotFound` unless non-partitioned topic `name` exists.
    fn ensure_known(&self, name: &TopicName) -> Result<(), RegistryError> {
        if self.known.lock().is_ok_and(|k| k.contains(name)) {
            Ok(())
        } else {
            Err(RegistryError::NotFound(format!("topic {name}")))
        }
    }

    /// Statistics of topic `name` (opening it).
    pub async fn stats(&self, name: &TopicName) -> Result<TopicStats, RegistryError> {
        self.ensure_known(name)?;
        let handle = self.get(name).await?;
        let (reply, done) = oneshot::channel();
        let stopped = || RegistryError::Storage("topic stopped".into());
        handle
            .tx
            .send(TopicCommand::Stats { reply })
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())
    }

    /// Deletes topic `name` and its data; refused while producers or consumers use it.
    pub async fn delete(&self, name: &TopicName) -> Result<(), RegistryError> {
        self.ensure_known(name)?;
        let mut open = self.open.lock().await;
        if let Some(h) = open.get(name) {
            let (reply, done) = oneshot::channel();
            if h.tx.send(TopicCommand::Stats { reply }).await.is_ok() {
                if let Ok(stats) = done.await {
                    if !stats.producers.is_empty()
                        || stats.subscriptions.iter().any(|s| !s.consumers.is_empty())
                    {
                        return Err(RegistryError::Busy(format!("topic {name}")));
                    }
                }
            }
            let (reply, done) = oneshot::channel();
            if h.tx.send(TopicCommand::Shutdown { reply }).await.is_ok() {
                let _ = done.await;
            }
            open.remove(name);
        }
        let dir = self.topics_dir.join(name.dir_name());
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .map_err(|e| RegistryError::Storage(e.to_string()))?
        .map_err(|e| RegistryError::Storage(e.to_string()))?;
        if let Ok(mut known) = self.known.lock() {
            known.remove(name);
        }
        Ok(())
    }

    /// Unloads topic `name`, as Pulsar's admin `unload` does: its producers and consumers are
    /// closed (their clients reconnect), its state is flushed and the topic is opened again on
    /// next use. A topic that is not open is left as it is. A partitioned topic's name
    /// unloads each of its partitions.
    pub async fn unload(&self, name: &TopicName) -> Result<(), RegistryError> {
        let n = self.partitions(name);
        if n == 0 {
            return self.unload_one(name).await;
        }
        for p in partition_names(name, n) {
            // A partition nobody has used yet has nothing to unload.
            not_found_is_done(self.unload_one(&p).await)?;
        }
        Ok(())
    }

    async fn unload_one(&self, name: &TopicName) -> Result<(), RegistryError> {
        self.ensure_known(name)?;
        let mut open = self.open.lock().await;
        if let Some(h) = open.remove(name) {
            let (reply, done) = oneshot::channel();
            if h.tx.send(TopicCommand::Unload { reply }).await.is_ok() {
                let _ = done.await;
            }
        }
        Ok(())
    }

    /// Creates (opens) non-partitioned topic `name`.
    pub async fn create(&self, name: &TopicName) -> Result<(), RegistryError> {
        if self.exists(name) {
            return Err(RegistryError::Exists(format!("topic {name}")));
        }
        self.get(name).await.map(|_| ())
    }

    /// Flushes and stops every topic.
    pub async fn shutdown(&self) {
        self.non_persistent.shutdown().await;
        let handles: Vec<TopicHandle> = self.open.lock().await.drain().map(|(_, h)| h).collect();
        for h in handles {
            let (reply, done) = oneshot::channel();
            if h.tx.send(TopicCommand::Shutdown { reply }).await.is_ok() {
                let _ = done.await;
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    crate::log::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes sure `dir` belongs to `name`: a shortened directory name (see
/// [`TopicName::dir_name`]) records the full name, and a hash collision is refused.
fn claim_dir(name: &TopicName, dir: &Path) -> Result<(), String> {
    if !TopicName::is_shortened_dir(&name.dir_name()) {
        return Ok(());
    }
    let file = dir.join(NAME_FILE);
    match std::fs::read_to_string(&file) {
        Ok(stored) if stored == name.as_str() => Ok(()),
        Ok(stored) => Err(format!("directory of {name} already holds topic {stored}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            write_atomically(&file, name.as_str().as_bytes()).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The partitions of partitioned topic `name` (`n` of them) that are valid topic names
/// (`create_partitioned` refuses a count whose last partition name is not).
fn partition_names(name: &TopicName, n: u32) -> impl Iterator<Item = TopicName> + '_ {
    (0..n).filter_map(|i| name.partition(i).ok())
}

/// A step over a partitioned topic's partitions: a partition never used (so never stored)
/// counts as done.
fn not_found_is_done(result: Result<(), RegistryError>) -> Result<(), RegistryError> {
    match result {
        Err(RegistryError::NotFound(_)) => Ok(()),
        other => other,
    }
}
