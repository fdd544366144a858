//! The durable store-and-forward queue (sled).
//!
//! # Durability
//!
//! - [`Queue::enqueue`] returns `Ok` only after the record is in sled and
//!   `Db::flush_async` covering it returned. sled documents that after a successful flush
//!   "all previous writes will be recovered if the system crashes". So once a device got
//!   its PUBACK, a kill -9 or a power cut does not lose the record.
//! - [`Queue::ack`] removes a record after the cloud's PUBACK for it, without its own
//!   flush (sled flushes in the background every 500 ms). A power cut can bring an
//!   acknowledged record back; it is sent again and the cloud's replay rule drops it.
//! - Records are keyed by device and a globally increasing id: per-device FIFO, and a
//!   drain that can take turns between devices.
//! - On open, every record is checked (CRC-32 over key and value); a damaged one is
//!   moved to the `quarantine` tree and counted, and the rest is kept. A database sled
//!   cannot open at all is moved aside whole and a fresh one started, so the gateway
//!   keeps running (the old directory stays on disk for offline inspection).
//!
//! # Layout
//!
//! - `record`: the versioned on-disk format.
//! - `ledger`: bytes per device, caps, admission.
//! - `writer`: the group-commit task.

mod ledger;
pub mod record;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot};

pub use ledger::{DeviceUsage, Limit};
pub use record::{Record, RecordId};

use ledger::Ledger;
use writer::WriteRequest;

/// What to do when a cap is reached (`queue.overflow`: `"refuse"` or `"drop-oldest"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Refuse the new record: the device gets no PUBACK and keeps its data. The default.
    #[default]
    Refuse,
    /// Drop the oldest records (of the device at its quota, of the largest device at
    /// the queue cap) to make room; every drop is counted.
    DropOldest,
}

/// How the queue is opened.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Cap on stored bytes (keys and values).
    pub max_bytes: u64,
    /// Refuse new records while the filesystem has less free space than this.
    pub min_free_disk: u64,
    /// Cap on one device's stored bytes.
    pub device_quota: u64,
    /// Policy at a cap.
    pub overflow: Overflow,
    /// sled page cache size in bytes (sled's default is 1 GiB: far too much for a Pi).
    pub cache_size: u64,
    /// Most records per group commit.
    pub max_batch: usize,
}

impl QueueConfig {
    /// Defaults for a queue at `path`: 256 MiB cap, 64 MiB OS reserve, 32 MiB per
    /// device, refuse at the cap, 8 MiB cache, batches of 1024.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: 256 << 20,
            min_free_disk: 64 << 20,
            device_quota: 32 << 20,
            overflow: Overflow::Refuse,
            cache_size: 8 << 20,
            max_batch: 1024,
        }
    }
}

/// Why the queue could not be opened or used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QueueError {
    /// sled failed.
    #[error("queue storage at {path} failed")]
    Storage {
        /// The queue directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<sled::Error>,
    },
    /// A damaged database could not be moved aside.
    #[error("cannot move damaged queue {path} aside")]
    MoveAside {
        /// The queue directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a record was not stored. In every case the device gets no PUBACK.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// A cap is reached and the policy is to refuse.
    #[error("queue full: {} limit reached", .0.as_str())]
    Full(Limit),
    /// Writing or syncing failed (for example, the disk is full).
    #[error("queue write failed")]
    Storage(#[source] Arc<sled::Error>),
    /// The writer's input is full; nothing was taken (only from [`Queue::submit`]).
    #[error("queue writer is busy")]
    Busy,
    /// The queue is shutting down.
    #[error("queue is closed")]
    Closed,
}

impl EnqueueError {
    /// A stable reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Full(limit) => limit.as_str(),
            Self::Storage(_) => "storage",
            Self::Busy => "busy",
            Self::Closed => "closed",
        }
    }
}

