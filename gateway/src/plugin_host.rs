//! Loading plugins and running their instances.
//!
//! A plugin is a WebAssembly component speaking one of the plugin ABI versions this host
//! supports (`magnetar:plugin@0.2.7`, see `sdk/wit/plugin.wit`, or an older one; see
//! `abi`): a component of another version is refused when it is compiled, with a message
//! naming its version and the supported ones. It is compiled once per process (and cached
//! on disk across restarts by wasmtime's cache) and instantiated once per worker thread. One instance serves many connections — the
//! proxy-wasm model — so an idle connection costs the host a few buffers, not an instance.
//!
//! Each worker is an OS thread that owns its `Store` and drains a bounded event queue: socket
//! bytes, completions of backend operations, timers. Wasm runs only on worker threads, never
//! on the async runtime's threads, so a slow plugin delays its own connections only.
//!
//! Containment: every call into an instance runs under an epoch deadline (CPU time) and the
//! store's memory limit. A trap — a panic, a deadline, a memory-limit hit — poisons only that
//! instance: the worker closes the instance's connections, builds a fresh instance from the
//! compiled component, and goes on; other workers and plugins never notice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::mpsc;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder};
use wasmtime_wasi::WasiCtxBuilder;

use crate::abi::{self, AbiVersion};
use crate::host::{Event, HostState, SaslStep, Services};

mod epoch;

use epoch::{EpochTicker, EPOCH_TICK};

/// Events queued per worker before senders wait.
const WORKER_QUEUE: usize = 4096;
/// Most completions of the instance's own (`HostState::finish_now`) delivered in a row
/// while events wait in the queue.
const READY_STREAK: usize = 32;

/// The sending side of one worker's event queue.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Event>,
}

impl WorkerHandle {
    /// Queues an event, waiting while the worker is saturated.
    pub async fn send(&self, event: Event) -> Result<(), WorkerGone> {
        self.tx.send(event).await.map_err(|_| WorkerGone)
    }
}

/// The worker has stopped (the gateway is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("plugin worker stopped")]
pub struct WorkerGone;

/// Limits every instance runs under.
#[derive(Debug, Clone, Copy)]
pub struct InstanceLimits {
    pub memory_bytes: usize,
    pub event_deadline: Duration,
}

/// The wasmtime engine shared by all plugins, with its epoch ticker.
pub struct PluginHost {
    engine: Engine,
    ticker: Arc<EpochTicker>,
    linker: Arc<Linker<HostState>>,
    limits: InstanceLimits,
}

