//! `blindgate demo`: the whole system on loopback, in one process.
//!
//! # Layout
//!
//! - `broker`: the embedded rumqttd cloud broker (TLS, client certificates).
//! - `link`: a link to the cloud that can be cut (the outage).

pub mod broker;
pub mod link;