/// Counters the queue keeps for metrics.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Records made durable.
    pub committed: AtomicU64,
    /// Group commits (fsyncs).
    pub commits: AtomicU64,
    /// Records dropped by the drop-oldest policy at a device quota.
    pub dropped_device_quota: AtomicU64,
    /// Records dropped by the drop-oldest policy at the queue cap.
    pub dropped_queue_bytes: AtomicU64,
    /// Damaged records moved to quarantine.
    pub quarantined: AtomicU64,
    /// Whole databases moved aside because sled could not open them.
    pub databases_moved_aside: AtomicU64,
}

/// A snapshot for metrics, health and `queue inspect`.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    /// Stored records and bytes.
    pub total: DeviceUsage,
    /// Devices with at least one record.
    pub devices: usize,
    /// Arrival time (ms since epoch) of the oldest stored record.
    pub oldest_arrival_ms: Option<u64>,
    /// sled's files on disk, in bytes.
    pub size_on_disk: u64,
    /// Records in quarantine.
    pub quarantine_records: usize,
}

/// A record handed to the writer; it is durable once [`PendingWrite::durable`] says so.
/// Dropping it does not cancel the write.
pub struct PendingWrite {
    queue: Queue,
    device_id: String,
    id: RecordId,
    size: u64,
    outcome: oneshot::Receiver<writer::WriteResult>,
}

impl PendingWrite {
    /// The id the record got.
    pub fn id(&self) -> RecordId {
        self.id
    }

    /// Waits for the group commit that covers this record.
    ///
    /// # Errors
    /// [`EnqueueError::Storage`] if writing or syncing failed, [`EnqueueError::Closed`]
    /// if the writer stopped first. Then the record is not stored.
    pub async fn durable(self) -> Result<RecordId, EnqueueError> {
        let result = match self.outcome.await {
            Ok(Ok(())) => return Ok(self.id),
            Ok(Err(err)) => Err(EnqueueError::Storage(err)),
            Err(_) => Err(EnqueueError::Closed),
        };
        self.queue
            .inner
            .ledger()
            .release(&self.device_id, self.size);
        result
    }
}

/// A handle to the queue; cheap to clone. The writer task stops when the last handle
/// is dropped or [`Queue::close`] is called and the last in-flight write completed.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    config: QueueConfig,
    db: sled::Db,
    records: sled::Tree,
    quarantine: sled::Tree,
    writes: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    ledger: Mutex<Ledger>,
    arrived: Notify,
    free_disk: AtomicU64,
    counters: Arc<QueueCounters>,
}

impl Queue {
    /// Opens (or creates) the queue, recovers every intact record, quarantines damaged
    /// ones, and starts the writer task on the current tokio runtime.
    ///
    /// # Errors
    /// [`QueueError`] if storage cannot be opened even after moving a damaged one aside.
    pub fn open(config: QueueConfig) -> Result<Self, QueueError> {
        let counters = Arc::new(QueueCounters::default());
        let db = open_db(&config, &counters)?;
        let storage = |source| QueueError::Storage {
            path: config.path.clone(),
            source: Arc::new(source),
        };
        let records = db.open_tree("records").map_err(storage)?;
        let quarantine = db.open_tree("quarantine").map_err(storage)?;
        let ledger = recover(&records, &quarantine, &counters).map_err(storage)?;
        db.flush().map_err(storage)?;

        // Room for two full batches: one being committed, one gathering.
        let (tx, rx) = mpsc::channel(config.max_batch.max(1) * 2);
        let inner = Arc::new(Inner {
            free_disk: AtomicU64::new(free_disk_bytes(&config.path)),
            config,
            db: db.clone(),
            records: records.clone(),
            quarantine,
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            ledger: Mutex::new(ledger),
            arrived: Notify::new(),
            counters,
        });
        let weak = Arc::downgrade(&inner);
        let max_batch = inner.config.max_batch.max(1);
        let task = tokio::spawn(writer::run(db, records, rx, max_batch, move |n| {
            if let Some(inner) = weak.upgrade() {
                inner.after_commit(n);
            }
        }));
        *inner.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(Self { inner })
    }

