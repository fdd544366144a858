//! Records in flight on one uplink connection, and which to send next.
//!
//! Each record sent gets the next packet id of a cycle four times the window long and is
//! `inflight` under it until exactly that id's PUBACK settles it, never by "everything
//! up to". If the cycle comes round to an id that is still unacknowledged, the broker
//! lost an acknowledgement and the connection is ended. The next records come
//! round-robin from the
//! devices that have any (per-device FIFO, fairness between devices); records that
//! waited through an outage are paced, records that arrived since the connection came up
//! are not. The backlog may also fill only part of the window (`drain_window`): a live
//! record then waits behind at most that many in the cloud broker's queue, not a whole
//! window of them.

use std::collections::{HashMap, HashSet};

use std::time::Duration;

use tokio::time::Instant;

use crate::queue::{Queue, QueueError, Record, RecordId};
use crate::rate::TokenBucket;

/// A record on its way: which device's, which id.
pub(crate) type Handle = (String, RecordId);

/// Longest a fill waits under load for a batch worth a write.
const BATCH_WAIT: Duration = Duration::from_millis(1);

/// Records of one device read per turn of the round-robin.
const PER_TURN: usize = 16;

/// Why a fill of the window stopped the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FillError {
    /// Reading the queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The packet id due next still carries an unacknowledged record: the broker left it
    /// unacknowledged for a whole cycle of ids.
    #[error("the broker left packet id {0} unacknowledged for a whole cycle")]
    PacketIdStuck(u16),
}

/// Whether a record in flight waited through an outage (the backlog) or arrived while
/// the connection was up (live).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Backlog,
    Live,
}

/// The window of one connection.
pub(crate) struct Flight {
    window: usize,
    /// Packet ids run 1..=cycle, then start again.
    cycle: u16,
    last_pkid: u16,
    inflight: HashMap<u16, (Handle, Origin)>,
    /// Of the window, how many records in flight may be backlog, and how many are.
    drain_window: usize,
    backlog_outstanding: usize,
    /// Devices whose next record is backlog held back by `drain_window`: not read
    /// again until the backlog in flight drops below it.
    held_for_window: HashSet<String>,
    /// Last record handed out per device on this connection.
    cursors: HashMap<String, RecordId>,
    next_device: usize,
    /// Records that arrived before this instant (ms since epoch) are backlog.
    backlog_before_ms: u64,
    pacing: TokenBucket,
    /// When pacing held a record back: try again at this instant.
    pub(crate) paced_until: Option<Instant>,
    /// Since when fills wait for a batch ([`Flight::worth_waiting`]), and how long
    /// they may.
    waiting_since: Option<Instant>,
    batch_wait: Duration,
}

impl Flight {
    pub(crate) fn new(
        window: usize,
        drain_window: usize,
        drain_rate: u32,
        connected_at_ms: u64,
    ) -> Self {
        Self {
            window: window.max(1),
            drain_window: drain_window.clamp(1, window.max(1)),
            backlog_outstanding: 0,
            held_for_window: HashSet::new(),
            cycle: u16::try_from(window.max(1).saturating_mul(4)).unwrap_or(u16::MAX),
            last_pkid: 0,
            inflight: HashMap::new(),
            cursors: HashMap::new(),
            next_device: 0,
            backlog_before_ms: connected_at_ms,
            pacing: TokenBucket::new(drain_rate, drain_rate.max(1)),
            paced_until: None,
            waiting_since: None,
            batch_wait: BATCH_WAIT,
        }
    }

    /// Records sent and not yet acknowledged.
    pub(crate) fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// The next packet id of the cycle, for a SUBSCRIBE or a record.
    pub(crate) fn next_pkid(&mut self) -> Result<u16, FillError> {
        self.last_pkid = if self.last_pkid >= self.cycle {
            1
        } else {
            self.last_pkid + 1
        };
        if self.inflight.contains_key(&self.last_pkid) {
            return Err(FillError::PacketIdStuck(self.last_pkid));
        }
        Ok(self.last_pkid)
    }

    /// Under load, a fill waits for a batch worth a write: while half the window or
    /// more is in flight, acknowledgements are on their way, so it waits until an
    /// eighth of the window is free, or [`BATCH_WAIT`] has passed (a live record waits
    /// no longer than that for it). Fewer, larger writes cost the cloud broker less per
    /// message (it reads and decrypts each write on its own); below half the window, a
    /// record goes out at once. Sets `paced_until` to the end of the wait.
    fn worth_waiting(&mut self, now: Instant) -> bool {
        let outstanding = self.outstanding();
        let busy =
            outstanding >= self.window / 2 && self.window - outstanding < (self.window / 8).max(1);
        if !busy {
            self.waiting_since = None;
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        let until = since + self.batch_wait;
        if now >= until {
            self.waiting_since = None;
            return false;
        }
        self.paced_until = Some(until);
        true
    }

    /// The cloud acknowledged `pkid`: the record it carried, if any.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<Handle> {
        let (handle, origin) = self.inflight.remove(&pkid)?;
        if origin == Origin::Backlog {
            self.backlog_outstanding -= 1;
        }
        Some(handle)
    }

