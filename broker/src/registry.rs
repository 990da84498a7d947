//! The set of topics: opens a topic's storage on first use and hands out handles to its
//! actor. Topics found on disk at start-up are listed (for `CommandGetTopicsOfNamespace`)
//! but only opened when a client uses them.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex as StdMutex;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::task::TaskTracker;

use crate::naming::TopicName;
use crate::topic::{self, TopicCommand, TopicHandle, COMMAND_QUEUE};

/// Most topics one broker serves (topic names come from clients).
pub const MAX_TOPICS: usize = 10_000;

/// Why a topic could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("too many topics (limit {MAX_TOPICS})")]
    TooManyTopics,
    #[error("opening topic storage: {0}")]
    Storage(String),
}

/// All topics of the broker.
pub struct Registry {
    topics_dir: PathBuf,
    /// Held while opening, so a topic is opened once.
    open: Mutex<HashMap<TopicName, TopicHandle>>,
    known: StdMutex<BTreeSet<TopicName>>,
    tasks: TaskTracker,
}

impl Registry {
    /// Scans `topics_dir` for existing topics.
    pub fn new(topics_dir: PathBuf) -> std::io::Result<Registry> {
        std::fs::create_dir_all(&topics_dir)?;
        let mut known = BTreeSet::new();
        for item in std::fs::read_dir(&topics_dir)? {
            let item = item?;
            if let Some(name) = item.file_name().to_str().and_then(TopicName::from_dir_name) {
                known.insert(name);
            }
        }
        Ok(Registry {
            topics_dir,
            open: Mutex::new(HashMap::new()),
            known: StdMutex::new(known),
            tasks: TaskTracker::new(),
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
        let topic = tokio::task::spawn_blocking(move || topic::open(topic_name, dir))
            .await
            .map_err(|e| RegistryError::Storage(e.to_string()))?
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        self.tasks.spawn(topic.run(rx));
        let handle = TopicHandle { tx };
        open.insert(name.clone(), handle.clone());
        if let Ok(mut known) = self.known.lock() {
            known.insert(name.clone());
        }
        Ok(handle)
    }

    /// Canonical names of the topics in namespace `tenant/ns`.
    pub fn topics_of_namespace(&self, namespace: &str) -> Vec<String> {
        match self.known.lock() {
            Ok(known) => known
                .iter()
                .filter(|t| t.namespace() == namespace)
                .map(|t| t.as_str().to_string())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Flushes and stops every topic.
    pub async fn shutdown(&self) {
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