    /// Stores one envelope of `device_id`. Returns once the record is durable
    /// (fsync'd by a group commit): the caller may then PUBACK. Concurrent calls are
    /// ordered by when they got room in the writer's channel.
    ///
    /// # Errors
    /// [`EnqueueError::Full`] at a cap under the refuse policy (or when the OS reserve is
    /// reached), [`EnqueueError::Storage`] when writing or syncing failed,
    /// [`EnqueueError::Closed`] during shutdown. In every case nothing was stored.
    pub async fn enqueue(&self, device_id: &str, payload: Bytes) -> Result<RecordId, EnqueueError> {
        let sender = self.inner.sender().ok_or(EnqueueError::Closed)?;
        let permit = sender.reserve().await.map_err(|_| EnqueueError::Closed)?;
        self.hand_over(permit, device_id, &payload)?.durable().await
    }

    /// Hands one envelope to the writer without waiting: the record id, the admission
    /// at the caps and the place in the writer's input are all decided now, so records
    /// submitted one after another keep that order. Await [`PendingWrite::durable`]
    /// before acknowledging.
    ///
    /// # Errors
    /// [`EnqueueError::Busy`] when the writer's input is full (try again shortly), and
    /// the errors of [`Queue::enqueue`]. Nothing was stored.
    pub fn submit(&self, device_id: &str, payload: &Bytes) -> Result<PendingWrite, EnqueueError> {
        let sender = self.inner.sender().ok_or(EnqueueError::Closed)?;
        let permit = sender.try_reserve().map_err(|err| match err {
            mpsc::error::TrySendError::Full(()) => EnqueueError::Busy,
            mpsc::error::TrySendError::Closed(()) => EnqueueError::Closed,
        })?;
        self.hand_over(permit, device_id, payload)
    }

    fn hand_over(
        &self,
        permit: mpsc::Permit<'_, WriteRequest>,
        device_id: &str,
        payload: &[u8],
    ) -> Result<PendingWrite, EnqueueError> {
        let inner = &self.inner;
        let id = RecordId(
            inner
                .db
                .generate_id()
                .map_err(|e| EnqueueError::Storage(Arc::new(e)))?,
        );
        let key = record::encode_key(device_id, id);
        let value = record::encode_value(&key, now_ms(), payload);
        let size = (key.len() + value.len()) as u64;
        inner.admit(device_id, size)?;
        let (reply, outcome) = oneshot::channel();
        permit.send(WriteRequest { key, value, reply });
        Ok(PendingWrite {
            queue: self.clone(),
            device_id: device_id.to_owned(),
            id,
            size,
            outcome,
        })
    }

    /// Devices that have records, in a stable order.
    pub fn devices(&self) -> Vec<String> {
        self.inner.ledger().devices()
    }

