//! A simulated device's persistent state, one directory per device:
//!
//! ```text
//! <state_dir>/<device_id>/
//!   state.json                  current key id, uplink seq reservation, downlink replay window
//!   keys/<key_id>.key           E3 key files (0600); old keys stay to open older downlink
//!   outbox/<key_id>-<seq>.e3    sealed uplinks no receipt has named yet, the exact bytes
//! ```
//!
//! Every write is atomic and durable: a temporary file is written, fsync'd and renamed,
//! then the directory is fsync'd, so a power cut leaves the old file or the new one.
//! Removals from the outbox are followed by a directory fsync as well. Directories are
//! 0700, files 0600.
//!
//! Uplink sequence numbers are reserved in blocks of [`SEQ_BLOCK`]: `state.json` records
//! the highest seq that may have been used, and is rewritten (fsync'd) before the first
//! seq of a new block is used. A restarted device continues after the reserved block,
//! so it never reuses a seq, whatever it did before it stopped; each restart leaves a
//! gap of at most `SEQ_BLOCK`, far inside the replay window's 65536.
//!
//! The file operations are blocking; [`DeviceState`] runs them on tokio's blocking pool.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use e3::{
    DeviceId, DeviceKey, KeyFileError, ReceiptEntry, ReplayStateError, ReplayWindow, Verdict,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How many uplink sequence numbers one write of `state.json` reserves.
pub const SEQ_BLOCK: u64 = 1000;

const STATE_FILE: &str = "state.json";
const KEYS_DIR: &str = "keys";
const OUTBOX_DIR: &str = "outbox";
const OUTBOX_EXT: &str = "e3";
const STATE_VERSION: u32 = 1;

/// What can go wrong with a device's state directory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file or directory could not be read, written, synced or removed.
    #[error("cannot access {}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A key file could not be read or written.
    #[error("device key file problem")]
    KeyFile(#[source] KeyFileError),
    /// A key file belongs to another device or names another key id than its file name.
    #[error("key file {} is not key {key_id} of device {device_id}", .path.display())]
    ForeignKey {
        /// The key file.
        path: PathBuf,
        /// The device it should belong to.
        device_id: String,
        /// The key id its name or the state expects.
        key_id: u32,
    },
    /// `state.json` is not a valid state file.
    #[error("malformed state file {}", .path.display())]
    Json {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The saved downlink replay window cannot be restored.
    #[error("state file {} holds an unusable replay window", .path.display())]
    Replay {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ReplayStateError,
    },
    /// `state.json` names a current key that is not in `keys/`.
    #[error("current key {key_id} is missing from {}", .dir.display())]
    MissingKey {
        /// The keys directory.
        dir: PathBuf,
        /// The key id `state.json` names.
        key_id: u32,
    },
    /// Every uplink sequence number has been used.
    #[error("uplink sequence numbers exhausted")]
    SeqExhausted,
    /// A blocking file task did not complete (the runtime is shutting down).
    #[error("state file task was cancelled")]
    Cancelled,
}

impl StateError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// `state.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedState {
    version: u32,
    device_id: String,
    current_key_id: u32,
    /// The highest uplink seq that may have been used.
    seq_reserved: u64,
    /// [`ReplayWindow::to_bytes`] of the cloud-to-device direction, base64.
    downlink_replay: String,
}

/// The paths of one device's state directory. Cheap to clone into blocking tasks.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
}

/// One sealed uplink read back from the outbox.
#[derive(Debug)]
pub(crate) struct OutboxFile {
    pub(crate) key_id: u32,
    pub(crate) seq: u64,
    pub(crate) bytes: Vec<u8>,
}

/// Everything a device directory holds, as loaded at start.
struct Loaded {
    keys: BTreeMap<u32, DeviceKey>,
    saved: SavedState,
    window: ReplayWindow,
    outbox: Vec<OutboxFile>,
}

impl StateDir {
    pub(crate) fn new(state_dir: &Path, device_id: &str) -> Self {
        Self {
            root: state_dir.join(device_id),
        }
    }

    fn state_file(&self) -> PathBuf {
        self.root.join(STATE_FILE)
    }

    fn keys_dir(&self) -> PathBuf {
        self.root.join(KEYS_DIR)
    }

    fn outbox_dir(&self) -> PathBuf {
        self.root.join(OUTBOX_DIR)
    }

    fn key_path(&self, key_id: u32) -> PathBuf {
        self.keys_dir().join(format!("{key_id}.key"))
    }

