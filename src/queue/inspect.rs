//! `blindgate queue inspect --data-dir DIR [--json]`: what a stopped gateway's queue
//! holds, per device, and what in it is damaged, quarantined or set aside. Offline and
//! read-only: it refuses a queue a running gateway holds (sled's lock on the state
//! database), reads the segment log in place without writing, and opens a copy of the
//! state database (opening sled writes). The report is what a starting gateway will
//! forward: the same frames, the same acknowledgement floors.
//!
//! Exit status: 0 clean; 1 damage found (damaged frames, records quarantined before,
//! records the last clean stop left that are missing, databases set aside, read
//! errors); 2 the queue cannot be opened (missing, in use), or bad usage.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::record::{self, RecordError};
use super::segments;
use super::state::{self, State};
use crate::cli::ExitStatus;
use crate::clock::now_ms;

/// Exit status: the queue is clean.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status: damaged, quarantined or set-aside data was found.
pub const EXIT_DAMAGED: u8 = 1;
/// Exit status: the queue cannot be opened.
pub const EXIT_UNOPENABLE: u8 = 2;

/// At most this many damaged or quarantined records are listed one by one.
const LISTED: usize = 100;

/// The `queue` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Show what a stopped gateway's queue holds, per device, and what is damaged.
    ///
    /// Reads a copy of the database (in the system's temporary directory), never the
    /// database itself. Exit status: 0 clean, 1 damage found, 2 cannot open.
    Inspect(InspectArgs),
}

/// Flags of `queue inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The gateway's data directory (`gateway.data_dir`); the queue is its `queue/`.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/blindgate")]
    pub data_dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `queue inspect` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The queue directory.
    pub queue: String,
    /// `clean`, `damaged` or `unopenable`.
    pub status: &'static str,
    /// Why the queue cannot be opened (status `unopenable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of the queue's files on disk.
    pub size_on_disk: u64,
    /// Intact records over all devices.
    pub records: u64,
    /// Bytes of intact records (keys and values, what the caps count).
    pub bytes: u64,
    /// Intact records per device, by device id.
    pub devices: Vec<DeviceReport>,
    /// Damaged ranges in the log (each is one or more records): a starting gateway
    /// quarantines them (and counts them in `blindgate_queue_quarantined_total`).
    pub damaged_total: u64,
    /// Ranges or records in quarantine already.
    pub quarantined_total: u64,
    /// The damaged ranges (at most 100 listed), never forwarded.
    pub quarantine: Vec<DamagedRecord>,
    /// What a starting gateway would have to do beyond sled's normal recovery.
    pub recovery: Vec<String>,
    /// Records the last clean stop left that are not found intact.
    pub lost_since_clean_stop: u64,
    /// Whole databases a gateway set aside because sled could not open them.
    pub set_aside: Vec<SetAside>,
    /// Errors while reading.
    pub read_errors: Vec<String>,
}

/// Intact records of one device.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceReport {
    /// The device id.
    pub device: String,
    /// Records.
    pub records: u64,
    /// Bytes (keys and values).
    pub bytes: u64,
    /// The oldest record's id.
    pub oldest_id: u64,
    /// The newest record's id.
    pub newest_id: u64,
    /// Arrival of the oldest record, ms since the Unix epoch.
    pub oldest_arrival_ms: u64,
    /// Arrival of the newest record, ms since the Unix epoch.
    pub newest_arrival_ms: u64,
    /// Age of the oldest record in seconds.
    pub oldest_age_s: u64,
    /// Age of the newest record in seconds.
    pub newest_age_s: u64,
}

/// A record that does not decode.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedRecord {
    /// The device, if the key still names one.
    pub device: Option<String>,
    /// The record id, if the key still holds one.
    pub id: Option<u64>,
    /// Key and value bytes.
    pub bytes: u64,
    /// Why it does not decode.
    pub reason: String,
}

