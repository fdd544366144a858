//! The durable store-and-forward queue.
//!
//! # Storage
//!
//! Records are frames in an append-only segment log (`segments`, `<queue>/log/`): one
//! group commit is one write and one `fdatasync`, a record is written once, and a
//! segment file is deleted once every record in it is gone. Where each record is lives
//! in memory (`index`), rebuilt from the log at every open. The small rest lives in
//! sled (`state`, `<queue>/state/`): per device the acknowledgement floor, how many
//! records the last clean stop left, and the bytes of damaged frames.
//! `docs/queue-log.md` says why sled no longer holds the records themselves.
//!
//! # Durability
//!
//! - [`Queue::enqueue`] returns `Ok` only after the record's frame is written and the
//!   segment `fdatasync`'d. So once a device got its PUBACK, a kill -9 or a power cut
//!   does not lose the record.
//! - [`Queue::ack`] writes nothing: the record leaves the index and its segment's count.
//!   Floors are saved every second and at a clean stop; after a crash, records
//!   acknowledged in the last second come back, are sent again, and the cloud's replay
//!   check drops them.
//! - Records are per device in id order (ids increase across restarts): per-device
//!   FIFO, and a drain that can take turns between devices.
//! - On open every frame is read and its CRC checked. A damaged frame costs that frame
//!   only: its bytes go to the quarantine and are counted, and the scan goes on at the
//!   next frame. A batch a crash cut short at the end of the log was never acknowledged
//!   and is cut off. If the last stop was clean, records it left that are not found are
//!   counted (`lost_at_open`).
//!
//! # Storage failures
//!
//! A batch that cannot be written (a full disk) is held, new records are refused, and
//! the batch is written again until that works ([`writer`]). Acknowledgements need no
//! disk space, and free it when a segment empties, so a full disk still drains.
//!
//! # Layout
//!
//! - `record`: the versioned frame format.
//! - `segments`: the segment log.
//! - `index`: where each queued record is.
//! - `state`: floors, the clean-stop count and the quarantine, in sled.
//! - `ledger`: bytes per device, caps, admission.
//! - `open`: opening: the log, the state, migrating a queue an earlier release kept in
//!   sled.
//! - `writer`: the group-commit task.
//! - `inspect`: `blindgate queue inspect`, offline.

mod index;
pub mod inspect;
mod ledger;
mod open;
pub mod record;
pub mod segments;
mod state;
mod writer;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot};

pub use ledger::{DeviceUsage, Limit};
pub use record::{Record, RecordId};

use index::Index;
use ledger::Ledger;
use segments::SegmentLog;
use state::State;
use writer::WriteRequest;

use crate::clock::now_ms;

