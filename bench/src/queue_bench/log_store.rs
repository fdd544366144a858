//! [`LogQueue`]: a prototype of the queue on the segment log (`blindgate::queue::
//! segments`), as `docs/queue-log.md` designs it, for measuring that design with the
//! same workload as the sled queue before the gateway moves to it.
//!
//! It has the costs that matter: a group-commit writer task (one append = one `pwrite`
//! and one `fdatasync` per batch), an in-memory index per device, reads with `pread`
//! and a CRC check, and removal that only counts (a segment file goes when empty). It
//! leaves out what the gateway's queue adds around them: caps and admission, stats,
//! and the per-device acknowledgement floors (one small sled batch per second in the
//! design), so its figures are a lower bound of the design's costs.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use blindgate::queue::record::{RecordId, encode_key};
use blindgate::queue::segments::{Append, DEFAULT_SEGMENT_SIZE, Location, SegmentLog};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::store::Store;

/// Most records per group commit (the gateway's default).
const MAX_BATCH: usize = 1024;

struct Request {
    device: String,
    id: u64,
    key: Vec<u8>,
    payload: Bytes,
    reply: oneshot::Sender<Result<(), String>>,
}

type Index = HashMap<String, VecDeque<(u64, Location)>>;

struct Inner {
    log: SegmentLog,
    index: Mutex<Index>,
    next_id: AtomicU64,
    writes: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The prototype; cheap to clone.
#[derive(Clone)]
pub(crate) struct LogQueue {
    inner: Arc<Inner>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LogQueue {
    /// Opens a fresh log at `dir` and starts its writer on the current runtime.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let (log, _) = SegmentLog::open(dir, DEFAULT_SEGMENT_SIZE, |_, _| true)
            .with_context(|| format!("cannot open the log at {}", dir.display()))?;
        let (tx, rx) = mpsc::channel(MAX_BATCH * 2);
        let inner = Arc::new(Inner {
            log,
            index: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
        });
        let task = tokio::spawn(write_batches(Arc::clone(&inner), rx));
        *lock(&inner.writer) = Some(task);
        Ok(Self { inner })
    }
}

/// The group-commit writer: one request, then whatever else waits, in one append.
async fn write_batches(inner: Arc<Inner>, mut requests: mpsc::Receiver<Request>) {
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let worker = Arc::clone(&inner);
        let written = tokio::task::spawn_blocking(move || {
            let arrival_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let frames: Vec<Append<'_>> = batch
                .iter()
                .map(|r| Append {
                    key: &r.key,
                    arrival_ms,
                    payload: &r.payload,
                })
                .collect();
            let result = worker.log.append(&frames);
            (batch, result)
        })
        .await;
        let Ok((batch, result)) = written else {
            return;
        };
        match result {
            Ok(locations) => {
                let mut index = lock(&inner.index);
                for (request, at) in batch.iter().zip(locations) {
                    index
                        .entry(request.device.clone())
                        .or_default()
                        .push_back((request.id, at));
                }
                drop(index);
                for request in batch {
                    let _ = request.reply.send(Ok(()));
                }
            }
            Err(err) => {
                for request in batch {
                    let _ = request.reply.send(Err(err.to_string()));
                }
            }
        }
    }
}

impl Store for LogQueue {
    type Durable = std::pin::Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

    fn append(&self, device: &str, payload: &Bytes) -> Result<Option<Self::Durable>> {
        let sender = lock(&self.inner.writes)
            .clone()
            .ok_or_else(|| anyhow!("closed"))?;
        let Ok(permit) = sender.try_reserve() else {
            return Ok(None);
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, outcome) = oneshot::channel();
        permit.send(Request {
            device: device.to_owned(),
            id,
            key: encode_key(device, RecordId(id)),
            payload: payload.clone(),
            reply,
        });
        Ok(Some(Box::pin(async move {
            outcome
                .await
                .context("writer gone")?
                .map_err(|e| anyhow!("append failed: {e}"))?;
            Ok(id)
        })))
    }

    fn read(&self, device: &str, after: Option<u64>, limit: usize) -> Result<Vec<(u64, Bytes)>> {
        let entries: Vec<(u64, Location)> = {
            let index = lock(&self.inner.index);
            let Some(records) = index.get(device) else {
                return Ok(Vec::new());
            };
            let from = after.map_or(0, |after| records.partition_point(|(id, _)| *id <= after));
            records.range(from..).take(limit).copied().collect()
        };
        entries
            .into_iter()
            .map(|(id, at)| Ok((id, self.inner.log.read(at).context("read")?.payload)))
            .collect()
    }

    fn ack(&self, device: &str, id: u64) -> Result<()> {
        let mut index = lock(&self.inner.index);
        let records = index.get_mut(device).ok_or_else(|| anyhow!("no device"))?;
        let at = records
            .binary_search_by_key(&id, |(id, _)| *id)
            .map_err(|_| anyhow!("no record {id}"))?;
        let (_, location) = records.remove(at).ok_or_else(|| anyhow!("no record"))?;
        if records.is_empty() {
            index.remove(device);
        }
        drop(index);
        self.inner.log.release(location);
        Ok(())
    }

    fn devices(&self) -> Vec<String> {
        let mut devices: Vec<String> = lock(&self.inner.index).keys().cloned().collect();
        devices.sort_unstable();
        devices
    }

    async fn flush(&self) -> Result<()> {
        // Removals write nothing; the design persists floors once a second.
        Ok(())
    }

    async fn close(self) -> Result<()> {
        lock(&self.inner.writes).take();
        let task = lock(&self.inner.writer).take();
        if let Some(task) = task {
            task.await.context("writer panicked")?;
        }
        Ok(())
    }
}