impl PluginHost {
    /// Builds the engine: component model, epoch interruption, compile cache in `cache_dir`.
    pub fn new(
        limits: InstanceLimits,
        cache_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<PluginHost> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // `MAGNETAR_WASM_PERFMAP=1` writes /tmp/perf-<pid>.map, so that `perf report` names
        // the plugins' compiled functions (profiling only; off by default).
        if std::env::var_os("MAGNETAR_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if let Some(dir) = cache_dir {
            let mut cache_config = wasmtime::CacheConfig::new();
            cache_config.with_directory(dir);
            match wasmtime::Cache::new(cache_config) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(e) => tracing::warn!(error = %e, "compile cache disabled"),
            }
        }
        let engine =
            Engine::new(&config).map_err(|e| anyhow!("creating the wasmtime engine: {e}"))?;
        let ticker = Arc::new(EpochTicker::start(&engine)?);
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| anyhow!("linking WASI: {e}"))?;
        // Every supported ABI version's imports, all served by the same host calls.
        abi::v0_2::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| anyhow!("linking the host API 0.2.7: {e}"))?;
        abi::v0_1::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| anyhow!("linking the host API 0.1.0: {e}"))?;
        Ok(PluginHost {
            engine,
            ticker,
            linker: Arc::new(linker),
            limits,
        })
    }

    /// Compiles a component (or takes it from the cache), and checks that it speaks an ABI
    /// version this host supports.
    pub fn compile(&self, name: &str, wasm: &[u8]) -> anyhow::Result<CompiledPlugin> {
        let component = Component::new(&self.engine, wasm)
            .map_err(|e| anyhow!("compiling plugin {name}: {e}"))?;
        let abi = abi::version_of(&component.component_type(), &self.engine)
            .map_err(|e| anyhow!("cannot load plugin {name}: {e}"))?;
        tracing::debug!(plugin = name, %abi, "plugin compiled");
        Ok(CompiledPlugin { component, abi })
    }

    /// Starts `workers` instances of a plugin, each on its own thread. The first instance is
    /// built before this returns, so a plugin that fails `init` fails the start.
    pub fn start_pool(
        &self,
        name: &str,
        plugin: CompiledPlugin,
        config_text: String,
        workers: usize,
        services: Arc<Services>,
    ) -> anyhow::Result<Arc<PluginPool>> {
        let runtime = tokio::runtime::Handle::current();
        let mut handles = Vec::new();
        for index in 0..workers.max(1) {
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            let mut worker = Worker {
                name: Arc::from(name),
                engine: self.engine.clone(),
                ticker: self.ticker.clone(),
                linker: self.linker.clone(),
                plugin: plugin.clone(),
                config_text: config_text.clone(),
                limits: self.limits,
                services: services.clone(),
                events: tx.clone(),
                runtime: runtime.clone(),
                instance: None,
            };
            worker.instance = Some(worker.instantiate()?);
            std::thread::Builder::new()
                .name(format!("plugin-{name}-{index}"))
                .spawn(move || worker.run(rx))
                .with_context(|| format!("starting worker {index} of plugin {name}"))?;
            handles.push(WorkerHandle { tx });
        }
        // Homes (`homes.post`) live on these workers, shard by shard.
        services
            .homes
            .register(name, handles.iter().map(|h| h.tx.clone()).collect());
        Ok(Arc::new(PluginPool {
            name: name.to_string(),
            workers: handles,
            next: AtomicUsize::new(0),
        }))
    }
}

/// The workers of one plugin; connections are spread over them round-robin.
pub struct PluginPool {
    pub name: String,
    workers: Vec<WorkerHandle>,
    next: AtomicUsize,
}

impl PluginPool {
    /// The worker the next connection goes to.
    pub fn pick(&self) -> WorkerHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[i].clone()
    }
}

/// A compiled plugin and the ABI version it speaks.
#[derive(Clone)]
pub struct CompiledPlugin {
    component: Component,
    abi: AbiVersion,
}

/// The exports of an instance, in the bindings of its ABI version.
enum Bindings {
    V0_1(abi::v0_1::Plugin),
    V0_2_1(abi::v0_2_1::Plugin),
    V0_2_2(abi::v0_2_2::Plugin),
    V0_2_3(abi::v0_2_3::Plugin),
    V0_2(abi::v0_2::Plugin),
}