/// Free disk space is read again after this many bytes were committed ...
const STATVFS_EVERY_BYTES: u64 = 256 << 10;
/// ... or this long.
const STATVFS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// A drained active segment is replaced once it holds this much.
const DRAINED_SEGMENT_MIN: u64 = 64 << 10;
/// Segment size: the queue's cap over this, between the bounds below, so that a small
/// queue on a small disk does not keep a large drained segment, and a large queue does
/// not hold thousands of files open (each segment keeps its file open for reads).
const SEGMENTS_PER_CAP: u64 = 32;
const SEGMENT_MIN: u64 = 256 << 10;
const SEGMENT_MAX: u64 = 64 << 20;

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
    /// The queue's directory.
    pub path: PathBuf,
    /// Cap on stored bytes (frames, keys and payloads).
    pub max_bytes: u64,
    /// Refuse new records while the filesystem has less free space than this.
    pub min_free_disk: u64,
    /// Cap on one device's stored bytes.
    pub device_quota: u64,
    /// Policy at a cap.
    pub overflow: Overflow,
    /// Page cache of the state database (sled), in bytes.
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
    /// Reading or writing the queue's files failed.
    #[error("queue storage at {path} failed")]
    Storage {
        /// The queue directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// A damaged state database, or a queue an earlier release kept in sled that sled
    /// cannot open, could not be moved aside.
    #[error("cannot move damaged queue files at {path} aside")]
    MoveAside {
        /// The queue directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl QueueError {
    /// Reading or writing the files of the queue at `path` failed with `source`.
    fn storage(path: &std::path::Path, source: io::Error) -> Self {
        Self::Storage {
            path: path.to_owned(),
            source: Arc::new(source),
        }
    }
}

/// Why a record was not stored. In every case the device gets no PUBACK.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// A cap is reached and the policy is to refuse.
    #[error("queue full: {} limit reached", .0.as_str())]
    Full(Limit),
    /// Writing or syncing failed (for example, the disk is full); the writer holds a
    /// batch it could not write yet.
    #[error("queue write failed")]
    Storage(#[source] Arc<io::Error>),
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
    /// Damaged frames (at open, or when read) kept in the quarantine.
    pub quarantined: AtomicU64,
    /// State databases (or sled queues of an earlier release) moved aside because sled
    /// could not open them.
    pub databases_moved_aside: AtomicU64,
    /// Group commits that failed (each is retried until it succeeds).
    pub failed_commits: AtomicU64,
    /// Records the last clean stop left that the next open did not find intact.
    pub lost_at_open: AtomicU64,
    /// Records moved from a sled queue of an earlier release into the log.
    pub migrated: AtomicU64,
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
    /// The queue's files on disk, in bytes.
    pub size_on_disk: u64,
    /// Damaged ranges in quarantine.
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
    log: SegmentLog,
    state: State,
    index: Mutex<Index>,
    ledger: Mutex<Ledger>,
    next_id: AtomicU64,
    /// True while the writer holds a batch it could not write: new records are refused.
    failing: AtomicBool,
    /// The last storage error, reported while the writer holds a batch.
    last_error: Mutex<Option<Arc<io::Error>>>,
    /// Repeated storage problems are logged once a minute.
    log_limit: crate::log_limit::LogLimiter,
    writes: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    arrived: Notify,
    free_disk: AtomicU64,
    /// Bytes committed since `free_disk` was read, and when it was.
    statvfs_since: Mutex<(u64, std::time::Instant)>,
    counters: Arc<QueueCounters>,
}

impl Queue {
    /// Opens (or creates) the queue, recovers every intact record, quarantines damaged
    /// ones, and starts the writer task on the current tokio runtime.
    ///
    /// # Errors
    /// [`QueueError`] if the queue's files cannot be read or created.
    pub fn open(config: QueueConfig) -> Result<Self, QueueError> {
        let counters = Arc::new(QueueCounters::default());
        let opened = open::open(&config, &counters)?;
        // Room for two full batches: one being committed, one gathering.
        let (tx, rx) = mpsc::channel(config.max_batch.max(1) * 2);
        let inner = Arc::new(Inner {
            free_disk: AtomicU64::new(free_disk_bytes(&config.path)),
            statvfs_since: Mutex::new((0, std::time::Instant::now())),
            config,
            log: opened.log,
            state: opened.state,
            index: Mutex::new(opened.index),
            ledger: Mutex::new(opened.ledger),
            next_id: AtomicU64::new(opened.next_id),
            failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
            log_limit: crate::log_limit::LogLimiter::new(std::time::Duration::from_secs(60)),
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            arrived: Notify::new(),
            counters,
        });
        let max_batch = inner.config.max_batch.max(1);
        let task = tokio::spawn(writer::run(Arc::downgrade(&inner), rx, max_batch));
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
        payload: &Bytes,
    ) -> Result<PendingWrite, EnqueueError> {
        let inner = &self.inner;
        if inner.failing.load(Ordering::Acquire) {
            return Err(EnqueueError::Storage(inner.unavailable()));
        }
        let id = RecordId(inner.next_id.fetch_add(1, Ordering::Relaxed));
        let key = record::encode_key(device_id, id);
        let size = (record::FRAME_OVERHEAD + key.len() + payload.len()) as u64;
        inner.admit(device_id, size)?;
        let (reply, outcome) = oneshot::channel();
        permit.send(WriteRequest {
            device_id: device_id.to_owned(),
            id,
            key,
            size,
            arrival_ms: now_ms(),
            payload: payload.clone(),
            reply,
        });
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
    /// [`QueueError::Storage`] if a segment cannot be read.
    pub fn read_device(
        &self,
        device_id: &str,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let inner = &self.inner;
        let entries = inner.index().after(device_id, after, limit);
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            match inner.log.read(entry.at) {
                Ok(frame) => out.push(Record {
                    id: entry.id,
                    device_id: device_id.to_owned(),
                    arrival_ms: frame.arrival_ms,
                    payload: frame.payload,
                }),
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::InvalidData | io::ErrorKind::NotFound
                    ) =>
                {
                    inner.quarantine_one(device_id, entry, &err);
                }
                Err(err) => return Err(inner.storage_error(err)),
            }
        }
        Ok(out)
    }

    /// Removes a record once the cloud acknowledged it. Returns false if it was already
    /// gone (acknowledged twice, or dropped by policy meanwhile). Writes nothing: the
    /// device's floor is saved within a second.
    ///
    /// # Errors
    /// None today; the signature keeps room for failures that cannot be deferred.
    pub fn ack(&self, device_id: &str, id: RecordId) -> Result<bool, QueueError> {
        Ok(self.inner.take_out(device_id, id))
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
        let oldest: Vec<_> = {
            let index = inner.index();
            devices.iter().filter_map(|d| index.oldest(d)).collect()
        };
        let oldest_arrival_ms = oldest
            .into_iter()
            .filter_map(|entry| inner.log.read(entry.at).ok())
            .map(|frame| frame.arrival_ms)
            .min();
        QueueStats {
            total,
            devices: devices.len(),
            oldest_arrival_ms,
            size_on_disk: inner.log.disk_bytes() + inner.state.size_on_disk(),
            quarantine_records: inner.state.quarantined(),
        }
    }

    /// Stops taking new records, waits until the writes already handed to the writer
    /// are durable (their publishers get their PUBACKs), then saves the floors and
    /// notes the clean stop.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the state cannot be saved.
    pub async fn close(&self) -> Result<(), QueueError> {
        lock(&self.inner.writes).take();
        let task = lock(&self.inner.writer).take();
        if let Some(task) = task {
            // A panicked writer has nothing left to finish; the state is saved anyway.
            let _ = task.await;
        }
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            inner.save_floors()?;
            let records = inner.index().len() as u64;
            inner
                .state
                .mark_clean_stop(records, &inner.config.path)
                .map_err(|e| inner.storage_error(io::Error::other(e)))
        })
        .await
        .map_err(|join| self.inner.storage_error(io::Error::other(join.to_string())))?
    }

    /// Saves the acknowledgement floors now (records are durable when they are
    /// acknowledged to the device; this makes removals durable too).
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the state cannot be saved.
    pub async fn flush(&self) -> Result<(), QueueError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.save_floors())
            .await
            .map_err(|join| self.inner.storage_error(io::Error::other(join.to_string())))?
    }
}

