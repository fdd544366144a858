//! `blindgate queue inspect --data-dir DIR [--json]`: what a stopped gateway's queue
//! holds, per device, and what in it is damaged, quarantined or set aside. Offline and
//! read-only: it refuses a database a running gateway holds (sled's lock), and works on
//! a copy, because opening a sled database writes to it. The copy is opened exactly as
//! a starting gateway opens the queue (sled's recovery, the fallbacks for a damaged
//! `conf` or snapshot, keeping what can be read of unreadable pages, quarantine), so
//! the report is what the gateway will forward.
//!
//! Exit status: 0 clean; 1 damage found (records failing their checksum, quarantined
//! records, a database sled cannot open or fully read, databases set aside before, an
//! interrupted rebuild, read errors); 2 the queue cannot be opened (missing, in use, or
//! not even recoverable), or bad usage.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use std::sync::atomic::Ordering;

use super::marker;
use super::rebuild::{rebuild_path, replaced_path};
use super::record::{self, RecordError};
use super::store::{Store, copy_dir, damaged_copies};
use super::{QueueConfig, QueueCounters};
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
    /// Records in the queue that fail to decode or their checksum: a starting gateway
    /// moves them to quarantine (and counts them in `blindgate_queue_quarantined_total`).
    pub damaged_total: u64,
    /// Records that were in quarantine already.
    pub quarantined_total: u64,
    /// The quarantine after a start: the damaged records and the ones quarantined
    /// before (at most 100 listed), never forwarded.
    pub quarantine: Vec<DamagedRecord>,
    /// What a starting gateway would have to do beyond sled's normal recovery.
    pub recovery: Vec<String>,
    /// Records the last clean stop left (`queue.clean`) that cannot be recovered.
    pub lost_since_clean_stop: u64,
    /// Records sled cannot recover that a starting gateway salvages from the raw bytes.
    pub salvageable: u64,
    /// Whole databases a gateway set aside because sled could not open them.
    pub set_aside: Vec<SetAside>,
    /// Directories of an interrupted rebuild (the next start finishes or removes them).
    pub rebuild_leftovers: Vec<String>,
    /// Errors sled returned while reading (the rest of that tree was not read).
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

/// A database set aside whole.
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
    report.rebuild_leftovers = [rebuild_path(&path), replaced_path(&path)]
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if let Err(error) = read_queue(&path, &mut report) {
        report.status = "unopenable";
        report.error = Some(error);
        return report;
    }
    let damaged = report.damaged_total > 0
        || report.quarantined_total > 0
        || !report.recovery.is_empty()
        || !report.set_aside.is_empty()
        || !report.rebuild_leftovers.is_empty()
        || !report.read_errors.is_empty();
    report.status = if damaged { "damaged" } else { "clean" };
    report
}

