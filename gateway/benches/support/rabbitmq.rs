//! A private RabbitMQ node, the reference AMQP 0-9-1 server, for the AMQP bench
//! (`benches/amqp.rs`) and the Rust AMQP tests (`tests/e2e/amqp.rs`), each through `#[path]`;
//! `tests/python/amqp_servers.py` starts it the same way for the Python tests.
//!
//! Debian's `/usr/lib/rabbitmq/bin/rabbitmq-server` run directly as the current user (the
//! `/usr/sbin` wrapper would switch to the `rabbitmq` user and the system node's
//! directories), everything in a directory of its own: its node name, AMQP port,
//! distribution port, an epmd of its own on a free loopback port (a system epmd is neither
//! used nor disturbed), no plugins, `guest`/`guest` from loopback only (RabbitMQ's default).
//! The node runs in a process group of its own, killed with its epmd when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server script (`RABBITMQ_SERVER` overrides it).
pub fn rabbitmq_server() -> String {
    std::env::var("RABBITMQ_SERVER")
        .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".into())
}

/// A running node; stopped (its whole process group, and its epmd) when dropped.
pub struct RabbitMq {
    pub amqp: SocketAddr,
    child: Child,
    epmd_port: u16,
}

/// `n` free loopback ports below the kernel's ephemeral range (16000-19999), all held until
/// all are chosen: a port the kernel hands out for outgoing connections may be taken again
/// before the node binds it, and the bench and the tests open many (RabbitMQ then fails to
/// boot with `dist_port_already_used`).
fn free_ports<const N: usize>() -> [SocketAddr; N] {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = (std::process::id() % 400) * 10;
    let mut held = Vec::with_capacity(N);
    for _ in 0..4000 {
        if held.len() == N {
            break;
        }
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 16_000 + (base + offset) % 4000;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            held.push(l);
        }
    }
    assert_eq!(held.len(), N, "no free ports between 16000 and 20000");
    std::array::from_fn(|i| held[i].local_addr().expect("local addr"))
}

impl RabbitMq {
    /// Starts a node in `dir` and waits (at most 60 s) until it takes AMQP connections;
    /// `None` if the server script is not installed (`scripts/setup` installs it).
    pub fn start(dir: &Path) -> Option<RabbitMq> {
        let bin = rabbitmq_server();
        if !Path::new(&bin).exists() {
            return None;
        }
        let [amqp, dist, epmd] = free_ports::<3>();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        std::fs::write(dir.join("rabbitmq.conf"), "loopback_users.guest = true\n")
            .expect("rabbitmq.conf");
        let log = std::fs::File::create(dir.join("rabbitmq.log")).expect("rabbitmq.log");
        let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let child = Command::new(&bin)
            .current_dir(dir)
            .env("HOME", dir)
            .env(
                "RABBITMQ_NODENAME",
                format!("magnetar-{}@localhost", amqp.port()),
            )
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp.port().to_string())
            .env("RABBITMQ_DIST_PORT", dist.port().to_string())
            .env("ERL_EPMD_PORT", epmd.port().to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_PID_FILE", d("rabbitmq.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawning rabbitmq-server");
        let node = RabbitMq {
            amqp,
            child,
            epmd_port: epmd.port(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(amqp).is_err() {
            let log = std::fs::read_to_string(dir.join("rabbitmq.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "RabbitMQ did not listen:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(node)
    }

    /// The process group of the node (its CPU time is the group's).
    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        // SIGTERM first: the node deregisters from its epmd as it stops (a node killed
        // outright stays registered for a while, and epmd refuses `-kill` while it has live
        // nodes); SIGKILL for whatever is left after 10 s.
        // SAFETY: killpg only sends signals, to the process group this node was started in.
        unsafe {
            libc::killpg(self.pgid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe {
            libc::killpg(self.pgid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
        // The node's epmd daemonized out of the group: stop it (retried while it still
        // counts the node as alive).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let killed = Command::new("epmd")
                .args(["-port", &self.epmd_port.to_string(), "-kill"])
                .env("ERL_EPMD_PORT", self.epmd_port.to_string())
                .stderr(Stdio::null())
                .output();
            match killed {
                Ok(out) if out.status.success() && out.stdout.starts_with(b"Killed") => break,
                // Not running (any more), or no epmd binary: nothing to stop.
                Ok(out) if !out.status.success() => break,
                Err(_) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
