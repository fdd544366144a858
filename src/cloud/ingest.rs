//! What the ingest does with one envelope, and with a batch.
//!
//! Per envelope: topic → gateway and device; clear header (device id must match the
//! topic); registry (may this gateway carry this device?); key by `(device, key_id)`;
//! open; kind must be uplink; replay rule; content (JSON reading, compressed reading,
//! image chunk, or opaque); into the sink's batch. Per batch: sink fsync, replay
//! checkpoint; only then may the broker get its acknowledgements and devices their
//! receipts.
//!
//! A JSON uplink with a `command_result` (a device's answer to a command, see
//! `crate::commands`) is stored like any other and, once accepted, counted by outcome
//! and logged (rate-limited per outcome).
//!
//! With the PostgreSQL sink the replay rule moves into the batch's transaction (the
//! table is the replay state, shared by several instances): an envelope that passed
//! every other check is [`Outcome::Pending`] until [`Ingest::commit`] resolves it.

use std::collections::{BTreeMap, HashMap};

use e3::{Header, Kind, ReceiptEntry, Verdict};

use super::CloudError;
use super::images::{ImageProgress, ImageStore};
use super::metrics::{CloudMetrics, CloudRejection};
use super::postgres::PostgresSink;
use super::registry::Registry;
use super::replay::ReplayStore;
use super::sink::{JsonlSink, SinkLine};
use crate::commands::{CommandOutcome, CommandResult, quote, quote_up_to};
use crate::keys::KeyStore;
use crate::log_limit::LogLimiter;
use crate::payload::{Content, decode};
use crate::topics::GatewayTemplate;

/// What became of one envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// New: in the sink's batch; a receipt is due once the batch is durable.
    Accepted(Route),
    /// Already accepted earlier: dropped, but answered with a receipt again so the
    /// device stops resending.
    Duplicate(Route),
    /// Refused for this reason; nothing stored, no receipt.
    Rejected(CloudRejection),
    /// In the batch of a sink that applies the replay rule at commit (PostgreSQL);
    /// [`Ingest::commit`] turns it into `Accepted`, `Duplicate` or `Rejected(Stale)`.
    Pending(Route),
}

/// Who a receipt goes to and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The gateway the envelope came through (the receipt goes back the same way).
    pub gateway: String,
    /// The device.
    pub device: String,
    /// The accepted uplink.
    pub entry: ReceiptEntry,
}

/// Where accepted messages go, and who applies the replay rule.
pub enum Sink {
    /// The JSON Lines file (one instance); the rule is applied per envelope with the
    /// replay windows in sled.
    Jsonl {
        /// The log of record.
        sink: JsonlSink,
        /// The windows, checkpointed with the sink offset they cover.
        replay: ReplayStore,
    },
    /// PostgreSQL (one or several instances); the rule is applied per batch by the
    /// database (see `postgres`).
    Postgres(PostgresSink),
}

impl Sink {
    /// The JSON Lines sink; `tail` (from [`JsonlSink::open`]) catches the replay
    /// windows up with it.
    pub fn jsonl(sink: JsonlSink, mut replay: ReplayStore, tail: Vec<SinkLine>) -> Self {
        for line in &tail {
            replay.accept(&line.device, line.seq);
        }
        if !tail.is_empty() {
            tracing::info!(lines = tail.len(), "replay state caught up with the sink");
        }
        Self::Jsonl { sink, replay }
    }
}

/// The ingest's state: keys, registry, sink (with the replay state), images.
pub struct Ingest {
    pub(crate) keys: KeyStore,
    registry: Option<Registry>,
    sink: Sink,
    images: ImageStore,
    up_topic: GatewayTemplate,
    max_envelope: usize,
    metrics: CloudMetrics,
    /// Downlink seqs reserved (persisted) per device and not used yet: one fsync per
    /// block instead of one per receipt.
    seq_blocks: HashMap<String, std::ops::Range<u64>>,
    /// Command results stored in the current batch, counted once their envelope is
    /// accepted (a duplicate is not counted again); cleared at each commit.
    command_results: HashMap<(String, u64), CommandResult>,
    log: LogLimiter,
}

/// Downlink seqs reserved at a time.
const SEQ_BLOCK: u64 = 64;

impl Ingest {
    /// Assembles the ingest from its parts.
    pub fn new(
        keys: KeyStore,
        registry: Option<Registry>,
        sink: Sink,
        images: ImageStore,
        up_topic: GatewayTemplate,
        max_envelope: usize,
        metrics: CloudMetrics,
    ) -> Self {
        Self {
            keys,
            registry,
            sink,
            images,
            up_topic,
            max_envelope,
            metrics,
            seq_blocks: HashMap::new(),
            command_results: HashMap::new(),
            log: LogLimiter::new(std::time::Duration::from_secs(10)),
        }
    }

