//! `blindgate keys new|rotate|shred|list`: the operator's tools over the cloud's device
//! key store. Every command takes `--store DIR` and may run while the cloud ingest uses
//! the same store (changes are serialised by a per-device `flock`). Output never
//! contains key bytes; the only key material leaving the store is the device key file
//! `new --out` writes (mode 0600) and the sealed `rekey` commands.

use std::error::Error as _;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use e3::Suite;
use thiserror::Error;

use super::{DEFAULT_STORE_DIR, DeviceStatus, KeyStore, KeyStoreError, Rotation, now_ms};
use crate::config::units::parse_duration;

/// The `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Provision a device: create its first key and write its device key file.
    New(NewArgs),
    /// Rotate one device's key, or every device's that is due; write the rekey commands.
    Rotate(RotateArgs),
    /// Destroy every key of a device for good; its id can never be provisioned again.
    Shred(ShredArgs),
    /// List devices: current key id, retired keys and until when, shredded (no key bytes).
    List(ListArgs),
}

/// Where the store is and who acts on it; shared by every `keys` subcommand.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The key store directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STORE_DIR)]
    store: PathBuf,
    /// Who the audit log names for this run (default: the process name).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
}

/// Flags of `keys new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Device id: 1..=64 characters of [A-Za-z0-9._-].
    #[arg(long, value_name = "ID")]
    device: String,
    /// AEAD suite: aes-256-gcm or chacha20-poly1305.
    #[arg(long, value_name = "SUITE", default_value = "aes-256-gcm", value_parser = parse_suite)]
    suite: Suite,
    /// Where to write the device's key file (mode 0600; never overwritten), to install
    /// on the device.
    #[arg(short, long, value_name = "FILE")]
    out: PathBuf,
}

/// Flags of `keys rotate`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["device", "all_due"])))]
pub struct RotateArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Rotate this device now.
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// Rotate every live device whose current key is older than --interval.
    #[arg(long)]
    all_due: bool,
    /// How long the old key keeps opening uplinks, e.g. "72h".
    #[arg(long, value_name = "DURATION", default_value = "72h", value_parser = parse_duration)]
    grace: Duration,
    /// With --all-due: the age at which a key is due for rotation, e.g. "24h".
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    interval: Duration,
    /// Suite of the new keys (default: the suite of each device's current key).
    #[arg(long, value_name = "SUITE", value_parser = parse_suite)]
    suite: Option<Suite>,
    /// Write the sealed rekey command (an E3 envelope, to publish on the device's
    /// downlink topic) to this file; with --all-due, a directory receiving
    /// `<device>.e3` per device. Without it only the command's seq and length are shown,
    /// and the command is lost: the device never learns its new key.
    #[arg(long, value_name = "PATH")]
    out_command: Option<PathBuf>,
}

/// Flags of `keys shred`.
#[derive(Debug, Args)]
pub struct ShredArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The device whose keys are destroyed.
    #[arg(long, value_name = "ID")]
    device: String,
    /// Confirms the shred; it cannot be undone.
    #[arg(long, required = true)]
    yes: bool,
}

/// Flags of `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
}

/// Why a `keys` subcommand failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeysCliError {
    /// The store could not be opened.
    #[error("cannot open key store {}", .path.display())]
    Open {
        /// The store directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KeyStoreError,
    },
    /// A store operation on one device failed.
    #[error("cannot {action} device {device}")]
    Device {
        /// `provision`, `export`, `rotate`, `shred` or `read`.
        action: &'static str,
        /// The device id.
        device: String,
        /// The cause.
        #[source]
        source: KeyStoreError,
    },
    /// The devices could not be listed.
    #[error("cannot list devices")]
    List(#[source] KeyStoreError),
    /// The key file `new` would write exists already.
    #[error("{} already exists; refusing to overwrite it", .path.display())]
    OutExists {
        /// The file.
        path: PathBuf,
    },
    /// A rekey command file could not be created or written.
    #[error("cannot write rekey command file {}", .path.display())]
    CommandFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Some of the due rotations failed (each was reported on stderr).
    #[error("{failed} of {due} due rotations failed")]
    RotationsFailed {
        /// How many failed.
        failed: usize,
        /// How many were due.
        due: usize,
    },
}

