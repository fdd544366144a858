//! One simulated device at work: the MQTT connection to the gateway, making and sealing
//! new messages, sending and resending the outbox, and handling receipts and commands.
//!
//! rumqttc's `EventLoop::poll` is not cancel-safe where it writes, so it runs in its own
//! task (`Driver`) and reports over a bounded channel. The device task never awaits the
//! MQTT client: it hands requests over with `try_*`, and what does not fit waits in the
//! device's own send queue until the next event says the client made progress. So the
//! two tasks can never wait on each other.
//!
//! Sending is at least once, end to end: an uplink stays in the outbox (on disk) until a
//! receipt names it, whatever the gateway's PUBACK said. Downlink is acknowledged to the
//! gateway (manual PUBACK) only after the device handled it durably, so a command the
//! device had not applied when it stopped is delivered again and not lost.
//!
//! rumqttc keeps its request channel across reconnects, so a PUBACK queued for one
//! connection could go out on the next one and acknowledge a different message there.
//! The [`AckGate`] prevents that: acknowledgements carry their connection's generation,
//! and the connection task bumps the generation and drains rumqttc's stale PUBACKs
//! (`EventLoop::clean`) under the same lock.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e3::{DeviceId, DeviceKey, Header, KEY_LEN, Kind, ReceiptEntry, Suite, Verdict};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeroize::{Zeroize, Zeroizing};

use super::payload::{ImageChunks, Message, Producer, Rng};
use super::state::DeviceState;
use super::{DeviceConfig, DeviceError, DeviceReport};
use crate::clock::now_ms;
use crate::commands::{CommandOutcome, RESERVED_COMMAND};
use crate::log_limit::LogLimiter;
use crate::tls::{CipherOrder, TlsError, UplinkTlsOptions, client_config_for_server_name};

/// Requests rumqttc buffers; when full, the send queue waits for the next event.
const REQUEST_CHANNEL: usize = 16;
/// Events from the connection task; when full, it stops polling until the device reads.
const EVENT_CHANNEL: usize = 64;
/// Unacknowledged publishes per connection (rumqttc's inflight window).
const INFLIGHT: u16 = 32;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Largest downlink packet accepted: receipts are at most 256 entries (about 3 KiB).
const MAX_DOWNLINK_PACKET: usize = 64 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a stopping device waits for its DISCONNECT to go out.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);
/// No new messages while the outbox holds this much; a device with a dead uplink stops
/// sampling rather than fill its storage.
const OUTBOX_BYTE_LIMIT: usize = 32 << 20;
/// Longest wait between two looks for uplinks due for a resend.
const RESEND_CHECK_MAX: Duration = Duration::from_secs(1);
/// Longest `cmd` value logged, in characters.
const CMD_LOG_LEN: usize = 64;

/// What the connection task reports.
#[derive(Debug)]
enum LinkEvent {
    /// CONNACK received: (re)subscribe and resend the outbox.
    Connected,
    /// The connection failed or was lost; rumqttc dials again after a backoff.
    Disconnected,
    /// A command or receipt, to be acknowledged once handled, on the connection
    /// `generation` only.
    Downlink {
        /// The connection it arrived on.
        generation: u64,
        /// The message.
        publish: Publish,
    },
    /// The gateway refused the downlink subscription.
    SubscribeRefused,
    /// rumqttc sent something: its request channel has room again.
    Progress,
}

/// The connection generation, bumped after every connection error. Whoever holds the
/// lock knows that no request queued in rumqttc belongs to an older connection.
#[derive(Debug, Default)]
struct AckGate {
    generation: Mutex<u64>,
}

impl AckGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        // Nothing can be left half-done under this lock: a poisoned value is still valid.
        self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The device's side of the connection.
struct Link {
    client: AsyncClient,
    events: mpsc::Receiver<LinkEvent>,
    task: JoinHandle<()>,
    up_topic: String,
    down_topic: String,
    /// As far as the device knows: set on CONNACK, cleared on any connection error.
    connected: bool,
    /// The downlink subscription still has to be requested on this connection.
    subscribe: bool,
    /// Outbox seqs to publish, lowest first (older messages before newer ones).
    queue: BTreeSet<u64>,
    /// Handled downlink publishes still to be acknowledged, with their generation.
    acks: VecDeque<(u64, Publish)>,
    gate: Arc<AckGate>,
}

