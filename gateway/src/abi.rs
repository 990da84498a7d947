//! The plugin ABI as Rust types and traits, generated from the WIT (`sdk/wit/plugin.wit`, the
//! single source of truth of the ABI) by `wasmtime::component::bindgen!`.
//!
//! A leaf: the host (`host`) implements the imports, `plugin_host` calls the exports, and
//! nothing here depends on the rest of the gateway.

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "plugin",
});