    fn next_downlink_seq(&mut self, device: &str) -> Option<u64> {
        let block = self.seq_blocks.entry(device.to_owned()).or_insert(0..0);
        if block.is_empty() {
            *block = self.keys.reserve_downlink_seqs(device, SEQ_BLOCK).ok()?;
        }
        let seq = block.start;
        block.start += 1;
        Some(seq)
    }

    /// Processes one envelope received on `topic` at `now_ms`. Refusals are counted
    /// and logged at most once per reason every 10 s (with the topic, which names the
    /// gateway and the device, never with payload bytes).
    pub fn process(&mut self, topic: &str, envelope: &[u8], now_ms: u64) -> Outcome {
        let outcome = self.classify(topic, envelope, now_ms);
        self.count(&outcome, topic, Some(envelope.len()));
        outcome
    }

    /// Counts a final outcome, and logs a refusal (rate-limited per reason).
    fn count(&mut self, outcome: &Outcome, topic: &str, bytes: Option<usize>) {
        let reason = match outcome {
            Outcome::Accepted(route) => {
                self.metrics.accepted.inc();
                self.count_command_result(route);
                return;
            }
            Outcome::Pending(_) => return,
            Outcome::Duplicate(_) => CloudRejection::Duplicate,
            Outcome::Rejected(reason) => *reason,
        };
        self.metrics.reject(reason);
        if let Some(suppressed) = self.log.check(reason.as_str()) {
            tracing::warn!(
                reason = reason.as_str(),
                topic,
                bytes,
                suppressed,
                "envelope not delivered"
            );
        }
    }

    /// Counts and logs (rate-limited per outcome) the command result `route` carried,
    /// if it carried one.
    fn count_command_result(&mut self, route: &Route) {
        let key = (route.device.clone(), route.entry.seq);
        let Some(result) = self.command_results.remove(&key) else {
            return;
        };
        let outcome = result.result;
        self.metrics.command_result(outcome);
        let reason = match outcome {
            CommandOutcome::Executed => "command_executed",
            CommandOutcome::Refused => "command_refused",
        };
        if let Some(suppressed) = self.log.check(reason) {
            let (cmd, message) = (quote(&result.cmd), quote_up_to(&result.message, 256));
            match outcome {
                CommandOutcome::Executed => {
                    tracing::info!(device = %route.device, command_seq = result.seq, cmd, suppressed, "device executed a command")
                }
                CommandOutcome::Refused => {
                    tracing::warn!(device = %route.device, command_seq = result.seq, cmd, message, suppressed, "device refused a command")
                }
            }
        }
    }

    fn classify(&mut self, topic: &str, envelope: &[u8], now_ms: u64) -> Outcome {
        use CloudRejection as R;
        let Some((gateway, device)) = self.up_topic.parse(topic) else {
            return Outcome::Rejected(R::Topic);
        };
        if envelope.len() > self.max_envelope {
            return Outcome::Rejected(R::Oversize);
        }
        let Ok(header) = Header::parse(envelope) else {
            return Outcome::Rejected(R::Header);
        };
        if header.device_id() != device {
            return Outcome::Rejected(R::DeviceMismatch);
        }
        if let Some(registry) = &self.registry
            && registry.allowed(gateway, device).is_none()
        {
            return Outcome::Rejected(R::NotAllowed);
        }
        let key = match self.keys.key_for_open(device, header.key_id(), now_ms) {
            Ok(key) => key,
            Err(err) => return Outcome::Rejected(R::from_key_error(err.reason())),
        };
        let Ok((header, plaintext)) = key.open(envelope) else {
            return Outcome::Rejected(R::Auth);
        };
        if header.kind() != Kind::Uplink {
            return Outcome::Rejected(R::WrongKind);
        }
        let route = Route {
            gateway: gateway.to_owned(),
            device: device.to_owned(),
            entry: ReceiptEntry {
                key_id: header.key_id(),
                seq: header.seq(),
            },
        };
        // JSON Lines: check now, record only once the message is stored, so a failed
        // store (image I/O) leaves the seq fresh for the device's resend.
        let decided_at_commit = match &mut self.sink {
            Sink::Jsonl { replay, .. } => match replay.check(device, header.seq()) {
                Verdict::Fresh => false,
                Verdict::Duplicate => return Outcome::Duplicate(route),
                Verdict::Stale => return Outcome::Rejected(R::Stale),
            },
            Sink::Postgres(_) => true,
        };
        match self.store(&route, &plaintext, now_ms) {
            Ok(()) if decided_at_commit => Outcome::Pending(route),
            Ok(()) => {
                if let Sink::Jsonl { replay, .. } = &mut self.sink {
                    replay.accept(device, header.seq());
                }
                Outcome::Accepted(route)
            }
            Err(reason) => Outcome::Rejected(reason),
        }
    }