/// A database set aside whole (`state.damaged-*`, `sled.damaged-*`).
#[derive(Debug, Clone, Serialize)]
pub struct SetAside {
    /// Its directory.
    pub path: String,
    /// Bytes of its files.
    pub size_on_disk: u64,
}

impl Report {
    /// The exit status this report calls for.
    pub fn exit_status(&self) -> u8 {
        match self.status {
            "clean" => EXIT_CLEAN,
            "damaged" => EXIT_DAMAGED,
            _ => EXIT_UNOPENABLE,
        }
    }
}

/// Runs `queue ...`.
///
/// # Errors
/// [`ExitStatus`] 1 or 2 after printing the report (see the module docs).
pub fn run(command: QueueCommand) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let QueueCommand::Inspect(args) = command;
    let report = inspect(&args.data_dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    match report.exit_status() {
        EXIT_CLEAN => Ok(()),
        code => Err(Box::new(ExitStatus(code))),
    }
}

/// Inspects the queue of `data_dir` without changing anything there.
pub fn inspect(data_dir: &Path) -> Report {
    let path = data_dir.join("queue");
    let mut report = Report {
        queue: path.display().to_string(),
        ..Report::default()
    };
    report.set_aside = set_aside(&path);
    if let Err(error) = read_queue(&path, &mut report) {
        report.status = "unopenable";
        report.error = Some(error);
        return report;
    }
    let damaged = report.damaged_total > 0
        || report.quarantined_total > 0
        || report.lost_since_clean_stop > 0
        || !report.set_aside.is_empty()
        || !report.read_errors.is_empty();
    report.status = if damaged { "damaged" } else { "clean" };
    report
}

fn read_queue(path: &Path, report: &mut Report) -> Result<(), String> {
    let log = super::open::log_path(path);
    let legacy = path.join("conf").exists() || path.join("db").exists();
    if !log.is_dir() && !legacy {
        return Err(format!("no queue at {}", path.display()));
    }
    report.size_on_disk = dir_size(path);
    let scratch =
        ScratchDir::new().map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let mut devices: BTreeMap<String, DeviceReport> = BTreeMap::new();
    if legacy {
        read_legacy(path, &scratch.0.join("sled"), report, &mut devices)?;
    }
    let (floors, clean_stop) = read_state(path, &scratch.0.join("state"), report)?;
    if log.is_dir() {
        let scanned = segments::read_only(&log, |_, frame| {
            let Ok((device, id)) = record::decode_key(frame.key) else {
                return false;
            };
            if floors.get(device).is_some_and(|floor| floor.covers(id.0)) {
                return false;
            }
            count(
                &mut devices,
                device,
                id.0,
                frame.arrival_ms,
                frame.len as u64,
            );
            true
        })
        .map_err(|e| format!("cannot read the queue's log: {e}"))?;
        report.damaged_total = scanned.damaged.len() as u64;
        for damage in scanned.damaged.iter().take(LISTED) {
            report.quarantine.push(DamagedRecord {
                device: None,
                id: None,
                bytes: damage.len,
                reason: format!(
                    "damaged bytes in segment {} at offset {}",
                    damage.segment, damage.offset
                ),
            });
        }
        if let Some((segment, offset, bytes)) = scanned.torn_tail {
            report.recovery.push(format!(
                "{bytes} bytes at the end of segment {segment} (offset {offset}) are a write a \
                 crash cut short, never acknowledged to a device: a starting gateway cuts them off"
            ));
        }
        if let Some(left) = clean_stop {
            report.lost_since_clean_stop = left.saturating_sub(scanned.kept);
        }
    }
    if report.lost_since_clean_stop > 0 {
        report.recovery.push(format!(
            "{} records the last clean stop left are not found intact",
            report.lost_since_clean_stop
        ));
    }
    let now = now_ms();
    for d in devices.values_mut() {
        report.records += d.records;
        report.bytes += d.bytes;
        d.oldest_age_s = now.saturating_sub(d.oldest_arrival_ms) / 1000;
        d.newest_age_s = now.saturating_sub(d.newest_arrival_ms) / 1000;
    }
    report.devices = devices.into_values().collect();
    Ok(())
}

