//! Records in flight on one uplink connection, and which to send next.
//!
//! Each record sent gets the next packet id of a cycle four times the window long and is
//! `inflight` under it until exactly that id's PUBACK settles it, never by "everything
//! up to". If the cycle comes round to an id that is still unacknowledged, the broker
//! lost an acknowledgement and the connection is ended. The next records come
//! round-robin from the
//! devices that have any (per-device FIFO, fairness between devices); records that
//! waited through an outage are paced, records that arrived since the connection came up
//! are not.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::queue::{Queue, QueueError, Record, RecordId};
use crate::rate::TokenBucket;

/// A record on its way: which device's, which id.
pub(crate) type Handle = (String, RecordId);

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

/// The window of one connection.
pub(crate) struct Flight {
    window: usize,
    /// Packet ids run 1..=cycle, then start again.
    cycle: u16,
    last_pkid: u16,
    inflight: HashMap<u16, Handle>,
    /// Last record handed out per device on this connection.
    cursors: HashMap<String, RecordId>,
    next_device: usize,
    /// Records that arrived before this instant (ms since epoch) are backlog.
    backlog_before_ms: u64,
    pacing: TokenBucket,
    /// When pacing held a record back: try again at this instant.
    pub(crate) paced_until: Option<Instant>,
}

impl Flight {
    pub(crate) fn new(window: usize, drain_rate: u32, connected_at_ms: u64) -> Self {
        Self {
            window: window.max(1),
            cycle: u16::try_from(window.max(1).saturating_mul(4)).unwrap_or(u16::MAX),
            last_pkid: 0,
            inflight: HashMap::new(),
            cursors: HashMap::new(),
            next_device: 0,
            backlog_before_ms: connected_at_ms,
            pacing: TokenBucket::new(drain_rate, drain_rate.max(1)),
            paced_until: None,
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

    /// The cloud acknowledged `pkid`: the record it carried, if any.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<Handle> {
        self.inflight.remove(&pkid)
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
        if self.outstanding() >= self.window {
            // Called at every new record; with the window full, the list of devices
            // (a copy of every name) would be made for nothing.
            return Ok(0);
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
                let after = self.cursors.get(device).copied();
                for record in queue.read_device(device, after, room.min(PER_TURN))? {
                    if record.arrival_ms < self.backlog_before_ms
                        && let Err(wait) = self.pacing.try_take(Instant::now())
                    {
                        let at = Instant::now() + wait;
                        self.paced_until = Some(self.paced_until.map_or(at, |p| p.min(at)));
                        break;
                    }
                    let pkid = self.next_pkid()?;
                    let handle = (record.device_id.clone(), record.id);
                    self.cursors.insert(handle.0.clone(), handle.1);
                    self.inflight.insert(pkid, handle);
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
        let mut flight = Flight::new(8, 0, 0);
        for id in [1, 2] {
            let pkid = flight.next_pkid().expect("free");
            flight.inflight.insert(pkid, ("a".into(), RecordId(id)));
        }
        assert_eq!(flight.acked(2), Some(("a".into(), RecordId(2))));
        assert_eq!(flight.acked(2), None);
        assert_eq!(flight.acked(1), Some(("a".into(), RecordId(1))));
        assert_eq!(flight.outstanding(), 0);
    }

    #[test]
    fn an_id_left_unacknowledged_for_a_cycle_stops_the_connection() {
        let mut flight = Flight::new(2, 0, 0);
        let first = flight.next_pkid().expect("free");
        flight.inflight.insert(first, ("a".into(), RecordId(1)));
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
}