/// The `handler` of an instance, whichever its ABI version (the functions are the same).
#[derive(Clone, Copy)]
enum Handler<'a> {
    V0_1(&'a abi::v0_1::exports::magnetar::plugin::handler::Guest),
    V0_2_1(&'a abi::v0_2_1::exports::magnetar::plugin::handler::Guest),
    V0_2_2(&'a abi::v0_2_2::exports::magnetar::plugin::handler::Guest),
    V0_2_3(&'a abi::v0_2_3::exports::magnetar::plugin::handler::Guest),
    V0_2(&'a abi::v0_2::exports::magnetar::plugin::handler::Guest),
}

/// The `events` export (since ABI 0.2.2), of the plugins that have it: the same functions
/// in the bindings of 0.2.2, 0.2.3 and 0.2.4.
#[derive(Clone, Copy)]
enum Events<'a> {
    V0_2_2(&'a abi::v0_2_2::exports::magnetar::plugin::events::Guest),
    V0_2_3(&'a abi::v0_2_3::exports::magnetar::plugin::events::Guest),
    V0_2(&'a abi::v0_2::exports::magnetar::plugin::events::Guest),
}

/// The `events2` export (since ABI 0.2.3), of the plugins that have it.
#[derive(Clone, Copy)]
enum Events2<'a> {
    V0_2_3(&'a abi::v0_2_3::exports::magnetar::plugin::events2::Guest),
    V0_2(&'a abi::v0_2::exports::magnetar::plugin::events2::Guest),
}

/// The `events3` export (ABI 0.2.4), of the plugins that have it.
type Events3<'a> = Option<&'a abi::v0_2::exports::magnetar::plugin::events3::Guest>;

/// 0.2.4's `events` records in the bindings of an older version (the same WIT records).
macro_rules! events_in {
    ($name:ident, $old:path) => {
        mod $name {
            use crate::abi::v0_2::exports::magnetar::plugin::events as new;
            use $old as old;

            pub(super) fn receipts(receipts: &[new::Receipt]) -> Vec<old::Receipt> {
                receipts
                    .iter()
                    .map(|r| old::Receipt {
                        token: r.token,
                        outcome: r.outcome.clone(),
                    })
                    .collect()
            }

            pub(super) fn messages(messages: &[new::Message]) -> Vec<old::Message> {
                messages
                    .iter()
                    .map(|m| old::Message {
                        subscription: m.subscription,
                        delivery_id: m.delivery_id,
                        message_id: m.message_id.clone(),
                        key: m.key.clone(),
                        payload: m.payload.clone(),
                        properties: m.properties.clone(),
                        publish_time_ms: m.publish_time_ms,
                        event_time_ms: m.event_time_ms,
                        redelivery_count: m.redelivery_count,
                    })
                    .collect()
            }
        }
    };
}
events_in!(
    events_v0_2_3,
    crate::abi::v0_2_3::exports::magnetar::plugin::events
);

/// 0.2.4's `events2` records in 0.2.3's bindings (the same WIT records).
mod events2_v0_2_3 {
    use crate::abi::types::OpError;
    use crate::abi::v0_2::exports::magnetar::plugin::events2 as new;
    use crate::abi::v0_2_3::exports::magnetar::plugin::events2 as old;

    pub(super) fn appended(results: &[new::AppendResult]) -> Vec<old::AppendResult> {
        results
            .iter()
            .map(|r| old::AppendResult {
                token: r.token,
                outcome: r
                    .outcome
                    .as_ref()
                    .map_err(Clone::clone)
                    .map(|a| old::Appended {
                        id: a.id.clone(),
                        first_index: a.first_index,
                        broker_time_ms: a.broker_time_ms,
                        duplicate: a.duplicate,
                    }),
            })
            .collect()
    }

    pub(super) fn entries(entries: &[new::Entry]) -> Vec<old::Entry> {
        entries
            .iter()
            .map(|e| old::Entry {
                reader: e.reader,
                delivery_id: e.delivery_id,
                id: e.id.clone(),
                first_index: e.first_index,
                broker_time_ms: e.broker_time_ms,
                publish_time_ms: e.publish_time_ms,
                producer: e.producer.clone(),
                sequence_id: e.sequence_id,
                messages: e
                    .messages
                    .iter()
                    .map(|m| old::EntryMessage {
                        key: m.key.clone(),
                        value: m.value.clone(),
                        properties: m.properties.clone(),
                        event_time_ms: m.event_time_ms,
                    })
                    .collect(),
            })
            .collect()
    }

    fn entry_at(e: &new::EntryAt) -> old::EntryAt {
        old::EntryAt {
            id: e.id.clone(),
            index: e.index,
        }
    }

    pub(super) fn bounds(b: &Result<new::Bounds, OpError>) -> Result<old::Bounds, OpError> {
        b.as_ref().map_err(Clone::clone).map(|b| old::Bounds {
            first: b.first.as_ref().map(entry_at),
            last: b.last.as_ref().map(entry_at),
        })
    }

    pub(super) fn topics(
        t: &Result<Vec<new::TopicInfo>, OpError>,
    ) -> Result<Vec<old::TopicInfo>, OpError> {
        t.as_ref().map_err(Clone::clone).map(|t| {
            t.iter()
                .map(|i| old::TopicInfo {
                    name: i.name.clone(),
                    partitions: i.partitions,
                })
                .collect()
        })
    }
}

events_in!(
    events_v0_2_2,
    crate::abi::v0_2_2::exports::magnetar::plugin::events
);

impl Bindings {
    fn handler(&self) -> Handler<'_> {
        match self {
            Bindings::V0_1(p) => Handler::V0_1(p.magnetar_plugin_handler()),
            Bindings::V0_2_1(p) => Handler::V0_2_1(p.magnetar_plugin_handler()),
            Bindings::V0_2_2(p) => Handler::V0_2_2(p.magnetar_plugin_handler()),
            Bindings::V0_2_3(p) => Handler::V0_2_3(p.magnetar_plugin_handler()),
            Bindings::V0_2(p) => Handler::V0_2(p.magnetar_plugin_handler()),
        }
    }

    fn events(&self) -> Option<Events<'_>> {
        match self {
            Bindings::V0_2(p) => Some(Events::V0_2(p.magnetar_plugin_events())),
            Bindings::V0_2_3(p) => Some(Events::V0_2_3(p.magnetar_plugin_events())),
            Bindings::V0_2_2(p) => Some(Events::V0_2_2(p.magnetar_plugin_events())),
            Bindings::V0_1(_) | Bindings::V0_2_1(_) => None,
        }
    }

    fn events2(&self) -> Option<Events2<'_>> {
        match self {
            Bindings::V0_2(p) => Some(Events2::V0_2(p.magnetar_plugin_events2())),
            Bindings::V0_2_3(p) => Some(Events2::V0_2_3(p.magnetar_plugin_events2())),
            Bindings::V0_1(_) | Bindings::V0_2_1(_) | Bindings::V0_2_2(_) => None,
        }
    }

    fn events3(&self) -> Events3<'_> {
        match self {
            Bindings::V0_2(p) => Some(p.magnetar_plugin_events3()),
            _ => None,
        }
    }
}

/// Calls a `handler` function through the bindings of the instance's ABI version.
macro_rules! on_handler {
    ($h:expr, $call:ident($($arg:expr),* $(,)?)) => {
        match $h {
            Handler::V0_1(h) => h.$call($($arg),*),
            Handler::V0_2_1(h) => h.$call($($arg),*),
            Handler::V0_2_2(h) => h.$call($($arg),*),
            Handler::V0_2_3(h) => h.$call($($arg),*),
            Handler::V0_2(h) => h.$call($($arg),*),
        }
    };
}

/// A live instance.
struct Instance {
    store: Store<HostState>,
    plugin: Bindings,
}

/// One worker thread: one instance of one plugin, and everything it needs to rebuild it.
struct Worker {
    name: Arc<str>,
    engine: Engine,
    ticker: Arc<EpochTicker>,
    linker: Arc<Linker<HostState>>,
    plugin: CompiledPlugin,
    config_text: String,
    limits: InstanceLimits,
    services: Arc<Services>,
    events: mpsc::Sender<Event>,
    runtime: tokio::runtime::Handle,
    instance: Option<Instance>,
}

impl Worker {
    fn instantiate(&self) -> anyhow::Result<Instance> {
        // Instantiation and `init` run plugin code under the deadline too.
        let _call = self.ticker.call();
        let wasi = WasiCtxBuilder::new().inherit_stderr().build();
        let state = HostState::new(
            self.name.clone(),
            wasi,
            ResourceTable::new(),
            StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            self.services.clone(),
            self.events.clone(),
            self.runtime.clone(),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s.limits_mut());
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let CompiledPlugin {
            component,
            abi: version,
        } = &self.plugin;
        let plugin = match version {
            AbiVersion::V0_1 => abi::v0_1::Plugin::instantiate(&mut store, component, &self.linker)
                .map(Bindings::V0_1),
            AbiVersion::V0_2_1 => {
                abi::v0_2_1::Plugin::instantiate(&mut store, component, &self.linker)
                    .map(Bindings::V0_2_1)
            }
            AbiVersion::V0_2_2 => {
                abi::v0_2_2::Plugin::instantiate(&mut store, component, &self.linker)
                    .map(Bindings::V0_2_2)
            }
            AbiVersion::V0_2_3 => {
                abi::v0_2_3::Plugin::instantiate(&mut store, component, &self.linker)
                    .map(Bindings::V0_2_3)
            }
            AbiVersion::V0_2 => abi::v0_2::Plugin::instantiate(&mut store, component, &self.linker)
                .map(Bindings::V0_2),
        }
        .map_err(|e| anyhow!("instantiating plugin {}: {e}", self.name))?;
        store.set_epoch_deadline(self.deadline_ticks());
        let h = plugin.handler();
        on_handler!(h, call_init(&mut store, &self.config_text))
            .map_err(|e| anyhow!("plugin {} trapped in init: {e}", self.name))?
            .map_err(|e| anyhow!("plugin {} refused its config: {e}", self.name))?;
        Ok(Instance { store, plugin })
    }

    fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_millis().max(1) as u64;
        (self.limits.event_deadline.as_millis() as u64)
            .div_ceil(tick)
            .max(1)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let ticks = self.deadline_ticks();
        // Completions the instance's own host calls decided (`HostState::finish_now`) go
        // first, but never more than `READY_STREAK` in a row while the queue has events: a
        // plugin that answers each completion with another cannot starve its connections.
        let mut streak = 0;
        loop {
            let ready = match self.instance.as_mut() {
                Some(i) if streak < READY_STREAK => i.store.data_mut().take_ready(),
                _ => None,
            };
            let event = match ready {
                Some(e) => {
                    streak += 1;
                    e
                }
                None => {
                    streak = 0;
                    match rx.try_recv() {
                        Ok(e) => e,
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            match self
                                .instance
                                .as_mut()
                                .and_then(|i| i.store.data_mut().take_ready())
                            {
                                Some(e) => e,
                                None => match rx.blocking_recv() {
                                    Some(e) => e,
                                    None => break,
                                },
                            }
                        }
                    }
                }
            };
            let conn = event.conn();
            if self.instance.is_none() {
                self.rebuild();
            }
            let Some(instance) = self.instance.as_mut() else {
                // No instance could be built: refuse the connection rather than queue forever.
                if let Event::Open { shared, .. } | Event::Data { shared, .. } = event {
                    shared.close();
                }
                continue;
            };
            let delivered = {
                let _call = self.ticker.call();
                deliver(instance, event, ticks)
            };
            if let Err(trap) = delivered {
                tracing::error!(plugin = %self.name, conn, error = %trap, cause = %trap.root_cause(), "plugin instance trapped; closing its connections and starting a new instance");
                if let Some(mut dead) = self.instance.take() {
                    dead.store.data_mut().close_all();
                }
                self.rebuild();
            }
        }
    }

    fn rebuild(&mut self) {
        match self.instantiate() {
            Ok(instance) => self.instance = Some(instance),
            Err(e) => {
                tracing::error!(plugin = %self.name, error = %e, "could not rebuild the plugin instance")
            }
        }
    }
}

/// Feeds one event to the instance.
fn deliver(instance: &mut Instance, event: Event, ticks: u64) -> wasmtime::Result<()> {
    let Instance { store, plugin } = instance;
    store.set_epoch_deadline(ticks);
    let h = plugin.handler();
    let events = plugin.events();
    let events2 = plugin.events2();
    let events3 = plugin.events3();
    match event {
        Event::Open {
            conn,
            info,
            shared,
            client_cert,
            first,
        } => {
            let peer = info
                .peer_addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip());
            store
                .data_mut()
                .open(conn, shared.clone(), peer, client_cert);
            on_handler!(h, call_on_open(&mut *store, conn, &info))?;
            let Some(data) = first else { return Ok(()) };
            let r = if store.data().knows(conn) {
                on_handler!(h, call_on_data(&mut *store, conn, &data))
            } else {
                Ok(())
            };
            shared.input_consumed(data.len());
            r
        }
        Event::Data { conn, data, shared } => {
            let r = if store.data().knows(conn) {
                on_handler!(h, call_on_data(&mut *store, conn, &data))
            } else {
                Ok(())
            };
            shared.input_consumed(data.len());
            r
        }
        Event::Closed { conn } => {
            if !store.data().knows(conn) {
                return Ok(());
            }
            let r = on_handler!(h, call_on_closed(&mut *store, conn));
            store.data_mut().forget(conn);
            r
        }
        Event::SaslResult {
            conn,
            token,
            outcome,
        } => {
            use abi::types::{SaslOutcome, SaslSuccess};
            let outcome = match outcome {
                Ok(SaslStep::Challenge(c)) => Some(Ok(SaslOutcome::Challenge(c))),
                Ok(SaslStep::Success(p, final_data)) => {
                    store.data_mut().auth_completed(conn, Ok(p)).map(|r| {
                        r.map(|principal| {
                            SaslOutcome::Success(SaslSuccess {
                                principal,
                                final_data,
                            })
                        })
                    })
                }
                Err(e) => store.data().knows(conn).then_some(Err(e)),
            };
            match outcome {
                Some(o) => {
                    on_handler!(h, call_on_sasl_result(&mut *store, conn, token, o.as_ref()))
                }
                None => Ok(()),
            }
        }
        Event::AuthResult {
            conn,
            token,
            outcome,
            busy,
        } => {
            let outcome = store.data_mut().auth_completed(conn, outcome);
            match (outcome, events) {
                // A plugin that knows "busy" hears it as such; older ones get the error.
                (Some(Err(_)), Some(Events::V0_2(ev))) if busy => {
                    ev.call_on_auth_busy(&mut *store, conn, token)
                }
                (Some(Err(_)), Some(Events::V0_2_3(ev))) if busy => {
                    ev.call_on_auth_busy(&mut *store, conn, token)
                }
                (Some(Err(_)), Some(Events::V0_2_2(ev))) if busy => {
                    ev.call_on_auth_busy(&mut *store, conn, token)
                }
                (Some(o), _) => {
                    on_handler!(h, call_on_auth_result(&mut *store, conn, token, o.as_ref()))
                }
                (None, _) => Ok(()),
            }
        }
        Event::PublishResult {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => {
            on_handler!(
                h,
                call_on_publish_result(&mut *store, conn, token, outcome.as_ref().map(|_| ()))
            )
        }
        Event::SubscribeResult {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => {
            on_handler!(
                h,
                call_on_subscribe_result(&mut *store, conn, token, outcome.as_ref().map(|s| *s))
            )
        }
        Event::Delivery { conn, delivery } if store.data().knows(conn) => {
            on_handler!(h, call_on_delivery(&mut *store, conn, &delivery))
        }
        // One call for the lot: the plugin can answer them together.
        Event::Deliveries { conn, deliveries } if store.data().knows(conn) => {
            on_handler!(h, call_on_deliveries(&mut *store, conn, &deliveries))
        }
        Event::PublishResults { conn, results } if store.data().knows(conn) => {
            on_handler!(h, call_on_publish_results(&mut *store, conn, &results))
        }
        Event::Timer { conn, token } if store.data().knows(conn) => {
            on_handler!(h, call_on_timer(&mut *store, conn, token))
        }
        Event::KvResult {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => on_handler!(
            h,
            call_on_kv_result(
                &mut *store,
                conn,
                token,
                outcome.as_ref().map(|v| v.as_deref()),
            )
        ),
        Event::KvScanResult {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => {
            on_handler!(
                h,
                call_on_kv_scan_result(&mut *store, conn, token, outcome.as_deref())
            )
        }
        Event::ClaimResult {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => {
            on_handler!(
                h,
                call_on_claim_result(&mut *store, conn, token, outcome.as_ref().map(|_| ()))
            )
        }
        Event::ClaimLost { conn, key } if store.data().knows(conn) => {
            on_handler!(h, call_on_claim_lost(&mut *store, conn, &key))
        }
        Event::Receipts { conn, receipts } if store.data().knows(conn) => match events {
            Some(Events::V0_2(ev)) => ev.call_on_receipts(&mut *store, conn, &receipts),
            Some(Events::V0_2_3(ev)) => {
                ev.call_on_receipts(&mut *store, conn, &events_v0_2_3::receipts(&receipts))
            }
            Some(Events::V0_2_2(ev)) => {
                ev.call_on_receipts(&mut *store, conn, &events_v0_2_2::receipts(&receipts))
            }
            None => Ok(()),
        },
        Event::Messages { conn, messages } if store.data().knows(conn) => match events {
            Some(Events::V0_2(ev)) => ev.call_on_messages(&mut *store, conn, &messages),
            Some(Events::V0_2_3(ev)) => {
                ev.call_on_messages(&mut *store, conn, &events_v0_2_3::messages(&messages))
            }
            Some(Events::V0_2_2(ev)) => {
                ev.call_on_messages(&mut *store, conn, &events_v0_2_2::messages(&messages))
            }
            None => Ok(()),
        },
        Event::Position {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => {
            let outcome = outcome.as_ref().map(|v| v.as_deref());
            match events {
                Some(Events::V0_2(ev)) => ev.call_on_position(&mut *store, conn, token, outcome),
                Some(Events::V0_2_3(ev)) => ev.call_on_position(&mut *store, conn, token, outcome),
                Some(Events::V0_2_2(ev)) => ev.call_on_position(&mut *store, conn, token, outcome),
                None => Ok(()),
            }
        }
        Event::Appended { conn, results } if store.data().knows(conn) => match events2 {
            Some(Events2::V0_2(ev)) => ev.call_on_appended(&mut *store, conn, &results),
            Some(Events2::V0_2_3(ev)) => {
                ev.call_on_appended(&mut *store, conn, &events2_v0_2_3::appended(&results))
            }
            None => Ok(()),
        },
        Event::Entries { conn, entries } if store.data().knows(conn) => match events2 {
            Some(Events2::V0_2(ev)) => ev.call_on_entries(&mut *store, conn, &entries),
            Some(Events2::V0_2_3(ev)) => {
                ev.call_on_entries(&mut *store, conn, &events2_v0_2_3::entries(&entries))
            }
            None => Ok(()),
        },
        Event::Bounds {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => match events2 {
            Some(Events2::V0_2(ev)) => {
                ev.call_on_bounds(&mut *store, conn, token, outcome.as_ref())
            }
            Some(Events2::V0_2_3(ev)) => {
                let outcome = events2_v0_2_3::bounds(&outcome);
                ev.call_on_bounds(&mut *store, conn, token, outcome.as_ref())
            }
            None => Ok(()),
        },
        Event::TopicsResult {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => match events2 {
            Some(Events2::V0_2(ev)) => {
                ev.call_on_topics_result(&mut *store, conn, token, outcome.as_deref())
            }
            Some(Events2::V0_2_3(ev)) => {
                let outcome = events2_v0_2_3::topics(&outcome);
                ev.call_on_topics_result(&mut *store, conn, token, outcome.as_deref())
            }
            None => Ok(()),
        },
        Event::HomePost {
            home,
            domain,
            shard,
            post_id,
            namespace,
            payload,
        } => match events3 {
            Some(ev) => {
                if !store.data().knows(home) {
                    store.data_mut().open_home(home);
                }
                ev.call_on_home_post(
                    &mut *store,
                    home,
                    &domain,
                    shard,
                    post_id,
                    &namespace,
                    &payload,
                )
            }
            None => {
                store.data_mut().refuse_post(home, post_id);
                Ok(())
            }
        },
        Event::HomeReply {
            conn,
            token,
            outcome,
        } if store.data().knows(conn) => match events3 {
            Some(ev) => ev.call_on_home_reply(&mut *store, conn, token, outcome.as_deref()),
            None => Ok(()),
        },
        // Completions for connections that are gone.
        _ => Ok(()),
    }
}