impl Inner {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger holds plain counters; a panic elsewhere cannot leave it torn.
        lock(&self.ledger)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    fn sender(&self) -> Option<mpsc::Sender<WriteRequest>> {
        lock(&self.writes).clone()
    }

    fn storage_error(&self, source: io::Error) -> QueueError {
        QueueError::storage(&self.config.path, source)
    }

    /// The error to report while the writer holds a batch it cannot write.
    fn unavailable(&self) -> Arc<io::Error> {
        lock(&self.last_error)
            .clone()
            .unwrap_or_else(|| Arc::new(io::Error::other("queue storage is failing")))
    }

    /// Counts a commit of `records` (`bytes` in all) and wakes the uplink. The free
    /// space is read again (`statvfs`) once `STATVFS_EVERY_BYTES` were written since, or
    /// `STATVFS_EVERY` passed: not once per commit, which at a few thousand messages a
    /// second would be a path lookup per message.
    fn after_commit(&self, records: usize, bytes: u64) {
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .committed
            .fetch_add(records as u64, Ordering::Relaxed);
        let due = {
            let mut since = lock(&self.statvfs_since);
            since.0 += bytes;
            since.0 >= STATVFS_EVERY_BYTES || since.1.elapsed() >= STATVFS_EVERY
        };
        if due {
            self.refresh_free_disk();
        }
        self.arrived.notify_one();
    }

