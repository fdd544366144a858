//! `blindgate demo`: the whole system on loopback, in one process.
//!
//! # Layout
//!
//! - `cli`: the flags and the printed summary.
//! - `broker`: the embedded rumqttd cloud broker (TLS, client certificates).
//! - `link`: a link to the cloud that can be cut (the outage).
//! - `run`: the script: set-up, outage, shutdown.
//! - `report`: the count at the end, from the cloud's sink.

pub mod broker;
pub mod cli;
pub mod link;
mod report;
mod run;

pub use report::DemoReport;
pub use run::{DemoError, DemoOptions, run_demo};
