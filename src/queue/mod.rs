//! The durable store-and-forward queue (sled).
//!
//! # Durability
//!
//! - [`Queue::enqueue`] returns `Ok` only after the record is in sled, a
//!   `Db::flush_async` covering it returned, and sled's files were `fdatasync`'d
//!   ([`durable`]: sled's own flush is not enough for a power cut). So once a device
//!   got its PUBACK, a kill -9 or a power cut does not lose the record.
//! - [`Queue::ack`] removes a record after the cloud's PUBACK for it, without its own
//!   flush (sled flushes in the background every 500 ms). A power cut can bring an
//!   acknowledged record back; it is sent again and the cloud's replay rule drops it.
//! - Records are keyed by device and a globally increasing id: per-device FIFO, and a
//!   drain that can take turns between devices.
//! - On open, every record is checked (CRC-32 over key and value); a damaged one is
//!   moved to the `quarantine` tree and counted, and the rest is kept.
//! - sled 0.34 replays its log only up to the first message that fails its own
//!   checksum, and overwrites what follows. The queue gets back what sled allows (a
//!   damaged `conf` is set aside and sled writes a fresh one, a snapshot pointing into
//!   damage is dropped so the whole log is replayed, pages sled cannot read are read
//!   around), and salvages the rest: every record value is a self-checking frame
//!   ([`record`]), so records sled cannot reach are found in the raw bytes of a copy of
//!   the damaged database (`salvage`). Copies are kept next to the queue
//!   (`queue.damaged-<time>`, for `blindgate queue inspect`); a database nothing can be
//!   read from is set aside whole and a fresh one started, so the gateway keeps running.
//! - A clean stop ([`Queue::close`]) closes sled and leaves `queue.clean` (`marker`):
//!   the records it left and a fingerprint of sled's files. The next open copies files
//!   that changed since aside before sled touches them, salvages the records the marker
//!   names that sled did not give back, and counts what is still missing
//!   (`lost_at_open`), so damage between a stop and a start is never silent. After a
//!   crash there is no marker. `tests/corruption.rs` measures all of this.
//!
//! # Storage failures
//!
//! After one failed write (a full disk), sled refuses every later write of that
//! database until it is opened again. The writer then holds the batch (no PUBACK for
//! it, new records are refused meanwhile), reopens the database, and retries with a
//! growing pause until the write succeeds: once space is back, the held records are
//! stored and acknowledged and forwarding goes on, without a restart. Removals the
//! failed database may not have kept are applied again to the reopened one.
//!
//! Draining needs disk space too (sled logs removals, and reopening writes a
//! snapshot). The queue keeps a 2 MiB emergency reserve in `queue.reserve`; at the
//! first failure it deletes that file, so it can reopen and drain a full disk, and
//! takes no new records until there is room for the reserve again.
//!
//! When the OS reserve (`min_free_disk`) refuses records while sled's file is mostly
//! freed space (sled does not shrink its file after a drain), the queue rebuilds the
//! database from a dump of its live records (`store`), which gives the space back.
//!
//! # Layout
//!
//! - `record`: the versioned on-disk format.
//! - `marker`: the clean-stop marker.
//! - `salvage`: finding records in the raw bytes of a damaged database.
//! - `ledger`: bytes per device, caps, admission.
//! - `store`: the sled database, opening, recovering and reopening it.
//! - `rebuild`: replacing the database with one made from a dump of its live records.
//! - `writer`: the group-commit task.
//! - `inspect`: `blindgate queue inspect`, offline.

mod durable;
pub mod inspect;
mod ledger;
mod marker;
mod rebuild;
pub mod record;
mod salvage;
pub mod segments;
mod store;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot};

pub use ledger::{DeviceUsage, Limit};
pub use record::{Record, RecordId};

use ledger::Ledger;
use marker::CleanMarker;
use store::Store;
use writer::WriteRequest;