impl Link {
    fn start(config: &DeviceConfig, tls: Arc<ClientConfig>) -> Self {
        let up_topic = format!("e3/{}/up", config.device_id);
        let down_topic = format!("e3/{}/down", config.device_id);
        let mut options = MqttOptions::new(
            config.device_id.clone(),
            config.gateway.ip().to_string(),
            config.gateway.port(),
        );
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_manual_acks(true)
            .set_inflight(INFLIGHT)
            .set_max_packet_size(
                MAX_DOWNLINK_PACKET,
                config.max_envelope + up_topic.len() + 16,
            )
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        let (events_tx, events) = mpsc::channel(EVENT_CHANNEL);
        let gate = Arc::new(AckGate::default());
        let driver = Driver {
            events: events_tx,
            gate: Arc::clone(&gate),
            device: config.device_id.clone(),
        };
        let task = tokio::spawn(driver.run(eventloop));
        Self {
            client,
            events,
            task,
            up_topic,
            down_topic,
            connected: false,
            subscribe: false,
            queue: BTreeSet::new(),
            acks: VecDeque::new(),
            gate,
        }
    }

    fn on_connected(&mut self, outbox: impl Iterator<Item = u64>) {
        self.connected = true;
        self.subscribe = true;
        self.queue = outbox.collect();
    }

    /// Acknowledgements and queued publishes belonged to the lost connection; the
    /// next CONNACK queues the whole outbox again.
    fn on_disconnected(&mut self) {
        self.connected = false;
        self.queue.clear();
        self.acks.clear();
    }

    /// Hands rumqttc as much as it takes: the subscription, acknowledgements, then
    /// queued uplinks in seq order.
    fn pump(&mut self, state: &mut DeviceState, report: &mut DeviceReport) {
        if !self.connected {
            return;
        }
        if self.subscribe {
            if self
                .client
                .try_subscribe(self.down_topic.as_str(), QoS::AtLeastOnce)
                .is_err()
            {
                return;
            }
            self.subscribe = false;
        }
        while let Some((generation, publish)) = self.acks.front() {
            let current = self.gate.lock();
            // A message from an earlier connection is delivered again by the gateway.
            if *generation == *current && self.client.try_ack(publish).is_err() {
                return;
            }
            drop(current);
            self.acks.pop_front();
        }
        while let Some(&seq) = self.queue.first() {
            if let Some(entry) = state.outbox_entry_mut(seq) {
                let payload = entry.bytes.clone();
                if self
                    .client
                    .try_publish(self.up_topic.as_str(), QoS::AtLeastOnce, false, payload)
                    .is_err()
                {
                    return;
                }
                if entry.sent_before {
                    report.resent += 1;
                } else {
                    report.sent += 1;
                }
                entry.sent_before = true;
                entry.last_sent = Some(Instant::now());
            }
            self.queue.pop_first();
        }
    }

