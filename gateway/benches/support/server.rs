//! A server process under test, for the gateway's benches (`mqtt.rs`, `websocket.rs`, each
//! through `#[path]`): free loopback ports, the real `magnetar` binary started on a config
//! file, a bounded wait for its ports, its CPU time from `/proc`, and the process killed
//! when dropped, so a failed bench leaves nothing running.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../../broker/benches/support/proc_cpu.rs"]
mod proc_cpu;

/// `N` loopback addresses nothing listens on right now, all different (each held until all
/// are found: after a storm, one at a time sometimes gave the same port twice).
pub fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let held: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("free port"));
    held.map(|l| l.local_addr().expect("free port"))
}

/// A server process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 60 s, then panics) until `addr` accepts connections.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway binary on the config file `config`, its data in `data_dir`, logging at `warn`.
/// Knobs: `BENCH_MAGNETAR_BIN` (another build, for A/B runs of two builds),
/// `BENCH_MAGNETAR_ENV` (`K=V K=V`: the gateway process's environment only),
/// `BENCH_MAGNETAR_LOG` (a file for its log).
pub fn spawn_magnetar(config: &Path, data_dir: &Path) -> Proc {
    let bin = std::env::var("BENCH_MAGNETAR_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_magnetar").to_string());
    let child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        // E.g. `LD_PRELOAD=… DUMP_HEAPTRACK_OUTPUT=…` for a heap profile of the gateway alone.
        .envs(
            std::env::var("BENCH_MAGNETAR_ENV")
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|kv| kv.split_once('=')),
        )
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("BENCH_MAGNETAR_LOG") {
            Some(path) => std::fs::File::create(path).map_or(Stdio::null(), Stdio::from),
            None => Stdio::null(),
        })
        .spawn()
        .expect("spawning magnetar");
    Proc(child)
}

/// CPU time (user + system) a process has used so far, in seconds (0 if unknown).
pub fn cpu_seconds(pid: u32) -> f64 {
    proc_cpu::cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// A number from env `name`, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