/// sled's files are about this many times the live records (measured 2.5x after a
/// fill); used to judge whether a rebuild gives space back.
const SLED_AMPLIFICATION: u64 = 3;
/// A rebuild must give back at least this much.
const REBUILD_MIN_GAIN: u64 = 1 << 20;
/// A fresh sled database: one 512 KiB segment (and a 62-byte `conf`).
const FRESH_DB: u64 = 512 << 10;
/// How often a refusal at the OS reserve may check whether a rebuild is worth it.
const REBUILD_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Disk space the queue keeps for itself in a file next to the database, released when
/// the disk is full so sled can still be reopened and the queue drained (removals and
/// reopening need space too); four sled segments.
const EMERGENCY_RESERVE: u64 = 2 << 20;
/// Removals kept for re-applying before the writer is asked to flush them.
const UNFLUSHED_ACKS_FLUSH: usize = 4096;

/// Maintenance the writer task is asked to do between batches.
const WANT_REOPEN: u8 = 1;
const WANT_REBUILD: u8 = 2;
const WANT_FLUSH: u8 = 4;

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
    /// Rebuilding the database (to give space back) failed, or an interrupted rebuild
    /// could not be finished on open.
    #[error("cannot rebuild queue {path}")]
    Rebuild {
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
    /// Writing or syncing failed (for example, the disk is full), or the database is
    /// being reopened or rebuilt.
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
    /// Group commits that failed (each is retried until it succeeds).
    pub failed_commits: AtomicU64,
    /// Times the database was opened again after a storage failure.
    pub reopens: AtomicU64,
    /// Times the database was rebuilt to give disk space back.
    pub rebuilds: AtomicU64,
    /// Records (intact or quarantined) the last clean stop left that the next open did
    /// not find: lost to damage of sled's files (a lower bound).
    pub lost_at_open: AtomicU64,
    /// Records the last clean stop left that sled could not recover and that were found
    /// intact in a copy of the damaged files and queued again.
    pub salvaged: AtomicU64,
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

    /// Waits for the group commit that covers this record. While the storage fails
    /// (a full disk), the writer keeps the record and retries, so this waits until
    /// the record is durable or the queue closes.
    ///
    /// # Errors
    /// [`EnqueueError::Storage`] if the queue closed while writing still failed,
    /// [`EnqueueError::Closed`] if the writer stopped first. Then the record is not
    /// stored.
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
    /// The open database; `None` while it is being reopened or rebuilt (or could not
    /// be reopened yet). Only the writer task replaces it.
    store: RwLock<Option<Arc<Store>>>,
    /// True while the writer holds a batch it could not write: new records are refused.
    failing: AtomicBool,
    /// True after the emergency reserve was released (the disk was full): new records
    /// are refused until the disk has room for the reserve again.
    emergency: AtomicBool,
    /// The last storage error, reported while the database is unavailable.
    last_error: Mutex<Option<Arc<sled::Error>>>,
    /// Keys removed (or to be removed) since the last successful flush: applied again to
    /// a reopened database, which may not have kept them.
    unflushed_acks: Mutex<Vec<Vec<u8>>>,
    /// True once `close` wrote the clean-stop marker.
    marker_written: AtomicBool,
    /// `WANT_*` bits for the writer task.
    wanted: AtomicU8,
    /// Wakes the writer task for maintenance.
    maintenance: Arc<Notify>,
    /// When a refusal at the OS reserve last checked whether to rebuild.
    rebuild_checked: Mutex<Option<Instant>>,
    /// Repeated storage problems are logged once a minute.
    log: crate::log_limit::LogLimiter,
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
        let (store, ledger) = Store::open(&config, &counters)?;
        store::keep_emergency_reserve(&config, EMERGENCY_RESERVE);

        // Room for two full batches: one being committed, one gathering.
        let (tx, rx) = mpsc::channel(config.max_batch.max(1) * 2);
        let maintenance = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            free_disk: AtomicU64::new(free_disk_bytes(&config.path)),
            config,
            store: RwLock::new(Some(Arc::new(store))),
            failing: AtomicBool::new(false),
            emergency: AtomicBool::new(false),
            marker_written: AtomicBool::new(false),
            last_error: Mutex::new(None),
            unflushed_acks: Mutex::new(Vec::new()),
            wanted: AtomicU8::new(0),
            maintenance: Arc::clone(&maintenance),
            rebuild_checked: Mutex::new(None),
            log: crate::log_limit::LogLimiter::new(Duration::from_secs(60)),
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            ledger: Mutex::new(ledger),
            arrived: Notify::new(),
            counters,
        });
        let max_batch = inner.config.max_batch.max(1);
        let task = tokio::spawn(writer::run(
            Arc::downgrade(&inner),
            rx,
            max_batch,
            maintenance,
        ));
        *lock(&inner.writer) = Some(task);
        Ok(Self { inner })
    }

    /// Stores one envelope of `device_id`. Returns once the record is durable
    /// (fsync'd by a group commit): the caller may then PUBACK. Concurrent calls are
    /// ordered by when they got room in the writer's channel.
    ///
    /// # Errors
    /// [`EnqueueError::Full`] at a cap under the refuse policy (or when the OS reserve is
    /// reached), [`EnqueueError::Storage`] while writing fails, [`EnqueueError::Closed`]
    /// during shutdown. In every case nothing was stored.
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
        // Held until the request is in the channel: a store replacement (which takes
        // the write lock) then finds every admitted record in the channel.
        let slot = read(&inner.store);
        let store = match slot.as_ref() {
            Some(store) if !inner.failing.load(Ordering::Acquire) => store,
            _ => return Err(EnqueueError::Storage(inner.unavailable())),
        };
        let id = store.next_id().map_err(|e| {
            let e = Arc::new(e);
            inner.write_failed(&e);
            EnqueueError::Storage(e)
        })?;
        let key = record::encode_key(device_id, id);
        let value = record::encode_value(&key, now_ms(), payload);
        let size = (key.len() + value.len()) as u64;
        inner.admit(store, device_id, size)?;
        let (reply, outcome) = oneshot::channel();
        permit.send(WriteRequest {
            key,
            value,
            device_id: device_id.to_owned(),
            size,
            reply,
        });
        drop(slot);
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
    /// [`QueueError::Storage`] if sled fails or the database is being replaced.
    pub fn read_device(
        &self,
        device_id: &str,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let inner = &self.inner;
        let store = inner
            .current_store()
            .ok_or_else(|| inner.storage_error(inner.unavailable()))?;
        let start = record::encode_key(
            device_id,
            RecordId(after.map_or(0, |a| a.0.saturating_add(1))),
        );
        let end = record::encode_key(device_id, RecordId(u64::MAX));
        let mut out = Vec::new();
        for item in store.records.range(start..=end) {
            let (key, value) = item.map_err(|e| inner.storage_error(Arc::new(e)))?;
            match record::decode_shared(&key, value.clone()) {
                Ok(record) => out.push(record),
                Err(_) => inner.quarantine_one(&store, &key, &value),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Removes a record once the cloud acknowledged it. Returns false if it was already
    /// gone (acknowledged twice, or dropped by policy meanwhile). While the database
    /// cannot be written (a full disk, or it is being reopened or rebuilt), the removal
    /// is kept and applied to the reopened database, and this returns true.
    ///
    /// # Errors
    /// None today; the signature keeps room for failures that cannot be deferred.
    pub fn ack(&self, device_id: &str, id: RecordId) -> Result<bool, QueueError> {
        let inner = &self.inner;
        let key = record::encode_key(device_id, id);
        let mut acks = lock(&inner.unflushed_acks);
        // `Some(size)` removed now, `None` already gone, `Err` deferred to a reopen.
        let removed = match inner
            .current_store()
            .map(|store| store.records.remove(&key))
        {
            Some(Ok(value)) => Ok(value.map(|v| (key.len() + v.len()) as u64)),
            Some(Err(err)) => {
                inner.write_failed(&Arc::new(err));
                Err(())
            }
            None => Err(()),
        };
        acks.push(key);
        let flush = acks.len() >= UNFLUSHED_ACKS_FLUSH;
        drop(acks);
        if inner.marker_written.swap(false, Ordering::AcqRel) {
            marker::withdraw(&inner.config);
        }
        if flush {
            inner.want(WANT_FLUSH);
        }
        match removed {
            Ok(Some(size)) => {
                inner.ledger().release(device_id, size);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(()) => Ok(true),
        }
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
        let store = inner.current_store();
        let oldest_arrival_ms = store.as_ref().and_then(|store| {
            devices
                .iter()
                .filter_map(|device| oldest_of(store, device))
                .filter_map(|(key, value)| record::decode(&key, &value).ok())
                .map(|record| record.arrival_ms)
                .min()
        });
        QueueStats {
            total,
            devices: devices.len(),
            oldest_arrival_ms,
            size_on_disk: store
                .as_ref()
                .map_or(0, |s| s.db.size_on_disk().unwrap_or(0)),
            quarantine_records: store.as_ref().map_or(0, |s| s.quarantine.len()),
        }
    }

    /// Stops taking new records, waits until the writes already handed to the writer
    /// are durable (their publishers get their PUBACKs), then flushes removals too.
    /// sled's directory lock is released once the last handle is dropped.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the final flush fails.
    pub async fn close(&self) -> Result<(), QueueError> {
        lock(&self.inner.writes).take();
        let task = lock(&self.inner.writer).take();
        if let Some(task) = task {
            // A panicked writer has nothing left to finish; the flush below still runs.
            let _ = task.await;
        }
        self.flush().await?;
        // What a clean stop leaves, for the next open to check: taken with sled closed,
        // so the files' fingerprint is final (an ack after this withdraws it).
        let Some(store) = write(&self.inner.store).take() else {
            return Ok(());
        };
        let (devices, total) = {
            let ledger = self.inner.ledger();
            let devices: Vec<(String, u64)> = ledger
                .devices()
                .into_iter()
                .map(|d| {
                    let records = ledger.device(&d).records;
                    (d, records)
                })
                .collect();
            (devices, ledger.total().records)
        };
        let config = self.inner.config.clone();
        let written = tokio::task::spawn_blocking(move || {
            let stock = CleanMarker::take_stock(
                &store.records,
                store.quarantine.len() as u64,
                &devices,
                total,
            );
            // sled writes its last bytes when its last handle goes.
            let closed = close_store(store);
            stock.and_then(|mut marker| {
                marker.files = marker::fingerprint(&config.path)?;
                if !closed {
                    tracing::debug!("the queue's database was still in use at the stop");
                }
                Ok(marker::write(&config, &marker))
            })
        })
        .await;
        if matches!(written, Ok(Ok(true))) {
            self.inner.marker_written.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Flushes everything (including removals) to disk.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if sled fails or the database is being replaced.
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.inner.flush().await
    }
}

impl Inner {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger holds plain counters; a panic elsewhere cannot leave it torn.
        lock(&self.ledger)
    }

    fn sender(&self) -> Option<mpsc::Sender<WriteRequest>> {
        lock(&self.writes).clone()
    }

    fn current_store(&self) -> Option<Arc<Store>> {
        read(&self.store).clone()
    }

    fn storage_error(&self, source: Arc<sled::Error>) -> QueueError {
        QueueError::Storage {
            path: self.config.path.clone(),
            source,
        }
    }

    /// The error to report while the database cannot take writes.
    fn unavailable(&self) -> Arc<sled::Error> {
        lock(&self.last_error).clone().unwrap_or_else(|| {
            Arc::new(sled::Error::Io(std::io::Error::other(
                "queue storage is being reopened or rebuilt",
            )))
        })
    }

    /// A write or removal failed: sled refuses all further writes of this database, so
    /// the writer is asked to reopen it.
    fn write_failed(&self, error: &Arc<sled::Error>) {
        *lock(&self.last_error) = Some(Arc::clone(error));
        // Most likely the disk is full: the reopen and the drain need room.
        self.release_emergency_reserve();
        self.want(WANT_REOPEN);
    }

    /// The disk is full: gives the emergency reserve back to the filesystem (once) so
    /// that the database can be reopened and drained, and refuses new records until
    /// there is room for the reserve again.
    fn release_emergency_reserve(&self) {
        if store::release_emergency_reserve(&self.config) {
            self.emergency.store(true, Ordering::Release);
            tracing::warn!(
                bytes = EMERGENCY_RESERVE,
                "the disk is full: released the queue's emergency reserve so it can keep draining; new records are refused until there is room again"
            );
        }
    }

    fn want(&self, what: u8) {
        self.wanted.fetch_or(what, Ordering::AcqRel);
        self.maintenance.notify_one();
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

    /// Flushes the current database; removals recorded before it are then durable.
    async fn flush(&self) -> Result<(), QueueError> {
        let store = self
            .current_store()
            .ok_or_else(|| self.storage_error(self.unavailable()))?;
        let covered = self.take_unflushed_acks();
        match store.flush_durable().await {
            Ok(_) => Ok(()),
            Err(err) => {
                self.restore_unflushed_acks(covered);
                let err = Arc::new(err);
                self.write_failed(&err);
                Err(self.storage_error(err))
            }
        }
    }

    /// Removals the next flush will cover (it starts after they were applied).
    fn take_unflushed_acks(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *lock(&self.unflushed_acks))
    }

    /// Removals a failed flush did not cover.
    fn restore_unflushed_acks(&self, mut covered: Vec<Vec<u8>>) {
        if covered.is_empty() {
            return;
        }
        let mut acks = lock(&self.unflushed_acks);
        covered.append(&mut acks);
        *acks = covered;
    }

    /// Installs a freshly opened database: counts the records admitted but not yet
    /// written (`pending`), re-applies removals the old database may not have kept,
    /// and lets readers and writers use it.
    fn install(&self, store: Store, mut ledger: Ledger, pending: &[WriteRequest]) {
        for request in pending {
            // A record whose write reached the disk before the failure is counted once.
            if !store.records.contains_key(&request.key).unwrap_or(false) {
                ledger.add(&request.device_id, request.size);
            }
        }
        // Holding the removals' lock: an ack now waits and then sees the new database.
        let acks = lock(&self.unflushed_acks);
        for key in acks.iter() {
            if let Ok(Some(value)) = store.records.remove(key)
                && let Ok((device, _)) = record::decode_key(key)
            {
                ledger.release(device, (key.len() + value.len()) as u64);
            }
        }
        *self.ledger() = ledger;
        *write(&self.store) = Some(Arc::new(store));
        drop(acks);
        self.free_disk
            .store(free_disk_bytes(&self.config.path), Ordering::Relaxed);
        // The uplink reads again: records may have come back.
        self.arrived.notify_one();
    }

    /// Reserves room for a record, dropping oldest records first if the policy says so.
    fn admit(&self, store: &Store, device_id: &str, size: u64) -> Result<(), EnqueueError> {
        if self.emergency.load(Ordering::Acquire) {
            let free = free_disk_bytes(&self.config.path);
            self.free_disk.store(free, Ordering::Relaxed);
            let needed = self.config.min_free_disk.saturating_add(EMERGENCY_RESERVE);
            if free < needed || !store::keep_emergency_reserve(&self.config, EMERGENCY_RESERVE) {
                self.consider_rebuild(store, free);
                return Err(EnqueueError::Full(Limit::DiskReserve));
            }
            self.emergency.store(false, Ordering::Release);
            tracing::info!(
                "the disk has room again; the queue's emergency reserve is back and new records are taken"
            );
        }
        if self.free_disk.load(Ordering::Relaxed) < self.config.min_free_disk {
            // Re-read: space may have come back since the last commit.
            let free = free_disk_bytes(&self.config.path);
            self.free_disk.store(free, Ordering::Relaxed);
            if free < self.config.min_free_disk {
                self.consider_rebuild(store, free);
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
            let dropped = victim.is_some_and(|victim| self.drop_oldest(store, &victim, limit));
            if !dropped {
                return Err(EnqueueError::Full(limit));
            }
        }
    }

    /// At the OS reserve: asks for a rebuild if sled's files are mostly freed space
    /// (after a drain) and the copy fits. Checked at most every few seconds.
    fn consider_rebuild(&self, store: &Store, free: u64) {
        {
            let mut checked = lock(&self.rebuild_checked);
            if checked.is_some_and(|at| at.elapsed() < REBUILD_CHECK_INTERVAL) {
                return;
            }
            *checked = Some(Instant::now());
        }
        let on_disk = store.db.size_on_disk().unwrap_or(0);
        let live = self.ledger().total().bytes;
        let mut free = free;
        if free <= live.saturating_add(64 << 10) {
            // A failed sled write can take the last bytes of the disk (sled's own
            // background flush too, which nobody is told about): the rebuild's dump
            // needs room, so give the emergency reserve back first.
            self.release_emergency_reserve();
            free = free_disk_bytes(&self.config.path);
        }
        let rebuilt = live
            .saturating_mul(SLED_AMPLIFICATION)
            .saturating_add(FRESH_DB);
        // The dump needs the live bytes; the fresh database is created once the old
        // one is deleted.
        tracing::debug!(
            on_disk,
            live,
            free,
            "queue at the disk reserve: rebuild worth it?"
        );
        if on_disk >= rebuilt.saturating_add(REBUILD_MIN_GAIN)
            && free > live.saturating_add(64 << 10)
        {
            tracing::info!(
                on_disk,
                live,
                free,
                "queue files are mostly freed space at the disk reserve; rebuilding the queue database"
            );
            self.want(WANT_REBUILD);
        }
    }

    fn drop_oldest(&self, store: &Store, device_id: &str, limit: Limit) -> bool {
        let Some((key, _)) = oldest_of(store, device_id) else {
            return false;
        };
        let Ok(Some(value)) = store.records.remove(&key) else {
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

    fn quarantine_one(&self, store: &Store, key: &[u8], value: &[u8]) {
        quarantine_record(
            &store.records,
            &store.quarantine,
            key,
            value,
            &self.counters,
        );
        if let Ok((device, _)) = record::decode_key(key) {
            self.ledger()
                .release(device, (key.len() + value.len()) as u64);
        }
    }
}

/// The first (oldest) record of a device, as raw key and value.
fn oldest_of(store: &Store, device_id: &str) -> Option<(sled::IVec, sled::IVec)> {
    let prefix = record::device_prefix(device_id);
    store.records.scan_prefix(&prefix).next()?.ok()
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

/// Locks a mutex; its data stays usable after a panic elsewhere (plain values).
/// Drops the last handle of a store, waiting up to 2 s for others (a metrics scrape) to
/// let go; false if some were still held. Blocking.
fn close_store(mut store: Arc<Store>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match Arc::try_unwrap(store) {
            Ok(store) => {
                drop(store);
                return true;
            }
            Err(shared) if Instant::now() < deadline => {
                store = shared;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Free bytes for unprivileged users on the filesystem holding `path` (or its nearest
/// existing ancestor). `u64::MAX` if it cannot be read, so a failing statvfs never
/// stops the queue by itself.
fn free_disk_bytes(path: &std::path::Path) -> u64 {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    rustix::fs::statvfs(existing).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize))
}
use crate::clock::now_ms;