    fn outbox_path(&self, key_id: u32, seq: u64) -> PathBuf {
        self.outbox_dir()
            .join(format!("{key_id}-{seq}.{OUTBOX_EXT}"))
    }

    /// Opens the directory, creating it from `initial_key_file` on first use (the key
    /// file is copied into `keys/`, then `state.json` is written last, as the commit).
    /// Once `state.json` exists, `initial_key_file` is not read again.
    fn load(&self, device_id: &DeviceId, initial_key_file: &Path) -> Result<Loaded, StateError> {
        for dir in [&self.root, &self.keys_dir(), &self.outbox_dir()] {
            create_private_dir(dir)?;
        }
        let state_file = self.state_file();
        if !state_file.exists() {
            self.initialise(device_id, initial_key_file)?;
        }
        let text = fs::read(&state_file).map_err(StateError::io(&state_file))?;
        let saved: SavedState =
            serde_json::from_slice(&text).map_err(|source| StateError::Json {
                path: state_file.clone(),
                source,
            })?;
        let window =
            decode_window(&saved.downlink_replay).map_err(|source| StateError::Replay {
                path: state_file.clone(),
                source,
            })?;
        let keys = self.read_keys(device_id)?;
        if !keys.contains_key(&saved.current_key_id) {
            return Err(StateError::MissingKey {
                dir: self.keys_dir(),
                key_id: saved.current_key_id,
            });
        }
        let outbox = self.read_outbox()?;
        Ok(Loaded {
            keys,
            saved,
            window,
            outbox,
        })
    }

    fn initialise(&self, device_id: &DeviceId, initial_key_file: &Path) -> Result<(), StateError> {
        let key = e3::read_key_file(initial_key_file).map_err(StateError::KeyFile)?;
        if key.device_id() != device_id {
            return Err(StateError::ForeignKey {
                path: initial_key_file.to_owned(),
                device_id: device_id.to_string(),
                key_id: key.key_id(),
            });
        }
        e3::write_key_file(&self.key_path(key.key_id()), &key, true)
            .map_err(StateError::KeyFile)?;
        self.write_state(&SavedState {
            version: STATE_VERSION,
            device_id: device_id.to_string(),
            current_key_id: key.key_id(),
            seq_reserved: 0,
            downlink_replay: BASE64.encode(ReplayWindow::new().to_bytes()),
        })
    }

    fn read_keys(&self, device_id: &DeviceId) -> Result<BTreeMap<u32, DeviceKey>, StateError> {
        let dir = self.keys_dir();
        let mut keys = BTreeMap::new();
        for (path, stem) in list_files(&dir, "key")? {
            let key = e3::read_key_file(&path).map_err(StateError::KeyFile)?;
            let named = stem.parse::<u32>().ok();
            if key.device_id() != device_id || named != Some(key.key_id()) {
                return Err(StateError::ForeignKey {
                    path,
                    device_id: device_id.to_string(),
                    key_id: named.unwrap_or(key.key_id()),
                });
            }
            keys.insert(key.key_id(), key);
        }
        Ok(keys)
    }

    /// Reads every `<key_id>-<seq>.e3`; other names (such as an interrupted write's
    /// temporary file) are skipped.
    fn read_outbox(&self) -> Result<Vec<OutboxFile>, StateError> {
        let mut entries = Vec::new();
        for (path, stem) in list_files(&self.outbox_dir(), OUTBOX_EXT)? {
            let Some((key_id, seq)) = parse_outbox_stem(&stem) else {
                continue;
            };
            let bytes = fs::read(&path).map_err(StateError::io(&path))?;
            entries.push(OutboxFile { key_id, seq, bytes });
        }
        entries.sort_by_key(|entry| entry.seq);
        Ok(entries)
    }

    fn write_state(&self, saved: &SavedState) -> Result<(), StateError> {
        let path = self.state_file();
        let mut text = serde_json::to_vec_pretty(saved).map_err(|source| StateError::Json {
            path: path.clone(),
            source,
        })?;
        text.push(b'\n');
        write_atomic(&path, &text)
    }

    fn write_outbox(&self, key_id: u32, seq: u64, bytes: &[u8]) -> Result<(), StateError> {
        write_atomic(&self.outbox_path(key_id, seq), bytes)
    }

