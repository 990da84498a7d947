//! Builds the built-in plugins (`plugins/*`) and the example plugin for `wasm32-wasip2` in
//! their own workspace and target directory, then generates `builtin_plugins.rs`, which
//! embeds the components in the binary. This is the pattern of substrate's wasm-builder: a
//! nested `cargo build`, so that `cargo build --release` alone yields the complete gateway.
//!
//! The nested build always uses the release profile: a debug Wasm plugin is slow and large,
//! and the gateway's own profile says nothing about the plugins'.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// Built-in plugins: (name the config uses, file the build produces).
const BUILTIN: &[(&str, &str)] = &[
    ("mqtt", "magnetar_mqtt.wasm"),
    ("pulsar-ws", "magnetar_pulsar_ws.wasm"),
    ("amqp", "magnetar_amqp.wasm"),
    ("kafka", "magnetar_kafka.wasm"),
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("gateway/ has a parent")
        .to_path_buf();
    for watched in [
        "plugins/Cargo.toml",
        "plugins/mqtt",
        "plugins/pulsar-ws",
        "plugins/amqp",
        "plugins/kafka/src",
        "plugins/kafka/Cargo.toml",
        "third_party/kafka-protocol",
        "sdk/src",
        "sdk/wit",
        "sdk/Cargo.toml",
        "examples/echo-plugin",
        "examples/web-echo-plugin",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    ensure_target_installed();

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm");
    println!("cargo:rerun-if-env-changed=MAGNETAR_KEEP_WASM");
    // While one engineer edits a plugin, others can build the gateway with the plugins of
    // the last good build: MAGNETAR_KEEP_WASM=1 skips the nested build if they exist.
    let keep = env::var_os("MAGNETAR_KEEP_WASM").is_some_and(|v| v == "1")
        && BUILTIN
            .iter()
            .all(|(_, f)| target_dir.join(TARGET).join("release").join(f).exists());
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = if keep {
        println!("cargo:warning=MAGNETAR_KEEP_WASM=1: using the plugins of the last build");
        std::process::ExitStatus::default()
    } else {
        Command::new(cargo)
            .args(["build", "--release", "--target", TARGET, "--manifest-path"])
            .arg(root.join("plugins/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            // The outer build's flags are for the host target, not for Wasm.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_PRIMARY_PACKAGE")
            // Under `cargo clippy` the plugins are linted by their own CI step, not here.
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CLIPPY_ARGS")
            .status()
            .expect("running cargo for the Wasm plugins")
    };
    if !status.success() {
        panic!("building the Wasm plugins (plugins/Cargo.toml) for {TARGET} failed; see the errors above");
    }

    let wasm_dir = target_dir.join(TARGET).join("release");
    let mut generated = String::from(
        "/// Built-in plugins embedded at build time: (name, WebAssembly component).\n\
         pub const BUILTIN_PLUGINS: &[(&str, &[u8])] = &[\n",
    );
    for (name, file) in BUILTIN {
        let path = wasm_dir.join(file);
        assert!(
            path.exists(),
            "the plugin build produced no {}",
            path.display()
        );
        generated.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    generated.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("builtin_plugins.rs"), generated).expect("writing builtin_plugins.rs");
    // The tests load the example plugin from here, as an operator would from a plugin dir.
    println!("cargo:rustc-env=MAGNETAR_WASM_DIR={}", wasm_dir.display());
}

/// Installs the `wasm32-wasip2` standard library through rustup when it is missing, or stops
/// with the one command that does.
fn ensure_target_installed() {
    if sysroot_has_target() {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !sysroot_has_target() {
        panic!("the Rust target {TARGET} is missing; install it with: rustup target add {TARGET}");
    }
}

fn sysroot_has_target() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .exists()
}
