//! The Pulsar backend.
//!
//! The gateway is a Pulsar client (the `pulsar` crate) whatever it talks to: the embedded
//! broker in this process or an Apache Pulsar cluster; switching is the service URL of the
//! config. One producer per Pulsar topic is shared by every connection publishing to it;
//! callers that need order (one connection's publishes) enqueue sequentially and await the
//! receipts afterwards, so order is kept while many sends are in flight.
//!
//! Producers batch, as Pulsar's own clients do by default: messages sent within
//! [`BATCH_DELAY`] of each other (up to [`BATCH_MESSAGES`] or [`BATCH_BYTES`]) leave as one
//! entry, so the broker stores, fsyncs and receipts them once and consumers receive them in
//! one frame. The cost is at most [`BATCH_DELAY`] of latency for a lone message. Messages
//! sealed in Pulsar's end-to-end format go through a producer that does not batch, because
//! their encryption metadata is per entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pulsar::consumer::{ConsumerOptions, InitialPosition};
use pulsar::producer::SendFuture;
use pulsar::{Authentication, Consumer, Producer, Pulsar, SubType, TokioExecutor};
use tokio::sync::OnceCell;

/// A backend failure, in words a log reader understands.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connecting to Pulsar at {url}: {source}")]
    Connect { url: String, source: pulsar::Error },
    #[error("creating a producer on {topic}: {source}")]
    Producer {
        topic: String,
        source: pulsar::Error,
    },
    #[error("sending to {topic}: {source}")]
    Send {
        topic: String,
        source: pulsar::Error,
    },
    /// The broker's `ConsumerBusy`: another consumer holds the subscription (a second one on
    /// an Exclusive subscription, or another subscription type). Not retried here: the caller
    /// decides (Pulsar's WebSocket API answers 409, MQTT's takeover tries again shortly).
    #[error("subscription {subscription} on {topic} is busy: {reason}")]
    Busy {
        topic: String,
        subscription: String,
        reason: String,
    },
    #[error("subscribing {subscription} on {topic}: {source}")]
    Subscribe {
        topic: String,
        subscription: String,
        source: pulsar::Error,
    },
}

/// A message on its way to Pulsar.
#[derive(Debug, Default)]
pub struct OutMessage {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub properties: HashMap<String, String>,
    /// Pulsar end-to-end encryption metadata, when the payload is sealed in that format.
    pub encryption: Option<(Vec<pulsar::proto::EncryptionKeys>, Vec<u8>)>,
    /// The application's event time (ms since the epoch), if it gave one.
    pub event_time: Option<u64>,
}

/// How a subscription is opened.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub topic: String,
    pub subscription: String,
    pub sub_type: SubType,
    pub durable: bool,
    pub earliest: bool,
    /// Flow permits asked of the broker at a time.
    pub receiver_queue: u32,
    /// A reader's (non-durable subscription's) first message: its entry is delivered whole.
    pub start_message_id: Option<pulsar::proto::MessageIdData>,
    /// Where messages delivered too often go instead.
    pub dead_letter: Option<pulsar::consumer::DeadLetterPolicy>,
    /// The consumer's name in the broker's stats.
    pub consumer_name: Option<String>,
}

type SharedProducer = Arc<tokio::sync::Mutex<Producer<TokioExecutor>>>;

/// Longest a message waits for others to share its batch.
pub const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(1);
/// Most messages in one batch.
pub const BATCH_MESSAGES: u32 = 1000;
/// Most payload bytes in one batch.
pub const BATCH_BYTES: usize = 128 * 1024;

/// Producers by topic, each made once: `[unbatched, batched]`, so that a lookup by `&str`
/// needs no key allocation.
type Producers = HashMap<String, [Arc<OnceCell<SharedProducer>>; 2]>;

/// The client and its producers.
pub struct Backend {
    client: Pulsar<TokioExecutor>,
    producers: Mutex<Producers>,
}

