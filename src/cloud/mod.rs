//! `blindgate cloud`: the cloud-side ingest. It subscribes to the gateways' uplink
//! topics on the cloud broker (mutual TLS 1.3), opens each envelope with the device's
//! key, applies the replay rule, writes accepted messages to the sink, and sends
//! authenticated receipts back down through the gateway that carried them.
//!
//! # Delivery
//!
//! The broker's QoS 1 message is acknowledged (manual acks) only after the batch that
//! holds it is fsync'd in the sink; receipts go out only then too. A crash before that
//! means the broker delivers again, and the replay rule, rebuilt from the sink on start,
//! turns the repeat into a duplicate that is answered with a receipt but not stored
//! twice. So each accepted message is in the sink exactly once.
//!
//! The JSON Lines sink serves one instance. Several instances behind a shared
//! subscription (`$share/<group>/...`) use the PostgreSQL sink ([`SinkChoice`]), whose
//! table is both the sink and the replay state: its primary key `(device, seq)` keeps
//! every message in it once across instances (see `postgres`).
//!
//! # Layout
//!
//! - `ingest`: one envelope's checks and the batch commit.
//! - `sink`: the JSON Lines sink (the log of record).
//! - `postgres`: the PostgreSQL sink, shared by several instances.
//! - `replay`: replay windows checkpointed in sled.
//! - `registry`: tenants, their devices and the gateways allowed to carry them.
//! - `images`: image reassembly (the chunk format is in `crate::payload`).
//! - `metrics`: the ingest's Prometheus metrics.

pub mod cli;
pub mod commands;
pub mod config;
pub mod images;
pub mod ingest;
pub mod metrics;
pub mod postgres;
pub mod registry;
pub mod replay;
pub mod sink;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, Incoming, MqttOptions, Publish, QoS, TlsConfiguration, Transport,
};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::keys::KeyStore;
use crate::pki::DevPki;
use crate::tls::{CipherOrder, TlsError, UplinkTlsOptions, uplink_client_config};
use crate::topics::GatewayTemplate;
use crate::uplink::Endpoint;
use ingest::{Ingest, Outcome, Sink};
pub use metrics::{CloudMetrics, CloudRejection};
use postgres::{PostgresError, PostgresSink};
use registry::Registry;
use replay::ReplayStore;
use sink::{JsonlSink, SinkError};

/// How long a clean stop waits for the last acks and receipts to be written out.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How the ingest connects and where it keeps things.
#[derive(Debug, Clone)]
pub struct CloudSettings {
    /// The cloud broker.
    pub broker: Endpoint,
    /// TLS 1.3 client configuration with the ingest's certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT client id; several instances need distinct ids.
    pub client_id: String,
    /// The subscription: `gw/+/e3/+/up`, or `$share/<group>/gw/+/e3/+/up` for several
    /// instances behind a shared subscription.
    pub subscription: String,
    /// Uplink topics: `gw/{gateway_id}/e3/{device_id}/up`.
    pub up_topic: GatewayTemplate,
    /// Downlink topics: `gw/{gateway_id}/e3/{device_id}/down`.
    pub down_topic: GatewayTemplate,
    /// The device key store.
    pub keys_dir: PathBuf,
    /// Where the replay state lives.
    pub state_dir: PathBuf,
    /// The JSON Lines sink.
    pub sink_path: PathBuf,
    /// Where reassembled images go.
    pub images_dir: PathBuf,
    /// Tenants and gateways; `None` lets any gateway carry any known device.
    pub registry: Option<Registry>,
    /// Largest envelope accepted.
    pub max_envelope: usize,
    /// Messages per batch at most.
    pub batch_max: usize,
    /// Longest a message waits for its batch to be committed.
    pub batch_delay: Duration,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
}

