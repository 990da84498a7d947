//! Connect storms: a fleet logging in at once, Magnetar beside Mosquitto (with a password
//! file) in the same run. Each device is one MQTT 3.1.1 connection (CONNECT, CONNACK) held
//! open until the whole fleet is in; the figure is connections per second, with
//! [`IN_FLIGHT`] logins in flight at once (devices do not all SYN in the same millisecond).
//!
//! Devices have their own users (`dev-<i>`), as IoT fleets provision them. All users share
//! one password and so one precomputed argon2 PHC string in Magnetar's config (loading
//! 10,000 hashes one by one would take minutes); each user still has its own entry in the
//! login cache, so a cold storm runs argon2 once per device. Rows:
//! - anonymous;
//! - password, cold: the first login of each user (argon2 per device; Mosquitto checks its
//!   PBKDF2-SHA512 hashes); only for the smallest fleet, as it costs ~20 ms of CPU per device;
//! - password: the reconnect storm (the same fleet again);
//! - token: a JWT as the password (Magnetar only);
//! - TLS + password: the reconnect storm over TLS;
//! - after a restart: the gateway stopped (SIGTERM) and started again, and the time until the
//!   whole password fleet is back, counted from the start of the new process.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use crate::client::{connect_packet, handshake, open_many};
use crate::{free_port, wait_listening, Proc, Tls};

/// Logins in flight at once.
const IN_FLIGHT: usize = 200;
/// The password of every device.
const PASSWORD: &str = "device-secret";

/// A held connection, plain or TLS.
enum Held {
    Plain(#[allow(dead_code)] tokio::net::TcpStream),
    Tls(#[allow(dead_code)] Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// How the fleet logs in.
#[derive(Clone)]
pub enum Kind {
    Anonymous,
    Password,
    Token(Arc<Vec<String>>),
    TlsPassword(TlsConnector),
}

async fn open(addr: SocketAddr, kind: Kind, i: usize, tag: String) -> Result<Held, String> {
    let id = format!("{tag}-{i}");
    let user = format!("dev-{i}");
    let token;
    let login = match &kind {
        Kind::Anonymous => None,
        Kind::Password | Kind::TlsPassword(_) => Some((user.as_str(), PASSWORD)),
        Kind::Token(tokens) => {
            token = tokens
                .get(i % tokens.len().max(1))
                .cloned()
                .unwrap_or_default();
            Some(("token", token.as_str()))
        }
    };
    let packet = connect_packet(&id, true, 60, login);
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    match kind {
        Kind::TlsPassword(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            handshake(&mut tls, &packet).await?;
            Ok(Held::Tls(Box::new(tls)))
        }
        _ => {
            handshake(&mut tcp, &packet).await?;
            Ok(Held::Plain(tcp))
        }
    }
}

/// Logs `n` devices in; returns the connections per second (counted from `since`), how many
/// were refused, and the held connections.
async fn storm(
    addr: SocketAddr,
    kind: &Kind,
    n: usize,
    tag: &str,
    since: Instant,
) -> (f64, usize, Vec<Held>) {
    let (opened, refused, first_error) = open_many(n, IN_FLIGHT, Duration::from_secs(60), |i| {
        open(addr, kind.clone(), i, tag.to_string())
    })
    .await;
    let held: Vec<Held> = opened.into_iter().map(|(_, h)| h).collect();
    if let Some(e) = first_error {
        println!("  ({tag}: {refused} of {n} failed, e.g. {e})");
    }
    let rate = held.len() as f64 / since.elapsed().as_secs_f64();
    (rate, refused, held)
}

/// Descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One storm against process `pid`, measured: the connections are closed, and the server has
/// closed its side (its descriptors back near `before`), before it returns, so that the next
/// storm does not run into the descriptor limit.
async fn measure(pid: u32, addr: SocketAddr, kind: &Kind, n: usize, tag: &str) -> f64 {
    let before = open_fds(pid);
    let (rate, _, held) = storm(addr, kind, n, tag, Instant::now()).await;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_fds(pid) > before + 64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rate
}

/// The gateway of the storm part: `users` devices with passwords, plain and TLS listeners.
struct Gateway {
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    proc: Option<Proc>,
    mqtt: SocketAddr,
    mqtts: SocketAddr,
}

impl Gateway {
    fn start(dir: &Path, tls: &Tls, users: usize) -> Gateway {
        let (broker, mqtt, mqtts) = (free_port(), free_port(), free_port());
        let hash = hash_password();
        let mut config = format!(
            "[broker]\nlisten = \"{broker}\"\n\n[admin]\nlisten = \"{}\"\n\n[tls]\ncert = {:?}\nkey = {:?}\n\n\
             [[listeners]]\nname = \"mqtt\"\nbind = \"{mqtt}\"\nplugin = \"mqtt\"\n\n\
             [[listeners]]\nname = \"mqtts\"\nbind = \"{mqtts}\"\nplugin = \"mqtt\"\ntls = true\n\n\
             [auth]\nallow_anonymous = true\n",
            free_port(),
            tls.cert,
            tls.key
        );
        for i in 0..users {
            config.push_str(&format!(
                "\n[[auth.users]]\nname = \"dev-{i}\"\npassword_hash = \"{hash}\"\ntenant = \"public\"\n"
            ));
        }
        let path = dir.join("storm-magnetar.toml");
        std::fs::write(&path, config).expect("config");
        let mut g = Gateway {
            dir: dir.to_path_buf(),
            config: path,
            proc: None,
            mqtt,
            mqtts,
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let bin = std::env::var("BENCH_MAGNETAR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_magnetar").to_string());
        let child = Command::new(bin)
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.dir.join("storm-data"))
            .env(
                "RUST_LOG",
                if std::env::var_os("BENCH_MAGNETAR_LOG").is_some() {
                    "info"
                } else {
                    "warn"
                },
            )
            .stdout(Stdio::null())
            // `BENCH_MAGNETAR_LOG`: the storm gateway's log goes to `<file>.storm`.
            .stderr(match std::env::var_os("BENCH_MAGNETAR_LOG") {
                Some(path) => {
                    let mut path = std::path::PathBuf::from(path).into_os_string();
                    path.push(".storm");
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_or(Stdio::null(), Stdio::from)
                }
                None => Stdio::null(),
            })
            .spawn()
            .expect("spawning magnetar");
        self.proc = Some(Proc(child));
        wait_listening(self.mqtt);
        wait_listening(self.mqtts);
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.0.id())
    }

    /// SIGTERM and wait: the gateway saves its login cache on the way out.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &p.0.id().to_string()])
                .status();
            let _ = p.0.wait();
        }
    }

    fn tokens(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let out = Command::new(env!("CARGO_BIN_EXE_magnetar"))
                    .arg("token")
                    .arg("--config")
                    .arg(&self.config)
                    .arg("--data-dir")
                    .arg(self.dir.join("storm-data"))
                    .arg("--user")
                    .arg(format!("dev-{i}"))
                    .output()
                    .expect("magnetar token");
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            })
            .collect()
    }
}

