//! Which device is connected where, and the downlink messages waiting for each.
//!
//! One session per device: a new connection with the same identity takes over and the
//! old one is closed (as MQTT requires for a client id). A command or receipt for a
//! device waits in a bounded per-device buffer (oldest dropped and counted when full);
//! a connected, subscribed session is woken and takes what its window has room for.
//! Messages a session had not got a PUBACK for when it ended go back to the front of
//! the buffer. A session holds a `Notify`, not a channel: most devices get a command
//! now and then, and a channel's block is about 1.5 KiB per connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DownlinkDrop, Metrics};

/// What a new session gets from the registry.
pub struct SessionSlot {
    /// Identifies this session to the registry (takeover and unregister).
    pub session: u64,
    /// Woken when downlink messages wait for this device, once it subscribed: take them
    /// with [`DeviceRegistry::take`].
    pub wake: Arc<Notify>,
    /// Cancelled when another connection takes the device over.
    pub kicked: CancellationToken,
}

#[derive(Default)]
struct Entry {
    session: Option<Live>,
    pending: VecDeque<Bytes>,
}

struct Live {
    id: u64,
    wake: Arc<Notify>,
    kicked: CancellationToken,
    subscribed: bool,
}

/// The registry of connected devices; shared by every session and the uplink.
pub struct DeviceRegistry {
    state: Mutex<State>,
    pending_limit: usize,
    metrics: Metrics,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, Entry>,
    next_session: u64,
}

impl DeviceRegistry {
    /// A registry holding at most `pending_limit` messages per device.
    pub fn new(pending_limit: usize, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            pending_limit: pending_limit.max(1),
            metrics,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session for `device`, closing any earlier one.
    pub fn register(&self, device: &str) -> SessionSlot {
        let wake = Arc::new(Notify::new());
        let kicked = CancellationToken::new();
        let mut state = self.state();
        state.next_session += 1;
        let session = state.next_session;
        let entry = state.devices.entry(device.to_owned()).or_default();
        if let Some(old) = entry.session.replace(Live {
            id: session,
            wake: Arc::clone(&wake),
            kicked: kicked.clone(),
            subscribed: false,
        }) {
            old.kicked.cancel();
        }
        SessionSlot {
            session,
            wake,
            kicked,
        }
    }

    /// The session subscribed to its downlink topic: start delivering.
    pub fn subscribed(&self, device: &str, session: u64) {
        let mut state = self.state();
        let Some(entry) = state.devices.get_mut(device) else {
            return;
        };
        if let Some(live) = entry.session.as_mut().filter(|l| l.id == session) {
            live.subscribed = true;
            if !entry.pending.is_empty() {
                live.wake.notify_one();
            }
        }
    }

    /// Up to `room` messages waiting for `device`, oldest first, if `session` is its
    /// subscribed session.
    pub fn take(&self, device: &str, session: u64, room: usize) -> Vec<Bytes> {
        let mut state = self.state();
        let Some(entry) = state.devices.get_mut(device) else {
            return Vec::new();
        };
        if !entry
            .session
            .as_ref()
            .is_some_and(|l| l.id == session && l.subscribed)
        {
            return Vec::new();
        }
        let n = room.min(entry.pending.len());
        entry.pending.drain(..n).collect()
    }

    /// The session ended; `undelivered` (no PUBACK yet) go back to the front of the
    /// device's buffer in their original order.
    pub fn unregister(&self, device: &str, session: u64, undelivered: Vec<Bytes>) {
        let mut state = self.state();
        let Some(entry) = state.devices.get_mut(device) else {
            return;
        };
        if entry.session.as_ref().is_some_and(|l| l.id == session) {
            entry.session = None;
        }
        for message in undelivered.into_iter().rev() {
            entry.pending.push_front(message);
        }
        while entry.pending.len() > self.pending_limit {
            entry.pending.pop_back();
            self.count_drop();
        }
        if entry.session.is_none() && entry.pending.is_empty() {
            state.devices.remove(device);
        }
    }

    /// Buffers a command or receipt (already checked) for `device`, and wakes its
    /// session if it is subscribed.
    pub fn deliver(&self, device: &str, message: Bytes) {
        let mut state = self.state();
        let entry = state.devices.entry(device.to_owned()).or_default();
        entry.pending.push_back(message);
        if entry.pending.len() > self.pending_limit {
            entry.pending.pop_front();
            self.count_drop();
        }
        if let Some(live) = entry.session.as_ref().filter(|l| l.subscribed) {
            live.wake.notify_one();
        }
    }

    fn count_drop(&self) {
        self.metrics
            .downlink_dropped
            .with_label_values(&[DownlinkDrop::PendingFull.as_str()])
            .inc();
        tracing::warn!("downlink buffer of a device is full; dropped its oldest message");
    }

    /// Messages waiting for `device`.
    pub fn pending(&self, device: &str) -> usize {
        self.state()
            .devices
            .get(device)
            .map_or(0, |e| e.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_until_subscribed_and_takes_back_undelivered() {
        let registry = DeviceRegistry::new(3, Metrics::new());
        registry.deliver("d", Bytes::from_static(b"1"));
        registry.deliver("d", Bytes::from_static(b"2"));
        let slot = registry.register("d");
        assert!(
            registry.take("d", slot.session, 10).is_empty(),
            "not subscribed yet"
        );
        registry.subscribed("d", slot.session);
        slot.wake.notified().await;
        assert_eq!(registry.take("d", slot.session, 1), [&b"1"[..]]);
        registry.deliver("d", Bytes::from_static(b"3"));
        // The session ends without PUBACKs: it hands back what it sent; the rest is
        // still in the buffer, after it.
        registry.unregister("d", slot.session, vec![Bytes::from_static(b"1")]);
        assert_eq!(registry.pending("d"), 3);
        let again = registry.register("d");
        assert!(
            registry.take("d", slot.session, 10).is_empty(),
            "an ended session"
        );
        registry.subscribed("d", again.session);
        again.wake.notified().await;
        assert_eq!(
            registry.take("d", again.session, 10),
            [&b"1"[..], &b"2"[..], &b"3"[..]]
        );
    }

    #[test]
    fn a_new_session_kicks_the_old_one_and_buffer_is_bounded() {
        let registry = DeviceRegistry::new(2, Metrics::new());
        let first = registry.register("d");
        let second = registry.register("d");
        assert!(first.kicked.is_cancelled());
        assert!(!second.kicked.is_cancelled());
        registry.unregister("d", first.session, Vec::new());
        for n in 0..5u8 {
            registry.deliver("d", Bytes::from(vec![n]));
        }
        assert_eq!(registry.pending("d"), 2);
    }
}