    /// Reads the free disk space again (`statvfs`) and returns it.
    fn refresh_free_disk(&self) -> u64 {
        let free = free_disk_bytes(&self.config.path);
        self.free_disk.store(free, Ordering::Relaxed);
        *lock(&self.statvfs_since) = (0, std::time::Instant::now());
        free
    }

    /// Saves the floors and, if the writer is `idle`, gives back the space of a drained
    /// active segment and of the spare segment file (not while records flow: that would
    /// put a segment's creation and its syncs in the way of appends every second).
    /// Blocking.
    fn maintain(&self, idle: bool) {
        let _ = self.save_floors();
        if !idle {
            return;
        }
        // Before the rotation too: its new segment is then a new, empty file.
        self.log.drop_spare();
        match self.log.rotate_if_drained(DRAINED_SEGMENT_MIN) {
            Ok(true) => {
                self.log.drop_spare();
                self.refresh_free_disk();
            }
            Ok(false) => {}
            Err(err) => {
                if self.log_limit.check("rotate").is_some() {
                    tracing::warn!(error = %err, "cannot start a new queue segment to give a drained one's space back");
                }
            }
        }
    }

    /// Saves every device's floor, if a record came or went since the last save.
    /// Blocking.
    fn save_floors(&self) -> Result<(), QueueError> {
        let floors: Vec<(String, index::Floor)> = {
            let mut index = self.index();
            if !index.take_changed() {
                return Ok(());
            }
            index
                .floors()
                .map(|(device, floor)| (device.to_owned(), floor))
                .collect()
        };
        match self
            .state
            .save_floors(floors.iter().map(|(d, f)| (d.as_str(), f)))
        {
            Ok(()) => {
                self.index().forget_empty();
                Ok(())
            }
            Err(err) => {
                self.index().mark_changed();
                if self.log_limit.check("floors").is_some() {
                    tracing::warn!(error = %err, "cannot save the queue's acknowledgement floors; acknowledged records may be sent again after a crash");
                }
                Err(self.storage_error(io::Error::other(err)))
            }
        }
    }

    /// Takes a record out of the queue (acknowledged, dropped or damaged); false if it
    /// was not there (any more).
    fn take_out(&self, device_id: &str, id: RecordId) -> bool {
        let Some(entry) = self.index().remove(device_id, id) else {
            return false;
        };
        self.log.release(entry.at);
        self.ledger().release(device_id, u64::from(entry.at.len));
        true
    }

    /// Reserves room for a record, dropping oldest records first if the policy says so.
    fn admit(&self, device_id: &str, size: u64) -> Result<(), EnqueueError> {
        if self.free_disk.load(Ordering::Relaxed) < self.config.min_free_disk {
            // Re-read: space may have come back since the last commit.
            if self.refresh_free_disk() < self.config.min_free_disk {
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

    fn drop_oldest(&self, device_id: &str, limit: Limit) -> bool {
        let Some(oldest) = self.index().oldest(device_id) else {
            return false;
        };
        if !self.take_out(device_id, oldest.id) {
            // Acknowledged meanwhile: that made room too.
            return true;
        }
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

    /// A record whose frame no longer reads back intact: out of the queue, counted.
    fn quarantine_one(&self, device_id: &str, entry: index::Entry, err: &io::Error) {
        self.take_out(device_id, entry.id);
        self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
        let _ = self.state.quarantine(entry.at, &[]);
        tracing::error!(error = %err, segment = entry.at.segment, offset = entry.at.offset, "damaged queue record taken out of the queue and counted");
    }
}

/// Locks a mutex; its data stays usable after a panic elsewhere (plain values).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Free bytes for unprivileged users on the filesystem holding `path` (or its nearest
/// existing ancestor). `u64::MAX` if it cannot be read, so a failing statvfs never
/// stops the queue by itself.
fn free_disk_bytes(path: &std::path::Path) -> u64 {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    rustix::fs::statvfs(existing).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize))
}