impl CloudSettings {
    /// An ingest whose files all live under `dir` (`keys/`, `state/`,
    /// `messages.jsonl`, `images/`), connecting to `localhost:port` with the dev PKI's
    /// cloud-ingest certificate: the demo's and the tests' set-up. No registry.
    ///
    /// # Errors
    /// [`CloudError::Tls`] if the PKI's files cannot be loaded.
    pub fn local(dir: &Path, pki: &DevPki, port: u16, client_id: &str) -> Result<Self, CloudError> {
        let tls = uplink_client_config(&UplinkTlsOptions {
            ca: pki.cloud_ca.cert.clone(),
            cert: pki.cloud_ingest.cert.clone(),
            key: pki.cloud_ingest.key.clone(),
            pins_sha256: Vec::new(),
            cipher_order: CipherOrder::Auto,
        })
        .map_err(|e| CloudError::Tls(Box::new(e)))?;
        let template = |t: &str| GatewayTemplate::new(t).map_err(CloudError::Topic);
        Ok(Self {
            broker: Endpoint {
                host: "localhost".into(),
                port,
            },
            tls,
            client_id: client_id.into(),
            subscription: "gw/+/e3/+/up".into(),
            up_topic: template("gw/{gateway_id}/e3/{device_id}/up")?,
            down_topic: template("gw/{gateway_id}/e3/{device_id}/down")?,
            keys_dir: dir.join("keys"),
            state_dir: dir.join("state"),
            sink_path: dir.join("messages.jsonl"),
            images_dir: dir.join("images"),
            registry: None,
            max_envelope: 131_072,
            batch_max: 64,
            batch_delay: Duration::from_millis(10),
            keep_alive: Duration::from_secs(10),
        })
    }
}

/// Which sink the ingest writes to (and so where the replay state lives).
#[derive(Clone, Default)]
pub enum SinkChoice {
    /// The JSON Lines file [`CloudSettings::sink_path`], replay windows in sled under
    /// [`CloudSettings::state_dir`]: one instance. The default.
    #[default]
    Jsonl,
    /// PostgreSQL at `url` (`postgresql://user@host:port/db` or `host=... user=...`;
    /// no TLS, so a local socket or a trusted network): one or several instances
    /// sharing the database. `state_dir` and `sink_path` are not used.
    Postgres {
        /// The connection string; may hold a password, so `Debug` hides it.
        url: String,
    },
}

impl std::fmt::Debug for SinkChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jsonl => f.write_str("Jsonl"),
            Self::Postgres { .. } => f.write_str("Postgres { url: <hidden> }"),
        }
    }
}