/// The PHC string of [`PASSWORD`], from `magnetar hash-password`.
fn hash_password() -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_magnetar"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("magnetar hash-password");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = writeln!(stdin, "{PASSWORD}");
    }
    let out = child.wait_with_output().expect("hash-password output");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Mosquitto with a password file of `users` devices; anonymous logins on a listener of
/// their own (`per_listener_settings`).
struct Mosquitto {
    proc: Proc,
    anonymous: SocketAddr,
    mqtt: SocketAddr,
    mqtts: SocketAddr,
}

fn start_mosquitto(dir: &Path, tls: &Tls, users: usize) -> Option<Mosquitto> {
    let passwd = dir.join("storm-passwd");
    let plain: String = (0..users)
        .map(|i| format!("dev-{i}:{PASSWORD}\n"))
        .collect();
    std::fs::write(&passwd, plain).ok()?;
    // Hashes the plain-text file in place (PBKDF2-SHA512, Mosquitto 2.0's default).
    let hashed = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(&passwd)
        .status()
        .ok()?;
    if !hashed.success() {
        return None;
    }
    let (anonymous, mqtt, mqtts) = (free_port(), free_port(), free_port());
    let text = format!(
        "user root\nper_listener_settings true\n\
         listener {} 127.0.0.1\nallow_anonymous true\n\
         listener {} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
         listener {} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncertfile {}\nkeyfile {}\n",
        anonymous.port(),
        mqtt.port(),
        passwd.display(),
        mqtts.port(),
        passwd.display(),
        tls.cert.display(),
        tls.key.display()
    );
    let proc = crate::spawn_mosquitto(
        &dir.join("storm-mosquitto.conf"),
        &text,
        &[anonymous, mqtt, mqtts],
    )?;
    Some(Mosquitto {
        proc,
        anonymous,
        mqtt,
        mqtts,
    })
}

