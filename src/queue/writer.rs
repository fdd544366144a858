//! The group-commit writer: one task appends every record to the segment log.
//!
//! It takes one request, then everything else already waiting (up to `max_batch`),
//! and appends them with one write and one `fdatasync`. Requests that arrive during
//! the sync form the next batch, so under load many publishes share one sync and under
//! light load a publish waits for one sync only. Each request's reply is sent after the
//! sync that covered it returned: only then may the device get its PUBACK.
//!
//! A batch that cannot be written (a full disk) is not given up: the writer keeps it,
//! refuses new records meanwhile, and writes it again with a growing pause (at the same
//! place in the log) until that works. The publishers of the held records get their
//! PUBACK then. Only closing the queue ends the wait, with an error (no PUBACK; the
//! devices send those records again).
//!
//! The appends themselves (`pwritev`, `fdatasync`) run on a thread of the queue's own,
//! which waits on a channel for the next batch. A commit then costs one wake-up there and
//! one back; tokio's blocking pool, used before, cost five or so futex calls per commit
//! on its shared lock and condition variable.
//!
//! At most every second, beside the appends (never in their way), the writer saves the
//! acknowledgement floors (`state`), and when it had nothing to write for a second it
//! replaces a drained active segment, so the space of a drained queue comes back even
//! while nothing new is written (a full disk refuses new records).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::index::Entry;
use super::record::RecordId;
use super::segments::Append;
use super::{Inner, lock};

/// The outcome sent back to `enqueue`: `Ok` means fsync'd.
pub(super) type WriteResult = Result<(), Arc<io::Error>>;

/// First pause after a failed commit; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts to write a held batch.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A batch stops growing at this many bytes of frames (a frame's offset in its segment
/// must fit in 32 bits, and one write need not be larger).
const MAX_BATCH_BYTES: u64 = 64 << 20;
/// How often acknowledgement floors are saved.
const FLOORS_EVERY: Duration = Duration::from_secs(1);

/// One record to store.
pub(super) struct WriteRequest {
    pub(super) device_id: String,
    pub(super) id: RecordId,
    pub(super) key: Vec<u8>,
    /// The frame's length, as the ledger counts it.
    pub(super) size: u64,
    pub(super) arrival_ms: u64,
    pub(super) payload: Bytes,
    pub(super) reply: oneshot::Sender<WriteResult>,
}

/// Blocking work handed to the disk thread.
type Job = Box<dyn FnOnce() + Send>;

/// The queue's disk thread: runs the appends one after another, for the writer's life.
struct DiskThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl DiskThread {
    /// Starts the thread; it ends once this handle is dropped and its last job ran.
    fn start() -> io::Result<Self> {
        let (jobs, receiver) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("blindgate-queue".into())
            .spawn(move || {
                for job in receiver {
                    // A panicking job drops its reply: the writer sees it, the thread
                    // stays for the next batch.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the thread; `None` if it panicked.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = reply.send(work());
            }))
            .ok()?;
        outcome.await.ok()
    }
}

/// Runs until every sender is gone, then returns after the last batch is durable.
pub(super) async fn run(
    inner: Weak<Inner>,
    mut requests: mpsc::Receiver<WriteRequest>,
    max_batch: usize,
) {
    let disk = match DiskThread::start() {
        Ok(disk) => Some(disk),
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the queue's disk thread; appends use tokio's blocking pool");
            None
        }
    };
    let mut batch = Vec::with_capacity(max_batch);
    let mut floors_saved = Instant::now();
    let mut maintenance: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let mut idle = false;
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => batch.push(request),
                None => break,
            },
            () = tokio::time::sleep(FLOORS_EVERY) => idle = true,
        }
        if !batch.is_empty() {
            // Lets the sessions whose data is already in (devices that sent at the same
            // moment) submit too, before this commit starts: no timer, no wait for
            // anything that has not arrived.
            tokio::task::yield_now().await;
        }
        let mut bytes: u64 = batch.iter().map(|r| r.size).sum();
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match requests.try_recv() {
                Ok(request) => {
                    bytes += request.size;
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            batch = commit_until_durable(&inner, batch, &requests, disk.as_ref()).await;
        }
        // Beside the appends, never in their way: one maintenance at a time.
        if floors_saved.elapsed() >= FLOORS_EVERY
            && maintenance
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
        {
            floors_saved = Instant::now();
            if let Some(queue) = inner.upgrade() {
                maintenance = Some(tokio::task::spawn_blocking(move || queue.maintain(idle)));
            }
        }
    }
    if let Some(running) = maintenance {
        let _ = running.await;
    }
}