    /// Up to `limit` records of `device_id` with ids above `after`, oldest first.
    /// Damaged records met on the way are quarantined and skipped.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if sled fails.
    pub fn read_device(
        &self,
        device_id: &str,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let inner = &self.inner;
        let start = record::encode_key(
            device_id,
            RecordId(after.map_or(0, |a| a.0.saturating_add(1))),
        );
        let end = record::encode_key(device_id, RecordId(u64::MAX));
        let mut out = Vec::new();
        for item in inner.records.range(start..=end) {
            let (key, value) = item.map_err(|e| inner.storage_error(e))?;
            match record::decode(&key, &value) {
                Ok(record) => out.push(record),
                Err(_) => inner.quarantine_one(&key, &value),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Removes a record once the cloud acknowledged it. Returns false if it was already
    /// gone (acknowledged twice, or dropped by policy meanwhile).
    ///
    /// # Errors
    /// [`QueueError::Storage`] if sled fails.
    pub fn ack(&self, device_id: &str, id: RecordId) -> Result<bool, QueueError> {
        let inner = &self.inner;
        let key = record::encode_key(device_id, id);
        let removed = inner
            .records
            .remove(&key)
            .map_err(|e| inner.storage_error(e))?;
        if let Some(value) = &removed {
            inner
                .ledger()
                .release(device_id, (key.len() + value.len()) as u64);
        }
        Ok(removed.is_some())
    }

    /// Waits until a commit stored new records (returns at once if one happened since
    /// the last call).
    pub async fn wait_for_records(&self) {
        self.inner.arrived.notified().await;
    }

    /// Usage of one device.
    pub fn device_usage(&self, device_id: &str) -> DeviceUsage {
        self.inner.ledger().device(device_id)
    }

    /// Counters for metrics.
    pub fn counters(&self) -> Arc<QueueCounters> {
        Arc::clone(&self.inner.counters)
    }

    /// A snapshot of the queue's size and age.
    pub fn stats(&self) -> QueueStats {
        let inner = &self.inner;
        let (total, devices) = {
            let ledger = inner.ledger();
            (ledger.total(), ledger.devices())
        };
        let oldest_arrival_ms = devices
            .iter()
            .filter_map(|device| inner.oldest_of(device))
            .filter_map(|(key, value)| record::decode(&key, &value).ok())
            .map(|record| record.arrival_ms)
            .min();
        QueueStats {
            total,
            devices: devices.len(),
            oldest_arrival_ms,
            size_on_disk: inner.db.size_on_disk().unwrap_or(0),
            quarantine_records: inner.quarantine.len(),
        }
    }

    /// Stops taking new records, waits until the writes already handed to the writer
    /// are durable (their publishers get their PUBACKs), then flushes removals too.
    /// sled's directory lock is released once the last handle is dropped.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the final flush fails.
    pub async fn close(&self) -> Result<(), QueueError> {
        self.inner
            .writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let task = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            // A panicked writer has nothing left to finish; the flush below still runs.
            let _ = task.await;
        }
        self.flush().await
    }

    /// Flushes everything (including removals) to disk.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if sled fails.
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.inner
            .db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| self.inner.storage_error(e))
    }
}

impl Inner {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger holds plain counters; a panic elsewhere cannot leave it torn.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sender(&self) -> Option<mpsc::Sender<WriteRequest>> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn storage_error(&self, source: sled::Error) -> QueueError {
        QueueError::Storage {
            path: self.config.path.clone(),
            source: Arc::new(source),
        }
    }

    fn after_commit(&self, records: usize) {
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .committed
            .fetch_add(records as u64, Ordering::Relaxed);
        self.free_disk
            .store(free_disk_bytes(&self.config.path), Ordering::Relaxed);
        self.arrived.notify_one();
    }

    /// Reserves room for a record, dropping oldest records first if the policy says so.
    fn admit(&self, device_id: &str, size: u64) -> Result<(), EnqueueError> {
        if self.free_disk.load(Ordering::Relaxed) < self.config.min_free_disk {
            // Re-read: space may have come back since the last commit.
            let free = free_disk_bytes(&self.config.path);
            self.free_disk.store(free, Ordering::Relaxed);
            if free < self.config.min_free_disk {
                return Err(EnqueueError::Full(Limit::DiskReserve));
            }
        }
        let cfg = &self.config;
        loop {
            let limit = match self
                .ledger()
                .admit(device_id, size, cfg.max_bytes, cfg.device_quota)
            {
                Ok(()) => return Ok(()),
                Err(limit) => limit,
            };
            if cfg.overflow == Overflow::Refuse || size > cfg.device_quota.min(cfg.max_bytes) {
                return Err(EnqueueError::Full(limit));
            }
            let victim = match limit {
                Limit::DeviceQuota => Some(device_id.to_owned()),
                _ => self.ledger().largest_device().map(str::to_owned),
            };
            let dropped = victim.is_some_and(|victim| self.drop_oldest(&victim, limit));
            if !dropped {
                return Err(EnqueueError::Full(limit));
            }
        }
    }

    /// The first (oldest) record of a device, as raw key and value.
    fn oldest_of(&self, device_id: &str) -> Option<(sled::IVec, sled::IVec)> {
        let prefix = record::device_prefix(device_id);
        self.records.scan_prefix(&prefix).next()?.ok()
    }