fn read_queue(path: &Path, report: &mut Report) -> Result<(), String> {
    if !path.join("db").is_file() {
        return Err(format!("no queue database at {}", path.display()));
    }
    report.size_on_disk = dir_size(path);
    let scratch =
        ScratchDir::new().map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let copy = scratch.0.join("queue");
    {
        // A shared lock on sled's file while copying: fails if a gateway holds it, and
        // keeps a gateway from starting on it until the copy is complete.
        let db = fs::File::open(path.join("db"))
            .map_err(|e| format!("cannot read {}: {e}", path.join("db").display()))?;
        rustix::fs::flock(&db, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(
            |_| {
                format!(
                    "{} is in use by a running gateway; stop it first (or see its /status page)",
                    path.display()
                )
            },
        )?;
        copy_dir(path, &copy).map_err(|e| format!("cannot copy the queue: {e}"))?;
        for sibling in [rebuild_path, marker::path_of] {
            if sibling(path).is_file() {
                fs::copy(sibling(path), sibling(&copy))
                    .map_err(|e| format!("cannot copy {}: {e}", sibling(path).display()))?;
            }
        }
    }
    let counters = QueueCounters::default();
    let mut config = QueueConfig::new(&copy);
    config.cache_size = 8 << 20;
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Store::open(&config, &counters)
    }));
    let store = match opened {
        Ok(Ok((store, _))) => store,
        Ok(Err(err)) => {
            let cause =
                std::error::Error::source(&err).map_or_else(String::new, |c| format!(": {c}"));
            return Err(format!("the queue cannot be opened: {err}{cause}"));
        }
        Err(_) => return Err("opening the queue panicked".to_owned()),
    };
    let lost = counters.lost_at_open.load(Ordering::Relaxed);
    report.lost_since_clean_stop = lost;
    let salvaged = counters.salvaged.load(Ordering::Relaxed);
    report.salvageable = salvaged;
    if lost > 0 {
        report.recovery.push(format!(
            "{lost} records the last clean stop left cannot be recovered: every copy of \
             their bytes is damaged or gone"
        ));
    }
    if salvaged > 0 {
        report.recovery.push(format!(
            "{salvaged} records sled cannot read past damage are intact in the raw files: a \
             starting gateway salvages them (they are counted below as queued)"
        ));
    }
    if counters.databases_moved_aside.load(Ordering::Relaxed) > 0 {
        report.recovery.push(
            "the files changed since the last clean stop, or sled cannot open or fully read \
             them: a starting gateway keeps a copy aside (queue.damaged-<time>) and keeps \
             what can be recovered"
                .to_owned(),
        );
    }
    let now = now_ms();
    let mut devices: BTreeMap<String, DeviceReport> = BTreeMap::new();
    for item in store.records.iter() {
        let (key, value) = match item {
            Ok(kv) => kv,
            Err(e) => {
                report.read_errors.push(format!("records: {e}"));
                break;
            }
        };
        let Ok(rec) = record::decode(&key, &value) else {
            report
                .read_errors
                .push("records: a damaged record was not quarantined".into());
            continue;
        };
        let size = (key.len() + value.len()) as u64;
        report.records += 1;
        report.bytes += size;
        let d = devices.entry(rec.device_id.clone()).or_default();
        if d.records == 0 {
            d.device = rec.device_id;
            d.oldest_id = rec.id.0;
            d.oldest_arrival_ms = rec.arrival_ms;
        }
        d.records += 1;
        d.bytes += size;
        d.newest_id = rec.id.0;
        d.newest_arrival_ms = rec.arrival_ms;
        // Ids sort within a device; arrival times follow but clocks may jump.
        d.oldest_arrival_ms = d.oldest_arrival_ms.min(rec.arrival_ms);
    }
    let mut in_quarantine = 0u64;
    for item in store.quarantine.iter() {
        let (key, value) = match item {
            Ok(kv) => kv,
            Err(e) => {
                report.read_errors.push(format!("quarantine: {e}"));
                break;
            }
        };
        in_quarantine += 1;
        if report.quarantine.len() < LISTED {
            let err = record::decode(&key, &value).err();
            let mut entry = damaged(&key, &value, err.unwrap_or(RecordError::Checksum));
            if err.is_none() {
                entry.reason = "quarantined (decodes now; it failed when it was moved)".into();
            }
            report.quarantine.push(entry);
        }
    }
    report.damaged_total = counters.quarantined.load(Ordering::Relaxed);
    report.quarantined_total = in_quarantine.saturating_sub(report.damaged_total);
    for d in devices.values_mut() {
        d.oldest_age_s = now.saturating_sub(d.oldest_arrival_ms) / 1000;
        d.newest_age_s = now.saturating_sub(d.newest_arrival_ms) / 1000;
    }
    report.devices = devices.into_values().collect();
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

/// Databases moved aside next to `path` (`queue.damaged-<unix time>`).
fn set_aside(path: &Path) -> Vec<SetAside> {
    damaged_copies(path)
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
            "damaged (a starting gateway quarantines them): {}",
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
        let _ = writeln!(w, "read error (the rest of that tree is unreadable): {e}");
    }
    for l in &report.rebuild_leftovers {
        let _ = writeln!(
            w,
            "interrupted rebuild: {l} (the next start finishes or removes it)"
        );
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