/// Why the ingest stopped.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CloudError {
    /// The TLS material is unusable.
    #[error("cloud broker TLS")]
    Tls(#[source] Box<TlsError>),
    /// A topic template is invalid.
    #[error("invalid topic template")]
    Topic(#[source] crate::topics::TemplateError),
    /// The key store could not be opened.
    #[error("cannot open the key store")]
    Keys(#[source] crate::keys::KeyStoreError),
    /// The replay state could not be opened.
    #[error("cannot open the replay state in {path}")]
    Replay {
        /// Its directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// The sink failed; nothing unacknowledged is lost (the broker delivers again).
    #[error("sink failed")]
    Sink(#[from] SinkError),
    /// The PostgreSQL sink failed; nothing unacknowledged is lost (the broker
    /// delivers again).
    #[error("PostgreSQL sink failed")]
    Postgres(#[source] PostgresError),
    /// The images directory could not be created.
    #[error("cannot create the images directory {path}")]
    Images {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

async fn open_ingest(
    settings: &CloudSettings,
    sink: &SinkChoice,
    metrics: CloudMetrics,
) -> Result<Ingest, CloudError> {
    let keys = KeyStore::open(&settings.keys_dir).map_err(CloudError::Keys)?;
    let sink = match sink {
        SinkChoice::Jsonl => open_jsonl(settings)?,
        SinkChoice::Postgres { url } => Sink::Postgres(
            PostgresSink::connect(url)
                .await
                .map_err(CloudError::Postgres)?,
        ),
    };
    let images =
        images::ImageStore::open(&settings.images_dir).map_err(|source| CloudError::Images {
            path: settings.images_dir.clone(),
            source,
        })?;
    Ok(Ingest::new(
        keys,
        settings.registry.clone(),
        sink,
        images,
        settings.up_topic.clone(),
        settings.max_envelope,
        metrics,
    ))
}

fn open_jsonl(settings: &CloudSettings) -> Result<Sink, CloudError> {
    let replay_path = settings.state_dir.join("replay");
    let (replay, checkpoint) =
        ReplayStore::open(&replay_path).map_err(|source| CloudError::Replay {
            path: replay_path.clone(),
            source,
        })?;
    if let Some(parent) = settings.sink_path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| CloudError::Images {
            path: parent.to_owned(),
            source,
        })?;
    }
    let (sink, tail) = JsonlSink::open(&settings.sink_path, checkpoint)?;
    Ok(Sink::jsonl(sink, replay, tail))
}

/// Runs the ingest with the JSON Lines sink until `shutdown`.
///
/// # Errors
/// [`CloudError`] if it cannot start, or if the sink fails (then it stops without
/// acknowledging what was not stored).
pub async fn run(
    settings: CloudSettings,
    metrics: CloudMetrics,
    shutdown: CancellationToken,
) -> Result<(), CloudError> {
    run_with_sink(settings, SinkChoice::Jsonl, metrics, shutdown).await
}

/// Runs the ingest with the chosen sink until `shutdown`.
///
/// # Errors
/// As [`run`]; with PostgreSQL also [`CloudError::Postgres`] if the database cannot be
/// reached at start or a batch's transaction fails.
pub async fn run_with_sink(
    settings: CloudSettings,
    sink: SinkChoice,
    metrics: CloudMetrics,
    shutdown: CancellationToken,
) -> Result<(), CloudError> {
    let mut ingest = open_ingest(&settings, &sink, metrics.clone()).await?;
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let connected = Session::new(&settings, &mut ingest, &metrics)
            .run(&shutdown)
            .await?;
        if connected {
            delay = Duration::from_millis(200);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

/// One connection to the broker.
struct Session<'a> {
    settings: &'a CloudSettings,
    ingest: &'a mut Ingest,
    metrics: &'a CloudMetrics,
    pending: Vec<(Publish, Outcome)>,
    batch_started: Option<Instant>,
    /// Acks and receipts the client's request channel had no room for yet: sent as
    /// the event loop drains it, never dropped (a lost ack makes the broker redeliver
    /// for ever and holds an inflight slot; a lost receipt makes the device resend).
    unsent: std::collections::VecDeque<Unsent>,
}

/// A request waiting for room in the client's channel.
enum Unsent {
    Ack(Publish),
    Receipt(String, Vec<u8>),
}

impl<'a> Session<'a> {
    fn new(settings: &'a CloudSettings, ingest: &'a mut Ingest, metrics: &'a CloudMetrics) -> Self {
        Self {
            settings,
            ingest,
            metrics,
            pending: Vec::new(),
            batch_started: None,
            unsent: std::collections::VecDeque::new(),
        }
    }

    /// Hands waiting acks and receipts to the client, in order, until its channel is
    /// full. Never waits: the event loop that drains the channel needs this task to
    /// keep reading events.
    fn send_unsent(&mut self, client: &AsyncClient) {
        while let Some(request) = self.unsent.front() {
            let sent = match request {
                Unsent::Ack(publish) => client.try_ack(publish).is_ok(),
                Unsent::Receipt(topic, envelope) => client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, false, envelope.clone())
                    .is_ok(),
            };
            if !sent {
                return;
            }
            if matches!(request, Unsent::Receipt(..)) {
                self.metrics.receipts.inc();
            }
            self.unsent.pop_front();
        }
    }

    fn options(&self) -> MqttOptions {
        let s = self.settings;
        let mut options = MqttOptions::new(&s.client_id, &s.broker.host, s.broker.port);
        options
            .set_keep_alive(s.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(s.max_envelope + 1024, s.max_envelope + 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(&s.tls),
            )));
        options
    }

    /// Returns whether the broker accepted the connection.
    async fn run(mut self, shutdown: &CancellationToken) -> Result<bool, CloudError> {
        let capacity = self.settings.batch_max.max(1) * 2 + 64;
        let (client, mut eventloop) = AsyncClient::new(self.options(), capacity);
        let (tx, mut events) = mpsc::channel(256);
        let poller = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut connected = false;
        let result = loop {
            self.send_unsent(&client);
            let deadline = self.batch_started.map(|t| t + self.settings.batch_delay);
            let retry =
                (!self.unsent.is_empty()).then(|| Instant::now() + Duration::from_millis(5));
            tokio::select! {
                () = shutdown.cancelled() => {
                    let committed = self.flush(&client).await;
                    self.close(&client, &mut events).await;
                    break committed;
                }
                event = events.recv() => match event {
                    Some(Ok(Event::Incoming(Incoming::SubAck(_)))) => {
                        self.metrics.subscribed.set(1);
                    }
                    Some(Ok(Event::Incoming(Incoming::ConnAck(_)))) => {
                        connected = true;
                        tracing::info!(broker = %self.settings.broker, "cloud ingest connected");
                        let _ = client.try_subscribe(self.settings.subscription.clone(), QoS::AtLeastOnce);
                    }
                    Some(Ok(Event::Incoming(Incoming::Publish(publish)))) => {
                        let outcome = self.ingest.process(&publish.topic, &publish.payload, now_ms());
                        self.pending.push((publish, outcome));
                        self.batch_started.get_or_insert_with(Instant::now);
                        if self.pending.len() >= self.settings.batch_max
                            && let Err(err) = self.flush(&client).await
                        {
                            break Err(err);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        tracing::warn!(broker = %self.settings.broker, error = %err, "cloud ingest connection lost");
                        // Store what was processed; the broker will deliver it again
                        // (unacknowledged), and the repeat is answered as a duplicate.
                        break self.flush(&client).await;
                    }
                    None => break self.flush(&client).await,
                },
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if let Err(err) = self.flush(&client).await {
                        break Err(err);
                    }
                }
                // The channel was full: try again once the event loop had a turn.
                () = sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {}
            }
        };
        poller.abort();
        self.metrics.subscribed.set(0);
        result.map(|()| connected)
    }

    /// A clean stop: hands every queued ack and receipt to the event loop, disconnects,
    /// and lets the event loop write them out (bounded: a dead broker cannot hold the
    /// stop). Aborting the event loop at once would drop them: the broker would deliver
    /// those messages again after a restart (answered as duplicates) and the devices
    /// would miss their receipts.
    async fn close(
        &mut self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    ) {
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            loop {
                self.send_unsent(client);
                if self.unsent.is_empty() {
                    break;
                }
                // The request channel is full: let the event loop take a turn.
                match events.recv().await {
                    Some(Ok(_)) => {}
                    _ => return,
                }
            }
            let _ = client.try_disconnect();
            while let Some(Ok(_)) = events.recv().await {}
        })
        .await;
    }

    /// Commits the batch, then acknowledges it to the broker and sends receipts.
    async fn flush(&mut self, client: &AsyncClient) -> Result<(), CloudError> {
        self.batch_started = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        self.ingest
            .commit(self.pending.iter_mut().map(|(_, outcome)| outcome))
            .await?;
        let pending = std::mem::take(&mut self.pending);
        let mut routes = Vec::new();
        for (publish, outcome) in pending {
            if let Outcome::Accepted(route) | Outcome::Duplicate(route) = outcome {
                routes.push(route);
            }
            self.unsent.push_back(Unsent::Ack(publish));
        }
        for (gateway, device, envelope) in self.ingest.receipts(&routes) {
            let topic = self.settings.down_topic.render(&gateway, &device);
            self.unsent.push_back(Unsent::Receipt(topic, envelope));
        }
        self.send_unsent(client);
        Ok(())
    }
}