/// Runs one `keys` subcommand.
///
/// # Errors
/// A [`KeysCliError`] naming the device and operation that failed.
pub fn run(cmd: KeysCommand) -> Result<(), KeysCliError> {
    match cmd {
        KeysCommand::New(args) => new(&args),
        KeysCommand::Rotate(args) => rotate(&args),
        KeysCommand::Shred(args) => shred(&args),
        KeysCommand::List(args) => list(&args),
    }
}

fn new(args: &NewArgs) -> Result<(), KeysCliError> {
    // Checked before provisioning so that a typo does not leave a key nobody holds.
    if args.out.exists() {
        return Err(KeysCliError::OutExists {
            path: args.out.clone(),
        });
    }
    let store = open_store(&args.store)?;
    let device = &args.device;
    let key = store
        .provision(device, args.suite)
        .map_err(device_error("provision", device))?;
    store
        .export_current(device, &args.out)
        .map_err(device_error("export", device))?;
    println!(
        "{device}: key {} ({}) provisioned; device key file written to {} (mode 0600)",
        key.key_id(),
        key.suite(),
        args.out.display()
    );
    Ok(())
}

fn rotate(args: &RotateArgs) -> Result<(), KeysCliError> {
    let store = open_store(&args.store)?;
    match &args.device {
        Some(device) => rotate_one(&store, args, device, args.out_command.as_deref()),
        None => rotate_all_due(&store, args),
    }
}

fn rotate_all_due(store: &KeyStore, args: &RotateArgs) -> Result<(), KeysCliError> {
    let now = now_ms();
    let due: Vec<String> = store
        .devices()
        .map_err(KeysCliError::List)?
        .into_iter()
        .filter(|device| store.rotation_due(device, args.interval, now))
        .collect();
    if due.is_empty() {
        println!("no device is due for rotation");
        return Ok(());
    }
    if let Some(dir) = &args.out_command {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(command_file_error(dir))?;
    }
    let mut failed = 0;
    for device in &due {
        let out = args
            .out_command
            .as_ref()
            .map(|dir| dir.join(format!("{device}.e3")));
        if let Err(err) = rotate_one(store, args, device, out.as_deref()) {
            failed += 1;
            eprintln!("{}", error_chain(&err));
        }
    }
    match failed {
        0 => Ok(()),
        failed => Err(KeysCliError::RotationsFailed {
            failed,
            due: due.len(),
        }),
    }
}

/// Rotates one device. The command file is created before rotating, so that a bad
/// path fails while nothing has changed yet.
fn rotate_one(
    store: &KeyStore,
    args: &RotateArgs,
    device: &str,
    out: Option<&Path>,
) -> Result<(), KeysCliError> {
    let file = out.map(create_command_file).transpose()?;
    let now = now_ms();
    let rotation = match args.suite {
        Some(suite) => store.rotate_to(device, suite, args.grace, now),
        None => store.rotate(device, args.grace, now),
    }
    .map_err(device_error("rotate", device))?;
    let until = now.saturating_add(super::millis(args.grace));
    println!(
        "{device}: key {} -> {} ({}); key {} opens uplinks until {until} ms (in {})",
        rotation.old.key_id(),
        rotation.new.key_id(),
        rotation.new.suite(),
        rotation.old.key_id(),
        format_remaining(until, now),
    );
    match (file, out) {
        (Some(file), Some(path)) => save_command(file, path, &rotation),
        _ => {
            println!(
                "{device}: rekey command seq {}, {} bytes (not saved)",
                rotation.command_seq,
                rotation.command.len()
            );
            eprintln!(
                "warning: the rekey command for {device} was not saved (no --out-command); \
                 the device keeps sealing with key {} and its uplinks are rejected once the \
                 grace period ends",
                rotation.old.key_id()
            );
            Ok(())
        }
    }
}

