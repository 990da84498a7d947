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
//!
//! Beside each rate, the server's CPU time per connection (µs, from `/proc/<pid>/stat`),
//! which a loaded machine disturbs less than the rate. `BENCH_STORM_ROUNDS` (default 1)
//! measures each row that many times, the two servers alternating, and reports the median
//! round; `BENCH_STORM_ROWS` (comma-separated `anonymous`, `password`, `token`, `tls`,
//! `restart`; default all) picks rows, e.g. for a profile (the gateway's pid is printed; attach
//! `perf record -p <pid>`). Devices connect from 127.0.0.1-4 in turn, so that long runs do
//! not run out of client ports.
//!
//! `BENCH_STORM_HASHES=mosquitto`: the gateway's users are Mosquitto's own password file,
//! imported with `magnetar import-mosquitto-passwd` (each user its PBKDF2-SHA512 hash, as
//! Mosquitto checks it), instead of argon2: the cold row then compares the two servers with
//! the same stored hashes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use crate::client::{connect_packet, handshake, open_many};
use crate::{free_ports, wait_listening, Proc, Tls};

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
    let mut tcp = connect_from(addr, i).await.map_err(|e| e.to_string())?;
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

/// Connects to `addr` from one of 127.0.0.1-4 (by `i`), when `addr` is on loopback.
async fn connect_from(addr: SocketAddr, i: usize) -> std::io::Result<tokio::net::TcpStream> {
    if !addr.ip().is_loopback() || !addr.is_ipv4() {
        return tokio::net::TcpStream::connect(addr).await;
    }
    let socket = tokio::net::TcpSocket::new_v4()?;
    let source = std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES) as u8);
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(addr).await
}

/// Loopback addresses the devices connect from.
const SOURCES: usize = 4;

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

/// One storm against process `pid`, measured: connections per second, and the server's CPU
/// time per connection in µs (accept to CONNACK, and the close). The connections are closed,
/// and the server has closed its side (its descriptors back near `before`), before it
/// returns, so that the next storm does not run into the descriptor limit.
async fn measure(pid: u32, addr: SocketAddr, kind: &Kind, n: usize, tag: &str) -> Rate {
    let before = open_fds(pid);
    let cpu = crate::cpu_seconds(pid);
    let (rate, _, held) = storm(addr, kind, n, tag, Instant::now()).await;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_fds(pid) > before + 64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu_us = (crate::cpu_seconds(pid) - cpu) * 1e6 / n.max(1) as f64;
    Rate { rate, cpu_us }
}

/// One storm's figures.
#[derive(Clone, Copy)]
struct Rate {
    /// Connections per second.
    rate: f64,
    /// Server CPU per connection, µs.
    cpu_us: f64,
}