    fn store(
        &mut self,
        route: &Route,
        plaintext: &[u8],
        now_ms: u64,
    ) -> Result<(), CloudRejection> {
        let mut line = SinkLine {
            gateway: route.gateway.clone(),
            device: route.device.clone(),
            key_id: route.entry.key_id,
            seq: route.entry.seq,
            received_ms: now_ms,
            json: None,
            base64: None,
            image_chunk: None,
        };
        match decode(plaintext) {
            Ok(Content::Json(value)) => {
                if let Some(result) = CommandResult::from_uplink(&value) {
                    self.command_results
                        .insert((route.device.clone(), route.entry.seq), result);
                }
                line.json = Some(value);
            }
            Ok(Content::Image(chunk)) => {
                line.image_chunk = Some((chunk.image_id, chunk.index, chunk.count));
                match self.images.add(&route.device, &chunk) {
                    Ok(ImageProgress::Complete(path)) => {
                        self.metrics.images_completed.inc();
                        tracing::info!(device = %route.device, path = %path.display(), "image reassembled, SHA-256 verified");
                    }
                    Ok(ImageProgress::Corrupt) => {
                        self.metrics.reject(CloudRejection::ImageCorrupt);
                    }
                    Ok(ImageProgress::Partial) => {}
                    Err(err) => {
                        tracing::error!(error = %err, "cannot store an image chunk");
                        return Err(CloudRejection::Storage);
                    }
                }
            }
            Ok(Content::Opaque) | Err(_) => line.base64 = Some(base64_of(plaintext)),
        }
        match &mut self.sink {
            Sink::Jsonl { sink, .. } => sink.push(&line),
            Sink::Postgres(sink) => {
                if let Err(err) = sink.push(&line) {
                    tracing::error!(error = %err, "cannot store a message in PostgreSQL");
                    return Err(CloudRejection::Storage);
                }
            }
        }
        Ok(())
    }

    /// Makes the batch durable. JSON Lines: sink fsync, then the replay checkpoint.
    /// PostgreSQL: one transaction that also applies the replay rule; each
    /// [`Outcome::Pending`] in `outcomes` (the batch's outcomes in the order
    /// [`process`](Self::process) returned them) is then resolved and counted.
    ///
    /// # Errors
    /// [`CloudError::Sink`] or [`CloudError::Postgres`]: the batch is not durable; the
    /// caller must not acknowledge it and should stop (the next start rebuilds the
    /// replay state from the sink, or finds it in the table).
    pub async fn commit<'o>(
        &mut self,
        outcomes: impl IntoIterator<Item = &'o mut Outcome>,
    ) -> Result<(), CloudError> {
        let verdicts = match &mut self.sink {
            Sink::Jsonl { sink, replay } => {
                self.command_results.clear();
                let offset = sink.commit()?;
                if let Err(err) = replay.checkpoint(offset) {
                    // The sink is durable; a stale checkpoint only means a longer catch-up.
                    tracing::warn!(error = %err, "replay checkpoint failed; the sink tail will be replayed on start");
                }
                return Ok(());
            }
            Sink::Postgres(sink) => sink.commit().await.map_err(CloudError::Postgres)?,
        };
        let pending = outcomes
            .into_iter()
            .filter(|outcome| matches!(outcome, Outcome::Pending(_)));
        // One verdict per push, and each push made exactly one `Pending`.
        for (outcome, verdict) in pending.zip(verdicts) {
            self.resolve(outcome, verdict);
        }
        self.command_results.clear();
        Ok(())
    }

    fn resolve(&mut self, outcome: &mut Outcome, verdict: Verdict) {
        let Outcome::Pending(route) = outcome else {
            return;
        };
        let route = route.clone();
        let topic = self.up_topic.render(&route.gateway, &route.device);
        *outcome = match verdict {
            Verdict::Fresh => Outcome::Accepted(route),
            Verdict::Duplicate => Outcome::Duplicate(route),
            Verdict::Stale => Outcome::Rejected(CloudRejection::Stale),
        };
        self.count(outcome, &topic, None);
    }

    /// Seals receipts for `routes` (grouped per gateway and device, 256 entries at
    /// most per receipt) with each device's current key; returns `(gateway, device,
    /// envelope)` ready to publish.
    pub fn receipts(&mut self, routes: &[Route]) -> Vec<(String, String, Vec<u8>)> {
        let mut grouped: BTreeMap<(&str, &str), Vec<ReceiptEntry>> = BTreeMap::new();
        for route in routes {
            grouped
                .entry((&route.gateway, &route.device))
                .or_default()
                .push(route.entry);
        }
        let mut out = Vec::new();
        for ((gateway, device), entries) in grouped {
            let Ok(key) = self.keys.current(device) else {
                continue;
            };
            for chunk in entries.chunks(e3::receipt::MAX_ENTRIES) {
                let Ok(plaintext) = e3::encode_receipt_vec(chunk) else {
                    continue;
                };
                let Some(seq) = self.next_downlink_seq(device) else {
                    continue;
                };
                if let Ok(envelope) = key.seal(Kind::Receipt, seq, &plaintext) {
                    out.push((gateway.to_owned(), device.to_owned(), envelope));
                }
            }
        }
        out
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
