//! Starts the real `magnetar` binary on free loopback ports with its own data directory, and
//! stops it (or kills it with SIGKILL) when asked or when the test ends, even on failure.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running gateway process and its ports.
pub struct Gateway {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// The Pulsar-protocol broker it uses: its embedded one, or [`Options::backend`]'s.
    pub broker: SocketAddr,
    pub mqtt: SocketAddr,
    pub mqtts: SocketAddr,
    pub echo: Option<SocketAddr>,
    /// The web port (Pulsar's admin REST API under `/admin/v2/`), with [`Options::web`].
    pub web: Option<SocketAddr>,
    /// The admin HTTP API; its token is [`ADMIN_TOKEN`].
    pub admin: SocketAddr,
}

/// The admin API token of test gateways.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Options of a test gateway.
#[derive(Default)]
pub struct Options {
    /// Also serve the example echo plugin (from the Wasm build directory) on a listener.
    pub echo_plugin: bool,
    /// With `echo_plugin`: serve this component as the echo plugin instead (a fixture).
    pub echo_wasm: Option<PathBuf>,
    /// Extra TOML appended to the generated config.
    pub extra: String,
    /// No embedded broker: use this one (a first gateway's), with this token (its
    /// superuser role's), as a second gateway of a deployment would.
    pub backend: Option<(SocketAddr, String)>,
    /// Also serve a web port (the `pulsar-ws` plugin with `web = true`): the backend's
    /// topic stats for a test's failure message.
    pub web: bool,
}

impl Gateway {
    pub fn start(opts: Options) -> Gateway {
        let mut gw = Gateway::configure(opts);
        gw.spawn();
        gw
    }

    /// Starts a gateway that must refuse to start: waits for the process to exit with an
    /// error, and returns its log.
    pub fn start_refused(opts: Options) -> String {
        let mut gw = Gateway::configure(opts);
        gw.launch();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = gw.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                assert!(
                    !status.success(),
                    "magnetar exited successfully:\n{}",
                    gw.log()
                );
                gw.child = None;
                return gw.log();
            }
            assert!(
                Instant::now() < deadline,
                "magnetar did not exit:\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes the config of a gateway on free ports, without starting it.
    fn configure(opts: Options) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        // All ports are held until all are chosen, so one gateway never gets a port twice.
        let held: Vec<TcpListener> = (0..6).map(|_| listener_below_ephemeral()).collect();
        let ports: Vec<SocketAddr> = held
            .iter()
            .map(|l| l.local_addr().expect("local addr"))
            .collect();
        drop(held);
        let (mut broker, mqtt, mqtts, admin) = (ports[0], ports[1], ports[2], ports[3]);
        let echo = opts.echo_plugin.then_some(ports[4]);
        let web = opts.web.then_some(ports[5]);
        let mut config = match &opts.backend {
            None => format!("[broker]\nlisten = \"{broker}\"\n\n"),
            Some((remote, token)) => {
                broker = *remote;
                format!("[broker]\nembedded = false\n\n[backend]\nservice_url = \"pulsar://{remote}\"\ntoken = \"{token}\"\n\n")
            }
        };
        config.push_str(&format!(
            "[admin]\nlisten = \"{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[plugins]\nworkers = 2\nevent_deadline_ms = 200\nmemory_limit_mib = 32\n"
        ));
        if opts.echo_plugin {
            let wasm = opts
                .echo_wasm
                .clone()
                .unwrap_or_else(|| Path::new(env!("MAGNETAR_WASM_DIR")).join("echo_plugin.wasm"));
            config.push_str(&format!("dir = {:?}\n", plugin_dir(dir.path(), &wasm)));
        }
        config.push_str(&format!(
            "\n[[listeners]]\nname = \"mqtt\"\nbind = \"{mqtt}\"\nplugin = \"mqtt\"\n\n[[listeners]]\nname = \"mqtt-tls\"\nbind = \"{mqtts}\"\nplugin = \"mqtt\"\ntls = true\n"
        ));
        if let Some(echo) = echo {
            config.push_str(&format!(
                "\n[[listeners]]\nname = \"echo\"\nbind = \"{echo}\"\nplugin = \"echo_plugin\"\n"
            ));
        }
        if let Some(web) = web {
            config.push_str(&format!(
                "\n[[listeners]]\nname = \"web\"\nbind = \"{web}\"\nplugin = \"pulsar-ws\"\nweb = true\n"
            ));
        }
        config.push_str(&opts.extra);
        let config_path = dir.path().join("magnetar.toml");
        std::fs::write(&config_path, config).expect("writing config");
        Gateway {
            child: None,
            dir,
            config_path,
            broker,
            mqtt,
            mqtts,
            echo,
            web,
            admin,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the process (again) on the same ports and data, and waits until it serves.
    pub fn spawn(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ports = vec![self.mqtt, self.mqtts, self.broker, self.admin];
        ports.extend(self.echo);
        ports.extend(self.web);
        for addr in ports {
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!(
                        "magnetar exited with {status} during start:\n{}",
                        self.log()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "magnetar did not listen on {addr}:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The start of `spawn`, without the wait: a fresh process, its log appended to the file.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("magnetar.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_magnetar"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning magnetar");
        self.child = Some(child);
    }

    /// SIGTERM, then waits for the process to exit: the gateway's shutdown code runs.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("magnetar.log")).unwrap_or_default()
    }

    /// The CA that signed the generated server certificate.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.data_dir().join("tls/ca.pem")).expect("generated ca.pem")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "--- magnetar log ---\n{}", self.log());
        }
        self.kill9();
    }
}