    /// Removes the named outbox files (missing ones are fine), then syncs the directory.
    fn remove_outbox(&self, entries: &[ReceiptEntry]) -> Result<(), StateError> {
        for entry in entries {
            let path = self.outbox_path(entry.key_id, entry.seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
        }
        sync_dir(&self.outbox_dir())
    }

    /// How many sealed uplinks wait in the outbox; 0 if the directory does not exist.
    pub(crate) fn outbox_len(&self) -> Result<usize, StateError> {
        let dir = self.outbox_dir();
        if !dir.exists() {
            return Ok(0);
        }
        Ok(list_files(&dir, OUTBOX_EXT)?
            .iter()
            .filter(|(_, stem)| parse_outbox_stem(stem).is_some())
            .count())
    }
}

fn decode_window(text: &str) -> Result<ReplayWindow, ReplayStateError> {
    let bytes = BASE64.decode(text).map_err(|_| ReplayStateError::Format)?;
    ReplayWindow::from_bytes(&bytes)
}

fn parse_outbox_stem(stem: &str) -> Option<(u32, u64)> {
    let (key_id, seq) = stem.split_once('-')?;
    Some((key_id.parse().ok()?, seq.parse().ok()?))
}

/// The files in `dir` named `<stem>.<ext>` (not starting with a dot), as (path, stem).
fn list_files(dir: &Path, ext: &str) -> Result<Vec<(PathBuf, String)>, StateError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(StateError::io(dir))? {
        let path = entry.map_err(StateError::io(dir))?.path();
        let (Some(stem), Some(found)) = (path.file_stem(), path.extension()) else {
            continue;
        };
        let stem = stem.to_string_lossy().into_owned();
        if found == ext && !stem.starts_with('.') {
            files.push((path, stem));
        }
    }
    Ok(files)
}

fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(StateError::io(dir))
}

/// Writes `bytes` to `path` through a temporary file: write, fsync, rename, fsync the
/// directory. Mode 0600.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temp);
        return Err(StateError::Io {
            path: path.to_owned(),
            source,
        });
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StateError::io(dir))
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| StateError::Cancelled)?
}

/// A sealed uplink waiting for a receipt.
#[derive(Debug)]
pub(crate) struct OutboxEntry {
    pub(crate) key_id: u32,
    /// The exact sealed bytes, also on disk; every (re)send publishes these.
    pub(crate) bytes: Vec<u8>,
    /// When it was last handed to the MQTT client in this run.
    pub(crate) last_sent: Option<Instant>,
    /// Published before, in this run or an earlier one: the next send is a resend.
    pub(crate) sent_before: bool,
}

/// The device's state in memory, written through to its directory.
pub(crate) struct DeviceState {
    dir: StateDir,
    device_id: DeviceId,
    keys: BTreeMap<u32, DeviceKey>,
    current_key_id: u32,
    next_seq: u64,
    seq_reserved: u64,
    downlink: ReplayWindow,
    /// Unreceipted uplinks by seq (seqs are unique per device whatever the key).
    outbox: BTreeMap<u64, OutboxEntry>,
    outbox_bytes: usize,
}

impl DeviceState {
    /// Opens (or, on first use, creates) the state directory of `device_id`.
    ///
    /// # Errors
    /// A [`StateError`] naming the file at fault.
    pub(crate) async fn open(
        state_dir: &Path,
        device_id: DeviceId,
        initial_key_file: &Path,
    ) -> Result<Self, StateError> {
        let dir = StateDir::new(state_dir, device_id.as_str());
        let loaded = {
            let (dir, id, initial) = (dir.clone(), device_id.clone(), initial_key_file.to_owned());
            blocking(move || dir.load(&id, &initial)).await?
        };
        let highest_in_outbox = loaded.outbox.last().map_or(0, |entry| entry.seq);
        let seq_reserved = loaded.saved.seq_reserved.max(highest_in_outbox);
        let mut state = Self {
            dir,
            device_id,
            keys: loaded.keys,
            current_key_id: loaded.saved.current_key_id,
            next_seq: seq_reserved
                .checked_add(1)
                .ok_or(StateError::SeqExhausted)?,
            seq_reserved,
            downlink: loaded.window,
            outbox: BTreeMap::new(),
            outbox_bytes: 0,
        };
        for file in loaded.outbox {
            state.insert_outbox(file.seq, file.key_id, file.bytes, true);
        }
        Ok(state)
    }