/// The round with the median rate.
fn median(mut rounds: Vec<Rate>) -> Rate {
    rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    rounds.get(rounds.len() / 2).copied().unwrap_or(Rate {
        rate: 0.0,
        cpu_us: 0.0,
    })
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
    /// `imported`: the users as `magnetar import-mosquitto-passwd` printed them (else
    /// `users` devices with one argon2 hash).
    fn start(dir: &Path, tls: &Tls, users: usize, imported: Option<String>) -> Gateway {
        let [broker, mqtt, mqtts, admin] = free_ports();
        let mut config = format!(
            "[broker]\nlisten = \"{broker}\"\n\n[admin]\nlisten = \"{}\"\n\n[tls]\ncert = {:?}\nkey = {:?}\n\n\
             [[listeners]]\nname = \"mqtt\"\nbind = \"{mqtt}\"\nplugin = \"mqtt\"\n\n\
             [[listeners]]\nname = \"mqtts\"\nbind = \"{mqtts}\"\nplugin = \"mqtt\"\ntls = true\n\n\
             [auth]\nallow_anonymous = true\n",
            admin,
            tls.cert,
            tls.key
        );
        match imported {
            // `[auth]` is the last table above: the imported `[[auth.users]]` join it.
            Some(users) => config.push_str(users.trim_start_matches("[auth]\n")),
            None => {
                let hash = hash_password();
                for i in 0..users {
                    config.push_str(&format!(
                        "\n[[auth.users]]\nname = \"dev-{i}\"\npassword_hash = \"{hash}\"\ntenant = \"public\"\n"
                    ));
                }
            }
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
            // `BENCH_MAGNETAR_ENV` (`K=V K=V`), as for the other parts' gateway.
            .envs(
                std::env::var("BENCH_MAGNETAR_ENV")
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('=')),
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

/// A Mosquitto password file of `users` devices (PBKDF2-SHA512, Mosquitto 2.0's default).
fn write_passwd(dir: &Path, users: usize) -> Option<std::path::PathBuf> {
    let passwd = dir.join("storm-passwd");
    let plain: String = (0..users)
        .map(|i| format!("dev-{i}:{PASSWORD}\n"))
        .collect();
    std::fs::write(&passwd, plain).ok()?;
    // Hashes the plain-text file in place.
    let hashed = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(&passwd)
        .status()
        .ok()?;
    hashed.success().then_some(passwd)
}

/// The users of a Mosquitto password file as `[[auth.users]]`, from
/// `magnetar import-mosquitto-passwd`.
fn import_passwd(passwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_magnetar"))
        .arg("import-mosquitto-passwd")
        .arg(passwd)
        .output()
        .expect("magnetar import-mosquitto-passwd");
    assert!(out.status.success(), "import-mosquitto-passwd failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_mosquitto(tls: &Tls, passwd: Option<&Path>) -> Option<Mosquitto> {
    let passwd = passwd?;
    let dir = passwd.parent()?;
    let [anonymous, mqtt, mqtts] = free_ports();
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

/// Measures one row `rounds` times, Magnetar (`m`) and Mosquitto (`q`, when it has the
/// row) alternating: the median round of each.
async fn pair(
    m: (u32, SocketAddr, &Kind),
    q: Option<(u32, SocketAddr, &Kind)>,
    n: usize,
    tag: &str,
    rounds: usize,
) -> (Rate, Option<Rate>) {
    let (mut ms, mut qs) = (Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        ms.push(measure(m.0, m.1, m.2, n, &format!("{tag}-r{r}")).await);
        if let Some((pid, addr, kind)) = q {
            qs.push(measure(pid, addr, kind, n, &format!("{tag}-q-r{r}")).await);
        }
    }
    (median(ms), q.map(|_| median(qs)))
}

/// The storm table for each fleet size in `sizes`, capped by the descriptor limit.
pub fn table(rt: &tokio::runtime::Runtime, dir: &Path, tls: &Tls, sizes: &[usize], nofile: u64) {
    let cap = (nofile as usize).saturating_sub(1024);
    let largest = sizes.iter().copied().max().unwrap_or(0).min(cap);
    let rounds = crate::env_usize("BENCH_STORM_ROUNDS", 1).max(1);
    let rows = std::env::var("BENCH_STORM_ROWS").unwrap_or_default();
    let wanted = |row: &str| rows.is_empty() || rows.split(',').any(|r| r.trim() == row);
    println!("\nConnect storms ({IN_FLIGHT} logins in flight; devices dev-<i> with their own users; connections per second; server CPU µs per connection; median of {rounds} round(s)):\n");
    println!("| fleet | login | magnetar conn/s | mosquitto conn/s | magnetar / mosquitto | magnetar CPU µs/conn | mosquitto CPU µs/conn |");
    println!("|---|---|---|---|---|---|---|");
    let passwd = write_passwd(dir, largest);
    let mosquitto_hashes = std::env::var("BENCH_STORM_HASHES").is_ok_and(|h| h == "mosquitto");
    let imported = passwd
        .as_deref()
        .filter(|_| mosquitto_hashes)
        .map(import_passwd);
    if mosquitto_hashes {
        println!(
            "(the gateway's users: Mosquitto's password file, imported: {} users)",
            imported
                .as_deref()
                .map_or(0, |t| t.matches("[[auth.users]]").count())
        );
    }
    let mut gw = Gateway::start(dir, tls, largest, imported);
    println!("(storm gateway pid {})", gw.pid());
    let mosquitto = start_mosquitto(tls, passwd.as_deref());
    let tls_connector = crate::idle::connector(&tls.der);
    let tokens = Kind::Token(Arc::new(gw.tokens(100)));
    let row = |n: usize, what: &str, (m, q): (Rate, Option<Rate>)| {
        let (q_text, ratio, q_cpu) = match q {
            Some(q) => (
                format!("{:.0}", q.rate),
                format!("{:.2}x", m.rate / q.rate.max(1e-9)),
                format!("{:.0}", q.cpu_us),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {n} | {what} | {:.0} | {q_text} | {ratio} | {:.0} | {q_cpu} |",
            m.rate, m.cpu_us
        );
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
            let anonymous = Kind::Anonymous;
            let password = Kind::Password;
            let tls_kind = Kind::TlsPassword(tls_connector.clone());
            let q = |addr: fn(&Mosquitto) -> SocketAddr, kind| {
                mosquitto.as_ref().map(|m| (qpid, addr(m), kind))
            };
            if wanted("anonymous") {
                let r = pair(
                    (gpid, gw.mqtt, &anonymous),
                    q(|m| m.anonymous, &anonymous),
                    n,
                    &format!("{tag}-anon"),
                    rounds,
                )
                .await;
                row(n, "anonymous", r);
            }
            if wanted("password") && n == smallest {
                // Once: a second round would find the cache warm.
                let r = pair(
                    (gpid, gw.mqtt, &password),
                    q(|m| m.mqtt, &password),
                    n,
                    &format!("{tag}-cold"),
                    1,
                )
                .await;
                row(n, "password, cold (first login of each user)", r);
            } else if wanted("password") || wanted("tls") {
                // Not timed: the first login of each user, so that the next storm is a
                // reconnect storm.
                measure(gpid, gw.mqtt, &password, n, &format!("{tag}-warm")).await;
            }
            if wanted("password") {
                let r = pair(
                    (gpid, gw.mqtt, &password),
                    q(|m| m.mqtt, &password),
                    n,
                    &format!("{tag}-pw"),
                    rounds,
                )
                .await;
                row(n, "password (reconnect)", r);
            }
            if wanted("token") {
                let r = pair(
                    (gpid, gw.mqtt, &tokens),
                    q(|m| m.mqtt, &password),
                    n,
                    &format!("{tag}-tok"),
                    rounds,
                )
                .await;
                row(n, "token (mosquitto: password)", r);
            }
            if wanted("tls") {
                let r = pair(
                    (gpid, gw.mqtts, &tls_kind),
                    q(|m| m.mqtts, &tls_kind),
                    n,
                    &format!("{tag}-tls"),
                    rounds,
                )
                .await;
                row(n, "TLS + password (reconnect)", r);
            }
        });
    }
    if !wanted("restart") && !rows.is_empty() {
        gw.stop();
        return;
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