/// Counts one intact record of `device`.
fn count(
    devices: &mut BTreeMap<String, DeviceReport>,
    device: &str,
    id: u64,
    arrival_ms: u64,
    size: u64,
) {
    let d = devices.entry(device.to_owned()).or_default();
    if d.records == 0 {
        d.device = device.to_owned();
        d.oldest_id = id;
        d.newest_id = id;
        d.oldest_arrival_ms = arrival_ms;
        d.newest_arrival_ms = arrival_ms;
    }
    d.records += 1;
    d.bytes += size;
    if id < d.oldest_id {
        d.oldest_id = id;
    }
    if id >= d.newest_id {
        d.newest_id = id;
        d.newest_arrival_ms = arrival_ms;
    }
    // Arrival times follow the ids, but clocks may jump.
    d.oldest_arrival_ms = d.oldest_arrival_ms.min(arrival_ms);
}

/// Reads a copy of the state database: the floors, and how many records the last clean
/// stop left. Refuses a queue a running gateway holds.
fn read_state(
    path: &Path,
    copy: &Path,
    report: &mut Report,
) -> Result<(HashMap<String, super::index::Floor>, Option<u64>), String> {
    let original = state::path_of(path);
    if !original.join("db").is_file() {
        return Ok((HashMap::new(), None));
    }
    {
        // A shared lock on sled's file while copying: fails if a gateway holds it, and
        // keeps a gateway from starting on it until the copy is complete.
        let db = fs::File::open(original.join("db"))
            .map_err(|e| format!("cannot read {}: {e}", original.display()))?;
        rustix::fs::flock(&db, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(
            |_| {
                format!(
                    "{} is in use by a running gateway; stop it first (or see its /status page)",
                    path.display()
                )
            },
        )?;
        copy_dir(&original, &state::path_of(copy))
            .map_err(|e| format!("cannot copy the queue's state: {e}"))?;
    }
    let state = State::open(copy, 1 << 20)
        .map_err(|e| format!("the queue's state database cannot be opened: {e}"))?;
    report.quarantined_total = state.quarantined() as u64;
    let clean_stop = state.take_clean_stop().map_err(|e| e.to_string())?;
    Ok((state.floors(), clean_stop))
}

/// Counts the records of an earlier release's sled queue (a copy of it), which a
/// starting gateway moves into the log.
fn read_legacy(
    path: &Path,
    copy: &Path,
    report: &mut Report,
    devices: &mut BTreeMap<String, DeviceReport>,
) -> Result<(), String> {
    copy_dir(path, copy).map_err(|e| format!("cannot copy the queue: {e}"))?;
    let db = sled::Config::new()
        .path(copy)
        .open()
        .map_err(|e| format!("the earlier release's queue cannot be opened: {e}"))?;
    let records = db.open_tree("records").map_err(|e| e.to_string())?;
    report.recovery.push(
        "the queue is an earlier release's (sled): a starting gateway moves its records into the log"
            .to_owned(),
    );
    for item in records.iter() {
        let (key, value) = match item {
            Ok(kv) => kv,
            Err(e) => {
                report.read_errors.push(format!("records: {e}"));
                break;
            }
        };
        match record::decode(&key, &value) {
            Ok(rec) => count(
                devices,
                &rec.device_id,
                rec.id.0,
                rec.arrival_ms,
                (key.len() + value.len()) as u64,
            ),
            Err(err) => {
                report.damaged_total += 1;
                if report.quarantine.len() < LISTED {
                    report.quarantine.push(damaged(&key, &value, err));
                }
            }
        }
    }
    Ok(())
}

/// Copies a directory tree (sled's files, or a queue's) to `to`.
fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_dir() {
            // A queue's own subdirectories are not sled's.
            if !matches!(name.as_ref(), "log" | "state") && !name.contains(".damaged-") {
                copy_dir(&entry.path(), &target)?;
            }
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn damaged(key: &[u8], value: &[u8], err: RecordError) -> DamagedRecord {
    let decoded = record::decode_key(key).ok();
    DamagedRecord {
        device: decoded.map(|(device, _)| device.to_owned()),
        id: decoded.map(|(_, id)| id.0),
        bytes: (key.len() + value.len()) as u64,
        reason: err.to_string(),
    }
}

/// Databases moved aside in `path` (`state.damaged-<ms>`, `sled.damaged-<ms>`).
fn set_aside(path: &Path) -> Vec<SetAside> {
    let mut copies: Vec<PathBuf> = fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
        .map(|e| e.path())
        .collect();
    copies.sort();
    copies
        .into_iter()
        .map(|copy| SetAside {
            size_on_disk: dir_size(&copy),
            path: copy.display().to_string(),
        })
        .collect()
}

fn dir_size(path: &Path) -> u64 {
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// A private directory under the system's temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "blindgate-queue-inspect-{}-{nanos}",
            std::process::id()
        ));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The text form of a report.
pub fn render(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "queue {}", report.queue);
    if let Some(error) = &report.error {
        let _ = writeln!(w, "cannot open: {error}");
    } else {
        let _ = writeln!(
            w,
            "{} records, {} in {} devices ({} of files on disk)",
            report.records,
            human_bytes(report.bytes),
            report.devices.len(),
            human_bytes(report.size_on_disk)
        );
        if !report.devices.is_empty() {
            let _ = writeln!(
                w,
                "{:<24} {:>8} {:>10} {:>12} {:>12} {:>10} {:>10}",
                "device", "records", "bytes", "oldest id", "newest id", "oldest", "newest"
            );
            for d in &report.devices {
                let _ = writeln!(
                    w,
                    "{:<24} {:>8} {:>10} {:>12} {:>12} {:>10} {:>10}",
                    d.device,
                    d.records,
                    human_bytes(d.bytes),
                    d.oldest_id,
                    d.newest_id,
                    human_age(d.oldest_age_s),
                    human_age(d.newest_age_s)
                );
            }
        }
        let _ = writeln!(
            w,
            "damaged ranges (a starting gateway quarantines them): {}",
            report.damaged_total
        );
        let _ = writeln!(w, "quarantined before: {}", report.quarantined_total);
        for r in &report.quarantine {
            let _ = writeln!(
                w,
                "  device {} id {} {} bytes: {}",
                r.device.as_deref().unwrap_or("?"),
                r.id.map_or_else(|| "?".to_owned(), |id| id.to_string()),
                r.bytes,
                r.reason
            );
        }
        let listed = report.quarantine.len() as u64;
        if report.damaged_total + report.quarantined_total > listed {
            let _ = writeln!(
                w,
                "  ... and {} more",
                report.damaged_total + report.quarantined_total - listed
            );
        }
        for note in &report.recovery {
            let _ = writeln!(w, "recovery: {note}");
        }
    }
    for s in &report.set_aside {
        let _ = writeln!(
            w,
            "set aside earlier (a damaged database, kept for inspection): {} ({})",
            s.path,
            human_bytes(s.size_on_disk)
        );
    }
    for e in &report.read_errors {
        let _ = writeln!(w, "read error: {e}");
    }
    let _ = writeln!(w, "status: {}", report.status);
    out
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn human_age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(3600), "60m");
        assert_eq!(human_age(86_400 * 3), "3d");
    }

    #[test]
    fn a_missing_queue_cannot_be_opened() {
        let report = inspect(Path::new("/nonexistent/blindgate-inspect-test"));
        assert_eq!(report.status, "unopenable");
        assert_eq!(report.exit_status(), EXIT_UNOPENABLE);
    }
}