fn create_command_file(path: &Path) -> Result<File, KeysCliError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(command_file_error(path))
}

/// Writes the command. The rotation has happened: if writing fails, the envelope goes
/// to stderr in hex so that the device can still be told its new key.
fn save_command(mut file: File, path: &Path, rotation: &Rotation) -> Result<(), KeysCliError> {
    let written = file
        .write_all(&rotation.command)
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        eprintln!(
            "rekey command (seq {}) in hex: {}",
            rotation.command_seq,
            hex::encode(&rotation.command)
        );
        return Err(KeysCliError::CommandFile {
            path: path.to_owned(),
            source,
        });
    }
    println!(
        "{}: rekey command seq {}, {} bytes, written to {}",
        rotation.new.device_id(),
        rotation.command_seq,
        rotation.command.len(),
        path.display()
    );
    Ok(())
}

fn shred(args: &ShredArgs) -> Result<(), KeysCliError> {
    let store = open_store(&args.store)?;
    let destroyed = store
        .shred(&args.device, now_ms())
        .map_err(device_error("shred", &args.device))?;
    println!("{}: shredded, {destroyed} key files destroyed", args.device);
    Ok(())
}

fn list(args: &ListArgs) -> Result<(), KeysCliError> {
    let store = open_store(&args.store)?;
    let now = now_ms();
    println!("DEVICE\tCURRENT\tRETIRED\tSHREDDED");
    for device in store.devices().map_err(KeysCliError::List)? {
        let status = store
            .status(&device)
            .map_err(device_error("read", &device))?;
        println!("{}", format_status(&status, now));
    }
    Ok(())
}

fn open_store(args: &StoreArgs) -> Result<KeyStore, KeysCliError> {
    let store = KeyStore::open(&args.store).map_err(|source| KeysCliError::Open {
        path: args.store.clone(),
        source,
    })?;
    Ok(match &args.actor {
        Some(actor) => store.with_actor(actor.clone()),
        None => store,
    })
}

/// One line of `keys list`: device, current key id, retired keys with the end of their
/// grace period, and when the device was shredded.
fn format_status(status: &DeviceStatus, now_ms: u64) -> String {
    let retired: Vec<String> = status
        .retired
        .iter()
        .map(|r| {
            format!(
                "{} until {} ({})",
                r.key_id,
                r.until_ms,
                format_remaining(r.until_ms, now_ms)
            )
        })
        .collect();
    let retired = if retired.is_empty() {
        "-".to_owned()
    } else {
        retired.join(", ")
    };
    let shredded = status
        .shredded_at_ms
        .map_or_else(|| "-".to_owned(), |at| format!("at {at}"));
    format!(
        "{}\t{}\t{retired}\t{shredded}",
        status.device, status.current_key_id
    )
}

/// `71h59m` until `until_ms`, or `ended`.
fn format_remaining(until_ms: u64, now_ms: u64) -> String {
    let minutes = until_ms.saturating_sub(now_ms) / 60_000;
    if until_ms <= now_ms {
        "ended".to_owned()
    } else {
        format!("{}h{:02}m", minutes / 60, minutes % 60)
    }
}

fn parse_suite(name: &str) -> Result<Suite, String> {
    Suite::from_name(name).ok_or_else(|| "expected aes-256-gcm or chacha20-poly1305".to_owned())
}

fn device_error<'a>(
    action: &'static str,
    device: &'a str,
) -> impl FnOnce(KeyStoreError) -> KeysCliError + 'a {
    move |source| KeysCliError::Device {
        action,
        device: device.to_owned(),
        source,
    }
}

fn command_file_error(path: &Path) -> impl FnOnce(io::Error) -> KeysCliError + '_ {
    move |source| KeysCliError::CommandFile {
        path: path.to_owned(),
        source,
    }
}

