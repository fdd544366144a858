//! Records in flight on one uplink connection, and which to send next.
//!
//! rumqttc assigns packet ids inside its event loop, after `publish` returned, so a
//! record is first `handed` (in order) and becomes `inflight` under a packet id when the
//! event loop reports `Outgoing::Publish(pkid)`; it is settled by exactly that id's
//! PUBACK, never by "everything up to". The next records come round-robin from the
//! devices that have any (per-device FIFO, fairness between devices); records that
//! waited through an outage are paced, records that arrived since the connection came up
//! are not.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use crate::queue::{Queue, QueueError, Record, RecordId};
use crate::rate::TokenBucket;

/// A record on its way: which device's, which id.
pub(crate) type Handle = (String, RecordId);

/// Records of one device read per turn of the round-robin.
const PER_TURN: usize = 16;

/// Why the packet-id bookkeeping cannot continue on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Desync {
    /// The event loop sent a publish we did not hand it.
    UnknownPublish(u16),
    /// A packet id was reused while its record was still unacknowledged.
    PacketIdReused(u16),
}

/// The window of one connection.
pub(crate) struct Flight {
    window: usize,
    handed: VecDeque<Handle>,
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
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            cursors: HashMap::new(),
            next_device: 0,
            backlog_before_ms: connected_at_ms,
            pacing: TokenBucket::new(drain_rate, drain_rate.max(1)),
            paced_until: None,
        }
    }

    /// Records handed to the client or in flight.
    pub(crate) fn outstanding(&self) -> usize {
        self.handed.len() + self.inflight.len()
    }

    /// The event loop wrote the oldest handed record under `pkid`.
    pub(crate) fn sent(&mut self, pkid: u16) -> Result<(), Desync> {
        let handle = self
            .handed
            .pop_front()
            .ok_or(Desync::UnknownPublish(pkid))?;
        if self.inflight.insert(pkid, handle).is_some() {
            return Err(Desync::PacketIdReused(pkid));
        }
        Ok(())
    }

    /// The cloud acknowledged `pkid`: the record it carried, if any.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<Handle> {
        self.inflight.remove(&pkid)
    }

    /// Picks the next records to send, up to the free window, round-robin over devices.
    /// `send` hands one record to the client and returns false if it could not.
    ///
    /// # Errors
    /// [`QueueError`] if reading the queue fails.
    pub(crate) fn fill(
        &mut self,
        queue: &Queue,
        mut send: impl FnMut(Record) -> bool,
    ) -> Result<usize, QueueError> {
        let devices = queue.devices();
        let mut sent = 0;
        let mut progress = true;
        self.paced_until = None;
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
                    let handle = (record.device_id.clone(), record.id);
                    if !send(record) {
                        return Ok(sent);
                    }
                    self.cursors.insert(handle.0.clone(), handle.1);
                    self.handed.push_back(handle);
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
        flight.handed.push_back(("a".into(), RecordId(1)));
        flight.handed.push_back(("a".into(), RecordId(2)));
        flight.sent(7).expect("mapped");
        flight.sent(8).expect("mapped");
        assert_eq!(flight.acked(8), Some(("a".into(), RecordId(2))));
        assert_eq!(flight.acked(8), None);
        assert_eq!(flight.acked(7), Some(("a".into(), RecordId(1))));
        assert_eq!(flight.sent(9), Err(Desync::UnknownPublish(9)));
    }

    #[test]
    fn a_reused_packet_id_is_a_desync() {
        let mut flight = Flight::new(8, 0, 0);
        flight.handed.push_back(("a".into(), RecordId(1)));
        flight.handed.push_back(("a".into(), RecordId(2)));
        flight.sent(1).expect("mapped");
        assert_eq!(flight.sent(1), Err(Desync::PacketIdReused(1)));
    }
}