    /// The device id.
    pub(crate) fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The key everything new is sealed with.
    pub(crate) fn current_key(&self) -> &DeviceKey {
        self.keys
            .get(&self.current_key_id)
            .expect("the current key is always in the key map (checked at load and rekey)")
    }

    /// A key the device holds, by id.
    pub(crate) fn key(&self, key_id: u32) -> Option<&DeviceKey> {
        self.keys.get(&key_id)
    }

    /// The next uplink seq; first makes a new block durable when the reserved one is used up.
    ///
    /// # Errors
    /// Writing `state.json` failed, or the seq space is exhausted.
    pub(crate) async fn next_seq(&mut self) -> Result<u64, StateError> {
        if self.next_seq > self.seq_reserved {
            let reserved = self
                .next_seq
                .checked_add(SEQ_BLOCK - 1)
                .ok_or(StateError::SeqExhausted)?;
            self.persist(reserved).await?;
            self.seq_reserved = reserved;
        }
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1).ok_or(StateError::SeqExhausted)?;
        Ok(seq)
    }

    /// What the replay rule says about a downlink seq, without recording it.
    pub(crate) fn check_downlink(&self, seq: u64) -> Verdict {
        self.downlink.check(seq)
    }

    /// Records a handled downlink seq and makes it durable together with the current key
    /// id: a command is applied once, a key switch and its command's seq together.
    ///
    /// # Errors
    /// Writing `state.json` failed.
    pub(crate) async fn accept_downlink(&mut self, seq: u64) -> Result<(), StateError> {
        let mut window = self.downlink.clone();
        window.accept(seq);
        let previous = std::mem::replace(&mut self.downlink, window);
        if let Err(err) = self.persist(self.seq_reserved).await {
            self.downlink = previous;
            return Err(err);
        }
        Ok(())
    }

    /// Stores a new key durably (a new file in `keys/`) and makes it current in memory;
    /// the switch becomes durable with the next [`accept_downlink`](Self::accept_downlink).
    ///
    /// # Errors
    /// Writing the key file failed.
    pub(crate) async fn add_key(&mut self, key: DeviceKey) -> Result<(), StateError> {
        let key_id = key.key_id();
        let path = self.dir.key_path(key_id);
        let key = blocking(move || {
            e3::write_key_file(&path, &key, false).map_err(StateError::KeyFile)?;
            Ok(key)
        })
        .await?;
        self.keys.insert(key_id, key);
        self.current_key_id = key_id;
        Ok(())
    }

    /// Makes a key the device already holds current (in memory, as [`add_key`](Self::add_key)).
    pub(crate) fn switch_key(&mut self, key_id: u32) -> bool {
        let known = self.keys.contains_key(&key_id);
        if known {
            self.current_key_id = key_id;
        }
        known
    }

    async fn persist(&self, seq_reserved: u64) -> Result<(), StateError> {
        let saved = SavedState {
            version: STATE_VERSION,
            device_id: self.device_id.to_string(),
            current_key_id: self.current_key_id,
            seq_reserved,
            downlink_replay: BASE64.encode(self.downlink.to_bytes()),
        };
        let dir = self.dir.clone();
        blocking(move || dir.write_state(&saved)).await
    }

    /// Writes a sealed uplink to the outbox durably, then keeps it in memory.
    ///
    /// # Errors
    /// Writing the file failed.
    pub(crate) async fn add_outbox(
        &mut self,
        seq: u64,
        key_id: u32,
        bytes: Vec<u8>,
    ) -> Result<(), StateError> {
        let dir = self.dir.clone();
        let bytes = blocking(move || {
            dir.write_outbox(key_id, seq, &bytes)?;
            Ok(bytes)
        })
        .await?;
        self.insert_outbox(seq, key_id, bytes, false);
        Ok(())
    }

    fn insert_outbox(&mut self, seq: u64, key_id: u32, bytes: Vec<u8>, sent_before: bool) {
        self.outbox_bytes += bytes.len();
        let entry = OutboxEntry {
            key_id,
            bytes,
            last_sent: None,
            sent_before,
        };
        if let Some(old) = self.outbox.insert(seq, entry) {
            self.outbox_bytes -= old.bytes.len();
        }
    }

    /// Drops the outbox entries a receipt names (durably); returns how many there were.
    ///
    /// # Errors
    /// Removing a file or syncing the directory failed.
    pub(crate) async fn remove_receipted(
        &mut self,
        named: Vec<ReceiptEntry>,
    ) -> Result<u64, StateError> {
        let held: Vec<ReceiptEntry> = named
            .into_iter()
            .filter(|e| {
                self.outbox
                    .get(&e.seq)
                    .is_some_and(|o| o.key_id == e.key_id)
            })
            .collect();
        if held.is_empty() {
            return Ok(0);
        }
        let dir = self.dir.clone();
        let held = blocking(move || {
            dir.remove_outbox(&held)?;
            Ok(held)
        })
        .await?;
        for entry in &held {
            if let Some(old) = self.outbox.remove(&entry.seq) {
                self.outbox_bytes -= old.bytes.len();
            }
        }
        Ok(held.len() as u64)
    }

    /// The unreceipted uplinks, by seq.
    pub(crate) fn outbox(&self) -> &BTreeMap<u64, OutboxEntry> {
        &self.outbox
    }

    /// An unreceipted uplink, for sending.
    pub(crate) fn outbox_entry_mut(&mut self, seq: u64) -> Option<&mut OutboxEntry> {
        self.outbox.get_mut(&seq)
    }

    /// Bytes held by the outbox.
    pub(crate) fn outbox_bytes(&self) -> usize {
        self.outbox_bytes
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn key_file(dir: &Path, device: &str, key_id: u32) -> PathBuf {
        let key = DeviceKey::new(
            DeviceId::new(device).expect("valid"),
            key_id,
            e3::Suite::Aes256Gcm,
            [9; 32],
        );
        let path = dir.join(format!("{device}-{key_id}.key"));
        e3::write_key_file(&path, &key, false).expect("key file");
        path
    }

    fn id() -> DeviceId {
        DeviceId::new("dev-1").expect("valid")
    }

    #[tokio::test]
    async fn a_reopened_state_continues_after_the_reserved_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = key_file(dir.path(), "dev-1", 4);
        let states = dir.path().join("states");
        let mut state = DeviceState::open(&states, id(), &initial)
            .await
            .expect("open");
        assert_eq!(state.current_key().key_id(), 4);
        assert_eq!(state.next_seq().await.expect("seq"), 1);
        assert_eq!(state.next_seq().await.expect("seq"), 2);
        drop(state);
        let mut state = DeviceState::open(&states, id(), &initial)
            .await
            .expect("reopen");
        assert_eq!(state.next_seq().await.expect("seq"), SEQ_BLOCK + 1);
        let mode = fs::metadata(states.join("dev-1/keys/4.key"))
            .expect("key copied in")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn the_outbox_survives_a_restart_until_a_receipt_names_an_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = key_file(dir.path(), "dev-1", 1);
        let states = dir.path().join("states");
        let mut state = DeviceState::open(&states, id(), &initial)
            .await
            .expect("open");
        for seq in 1..=3 {
            state
                .add_outbox(seq, 1, vec![seq as u8; 10])
                .await
                .expect("outbox write");
        }
        let receipt = vec![
            ReceiptEntry { key_id: 1, seq: 2 },
            ReceiptEntry { key_id: 9, seq: 3 },
        ];
        assert_eq!(state.remove_receipted(receipt).await.expect("remove"), 1);
        drop(state);
        let state = DeviceState::open(&states, id(), &initial)
            .await
            .expect("reopen");
        let seqs: Vec<u64> = state.outbox().keys().copied().collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(state.outbox()[&3].bytes, vec![3u8; 10]);
        assert!(state.outbox()[&1].sent_before);
        assert_eq!(
            StateDir::new(&states, "dev-1").outbox_len().expect("len"),
            2
        );
    }

    #[tokio::test]
    async fn an_accepted_downlink_seq_stays_accepted_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = key_file(dir.path(), "dev-1", 1);
        let states = dir.path().join("states");
        let mut state = DeviceState::open(&states, id(), &initial)
            .await
            .expect("open");
        state.accept_downlink(7).await.expect("accept");
        drop(state);
        let state = DeviceState::open(&states, id(), &initial)
            .await
            .expect("reopen");
        assert_eq!(state.check_downlink(7), Verdict::Duplicate);
        assert_eq!(state.check_downlink(8), Verdict::Fresh);
    }

    #[tokio::test]
    async fn a_key_file_of_another_device_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = key_file(dir.path(), "other", 1);
        let err = DeviceState::open(&dir.path().join("s"), id(), &initial)
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, StateError::ForeignKey { .. }), "{err}");
    }
}