    fn drop_oldest(&self, device_id: &str, limit: Limit) -> bool {
        let Some((key, _)) = self.oldest_of(device_id) else {
            return false;
        };
        let Ok(Some(value)) = self.records.remove(&key) else {
            // Acknowledged meanwhile: that made room too.
            return true;
        };
        self.ledger()
            .release(device_id, (key.len() + value.len()) as u64);
        let counter = match limit {
            Limit::DeviceQuota => &self.counters.dropped_device_quota,
            _ => &self.counters.dropped_queue_bytes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            device = device_id,
            limit = limit.as_str(),
            "queue full: dropped the oldest record (overflow = drop-oldest)"
        );
        true
    }

    fn quarantine_one(&self, key: &[u8], value: &[u8]) {
        quarantine_record(&self.records, &self.quarantine, key, value, &self.counters);
        if let Ok((device, _)) = record::decode_key(key) {
            self.ledger()
                .release(device, (key.len() + value.len()) as u64);
        }
    }
}

fn quarantine_record(
    records: &sled::Tree,
    quarantine: &sled::Tree,
    key: &[u8],
    value: &[u8],
    counters: &QueueCounters,
) {
    let moved = quarantine
        .insert(key, value)
        .and_then(|_| records.remove(key));
    counters.quarantined.fetch_add(1, Ordering::Relaxed);
    match moved {
        Ok(_) => tracing::error!(
            bytes = value.len(),
            "damaged queue record moved to quarantine"
        ),
        Err(err) => {
            tracing::error!(error = %err, "damaged queue record could not be moved to quarantine")
        }
    }
}

/// Scans every record: counts the intact ones, quarantines the damaged ones.
fn recover(
    records: &sled::Tree,
    quarantine: &sled::Tree,
    counters: &QueueCounters,
) -> Result<Ledger, sled::Error> {
    let mut ledger = Ledger::default();
    let mut damaged = Vec::new();
    for item in records.iter() {
        let (key, value) = item?;
        match record::decode(&key, &value) {
            Ok(record) => ledger.add(&record.device_id, (key.len() + value.len()) as u64),
            Err(_) => damaged.push((key, value)),
        }
    }
    for (key, value) in damaged {
        quarantine_record(records, quarantine, &key, &value, counters);
    }
    Ok(ledger)
}

fn open_db(config: &QueueConfig, counters: &QueueCounters) -> Result<sled::Db, QueueError> {
    let sled_config = || {
        sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_size)
            .flush_every_ms(Some(500))
    };
    match open_when_unlocked(&sled_config()) {
        Ok(db) => Ok(db),
        Err(sled::Error::Io(err)) => Err(QueueError::Storage {
            path: config.path.clone(),
            source: Arc::new(sled::Error::Io(err)),
        }),
        Err(err) => {
            // Corrupt beyond sled's own recovery: keep the gateway running on a fresh
            // queue and leave the damaged one for offline inspection.
            let aside = moved_aside_path(&config.path);
            tracing::error!(error = %err, path = %config.path.display(), aside = %aside.display(), "queue database cannot be opened; moving it aside and starting a new one");
            std::fs::rename(&config.path, &aside).map_err(|source| QueueError::MoveAside {
                path: config.path.clone(),
                source,
            })?;
            counters
                .databases_moved_aside
                .fetch_add(1, Ordering::Relaxed);
            sled_config().open().map_err(|source| QueueError::Storage {
                path: config.path.clone(),
                source: Arc::new(source),
            })
        }
    }
}

/// Opens the database, waiting (up to 5 s) while sled's file lock is still held by
/// the handles of a queue of this process that was just closed: sled releases the
/// lock only when its last background thread drops its handle, which can lag a
/// close on a loaded machine. Another process holding the lock still fails, later.
fn open_when_unlocked(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(err))
                if err.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn moved_aside_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".damaged-{}", now_ms() / 1000));
    path.with_file_name(name)
}

/// Free bytes for unprivileged users on the filesystem holding `path` (or its nearest
/// existing ancestor). `u64::MAX` if it cannot be read, so a failing statvfs never
/// stops the queue by itself.
fn free_disk_bytes(path: &Path) -> u64 {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    rustix::fs::statvfs(existing).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize))
}
use crate::clock::now_ms;