/// `error: cause: cause`, for failures reported while carrying on with other devices.
fn error_chain(err: &KeysCliError) -> String {
    let mut text = format!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;
    use crate::keys::RetiredKey;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: KeysCommand,
    }

    fn parse(args: &[&str]) -> Result<KeysCommand, clap::Error> {
        TestCli::try_parse_from(std::iter::once("keys").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    #[test]
    fn the_command_line_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn rotate_takes_a_device_or_all_due_but_not_both() {
        assert!(parse(&["rotate"]).is_err());
        assert!(parse(&["rotate", "--device", "d", "--all-due"]).is_err());
        let Ok(KeysCommand::Rotate(args)) = parse(&["rotate", "--all-due"]) else {
            panic!("rotate --all-due parses");
        };
        assert_eq!(args.grace, Duration::from_secs(72 * 3600));
        assert_eq!(args.interval, Duration::from_secs(24 * 3600));
        assert_eq!(args.store.store, Path::new(DEFAULT_STORE_DIR));
    }

    #[test]
    fn shred_requires_yes() {
        assert!(parse(&["shred", "--device", "d"]).is_err());
        assert!(parse(&["shred", "--device", "d", "--yes"]).is_ok());
    }

    #[test]
    fn unknown_suites_are_refused() {
        assert!(parse(&["new", "--device", "d", "--suite", "rot13", "-o", "k"]).is_err());
        let Ok(KeysCommand::New(args)) = parse(&[
            "new",
            "--device",
            "d",
            "--suite",
            "chacha20-poly1305",
            "-o",
            "k",
        ]) else {
            panic!("new parses");
        };
        assert_eq!(args.suite, Suite::ChaCha20Poly1305);
    }

    #[test]
    fn list_lines_show_ids_and_times_but_no_keys() {
        let status = DeviceStatus {
            device: "pump-17".to_owned(),
            current_key_id: 2,
            current_created_ms: 0,
            retired: vec![RetiredKey {
                key_id: 1,
                until_ms: 3_600_000 + 90_000,
            }],
            shredded_at_ms: None,
            next_downlink_seq: 7,
        };
        assert_eq!(
            format_status(&status, 0),
            "pump-17\t2\t1 until 3690000 (1h01m)\t-"
        );
        let shredded = DeviceStatus {
            retired: Vec::new(),
            shredded_at_ms: Some(5),
            ..status
        };
        assert_eq!(format_status(&shredded, 10), "pump-17\t2\t-\tat 5");
    }

    #[test]
    fn new_rotate_and_shred_run_against_a_real_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("keys");
        let store_arg = store.to_str().expect("utf-8 path");
        let key_file = dir.path().join("pump-17.key");
        let commands = dir.path().join("commands");
        let run_args = |args: &[&str]| run(parse(args).expect("parses"));
        run_args(&[
            "new",
            "--store",
            store_arg,
            "--device",
            "pump-17",
            "-o",
            key_file.to_str().expect("utf-8"),
        ])
        .expect("new");
        assert!(e3::read_key_file(&key_file).is_ok());
        run_args(&[
            "rotate",
            "--store",
            store_arg,
            "--all-due",
            "--interval",
            "0s",
            "--out-command",
            commands.to_str().expect("utf-8"),
        ])
        .expect("rotate");
        let command = std::fs::read(commands.join("pump-17.e3")).expect("command written");
        let device_key = e3::read_key_file(&key_file).expect("key");
        let (header, _) = device_key.open(&command).expect("opens with the old key");
        assert_eq!(header.kind(), e3::Kind::Command);
        run_args(&["list", "--store", store_arg]).expect("list");
        assert!(
            run_args(&[
                "shred", "--store", store_arg, "--device", "pump-17", "--yes", "--actor", "ops"
            ])
            .is_ok()
        );
        let audit = std::fs::read_to_string(store.join("audit.log")).expect("audit");
        assert!(audit.contains(r#""action":"export""#), "{audit}");
        assert!(audit.contains(r#""actor":"ops""#), "{audit}");
    }
}
