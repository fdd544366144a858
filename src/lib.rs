//! blindgate: an edge gateway that forwards devices' end-to-end encrypted (E3) MQTT
//! messages to the cloud over mutual TLS 1.3, with a durable store-and-forward queue.
//!
//! # Layout
//!
//! - [`cloud`]: `blindgate cloud`, the cloud-side ingest (open, replay rule, sink, receipts).
//! - [`commands`]: command allowlists (schema, the check both ends apply, command results).
//! - [`clock`]: the wall clock in milliseconds (one definition for every timestamp).
//! - [`cli`]: the command line (one binary, subcommands) and its dispatch.
//! - [`e3_tool`]: `blindgate e3 seal|open|keygen`, local tools over device key files.
//! - [`demo`]: `blindgate demo`, the whole system on loopback (embedded rumqttd, cuttable link).
//! - [`gateway`]: `blindgate gateway`: wiring, the service loop (reload on SIGHUP and on
//!   certificate change, watchdog), and the stop order that loses nothing.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`ingress`]: the device listener (MQTT 3.1.1 over TLS 1.3, PUBACK after fsync).
//! - [`uplink`]: the E4 uplink to the cloud (rumqttc, mutual TLS 1.3, failover, paced drain).
//! - [`queue`]: the durable store-and-forward queue (sled, group commit, caps).
//! - [`tls`]: rustls 0.23 (ring) TLS 1.3 configs: device listener, uplink client, SPKI pins, certificate identity.
//! - [`keys`]: the cloud's device key store (`blindgate keys ...`): provision, rotate, shred, audit log.
//! - [`device`]: simulated devices (`blindgate device simulate`): outbox until receipted, rekey.
//! - [`pki`]: `blindgate certs dev`, a development PKI (two CAs and every certificate).
//! - [`payload`]: the plaintext formats inside envelopes (readings, image chunks), one codec for devices and cloud.
//! - [`metrics`]: every Prometheus metric, with closed label sets.
//! - [`topics`]: MQTT topic templates (`e3/{device_id}/up`, ...).
//! - [`shutdown`]: SIGTERM/SIGINT into the shutdown future.
//! - [`systemd`]: the `sd_notify` protocol (ready, reloading, stopping, watchdog).
//! - [`status`]: the technician's `/status` page and the list of recent problems.
//! - [`config`]: the gateway config file, checked once into `ValidConfig`.
//! - [`rate`]: token buckets (per-device rate limit, paced drain).
//! - [`logging`]: log output (human or JSON, journald-aware).
//! - [`log_limit`]: rate-limited logging of repeated problems.
//! - `manpage`: `blindgate manpage`, man pages generated from the command line (packaging).
//!
//! The envelope format itself lives in the workspace crate `e3`.

pub mod cli;
pub mod clock;
pub mod cloud;
pub mod commands;
pub mod config;
pub mod demo;
pub mod device;
pub mod e3_tool;
pub mod gateway;
pub mod http;
pub mod ingress;
pub mod keys;
pub mod log_limit;
pub mod logging;
mod manpage;
pub mod metrics;
pub mod payload;
pub mod pki;
pub mod queue;
pub mod rate;
pub mod shutdown;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod topics;
pub mod uplink;
