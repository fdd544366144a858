//! The group-commit writer: one task owns every insert into the records tree.
//!
//! It takes one request, then everything else already waiting (up to `max_batch`),
//! applies them as one sled batch and flushes once. Requests that arrive during the
//! flush form the next batch, so under load many publishes share one fsync and under
//! light load a publish waits for one fsync only. Each request's reply is sent after
//! the flush that covered it returned: only then may the device get its PUBACK.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// The outcome sent back to `enqueue`: `Ok` means fsync'd.
pub(crate) type WriteResult = Result<(), Arc<sled::Error>>;

/// One record to store.
pub(crate) struct WriteRequest {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    pub(crate) reply: oneshot::Sender<WriteResult>,
}

/// Runs until every sender is gone, then returns after the last batch is durable.
pub(crate) async fn run(
    db: sled::Db,
    records: sled::Tree,
    mut requests: mpsc::Receiver<WriteRequest>,
    max_batch: usize,
    on_commit: impl Fn(usize),
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = requests.recv().await {
        batch.push(first);
        while batch.len() < max_batch {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let result = commit(&db, &records, &batch).await;
        if result.is_ok() {
            on_commit(batch.len());
        }
        for request in batch.drain(..) {
            // The publisher may have gone; its record is stored either way.
            let _ = request.reply.send(result.clone());
        }
    }
}

async fn commit(db: &sled::Db, records: &sled::Tree, batch: &[WriteRequest]) -> WriteResult {
    let mut inserts = sled::Batch::default();
    for request in batch {
        inserts.insert(request.key.as_slice(), request.value.as_slice());
    }
    records.apply_batch(inserts).map_err(Arc::new)?;
    if let Err(err) = db.flush_async().await {
        // Not durable, so not acknowledged: take the records back out (best effort) so
        // that accounting and the device's resend agree. If they stay, a resend is a
        // duplicate the cloud drops.
        for request in batch {
            let _ = records.remove(request.key.as_slice());
        }
        return Err(Arc::new(err));
    }
    Ok(())
}
