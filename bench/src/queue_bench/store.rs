//! The storage engine under test, behind a small trait so that another design can be
//! measured with the same workload: [`Store`], and [`GatewayQueue`], the gateway's own
//! durable queue (`blindgate::queue::Queue`).

use std::future::Future;
use std::path::Path;

use anyhow::{Context, Result};
use blindgate::queue::{EnqueueError, Queue, QueueConfig, RecordId};
use bytes::Bytes;

/// What the workload needs of a durable per-device FIFO store. Handles are cloned into
/// every device task.
pub(crate) trait Store: Clone + Send + Sync + 'static {
    /// Resolves to the record's id once it is durable (fsync'd).
    type Durable: Future<Output = Result<u64>> + Send + 'static;

    /// Hands one record over without waiting for it to be durable; records handed over
    /// one after another keep that order. `Ok(None)`: the store's input is full, nothing
    /// was taken, try again shortly.
    fn append(&self, device: &str, payload: &Bytes) -> Result<Option<Self::Durable>>;

    /// Up to `limit` records of `device` with ids above `after`, oldest first.
    fn read(&self, device: &str, after: Option<u64>, limit: usize) -> Result<Vec<(u64, Bytes)>>;

    /// Removes one record (no flush of its own).
    fn ack(&self, device: &str, id: u64) -> Result<()>;

    /// Devices that have records.
    fn devices(&self) -> Vec<String>;

    /// Makes everything so far (removals too) durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// A clean stop.
    fn close(self) -> impl Future<Output = Result<()>> + Send;
}

/// `blindgate::queue::Queue` with the gateway's defaults, except the caps, which are
/// raised so that a run is never refused.
#[derive(Clone)]
pub(crate) struct GatewayQueue {
    queue: Queue,
}

impl GatewayQueue {
    /// Opens a fresh queue at `dir`, with room for `bytes` of records (keys and
    /// framing included); must run inside the tokio runtime (it starts the writer task).
    pub(crate) fn open(dir: &Path, bytes: u64) -> Result<Self> {
        let mut config = QueueConfig::new(dir);
        config.max_bytes = bytes;
        config.device_quota = bytes;
        let queue = Queue::open(config)
            .with_context(|| format!("cannot open the queue at {}", dir.display()))?;
        Ok(Self { queue })
    }
}

impl Store for GatewayQueue {
    type Durable = std::pin::Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

    fn append(&self, device: &str, payload: &Bytes) -> Result<Option<Self::Durable>> {
        match self.queue.submit(device, payload) {
            Ok(pending) => Ok(Some(Box::pin(async move {
                let id = pending.durable().await.context("record not stored")?;
                Ok(id.0)
            }))),
            Err(EnqueueError::Busy) => Ok(None),
            Err(err) => Err(err).context("submit refused"),
        }
    }

    fn read(&self, device: &str, after: Option<u64>, limit: usize) -> Result<Vec<(u64, Bytes)>> {
        let records = self
            .queue
            .read_device(device, after.map(RecordId), limit)
            .context("read failed")?;
        Ok(records.into_iter().map(|r| (r.id.0, r.payload)).collect())
    }

    fn ack(&self, device: &str, id: u64) -> Result<()> {
        self.queue.ack(device, RecordId(id)).context("ack failed")?;
        Ok(())
    }

    fn devices(&self) -> Vec<String> {
        self.queue.devices()
    }

    async fn flush(&self) -> Result<()> {
        self.queue.flush().await.context("flush failed")
    }

    async fn close(self) -> Result<()> {
        self.queue.close().await.context("close failed")
    }
}