impl Backend {
    /// Connects to the service URL, with a token when one is given. With `in_process` (the
    /// embedded broker of this process) every broker connection is an in-process pipe
    /// instead of a loopback TCP connection: the same Pulsar protocol, without the kernel.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        in_process: Option<magnetar_broker::InProcess>,
    ) -> Result<Backend, BackendError> {
        let mut builder = Pulsar::builder(url, TokioExecutor);
        if let Some(broker) = in_process {
            builder = builder.with_connector(Arc::new(broker));
        }
        if let Some(token) = token {
            builder = builder.with_auth(Authentication {
                name: "token".into(),
                data: token.as_bytes().to_vec(),
            });
        }
        let client = builder
            .build()
            .await
            .map_err(|source| BackendError::Connect {
                url: url.to_string(),
                source,
            })?;
        Ok(Backend {
            client,
            producers: Mutex::new(HashMap::new()),
        })
    }

    /// The underlying client, for readers such as the kv.
    pub fn client(&self) -> &Pulsar<TokioExecutor> {
        &self.client
    }

    /// The topic's producer when it is made already: the common case, without awaiting.
    fn existing_producer(&self, topic: &str, batched: bool) -> Option<SharedProducer> {
        let map = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        map.get(topic)?[usize::from(batched)].get().cloned()
    }

    /// The topic's producer, made on first use. The future is large (it holds a producer's
    /// creation), so callers box it, and only when [`Backend::existing_producer`] has none.
    async fn producer(&self, topic: &str, batched: bool) -> Result<SharedProducer, BackendError> {
        let cell = {
            let mut map = self.producers.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(topic.to_string()).or_default()[usize::from(batched)].clone()
        };
        let producer = cell
            .get_or_try_init(|| async {
                let p = self
                    .client
                    .producer()
                    .with_topic(topic)
                    // A full connection queue makes the send wait (backpressure to the
                    // connections publishing) instead of failing with `SlowDown`.
                    .with_options(pulsar::ProducerOptions {
                        block_queue_if_full: true,
                        batch_size: batched.then_some(BATCH_MESSAGES),
                        batch_byte_size: batched.then_some(BATCH_BYTES),
                        batch_timeout: batched.then_some(BATCH_DELAY),
                        ..Default::default()
                    })
                    .build()
                    .await
                    .map_err(|source| BackendError::Producer {
                        topic: topic.to_string(),
                        source,
                    })?;
                Ok::<_, BackendError>(Arc::new(tokio::sync::Mutex::new(p)))
            })
            .await?;
        Ok(producer.clone())
    }

    /// Hands a message to the topic's producer and returns the receipt to await. Messages
    /// enqueued one after another by one caller are stored in that order. The future stays
    /// small (no producer creation inside, see [`Backend::producer`]): one per publish.
    pub async fn enqueue(&self, topic: &str, msg: OutMessage) -> Result<SendFuture, BackendError> {
        self.enqueue_batched(topic, msg, true).await
    }

    /// [`Backend::enqueue`], in a batch with others only if `batch` (and the message is not
    /// sealed end to end): else alone in its entry.
    pub async fn enqueue_batched(
        &self,
        topic: &str,
        msg: OutMessage,
        batch: bool,
    ) -> Result<SendFuture, BackendError> {
        let batched = batch && msg.encryption.is_none();
        let producer = match self.existing_producer(topic, batched) {
            Some(p) => p,
            None => Box::pin(self.producer(topic, batched)).await?,
        };
        let (encryption_keys, encryption_param) = match msg.encryption {
            Some((keys, iv)) => (keys, Some(iv)),
            None => (Vec::new(), None),
        };
        let message = pulsar::producer::Message {
            payload: msg.payload,
            properties: msg.properties,
            partition_key: msg.key,
            event_time: msg.event_time,
            encryption_keys,
            encryption_param,
            ..Default::default()
        };
        let mut guard = producer.lock().await;
        match guard.send_non_blocking(message).await {
            Ok(fut) => Ok(fut),
            Err(source) => {
                drop(guard);
                // A broken producer is rebuilt by the next send.
                if let Some(cells) = self
                    .producers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(topic)
                {
                    cells[usize::from(batched)] = Arc::default();
                }
                Err(BackendError::Send {
                    topic: topic.to_string(),
                    source,
                })
            }
        }
    }

    /// Opens a consumer that asks the broker for `receiver_queue` messages at a time, as
    /// they arrive.
    pub async fn subscribe(
        &self,
        opts: &SubscribeOptions,
    ) -> Result<Consumer<Vec<u8>, TokioExecutor>, BackendError> {
        self.open_consumer(opts, false, false).await
    }

    /// Opens a consumer like [`subscribe`](Self::subscribe) that receives each entry as one
    /// message, a batch unsplit (its id without a batch index; the payload's metadata is the
    /// batch's): for readers that want each entry's id and broker-entry metadata only.
    pub async fn subscribe_entries(
        &self,
        opts: &SubscribeOptions,
    ) -> Result<Consumer<Vec<u8>, TokioExecutor>, BackendError> {
        self.open_consumer(opts, false, true).await
    }

    /// Opens a consumer that gets nothing until the caller grants the broker flow permits
    /// (`Consumer::grant_permits`): the caller bounds what the broker sends it ahead (a
    /// Shared subscription's other consumers get the rest).
    pub async fn subscribe_windowed(
        &self,
        opts: &SubscribeOptions,
    ) -> Result<Consumer<Vec<u8>, TokioExecutor>, BackendError> {
        self.open_consumer(opts, true, false).await
    }

    async fn open_consumer(
        &self,
        opts: &SubscribeOptions,
        manual_flow: bool,
        whole_entries: bool,
    ) -> Result<Consumer<Vec<u8>, TokioExecutor>, BackendError> {
        // A subscription held by another consumer is an answer, not an outage: without this,
        // the client would retry `ConsumerBusy` until the other consumer leaves.
        let mut options = ConsumerOptions::default()
            .durable(opts.durable)
            .fail_if_busy(true);
        options.manual_flow = manual_flow;
        options.whole_entries = whole_entries;
        options.initial_position = if opts.earliest {
            InitialPosition::Earliest
        } else {
            InitialPosition::Latest
        };
        options.start_message_id = opts.start_message_id.clone();
        let mut builder = self
            .client
            .consumer()
            .with_topic(opts.topic.clone())
            .with_subscription(opts.subscription.clone())
            .with_subscription_type(opts.sub_type)
            .with_batch_size(opts.receiver_queue.max(1))
            .with_options(options);
        if let Some(policy) = &opts.dead_letter {
            builder = builder.with_dead_letter_policy(policy.clone());
        }
        if let Some(name) = &opts.consumer_name {
            builder = builder.with_consumer_name(name.clone());
        }
        builder
            .build::<Vec<u8>>()
            .await
            .map_err(|source| match source {
                pulsar::Error::Connection(pulsar::error::ConnectionError::PulsarError(
                    Some(pulsar::proto::ServerError::ConsumerBusy),
                    reason,
                )) => BackendError::Busy {
                    topic: opts.topic.clone(),
                    subscription: opts.subscription.clone(),
                    reason: reason.unwrap_or_else(|| "held by another consumer".to_string()),
                },
                source => BackendError::Subscribe {
                    topic: opts.topic.clone(),
                    subscription: opts.subscription.clone(),
                    source,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use magnetar_broker::{Broker, BrokerConfig};

    use super::*;

    fn options(subscription: &str, sub_type: SubType) -> SubscribeOptions {
        SubscribeOptions {
            topic: "persistent://public/default/busy".into(),
            subscription: subscription.into(),
            sub_type,
            durable: true,
            earliest: false,
            receiver_queue: 10,
            start_message_id: None,
            dead_letter: None,
            consumer_name: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_held_by_another_consumer_is_busy_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(BrokerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().into(),
        ))
        .await
        .unwrap();
        let backend = Backend::connect(&broker.service_url(), None, Some(broker.in_process()))
            .await
            .unwrap();
        let mut first = backend
            .subscribe(&options("s", SubType::Exclusive))
            .await
            .unwrap();
        // The client's retry delay is 5 s: an answer within 3 s was not retried.
        let within = Duration::from_secs(3);
        for sub_type in [SubType::Exclusive, SubType::Shared] {
            let second = tokio::time::timeout(within, backend.subscribe(&options("s", sub_type)))
                .await
                .expect("answered at once");
            assert!(
                matches!(&second, Err(BackendError::Busy { subscription, .. }) if subscription == "s"),
                "{sub_type:?}: {:?}",
                second.err()
            );
        }
        // Another subscription of the topic is not disturbed.
        backend
            .subscribe(&options("other", SubType::Exclusive))
            .await
            .unwrap();
        first.close().await.unwrap();
        tokio::time::timeout(within, backend.subscribe(&options("s", SubType::Exclusive)))
            .await
            .expect("answered at once")
            .unwrap();
    }
}