    /// Picks the next records to send, up to the free window, round-robin over devices,
    /// and gives each to `send` with its packet id.
    ///
    /// # Errors
    /// [`FillError`] if reading the queue fails or the next packet id is stuck.
    pub(crate) fn fill(
        &mut self,
        queue: &Queue,
        mut send: impl FnMut(u16, Record),
    ) -> Result<usize, FillError> {
        self.paced_until = None;
        if self.outstanding() >= self.window || self.worth_waiting(Instant::now()) {
            // Called at every new record; with the window full, the list of devices
            // (a copy of every name) would be made for nothing.
            return Ok(0);
        }
        if self.backlog_outstanding < self.drain_window {
            self.held_for_window.clear();
        }
        let devices = queue.devices();
        let mut sent = 0;
        let mut progress = true;
        while progress && self.outstanding() < self.window && !devices.is_empty() {
            progress = false;
            for turn in 0..devices.len() {
                let room = self.window - self.outstanding();
                if room == 0 {
                    break;
                }
                let device = &devices[(self.next_device + turn) % devices.len()];
                if self.held_for_window.contains(device) {
                    continue;
                }
                let after = self.cursors.get(device).copied();
                for record in queue.read_device(device, after, room.min(PER_TURN))? {
                    let origin = if record.arrival_ms < self.backlog_before_ms {
                        Origin::Backlog
                    } else {
                        Origin::Live
                    };
                    if origin == Origin::Backlog {
                        // The rest of this device's turn is backlog too (FIFO); its
                        // acknowledgement, or the pacing's wait, brings the next fill.
                        if self.backlog_outstanding >= self.drain_window {
                            self.held_for_window.insert(record.device_id);
                            break;
                        }
                        if let Err(wait) = self.pacing.try_take(Instant::now()) {
                            let at = Instant::now() + wait;
                            self.paced_until = Some(self.paced_until.map_or(at, |p| p.min(at)));
                            break;
                        }
                        self.backlog_outstanding += 1;
                    }
                    let pkid = self.next_pkid()?;
                    let handle = (record.device_id.clone(), record.id);
                    self.cursors.insert(handle.0.clone(), handle.1);
                    self.inflight.insert(pkid, (handle, origin));
                    send(pkid, record);
                    sent += 1;
                    progress = true;
                }
            }
            self.next_device = (self.next_device + 1) % devices.len().max(1);
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_by_packet_id_not_by_order() {
        let mut flight = Flight::new(8, 8, 0, 0);
        for id in [1, 2] {
            let pkid = flight.next_pkid().expect("free");
            flight
                .inflight
                .insert(pkid, (("a".into(), RecordId(id)), Origin::Live));
        }
        assert_eq!(flight.acked(2), Some(("a".into(), RecordId(2))));
        assert_eq!(flight.acked(2), None);
        assert_eq!(flight.acked(1), Some(("a".into(), RecordId(1))));
        assert_eq!(flight.outstanding(), 0);
    }

    #[test]
    fn an_id_left_unacknowledged_for_a_cycle_stops_the_connection() {
        let mut flight = Flight::new(2, 2, 0, 0);
        let first = flight.next_pkid().expect("free");
        flight
            .inflight
            .insert(first, (("a".into(), RecordId(1)), Origin::Live));
        // The cycle is 8 ids long: 7 more are free, the 8th after them is `first`.
        for _ in 0..7 {
            let pkid = flight.next_pkid().expect("free");
            assert_ne!(pkid, first);
        }
        assert!(matches!(
            flight.next_pkid(),
            Err(FillError::PacketIdStuck(id)) if id == first
        ));
    }

    /// A queue on a real directory with `backlog` records of each backlog device stored
    /// before `connected_at_ms` and `live` records of `live-1` after it.
    async fn queue_with(backlog: usize, live: usize) -> (tempfile::TempDir, Queue, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = crate::queue::QueueConfig::new(dir.path().join("queue"));
        config.min_free_disk = 0;
        let queue = Queue::open(config).expect("opens");
        for n in 0..backlog {
            for device in ["old-1", "old-2"] {
                let payload = bytes::Bytes::from(vec![n as u8; 10]);
                queue.enqueue(device, payload).await.expect("stored");
            }
        }
        std::thread::sleep(Duration::from_millis(5));
        let connected_at_ms = crate::clock::now_ms();
        std::thread::sleep(Duration::from_millis(5));
        for n in 0..live {
            let payload = bytes::Bytes::from(vec![n as u8; 10]);
            queue.enqueue("live-1", payload).await.expect("stored");
        }
        (dir, queue, connected_at_ms)
    }

    fn fill_names(flight: &mut Flight, queue: &Queue) -> Vec<(u16, String)> {
        let mut sent = Vec::new();
        flight
            .fill(queue, |pkid, record| sent.push((pkid, record.device_id)))
            .expect("fills");
        sent
    }

    #[tokio::test]
    async fn the_backlog_takes_at_most_its_share_of_the_window_and_live_the_rest() {
        let (_dir, queue, connected_at_ms) = queue_with(20, 20).await;
        let mut flight = Flight::new(40, 4, 0, connected_at_ms);
        let sent = fill_names(&mut flight, &queue);
        let backlog: Vec<_> = sent.iter().filter(|(_, d)| d.starts_with("old")).collect();
        assert_eq!(backlog.len(), 4, "{sent:?}");
        assert_eq!(sent.len(), 24, "every live record goes too: {sent:?}");
        // The window has room, but not the backlog's share; an acknowledged backlog
        // record makes room for one more backlog record, not more.
        assert!(fill_names(&mut flight, &queue).is_empty());
        let (pkid, _) = backlog[0];
        let (device, id) = flight.acked(*pkid).expect("in flight");
        assert!(queue.ack(&device, id).expect("acks"));
        let next = fill_names(&mut flight, &queue);
        assert_eq!(next.len(), 1, "{next:?}");
        assert!(next[0].1.starts_with("old"), "{next:?}");
        assert!(fill_names(&mut flight, &queue).is_empty());
    }

    #[tokio::test]
    async fn without_live_records_the_backlog_still_stops_at_its_share() {
        let (_dir, queue, connected_at_ms) = queue_with(20, 0).await;
        let mut flight = Flight::new(16, 4, 0, connected_at_ms);
        assert_eq!(fill_names(&mut flight, &queue).len(), 4);
        assert_eq!(flight.outstanding(), 4);
        // Its whole share free again: four more.
        let pkids: Vec<u16> = flight.inflight.keys().copied().collect();
        for pkid in pkids {
            flight.acked(pkid).expect("in flight");
        }
        assert_eq!(fill_names(&mut flight, &queue).len(), 4);
    }

    #[tokio::test]
    async fn under_load_a_fill_waits_for_an_eighth_of_the_window() {
        let (_dir, queue, connected_at_ms) = queue_with(0, 40).await;
        let mut flight = Flight::new(16, 16, 0, connected_at_ms);
        flight.batch_wait = Duration::from_secs(3600);
        assert_eq!(fill_names(&mut flight, &queue).len(), 16);
        let mut pkids: Vec<u16> = flight.inflight.keys().copied().collect();
        pkids.sort_unstable();
        // 15 of 16 in flight: one free slot is not worth a write yet.
        flight.acked(pkids[0]).expect("in flight");
        assert!(fill_names(&mut flight, &queue).is_empty());
        // Two free (an eighth of 16): both go in one fill.
        flight.acked(pkids[1]).expect("in flight");
        assert_eq!(fill_names(&mut flight, &queue).len(), 2);
        // Below half the window in flight, a free slot is filled at once.
        for &pkid in &pkids[2..12] {
            flight.acked(pkid).expect("in flight");
        }
        assert_eq!(flight.outstanding(), 6);
        assert_eq!(fill_names(&mut flight, &queue).len(), 10);
    }

    #[tokio::test]
    async fn a_fill_waits_for_a_batch_no_longer_than_the_batch_wait() {
        let (_dir, queue, connected_at_ms) = queue_with(0, 40).await;
        let mut flight = Flight::new(16, 16, 0, connected_at_ms);
        flight.batch_wait = Duration::from_millis(20);
        assert_eq!(fill_names(&mut flight, &queue).len(), 16);
        let pkid = *flight.inflight.keys().next().expect("in flight");
        flight.acked(pkid).expect("in flight");
        let before = Instant::now();
        assert!(fill_names(&mut flight, &queue).is_empty());
        let after = Instant::now();
        let until = flight
            .paced_until
            .expect("the loop is told when to fill again");
        let wait = Duration::from_millis(20);
        assert!(until >= before + wait && until <= after + wait);
        tokio::time::sleep_until(until).await;
        assert_eq!(fill_names(&mut flight, &queue).len(), 1, "the wait is over");
    }
}