/// Appends `batch` and replies to its requests; on failure keeps it and tries again,
/// until it succeeds or the queue closes. Returns the emptied vector for reuse.
async fn commit_until_durable(
    inner: &Weak<Inner>,
    mut batch: Vec<WriteRequest>,
    requests: &mpsc::Receiver<WriteRequest>,
    disk: Option<&DiskThread>,
) -> Vec<WriteRequest> {
    let mut delay = RETRY_MIN;
    let mut failing_since: Option<Instant> = None;
    loop {
        // Without the queue nobody waits for a reply: dropping them reads as "closed".
        let Some(queue) = inner.upgrade() else {
            batch.clear();
            return batch;
        };
        let worker = Arc::clone(&queue);
        let work = move || {
            let result = append(&worker, &batch);
            (batch, result)
        };
        let done = match disk {
            Some(disk) => disk.run(work).await,
            None => tokio::task::spawn_blocking(work).await.ok(),
        };
        let Some((returned, result)) = done else {
            // The batch went with the panicked append; its publishers see "closed".
            tracing::error!("queue append panicked");
            return Vec::new();
        };
        batch = returned;
        let error = match result {
            Ok(()) => {
                if let Some(since) = failing_since {
                    tracing::info!(
                        records = batch.len(),
                        held_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "queue storage works again; the held records are stored"
                    );
                    *lock(&queue.last_error) = None;
                }
                queue.failing.store(false, Ordering::Release);
                queue.after_commit(batch.len(), batch.iter().map(|r| r.size).sum());
                for request in batch.drain(..) {
                    // The publisher may have gone; its record is stored either way.
                    let _ = request.reply.send(Ok(()));
                }
                return batch;
            }
            Err(error) => Arc::new(error),
        };
        queue
            .counters
            .failed_commits
            .fetch_add(1, Ordering::Relaxed);
        *lock(&queue.last_error) = Some(Arc::clone(&error));
        queue.failing.store(true, Ordering::Release);
        if failing_since.is_none() {
            failing_since = Some(Instant::now());
            tracing::error!(error = %error, records = batch.len(), "queue write failed; holding these records (no PUBACK) and refusing new ones until writing works again");
        }
        drop(queue);
        if !pause(delay, requests).await {
            for request in batch.drain(..) {
                let _ = request.reply.send(Err(Arc::clone(&error)));
            }
            return batch;
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Appends the batch to the log and puts its records in the index. Blocking.
fn append(queue: &Inner, batch: &[WriteRequest]) -> io::Result<()> {
    let frames: Vec<Append<'_>> = batch
        .iter()
        .map(|request| Append {
            key: &request.key,
            arrival_ms: request.arrival_ms,
            payload: &request.payload,
        })
        .collect();
    let locations = queue.log.append(&frames)?;
    let mut index = queue.index();
    for (request, at) in batch.iter().zip(locations) {
        index.insert(&request.device_id, Entry { id: request.id, at });
    }
    Ok(())
}

/// Sleeps for `delay`; false if the queue was closed meanwhile.
async fn pause(delay: Duration, requests: &mpsc::Receiver<WriteRequest>) -> bool {
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if requests.is_closed() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50).min(delay)).await;
    }
    !requests.is_closed()
}