/// The storm table for each fleet size in `sizes`, capped by the descriptor limit.
pub fn table(rt: &tokio::runtime::Runtime, dir: &Path, tls: &Tls, sizes: &[usize], nofile: u64) {
    let cap = (nofile as usize).saturating_sub(1024);
    let largest = sizes.iter().copied().max().unwrap_or(0).min(cap);
    println!("\nConnect storms ({IN_FLIGHT} logins in flight; devices dev-<i> with their own users; connections per second):\n");
    println!("| fleet | login | magnetar conn/s | mosquitto conn/s | magnetar / mosquitto |");
    println!("|---|---|---|---|---|");
    let mut gw = Gateway::start(dir, tls, largest);
    let mosquitto = start_mosquitto(dir, tls, largest);
    let tls_connector = crate::idle::connector(&tls.der);
    let tokens = Kind::Token(Arc::new(gw.tokens(100)));
    let row = |n: usize, what: &str, m: f64, q: Option<f64>| {
        let (q_text, ratio) = match q {
            Some(q) => (format!("{q:.0}"), format!("{:.2}x", m / q.max(1e-9))),
            None => ("–".into(), "–".into()),
        };
        println!("| {n} | {what} | {m:.0} | {q_text} | {ratio} |");
    };
    let smallest = sizes.iter().copied().min().unwrap_or(0);
    for &asked in sizes {
        let n = asked.min(cap);
        if n < asked {
            println!("(fleet {asked} asked, RLIMIT_NOFILE {nofile} allows {n})");
        }
        let tag = format!("s{n}");
        rt.block_on(async {
            let gpid = gw.pid();
            let qpid = mosquitto.as_ref().map_or(0, |m| m.proc.0.id());
            let q = |addr: Option<SocketAddr>, kind: Kind, t: String| async move {
                match addr {
                    Some(a) => Some(measure(qpid, a, &kind, n, &t).await),
                    None => None,
                }
            };
            let m = measure(gpid, gw.mqtt, &Kind::Anonymous, n, &format!("{tag}-anon")).await;
            let mq = q(
                mosquitto.as_ref().map(|m| m.anonymous),
                Kind::Anonymous,
                format!("{tag}-qanon"),
            )
            .await;
            row(n, "anonymous", m, mq);
            if n == smallest {
                let m = measure(gpid, gw.mqtt, &Kind::Password, n, &format!("{tag}-cold")).await;
                let mq = q(
                    mosquitto.as_ref().map(|m| m.mqtt),
                    Kind::Password,
                    format!("{tag}-qcold"),
                )
                .await;
                row(n, "password, cold (first login of each user)", m, mq);
            } else {
                // Not timed: the first login of each user, so that the next storm is a
                // reconnect storm.
                measure(gpid, gw.mqtt, &Kind::Password, n, &format!("{tag}-warm")).await;
            }
            let m = measure(gpid, gw.mqtt, &Kind::Password, n, &format!("{tag}-pw")).await;
            let mq = q(
                mosquitto.as_ref().map(|m| m.mqtt),
                Kind::Password,
                format!("{tag}-qpw"),
            )
            .await;
            row(n, "password (reconnect)", m, mq);
            let m = measure(gpid, gw.mqtt, &tokens, n, &format!("{tag}-tok")).await;
            let mq = q(
                mosquitto.as_ref().map(|m| m.mqtt),
                Kind::Password,
                format!("{tag}-qtok"),
            )
            .await;
            row(n, "token (mosquitto: password)", m, mq);
            let kind = Kind::TlsPassword(tls_connector.clone());
            let m = measure(gpid, gw.mqtts, &kind, n, &format!("{tag}-tls")).await;
            let mq = q(
                mosquitto.as_ref().map(|m| m.mqtts),
                kind.clone(),
                format!("{tag}-qtls"),
            )
            .await;
            row(n, "TLS + password (reconnect)", m, mq);
        });
    }
    // The restart: every device of the largest fleet comes back to a new process.
    gw.stop();
    let since = Instant::now();
    gw.spawn();
    let (_, refused, held) =
        rt.block_on(storm(gw.mqtt, &Kind::Password, largest, "restart", since));
    let seconds = since.elapsed().as_secs_f64();
    drop(held);
    println!(
        "\nAfter a restart: {largest} password devices back in {seconds:.1} s from the new process's start ({refused} refused)."
    );
    gw.stop();
}
