#[path = "../../tests/e2e/broker.rs"]
mod broker;