    /// Sends DISCONNECT if connected, then waits (bounded) for the connection task.
    async fn close(self) {
        let Self {
            client,
            events,
            mut task,
            connected,
            ..
        } = self;
        if !connected || client.try_disconnect().is_err() {
            task.abort();
        }
        drop(events);
        if tokio::time::timeout(CLOSE_DEADLINE, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// The connection task's ends of the channel and the gate.
struct Driver {
    events: mpsc::Sender<LinkEvent>,
    gate: Arc<AckGate>,
    device: String,
}

impl Driver {
    /// Polls rumqttc (which dials again after an error) and reports. Ends after
    /// DISCONNECT went out, or on an error once the device stopped listening.
    async fn run(self, mut eventloop: EventLoop) {
        let mut backoff = BACKOFF_MIN;
        let mut rng = Rng::from_os();
        let mut generation = *self.gate.lock();
        loop {
            let event = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = BACKOFF_MIN;
                    info!(device = %self.device, "connected to the gateway");
                    LinkEvent::Connected
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => LinkEvent::Downlink {
                    generation,
                    publish,
                },
                Ok(Event::Incoming(Packet::SubAck(ack)))
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) =>
                {
                    LinkEvent::SubscribeRefused
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(Event::Outgoing(_)) => LinkEvent::Progress,
                Ok(Event::Incoming(_)) => continue,
                Err(err) => {
                    if self.events.is_closed() {
                        return;
                    }
                    generation = self.next_generation(&mut eventloop);
                    warn!(device = %self.device, error = %err, retry_in = ?backoff, "gateway connection failed");
                    let _ = self.events.send(LinkEvent::Disconnected).await;
                    tokio::time::sleep(backoff.mul_f64(0.5 + rng.unit() / 2.0)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            // While the device is closing nobody listens; keep polling until DISCONNECT is out.
            let _ = self.events.send(event).await;
        }
    }

    /// Starts a new generation and drops every PUBACK rumqttc still holds (`clean`
    /// filters them out of its pending requests) under one lock.
    fn next_generation(&self, eventloop: &mut EventLoop) -> u64 {
        let mut generation = self.gate.lock();
        *generation += 1;
        eventloop.clean();
        *generation
    }
}

/// TLS 1.3 only (ring), the device certificate as client certificate, the gateway's
/// certificate checked against the device CA and `server_name` (the device dials an
/// address; rumqttc would otherwise check the certificate against that address).
fn device_tls(config: &DeviceConfig) -> Result<Arc<ClientConfig>, DeviceError> {
    let options = UplinkTlsOptions {
        ca: config.ca.clone(),
        cert: config.cert.clone(),
        key: config.key.clone(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    };
    client_config_for_server_name(&options, &config.server_name).map_err(|err| match err {
        TlsError::ServerName { name } => DeviceError::ServerName { name },
        other => DeviceError::Tls(other),
    })
}

/// Runs one device; see [`super::run_device`].
pub(super) async fn run(
    config: DeviceConfig,
    device_id: DeviceId,
    shutdown: CancellationToken,
) -> Result<DeviceReport, DeviceError> {
    let tls = device_tls(&config)?;
    let state = DeviceState::open(&config.state_dir, device_id, &config.initial_key_file).await?;
    let link = Link::start(&config, tls);
    let producer = Producer::new(&config.device_id, config.payload, config.compress);
    let mut device = Device {
        config,
        state,
        link,
        producer,
        report: DeviceReport::default(),
        made: 0,
        paused: false,
        log: LogLimiter::new(Duration::from_secs(10)),
    };
    let result = device.run(&shutdown).await;
    let mut report = device.report;
    report.outbox_left = device.state.outbox().len() as u64;
    device.link.close().await;
    info!(device = %device.config.device_id, ?report, "device stopped");
    result.map(|()| report)
}

/// A running device.
struct Device {
    config: DeviceConfig,
    state: DeviceState,
    link: Link,
    producer: Producer,
    report: DeviceReport,
    /// New messages made in this run (an image counts once).
    made: u64,
    /// New messages are paused because the outbox is at its limit.
    paused: bool,
    /// Refused commands are logged at most once per 10 s.
    log: LogLimiter,
}

impl Device {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), DeviceError> {
        let mut produce = interval(Duration::from_secs_f64(1.0 / self.config.rate_per_sec));
        produce.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let check =
            (self.config.resend_after / 2).clamp(Duration::from_millis(10), RESEND_CHECK_MAX);
        let mut resend = interval(check);
        resend.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while !self.finished() {
            self.note_pause();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                event = self.link.events.recv() => {
                    self.on_event(event.ok_or(DeviceError::LinkClosed)?).await?;
                }
                _ = resend.tick() => self.queue_due(),
                _ = produce.tick(), if self.may_produce() => self.produce().await?,
            }
            self.link.pump(&mut self.state, &mut self.report);
        }
        Ok(())
    }

    /// With `count`: that many new messages made and the outbox empty.
    fn finished(&self) -> bool {
        self.config
            .count
            .is_some_and(|count| self.made >= count && self.state.outbox().is_empty())
    }

    fn may_produce(&self) -> bool {
        self.config.count.is_none_or(|count| self.made < count) && !self.paused
    }

    fn note_pause(&mut self) {
        let full = self.state.outbox_bytes() >= OUTBOX_BYTE_LIMIT;
        if full != self.paused {
            self.paused = full;
            let bytes = self.state.outbox_bytes();
            if full {
                warn!(device = %self.config.device_id, bytes, "outbox full: new messages paused until receipts arrive");
            } else {
                info!(device = %self.config.device_id, bytes, "outbox has room again: new messages resume");
            }
        }
    }

    async fn on_event(&mut self, event: LinkEvent) -> Result<(), DeviceError> {
        match event {
            LinkEvent::Connected => self.link.on_connected(self.state.outbox().keys().copied()),
            LinkEvent::Disconnected => self.link.on_disconnected(),
            LinkEvent::Downlink {
                generation,
                publish,
            } => {
                self.on_downlink(&publish).await?;
                self.link.acks.push_back((generation, publish));
            }
            LinkEvent::SubscribeRefused => {
                warn!(device = %self.config.device_id, topic = %self.link.down_topic, "gateway refused the downlink subscription");
            }
            LinkEvent::Progress => {}
        }
        Ok(())
    }

    /// Queues every uplink whose last send is `resend_after` old.
    fn queue_due(&mut self) {
        if !self.link.connected {
            return;
        }
        let now = Instant::now();
        let resend_after = self.config.resend_after;
        let due = self.state.outbox().iter().filter(|(_, entry)| {
            entry
                .last_sent
                .is_some_and(|sent| now.duration_since(sent) >= resend_after)
        });
        self.link.queue.extend(due.map(|(seq, _)| *seq));
    }

    async fn produce(&mut self) -> Result<(), DeviceError> {
        match self.producer.next(now_ms())? {
            Message::Reading(plaintext) => {
                let seq = self.state.next_seq().await?;
                self.store(seq, &plaintext).await?;
            }
            Message::Image(image) => self.store_image(image).await?,
        }
        self.made += 1;
        Ok(())
    }

    /// Seals and stores each chunk; the image id is the first chunk's seq, which is
    /// unique per device for ever.
    async fn store_image(&mut self, image: Vec<u8>) -> Result<(), DeviceError> {
        let first = self.state.next_seq().await?;
        let id_len = self.config.device_id.len();
        let chunks = ImageChunks::new(first, image, self.config.max_envelope, id_len)?;
        for index in 0..chunks.count() {
            let seq = if index == 0 {
                first
            } else {
                self.state.next_seq().await?
            };
            self.store(seq, &chunks.chunk(index)).await?;
            self.link.pump(&mut self.state, &mut self.report);
        }
        Ok(())
    }

    /// Seals `plaintext` as uplink `seq` with the current key, writes it to the outbox
    /// and queues it.
    async fn store(&mut self, seq: u64, plaintext: &[u8]) -> Result<(), DeviceError> {
        let key = self.state.current_key();
        let key_id = key.key_id();
        let envelope = key
            .seal(Kind::Uplink, seq, plaintext)
            .map_err(DeviceError::Seal)?;
        if envelope.len() > self.config.max_envelope {
            return Err(DeviceError::EnvelopeTooLarge {
                len: envelope.len(),
                max: self.config.max_envelope,
            });
        }
        self.state.add_outbox(seq, key_id, envelope).await?;
        if self.link.connected {
            self.link.queue.insert(seq);
        }
        Ok(())
    }

    /// Opens a command or receipt, applies the replay rule, handles it, and records its
    /// seq durably. Anything that does not open is counted and dropped.
    async fn on_downlink(&mut self, publish: &Publish) -> Result<(), DeviceError> {
        let opened = if publish.topic == self.link.down_topic {
            self.open_downlink(&publish.payload)
        } else {
            Err("topic")
        };
        let (kind, seq, plaintext) = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                self.report.downlink_invalid += 1;
                warn!(device = %self.config.device_id, reason, "downlink dropped");
                return Ok(());
            }
        };
        let verdict = self.state.check_downlink(seq);
        if verdict != Verdict::Fresh {
            self.report.replays_rejected += 1;
            info!(device = %self.config.device_id, seq, kind = kind.as_str(), verdict = verdict.as_str(), "replayed downlink rejected");
            return Ok(());
        }
        match kind {
            Kind::Receipt => self.on_receipt(&plaintext).await?,
            _ => self.on_command(seq, &plaintext).await?,
        }
        Ok(self.state.accept_downlink(seq).await?)
    }

    /// The kind, seq and plaintext of a downlink envelope, or why it is refused (a
    /// stable reason, never its content).
    fn open_downlink(
        &self,
        envelope: &[u8],
    ) -> Result<(Kind, u64, Zeroizing<Vec<u8>>), &'static str> {
        let header = Header::parse(envelope).map_err(|err| err.rule())?;
        if header.device_id() != self.state.device_id().as_str() {
            return Err("device_id");
        }
        if header.kind() == Kind::Uplink {
            return Err("kind");
        }
        let key = self.state.key(header.key_id()).ok_or("unknown_key")?;
        let (_, plaintext) = key.open(envelope).map_err(|err| err.reason())?;
        Ok((header.kind(), header.seq(), Zeroizing::new(plaintext)))
    }

    async fn on_receipt(&mut self, plaintext: &[u8]) -> Result<(), DeviceError> {
        let entries: Vec<ReceiptEntry> = match e3::decode_receipt(plaintext) {
            Ok(entries) => entries.collect(),
            Err(err) => {
                self.report.downlink_invalid += 1;
                warn!(device = %self.config.device_id, error = %err, "malformed receipt dropped");
                return Ok(());
            }
        };
        let named = entries.len();
        let removed = self.state.remove_receipted(entries).await?;
        self.report.receipted += removed;
        debug!(device = %self.config.device_id, named, removed, "receipt");
        Ok(())
    }

    /// `rekey` by its own rules; any other command, with an allowlist, checked and
    /// answered with a sealed result uplink (executed only if allowed); without one,
    /// logged and not executed.
    async fn on_command(&mut self, seq: u64, plaintext: &[u8]) -> Result<(), DeviceError> {
        self.report.commands += 1;
        let command = serde_json::from_slice::<CommandJson>(plaintext).ok();
        if command.as_ref().is_some_and(|c| c.cmd == RESERVED_COMMAND) {
            return self.rekey(plaintext).await;
        }
        let Some(allowed) = &self.config.commands else {
            match command {
                Some(command) => {
                    info!(device = %self.config.device_id, cmd = %printable(&command.cmd), "command received (no allowlist: not executed)");
                }
                None => {
                    self.report.downlink_invalid += 1;
                    warn!(device = %self.config.device_id, "command is not a JSON object with a cmd string; ignored");
                }
            }
            return Ok(());
        };
        let result = super::command::decide(allowed, seq, plaintext);
        match result.result {
            CommandOutcome::Executed => {
                self.report.commands_executed += 1;
                info!(device = %self.config.device_id, seq, cmd = %result.cmd, "command executed");
            }
            CommandOutcome::Refused => {
                self.report.commands_refused += 1;
                if let Some(suppressed) = self.log.check("command_refused") {
                    warn!(device = %self.config.device_id, seq, cmd = %result.cmd, message = %result.message, suppressed, "command refused, not executed");
                }
            }
        }
        let uplink = result.to_plaintext(&self.config.device_id, now_ms());
        let result_seq = self.state.next_seq().await?;
        self.store(result_seq, &uplink).await
    }

    /// Stores the new key and seals everything new with it; old keys stay for downlink
    /// sealed before the switch.
    async fn rekey(&mut self, plaintext: &[u8]) -> Result<(), DeviceError> {
        let Some(key) = self.parse_rekey(plaintext) else {
            self.report.downlink_invalid += 1;
            warn!(device = %self.config.device_id, "malformed rekey command ignored (needs key_id, suite, key)");
            return Ok(());
        };
        let key_id = key.key_id();
        match self.state.key(key_id) {
            None => self.state.add_key(key).await?,
            Some(held)
                if held.suite() == key.suite() && held.secret_bytes() == key.secret_bytes() =>
            {
                self.state.switch_key(key_id);
            }
            Some(_) => {
                self.report.downlink_invalid += 1;
                warn!(device = %self.config.device_id, key_id, "rekey names a key id the device holds with other key material; refused");
                return Ok(());
            }
        }
        self.report.rekeys += 1;
        info!(device = %self.config.device_id, key_id, "rekeyed: new uplinks are sealed with the new key");
        Ok(())
    }

    fn parse_rekey(&self, plaintext: &[u8]) -> Option<DeviceKey> {
        let json: RekeyJson = serde_json::from_slice(plaintext).ok()?;
        let suite = Suite::from_name(&json.suite)?;
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(json.key.as_bytes(), &mut *secret).ok()?;
        let device_id = self.state.device_id().clone();
        Some(DeviceKey::new(device_id, json.key_id, suite, *secret))
    }
}

/// Any command: only `cmd` is read (other fields are free-form and never logged).
#[derive(Deserialize)]
struct CommandJson {
    cmd: String,
}

/// `{"cmd": "rekey", "key_id": 2, "suite": "aes-256-gcm", "key": "<64 hex>"}`.
#[derive(Deserialize)]
struct RekeyJson {
    key_id: u32,
    suite: String,
    key: String,
}

impl Drop for RekeyJson {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// A `cmd` value safe to log: at most [`CMD_LOG_LEN`] characters, non-printable ones
/// replaced.
fn printable(cmd: &str) -> String {
    cmd.chars()
        .take(CMD_LOG_LEN)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
