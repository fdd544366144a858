//! Publishes a session has read but the queue could not take yet (a full queue, a
//! full disk, the in-flight byte budget).
//!
//! They wait here in arrival order, with no PUBACK, and go to the queue in that order
//! once it has room, so records and PUBACKs keep the order the device sent them in. The
//! session keeps reading meanwhile, up to its in-flight window and [`HELD_BYTES`], so
//! it still answers the device's PINGREQs (a device whose keep-alive goes unanswered
//! disconnects and reconnects: a reconnect storm exactly when the gateway is
//! struggling). Past those bounds the session stops reading and TCP pushes back.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Publish;
use tokio::time::Instant;

/// Payload bytes one session may hold beyond the first held publish.
pub(super) const HELD_BYTES: usize = 64 << 10;
/// First pause before trying the queue again; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest pause between tries.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// One publish waiting for its turn.
pub(super) enum HeldPublish {
    /// A valid envelope to store.
    Store(Publish),
    /// An envelope refused by a check: acknowledged (never stored) when its turn
    /// comes, so its PUBACK does not overtake those of earlier publishes.
    Refused { pkid: u16, qos: QoS },
}

/// The publishes waiting, and when to try the queue again.
pub(super) struct Held {
    items: VecDeque<HeldPublish>,
    bytes: usize,
    /// Set after the queue refused the first one; `None`: try at once.
    retry_at: Option<Instant>,
    delay: Duration,
}

impl Held {
    pub(super) fn new() -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            retry_at: None,
            delay: RETRY_MIN,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// True while the session may read more packets (and so answer PINGREQs).
    pub(super) fn has_room(&self) -> bool {
        self.bytes < HELD_BYTES
    }

    pub(super) fn push(&mut self, publish: HeldPublish) {
        if let HeldPublish::Store(p) = &publish {
            self.bytes = self.bytes.saturating_add(p.payload.len());
        }
        self.items.push_back(publish);
    }

    /// The first publish, if its turn has come (no retry pending, or it is due).
    pub(super) fn due_front(&self, now: Instant) -> Option<&HeldPublish> {
        match self.retry_at {
            Some(at) if at > now => None,
            _ => self.items.front(),
        }
    }

    /// Takes the first publish out: it was handed on. The next one is tried at once.
    pub(super) fn pop_front(&mut self) {
        if let Some(HeldPublish::Store(p)) = self.items.pop_front() {
            self.bytes = self.bytes.saturating_sub(p.payload.len());
        }
        self.retry_at = None;
        self.delay = RETRY_MIN;
    }

    /// The queue refused the first publish: schedules the next try with a growing
    /// pause. True for the first refusal since the queue last took one (to count a
    /// holding episode once, not every retry).
    pub(super) fn refused(&mut self, now: Instant) -> bool {
        let first = self.retry_at.is_none();
        self.retry_at = Some(now + self.delay);
        self.delay = (self.delay * 2).min(RETRY_MAX);
        first
    }

    /// When the session must wake up to try again, if a try is scheduled.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| !self.items.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::{Held, HeldPublish, RETRY_MAX, RETRY_MIN};
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::Publish;
    use tokio::time::Instant;

    fn publish(len: usize) -> HeldPublish {
        HeldPublish::Store(Publish::new("e3/d/up", QoS::AtLeastOnce, vec![0u8; len]))
    }

    #[test]
    fn keeps_order_counts_bytes_and_backs_off() {
        let now = Instant::now();
        let mut held = Held::new();
        held.push(publish(40 << 10));
        held.push(HeldPublish::Refused {
            pkid: 9,
            qos: QoS::AtLeastOnce,
        });
        assert!(held.has_room());
        held.push(publish(30 << 10));
        assert!(!held.has_room(), "70 KiB held is past the bound");
        assert!(held.due_front(now).is_some(), "tried at once");
        assert!(held.refused(now), "the first refusal of an episode");
        assert!(!held.refused(now), "a retry is not a new episode");
        assert!(held.due_front(now).is_none(), "waits for the retry");
        assert!(held.due_front(now + RETRY_MAX).is_some());
        held.pop_front();
        assert!(matches!(
            held.due_front(now),
            Some(HeldPublish::Refused { pkid: 9, .. })
        ));
        held.pop_front();
        held.pop_front();
        assert!(held.len() == 0 && held.has_room() && held.retry_at().is_none());
        assert!(held.refused(now) && held.retry_at().is_none());
        held.push(publish(1));
        assert_eq!(held.retry_at(), Some(now + RETRY_MIN));
    }
}
