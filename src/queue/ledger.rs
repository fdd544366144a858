//! Byte and record accounting per device, and the admission decision at the caps.
//!
//! The ledger counts the logical size of stored records (key + value). sled's own disk
//! use is larger (about twice the payload, measured) and does not shrink after a
//! drain; the OS reserve check against the filesystem's free space is what protects
//! the disk itself.

use std::collections::HashMap;

/// Which limit refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The queue's total byte cap.
    QueueBytes,
    /// The device's quota.
    DeviceQuota,
    /// The filesystem's free space is below the OS reserve.
    DiskReserve,
}

impl Limit {
    /// A stable name for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::QueueBytes => "queue_bytes",
            Self::DeviceQuota => "device_quota",
            Self::DiskReserve => "disk_reserve",
        }
    }
}

/// What one device holds in the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceUsage {
    /// Stored bytes (keys and values).
    pub bytes: u64,
    /// Stored records.
    pub records: u64,
}

/// Totals and per-device usage.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    total: DeviceUsage,
    devices: HashMap<String, DeviceUsage>,
}

impl Ledger {
    /// Reserves `size` bytes for one record of `device` if both caps allow it.
    ///
    /// # Errors
    /// The [`Limit`] that would be exceeded.
    pub(super) fn admit(
        &mut self,
        device: &str,
        size: u64,
        max_bytes: u64,
        device_quota: u64,
    ) -> Result<(), Limit> {
        let used = self.devices.get(device).map_or(0, |u| u.bytes);
        if used + size > device_quota {
            return Err(Limit::DeviceQuota);
        }
        if self.total.bytes + size > max_bytes {
            return Err(Limit::QueueBytes);
        }
        self.add(device, size);
        Ok(())
    }

    /// Counts a record that is already stored (recovery).
    pub(super) fn add(&mut self, device: &str, size: u64) {
        let usage = self.devices.entry(device.to_owned()).or_default();
        usage.bytes += size;
        usage.records += 1;
        self.total.bytes += size;
        self.total.records += 1;
    }

    /// Forgets a record that left the queue (acknowledged, dropped, or never stored).
    pub(super) fn release(&mut self, device: &str, size: u64) {
        if let Some(usage) = self.devices.get_mut(device) {
            usage.bytes = usage.bytes.saturating_sub(size);
            usage.records = usage.records.saturating_sub(1);
            if usage.records == 0 {
                self.devices.remove(device);
            }
        }
        self.total.bytes = self.total.bytes.saturating_sub(size);
        self.total.records = self.total.records.saturating_sub(1);
    }

    /// Totals over all devices.
    pub(super) fn total(&self) -> DeviceUsage {
        self.total
    }

    /// Usage of one device.
    pub(super) fn device(&self, device: &str) -> DeviceUsage {
        self.devices.get(device).copied().unwrap_or_default()
    }

    /// The device holding the most bytes: whom drop-oldest takes from at the queue cap.
    pub(super) fn largest_device(&self) -> Option<&str> {
        self.devices
            .iter()
            .max_by_key(|(_, usage)| usage.bytes)
            .map(|(device, _)| device.as_str())
    }

    /// Devices that have records, in a stable order.
    pub(super) fn devices(&self) -> Vec<String> {
        let mut devices: Vec<String> = self.devices.keys().cloned().collect();
        devices.sort_unstable();
        devices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_then_cap_then_release() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.admit("a", 60, 100, 80), Ok(()));
        assert_eq!(ledger.admit("a", 30, 100, 80), Err(Limit::DeviceQuota));
        assert_eq!(ledger.admit("b", 50, 100, 80), Err(Limit::QueueBytes));
        assert_eq!(ledger.admit("b", 40, 100, 80), Ok(()));
        assert_eq!(ledger.largest_device(), Some("a"));
        ledger.release("a", 60);
        assert_eq!(ledger.device("a"), DeviceUsage::default());
        assert_eq!(
            ledger.total(),
            DeviceUsage {
                bytes: 40,
                records: 1
            }
        );
        assert_eq!(ledger.devices(), vec!["b".to_owned()]);
    }
}
