//! The group-commit writer: one task owns every insert into the records tree, and every
//! replacement of the database.
//!
//! It takes one request, then everything else already waiting (up to `max_batch`),
//! applies them as one sled batch and flushes once. Requests that arrive during the
//! flush form the next batch, so under load many publishes share one fsync and under
//! light load a publish waits for one fsync only. Each request's reply is sent after
//! the flush that covered it returned: only then may the device get its PUBACK.
//!
//! A batch that cannot be written (a full disk) is not given up: the writer keeps it,
//! refuses new records meanwhile, reopens the database (sled refuses every write after
//! a failed one until then) and tries again with a growing pause. The publishers of
//! the held records get their PUBACK once it succeeds. Only closing the queue ends the
//! wait, with an error (no PUBACK; the devices send those records again).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use super::store::Store;
use super::{Inner, WANT_FLUSH, WANT_REBUILD, WANT_REOPEN, lock, write};

/// The outcome sent back to `enqueue`: `Ok` means fsync'd.
pub(super) type WriteResult = Result<(), Arc<sled::Error>>;

/// First pause after a failed commit; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts to write a held batch.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Pause between attempts to reopen a database when nothing is waiting to be written.
const IDLE_RETRY: Duration = Duration::from_secs(1);

/// One record to store.
pub(super) struct WriteRequest {
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
    /// For the ledger when the database is replaced while the record waits.
    pub(super) device_id: String,
    pub(super) size: u64,
    pub(super) reply: oneshot::Sender<WriteResult>,
}

/// Runs until every sender is gone, then returns after the last batch is durable.
pub(super) async fn run(
    inner: Weak<Inner>,
    mut requests: mpsc::Receiver<WriteRequest>,
    max_batch: usize,
    maintenance: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let retry_idle = inner.upgrade().is_some_and(|queue| queue.needs_store());
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => batch.push(request),
                None => break,
            },
            () = maintenance.notified() => {}
            () = tokio::time::sleep(IDLE_RETRY), if retry_idle => {}
        }
        while batch.len() < max_batch {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        if let Some(queue) = inner.upgrade() {
            maintain(&queue, &mut batch, &mut requests).await;
        }
        if !batch.is_empty() {
            commit_until_durable(&inner, &mut batch, &mut requests).await;
        }
    }
}

impl Inner {
    /// True if the database is missing or maintenance was asked for.
    fn needs_store(&self) -> bool {
        self.wanted.load(Ordering::Acquire) != 0 || self.current_store().is_none()
    }
}

/// Does the maintenance asked for: reopen (also when no database is open), rebuild,
/// or a flush of accumulated removals.
async fn maintain(
    queue: &Arc<Inner>,
    batch: &mut Vec<WriteRequest>,
    requests: &mut mpsc::Receiver<WriteRequest>,
) {
    let wanted = queue.wanted.swap(0, Ordering::AcqRel);
    if wanted & WANT_REOPEN != 0 || queue.current_store().is_none() {
        replace(queue, Replace::Reopen, batch, requests).await;
    } else if wanted & WANT_REBUILD != 0 {
        replace(queue, Replace::Rebuild, batch, requests).await;
    } else if wanted & WANT_FLUSH != 0 {
        // A failure asks for a reopen by itself.
        let _ = queue.flush().await;
    }
}

/// Writes `batch` and replies to its requests; on failure keeps it, reopens the
/// database and tries again, until it succeeds or the queue closes.
async fn commit_until_durable(
    inner: &Weak<Inner>,
    batch: &mut Vec<WriteRequest>,
    requests: &mut mpsc::Receiver<WriteRequest>,
) {
    let mut delay = RETRY_MIN;
    let mut failing_since: Option<Instant> = None;
    loop {
        // Without the queue nobody waits for a reply: dropping them reads as "closed".
        let Some(queue) = inner.upgrade() else {
            batch.clear();
            return;
        };
        let covered = queue.take_unflushed_acks();
        let result = match queue.current_store() {
            Some(store) => commit(&store, batch).await,
            None => Err(queue.unavailable()),
        };
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
                queue.after_commit(batch.len());
                for request in batch.drain(..) {
                    // The publisher may have gone; its record is stored either way.
                    let _ = request.reply.send(Ok(()));
                }
                return;
            }
            Err(error) => error,
        };
        queue.restore_unflushed_acks(covered);
        queue.release_emergency_reserve();
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
            return;
        }
        delay = (delay * 2).min(RETRY_MAX);
        let Some(queue) = inner.upgrade() else {
            batch.clear();
            return;
        };
        replace(&queue, Replace::Reopen, batch, requests).await;
    }
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

async fn commit(store: &Arc<Store>, batch: &[WriteRequest]) -> WriteResult {
    let mut inserts = sled::Batch::default();
    for request in batch {
        inserts.insert(request.key.as_slice(), request.value.as_slice());
    }
    store.records.apply_batch(inserts).map_err(Arc::new)?;
    // Not durable means not acknowledged. The records may or may not be on disk; the
    // retry writes them again (the same keys), and a reopened database counts each once.
    store.flush_durable().await.map_err(Arc::new)?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Replace {
    Reopen,
    Rebuild,
}

/// Takes the database out (readers and `submit` see none meanwhile), moves every
/// admitted record still in the channel into `batch`, reopens or rebuilds the database
/// on a blocking thread, and installs the result. If a rebuild fails before its swap,
/// the old database is put back; if nothing can be opened, the slot stays empty and the
/// writer tries again later.
async fn replace(
    queue: &Arc<Inner>,
    how: Replace,
    batch: &mut Vec<WriteRequest>,
    requests: &mut mpsc::Receiver<WriteRequest>,
) {
    let old = write(&queue.store).take();
    while let Ok(request) = requests.try_recv() {
        batch.push(request);
    }
    let config = queue.config.clone();
    let counters = Arc::clone(&queue.counters);
    let size_before = old.as_ref().map_or(0, |s| s.db.size_on_disk().unwrap_or(0));
    let opened = tokio::task::spawn_blocking(move || match (how, old) {
        (Replace::Rebuild, Some(old)) => super::rebuild::rebuild(&config, old, &counters),
        (_, old) => {
            drop(old);
            Store::reopen(&config, &counters).map_err(|err| (None, err))
        }
    })
    .await;
    match opened {
        Ok(Ok((store, ledger))) => {
            let size_after = store.db.size_on_disk().unwrap_or(0);
            queue.install(store, ledger, batch);
            match how {
                Replace::Reopen => {
                    queue.counters.reopens.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("queue database reopened");
                }
                Replace::Rebuild => {
                    queue.counters.rebuilds.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        size_before,
                        size_after,
                        "queue database rebuilt; disk space given back"
                    );
                }
            }
        }
        Ok(Err((Some(old), err))) => {
            let cause = std::error::Error::source(&err).map(ToString::to_string);
            tracing::warn!(error = %err, cause, "queue rebuild failed; keeping the database as it is");
            *write(&queue.store) = Some(old);
            queue.arrived.notify_one();
        }
        Ok(Err((None, err))) => {
            queue.release_emergency_reserve();
            if queue.log.check("reopen").is_some() {
                let cause = std::error::Error::source(&err).map(ToString::to_string);
                tracing::error!(error = %err, cause, "queue database cannot be opened again; retrying");
            }
        }
        Err(join) => {
            tracing::error!(error = %join, "reopening the queue database panicked; retrying");
        }
    }
}
