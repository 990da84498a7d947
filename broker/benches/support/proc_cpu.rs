//! CPU time of a process from `/proc`, for the benches' CPU-per-message columns: shared by
//! the broker bench and the gateway benches (`gateway/benches/support/server.rs`) through
//! `#[path]`.

/// CPU time (user + system) the process of `stat_path` (`/proc/<pid>/stat`, or
/// `/proc/self/stat`) has used so far, in seconds (0 if unknown).
pub fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, hence the last ')'): utime and
    // stime are fields 14 and 15, in clock ticks.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), asked once; 100 if unknown.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