/// A directory holding the echo plugin `wasm`, as an operator's plugin directory would.
fn plugin_dir(base: &Path, wasm: &Path) -> PathBuf {
    let dir = base.join("plugins");
    std::fs::create_dir_all(&dir).expect("plugin dir");
    std::fs::copy(wasm, dir.join("echo_plugin.wasm"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", wasm.display()));
    dir
}

/// A plugin kept in `tests/fixtures` (e.g. one built against an older ABI).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A listening socket on a free port below the kernel's ephemeral range (32768 and up on
/// Linux). A port the kernel hands out for `:0` comes from the range client sockets use: the
/// thousands of connections a storm or fleet test opens could take it between its choice and
/// the gateway's bind (seen: "listener mqtt-tls: binding 127.0.0.1:36827").
fn listener_below_ephemeral() -> TcpListener {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Test binaries running at once (other crates' suites) start at different places.
    let base = 20_000 + (std::process::id() % 500) * 24;
    for _ in 0..12_000 {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return l;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// A line client of the example echo plugin (`examples/echo-plugin`): one command per line,
/// one answer per line.
pub struct Line {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Line {
    /// Connects; reads give up after `patience` without an answer.
    pub fn connect_with(addr: SocketAddr, patience: Duration) -> Line {
        let s = TcpStream::connect(addr).expect("connecting to the echo listener");
        s.set_read_timeout(Some(patience)).expect("timeout");
        Line {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    /// Connects, with 10 s of patience per answer.
    pub fn connect(addr: SocketAddr) -> Line {
        Line::connect_with(addr, Duration::from_secs(10))
    }

    pub fn say(&mut self, text: &str) {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .expect("write");
    }

    /// The next answer as sent (its newline kept); `None` at the end or after the patience.
    pub fn hear(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    /// Says `text`, returns the answer as [`Line::hear`] does.
    pub fn echo(&mut self, text: &str) -> Option<String> {
        self.say(text);
        self.hear()
    }

    /// The next answer, trimmed; it must come.
    pub fn answer(&mut self) -> String {
        self.hear()
            .expect("an answer in time")
            .trim_end()
            .to_string()
    }

    /// Says `text`, returns [`Line::answer`].
    pub fn ask(&mut self, text: &str) -> String {
        self.say(text);
        self.answer()
    }
}
