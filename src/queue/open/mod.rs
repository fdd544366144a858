//! Opening the queue: its state database, a sled queue of an earlier release moved into
//! the log, then every frame of the log read into the index.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::index::{Entry, Floor, Index};
use super::ledger::Ledger;
use super::record;
use super::segments::{Location, OpenReport, SegmentLog};
use super::state::{self, State};
use super::{QueueConfig, QueueCounters, QueueError};

mod migrate;

/// What an open hands to the queue.
pub(super) struct Opened {
    pub(super) log: SegmentLog,
    pub(super) state: State,
    pub(super) index: Index,
    pub(super) ledger: Ledger,
    pub(super) next_id: u64,
}

/// The segment log's directory in the queue at `queue_dir`.
pub(super) fn log_path(queue_dir: &Path) -> PathBuf {
    queue_dir.join("log")
}

/// Opens the queue at `config.path`.
///
/// # Errors
/// [`QueueError`] if its files cannot be read or created.
pub(super) fn open(config: &QueueConfig, counters: &QueueCounters) -> Result<Opened, QueueError> {
    let path = &config.path;
    let storage = |source| QueueError::storage(path, source);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(storage)?;
    migrate::tidy_earlier_release(path);
    migrate::from_sled(config, counters)?;
    let (state, floors, clean_stop) = open_state(path, config.cache_size, counters)?;

    let mut index = Index::default();
    let mut ledger = Ledger::default();
    let mut max_id = 0;
    let (log, report) = SegmentLog::open(&log_path(path), segment_size(config), |at, frame| {
        let Ok((device, id)) = record::decode_key(frame.key) else {
            return false;
        };
        max_id = max_id.max(id.0);
        if floors.get(device).is_some_and(|floor| floor.covers(id.0)) {
            return false;
        }
        let kept = index.insert(device, Entry { id, at });
        if kept {
            ledger.add(device, u64::from(at.len));
        }
        kept
    })
    .map_err(storage)?;
    for (device, floor) in &floors {
        index.restore_gone(device, floor);
    }
    report_damage(&state, &report, counters);
    if let Some(left) = clean_stop {
        let missing = left.saturating_sub(report.kept);
        if missing > 0 {
            counters.lost_at_open.fetch_add(missing, Ordering::Relaxed);
            tracing::error!(
                left,
                found = report.kept,
                "records the last clean stop left are missing or damaged: the queue's files were damaged while the gateway was stopped"
            );
        }
    }
    let next_id = next_id(max_id, &floors);
    tracing::info!(
        records = report.kept,
        devices = ledger.devices().len(),
        segments = log.segment_count(),
        "queue opened"
    );
    Ok(Opened {
        log,
        state,
        index,
        ledger,
        next_id,
    })
}

/// Segments of a 32nd of the queue's cap, between 256 KiB and 64 MiB (8 MiB for the
/// default cap of 256 MiB).
fn segment_size(config: &QueueConfig) -> u64 {
    (config.max_bytes / super::SEGMENTS_PER_CAP).clamp(super::SEGMENT_MIN, super::SEGMENT_MAX)
}

/// The first id to give out: above every id in the log and every floor, so that no new
/// record is ever below a floor saved for its device.
fn next_id(max_id: u64, floors: &HashMap<String, Floor>) -> u64 {
    let max_floor = floors
        .values()
        .map(|f| f.floor.max(f.gone.last().map_or(0, |id| id + 1)))
        .max()
        .unwrap_or(0);
    max_id.saturating_add(1).max(max_floor).max(1)
}

/// Quarantines and counts damaged frames; logs a cut-off tail.
fn report_damage(state: &State, report: &OpenReport, counters: &QueueCounters) {
    for damage in &report.damaged {
        let at = Location {
            segment: damage.segment,
            offset: u32::try_from(damage.offset).unwrap_or(u32::MAX),
            len: u32::try_from(damage.len).unwrap_or(u32::MAX),
        };
        if let Err(err) = state.quarantine(at, &damage.bytes) {
            tracing::warn!(error = %err, "cannot keep a damaged queue range in the quarantine");
        }
        counters.quarantined.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            segment = damage.segment,
            offset = damage.offset,
            bytes = damage.len,
            "damaged bytes in the queue's log: the records in them are lost; kept in the quarantine"
        );
    }
    if let Some((segment, offset, bytes)) = report.torn_tail {
        tracing::info!(
            segment,
            offset,
            bytes,
            "a write the last crash cut short was cut off the queue's log (never acknowledged to a device)"
        );
    }
}

/// The open state database, its floors, and the last clean stop's count.
type StateRead = (State, HashMap<String, Floor>, Option<u64>);

/// Opens the state database and reads it. One sled cannot open or read (sled 0.34 may
/// panic on damaged files) is moved aside and a fresh one made: its floors are lost, so
/// acknowledged records still in the log are sent again (the cloud drops them).
fn open_state(path: &Path, cache: u64, counters: &QueueCounters) -> Result<StateRead, QueueError> {
    let storage = |source| QueueError::storage(path, source);
    let read = || -> sled::Result<StateRead> {
        let state = State::open(path, cache)?;
        let floors = state.floors();
        let clean_stop = state.take_clean_stop()?;
        Ok((state, floors, clean_stop))
    };
    let mut conf_set_aside = false;
    loop {
        match std::panic::catch_unwind(read) {
            Ok(Ok(read)) => return Ok(read),
            Ok(Err(sled::Error::Io(err))) => return Err(storage(err)),
            Ok(Err(err)) => {
                tracing::error!(error = %err, "the queue's state database cannot be opened");
            }
            Err(_) => tracing::error!("reading the queue's state database panicked"),
        }
        // First only sled's small `conf` (sled writes a fresh one; the state database
        // uses sled's defaults), then the whole database.
        let conf = state::path_of(path).join("conf");
        if conf_set_aside || !conf.exists() {
            break;
        }
        let aside = state::path_of(path).join(format!("conf.damaged-{}", crate::clock::now_ms()));
        if std::fs::rename(&conf, &aside).is_err() {
            break;
        }
        conf_set_aside = true;
    }
    tracing::error!(
        "moving the queue's state database aside (acknowledged records still queued will be sent again)"
    );
    let from = state::path_of(path);
    let aside = path.join(format!("state.damaged-{}", crate::clock::now_ms()));
    std::fs::rename(&from, &aside).map_err(|source| QueueError::MoveAside {
        path: from.clone(),
        source,
    })?;
    counters
        .databases_moved_aside
        .fetch_add(1, Ordering::Relaxed);
    let state = State::open(path, cache).map_err(|e| storage(io::Error::other(e)))?;
    Ok((state, HashMap::new(), None))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{Floor, next_id};

    #[test]
    fn ids_continue_above_the_log_and_every_floor() {
        let floor = |floor, gone: &[u64]| Floor {
            floor,
            gone: gone.to_vec(),
        };
        let floors: HashMap<String, Floor> = [
            ("a".to_owned(), floor(50, &[])),
            ("b".to_owned(), floor(7, &[60])),
        ]
        .into();
        assert_eq!(next_id(10, &floors), 61);
        let floors: HashMap<String, Floor> = [("a".to_owned(), floor(50, &[]))].into();
        assert_eq!(next_id(10, &floors), 50);
        assert_eq!(next_id(80, &floors), 81);
        assert_eq!(next_id(0, &HashMap::new()), 1);
    }
}
