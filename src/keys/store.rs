//! [`KeyStore`]: the operations on the device key store, and the files behind them
//! (the layout, durability and locking rules are in the module docs of `keys`).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use e3::{DeviceId, DeviceKey, Kind, OsRng, Suite};
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::audit::{self, Action, AuditLog};
use super::{DeviceStatus, KeyStoreError, RetiredKey, Rotation, millis, now_ms, seq};

const DEVICES_DIR: &str = "devices";
const AUDIT_FILE: &str = "audit.log";
const STATE_FILE: &str = "state.json";
/// Only the holder of the device's lock writes `state.json`, so one temporary name suffices.
const STATE_TEMP: &str = ".state.json.tmp";
const LOCK_FILE: &str = ".lock";
const KEY_SUFFIX: &str = ".key";
const FIRST_KEY_ID: u32 = 1;

/// The device key store. Cheap to share between threads (`&self` everywhere); several
/// processes may open the same directory.
pub struct KeyStore {
    dir: PathBuf,
    audit: AuditLog,
    /// Keys loaded from disk, by (device, key id). Only handed out after `state.json`
    /// said the key is usable; entries of expired keys and shredded devices are dropped
    /// (and zeroized) when a call notices.
    cache: Mutex<HashMap<(String, u32), DeviceKey>>,
}

/// `state.json` of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceState {
    current: u32,
    current_created_ms: u64,
    retired: Vec<Retired>,
    shredded_at_ms: Option<u64>,
    next_downlink_seq: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Retired {
    key_id: u32,
    created_ms: u64,
    until_ms: u64,
}

/// A checked device id and its directory.
struct Device {
    id: DeviceId,
    dir: PathBuf,
}

/// Holds a device's exclusive `flock` until dropped (closing the file releases it).
struct DeviceLock {
    _file: File,
}

/// The `rekey` command plaintext (docs/PAYLOADS.md).
#[derive(Serialize)]
struct RekeyCommand<'a> {
    cmd: &'static str,
    key_id: u32,
    suite: &'static str,
    key: &'a str,
}

impl KeyStore {
    /// Opens the store in `dir`, creating it (mode 0700) and its audit log if needed.
    /// The audit log names this process as the actor; see [`KeyStore::with_actor`].
    ///
    /// # Errors
    /// [`KeyStoreError::Io`] or [`KeyStoreError::Audit`].
    pub fn open(dir: &Path) -> Result<Self, KeyStoreError> {
        let devices = dir.join(DEVICES_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&devices)
            .map_err(KeyStoreError::io(&devices))?;
        let audit = AuditLog::open(&dir.join(AUDIT_FILE), audit::process_name())?;
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            audit,
            cache: Mutex::default(),
        })
    }

    /// Names `actor` instead of the process name in later audit lines.
    #[must_use]
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.audit.set_actor(actor.into());
        self
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates `device` with a fresh key (key id 1) in `suite` and returns the key.
    /// Durable when this returns.
    ///
    /// # Errors
    /// [`KeyStoreError::DeviceExists`], [`KeyStoreError::Shredded`] (a shredded id is
    /// never provisioned again), an invalid id, or a storage error.
    pub fn provision(&self, device: &str, suite: Suite) -> Result<DeviceKey, KeyStoreError> {
        let dev = self.device(device)?;
        create_device_dir(&dev.dir, &self.devices_dir())?;
        let _lock = lock(&dev)?;
        if let Some(state) = read_state(&dev)? {
            return Err(match state.shredded_at_ms {
                Some(at_ms) => shredded(device, at_ms),
                None => KeyStoreError::DeviceExists {
                    device: device.to_owned(),
                },
            });
        }
        let key = DeviceKey::generate(dev.id.clone(), FIRST_KEY_ID, suite, &mut OsRng);
        self.audit.record(Action::Provision, device, FIRST_KEY_ID)?;
        write_key(&dev, &key)?;
        write_state(&dev, &DeviceState::new(now_ms()))?;
        Ok(key)
    }

    /// The key `device` seals new messages with (the cloud seals receipts with it).
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`], [`KeyStoreError::Shredded`] or a storage error.
    pub fn current(&self, device: &str) -> Result<DeviceKey, KeyStoreError> {
        let dev = self.device(device)?;
        let state = self.live_state(&dev)?;
        self.load_for_use(&dev, state.current)
    }

    /// The key to open an envelope of `device` sealed with `key_id`, received at
    /// `now_ms`: the current key, or a retired one whose grace period has not ended.
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`], [`KeyStoreError::UnknownKey`],
    /// [`KeyStoreError::KeyExpired`], [`KeyStoreError::Shredded`] (see
    /// [`KeyStoreError::reason`]) or a storage error.
    pub fn key_for_open(
        &self,
        device: &str,
        key_id: u32,
        now_ms: u64,
    ) -> Result<DeviceKey, KeyStoreError> {
        let dev = self.device(device)?;
        let state = self.live_state(&dev)?;
        if let Err(err) = state.check_usable(device, key_id, now_ms) {
            self.evict(device, key_id);
            return Err(err);
        }
        self.load_for_use(&dev, key_id)
    }

    /// Rotates `device` to a new key in the same suite; see [`KeyStore::rotate_to`].
    ///
    /// # Errors
    /// As [`KeyStore::rotate_to`].
    pub fn rotate(
        &self,
        device: &str,
        grace: Duration,
        now_ms: u64,
    ) -> Result<Rotation, KeyStoreError> {
        self.rotate_with(device, None, grace, now_ms)
    }

    /// Rotates `device` to a new key (key id current + 1) in `suite`. The old key keeps
    /// opening uplinks until `now_ms + grace`; retired keys whose grace period has ended
    /// are destroyed first. The returned [`Rotation::command`] is the `rekey` command
    /// sealed with the old key on a freshly reserved downlink seq; the caller only
    /// publishes it. Everything is durable when this returns.
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`], [`KeyStoreError::Shredded`],
    /// [`KeyStoreError::Exhausted`] or a storage error; then nothing was rotated.
    pub fn rotate_to(
        &self,
        device: &str,
        suite: Suite,
        grace: Duration,
        now_ms: u64,
    ) -> Result<Rotation, KeyStoreError> {
        self.rotate_with(device, Some(suite), grace, now_ms)
    }

    fn rotate_with(
        &self,
        device: &str,
        suite: Option<Suite>,
        grace: Duration,
        now_ms: u64,
    ) -> Result<Rotation, KeyStoreError> {
        let dev = self.device(device)?;
        let _lock = lock(&dev)?;
        let mut state = self.live_state(&dev)?;
        self.destroy_expired(&dev, &mut state, now_ms)?;
        let old = self.load_for_use(&dev, state.current)?;
        let new_id = state
            .current
            .checked_add(1)
            .ok_or_else(|| exhausted(device, "key ids"))?;
        let suite = suite.unwrap_or_else(|| old.suite());
        let new = DeviceKey::generate(dev.id.clone(), new_id, suite, &mut OsRng);
        let command_seq = seq::reserve(&mut state.next_downlink_seq, 1)
            .ok_or_else(|| exhausted(device, "downlink seqs"))?
            .start;
        let command = old
            .seal(Kind::Command, command_seq, &rekey_command(&new))
            .map_err(KeyStoreError::Seal)?;
        self.audit.record(Action::Rotate, device, new_id)?;
        write_key(&dev, &new)?;
        state.retire_current(new_id, now_ms, now_ms.saturating_add(millis(grace)));
        write_state(&dev, &state)?;
        Ok(Rotation {
            old,
            new,
            command_seq,
            command,
        })
    }

    /// Destroys every key of `device` (each file overwritten with zeros, fsync'd,
    /// unlinked, then the directory fsync'd) and marks it shredded at `now_ms`, first,
    /// so that from then on every lookup fails with [`KeyStoreError::Shredded`] and the
    /// id cannot be provisioned again. Shredding a shredded device destroys whatever a
    /// crash left behind. Returns the number of key files destroyed.
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`] or a storage error (run it again).
    pub fn shred(&self, device: &str, now_ms: u64) -> Result<usize, KeyStoreError> {
        let dev = self.device(device)?;
        let _lock = lock(&dev)?;
        let mut state = read_state(&dev)?.ok_or_else(|| unknown_device(device))?;
        if state.shredded_at_ms.is_none() {
            state.shredded_at_ms = Some(now_ms);
            write_state(&dev, &state)?;
        }
        self.forget_device(device);
        self.destroy_key_files(&dev, |_| false)
    }

    /// Reserves `count` downlink seqs of `device` (commands and receipts share them).
    /// The reservation is durable before this returns, so no seq is ever handed out
    /// twice, across threads, processes and restarts.
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`], [`KeyStoreError::Shredded`],
    /// [`KeyStoreError::Exhausted`] or a storage error.
    pub fn reserve_downlink_seqs(
        &self,
        device: &str,
        count: u64,
    ) -> Result<Range<u64>, KeyStoreError> {
        let dev = self.device(device)?;
        let _lock = lock(&dev)?;
        let mut state = self.live_state(&dev)?;
        let range = seq::reserve(&mut state.next_downlink_seq, count)
            .ok_or_else(|| exhausted(device, "downlink seqs"))?;
        write_state(&dev, &state)?;
        Ok(range)
    }

    /// Every provisioned device id, shredded ones included, sorted.
    ///
    /// # Errors
    /// [`KeyStoreError::Io`] when the devices directory cannot be listed.
    pub fn devices(&self) -> Result<Vec<String>, KeyStoreError> {
        let dir = self.devices_dir();
        let mut devices = Vec::new();
        for entry in fs::read_dir(&dir).map_err(KeyStoreError::io(&dir))? {
            let entry = entry.map_err(KeyStoreError::io(&dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if self.device(&name).is_ok() && entry.path().join(STATE_FILE).is_file() {
                devices.push(name);
            }
        }
        devices.sort();
        Ok(devices)
    }

    /// True when `device` is live and its current key is at least `interval` old at
    /// `now_ms`. False for unknown or shredded devices, and when the state is unreadable.
    pub fn rotation_due(&self, device: &str, interval: Duration, now_ms: u64) -> bool {
        self.status(device).is_ok_and(|status| {
            status.shredded_at_ms.is_none()
                && now_ms.saturating_sub(status.current_created_ms) >= millis(interval)
        })
    }

    /// What `state.json` says about `device` (shredded devices too); reads no key.
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`] or a storage error.
    pub fn status(&self, device: &str) -> Result<DeviceStatus, KeyStoreError> {
        let dev = self.device(device)?;
        let state = read_state(&dev)?.ok_or_else(|| unknown_device(device))?;
        Ok(state.status(device))
    }

    /// Writes the current key of `device` as a key file at `out` (mode 0600, never
    /// overwriting), for provisioning the device, and returns its key id.
    ///
    /// # Errors
    /// [`KeyStoreError::UnknownDevice`], [`KeyStoreError::Shredded`],
    /// [`KeyStoreError::KeyFile`] (also when `out` exists) or a storage error.
    pub fn export_current(&self, device: &str, out: &Path) -> Result<u32, KeyStoreError> {
        let dev = self.device(device)?;
        let state = self.live_state(&dev)?;
        let key = self.read_key(&dev, state.current)?;
        self.audit.record(Action::Export, device, state.current)?;
        e3::write_key_file(out, &key, false).map_err(KeyStoreError::KeyFile)?;
        Ok(state.current)
    }

    fn devices_dir(&self) -> PathBuf {
        self.dir.join(DEVICES_DIR)
    }

    fn device(&self, device: &str) -> Result<Device, KeyStoreError> {
        let id = DeviceId::new(device).map_err(KeyStoreError::InvalidDeviceId)?;
        if device == "." || device == ".." {
            return Err(KeyStoreError::ReservedDeviceId {
                device: device.to_owned(),
            });
        }
        Ok(Device {
            id,
            dir: self.devices_dir().join(device),
        })
    }

    /// The state of a device that exists and is not shredded.
    fn live_state(&self, dev: &Device) -> Result<DeviceState, KeyStoreError> {
        let state = read_state(dev)?.ok_or_else(|| unknown_device(dev.name()))?;
        if let Some(at_ms) = state.shredded_at_ms {
            self.forget_device(dev.name());
            return Err(shredded(dev.name(), at_ms));
        }
        Ok(state)
    }

    /// A usable key, from the cache or loaded (and audited as `open`) on first use.
    fn load_for_use(&self, dev: &Device, key_id: u32) -> Result<DeviceKey, KeyStoreError> {
        let cache_key = (dev.name().to_owned(), key_id);
        if let Some(key) = self.cache().get(&cache_key) {
            return Ok(copy_key(key));
        }
        self.audit.record(Action::Open, dev.name(), key_id)?;
        let key = self.read_key(dev, key_id)?;
        let copy = copy_key(&key);
        self.cache().insert(cache_key, key);
        Ok(copy)
    }

    /// Reads a key file named by `state.json`. A missing file after a concurrent shred
    /// is reported as [`KeyStoreError::Shredded`].
    fn read_key(&self, dev: &Device, key_id: u32) -> Result<DeviceKey, KeyStoreError> {
        let path = dev.key_path(key_id);
        let key = match e3::read_key_file(&path) {
            Ok(key) => key,
            Err(err) => {
                let shredded_at = read_state(dev)
                    .ok()
                    .flatten()
                    .and_then(|s| s.shredded_at_ms);
                return Err(match shredded_at {
                    Some(at_ms) => {
                        self.forget_device(dev.name());
                        shredded(dev.name(), at_ms)
                    }
                    None => KeyStoreError::KeyFile(err),
                });
            }
        };
        if key.device_id() != &dev.id || key.key_id() != key_id {
            return Err(KeyStoreError::ForeignKey {
                path,
                device: dev.name().to_owned(),
                key_id,
            });
        }
        Ok(key)
    }

    /// Drops retired keys whose grace period has ended from the state (durably), then
    /// destroys every key file the state no longer names (also leftovers of a crash).
    fn destroy_expired(
        &self,
        dev: &Device,
        state: &mut DeviceState,
        now_ms: u64,
    ) -> Result<(), KeyStoreError> {
        let before = state.retired.len();
        state.retired.retain(|r| now_ms < r.until_ms);
        if state.retired.len() != before {
            write_state(dev, state)?;
        }
        self.destroy_key_files(dev, |key_id| state.names(key_id))?;
        Ok(())
    }

    /// Destroys the key files (and temporary key files) of `dev` whose key id `keep`
    /// rejects, each audited as `shred` first. Returns how many were destroyed.
    fn destroy_key_files(
        &self,
        dev: &Device,
        keep: impl Fn(u32) -> bool,
    ) -> Result<usize, KeyStoreError> {
        let mut destroyed = 0;
        for (path, file) in key_files(&dev.dir)? {
            if !file.temporary && keep(file.key_id) {
                continue;
            }
            self.evict(dev.name(), file.key_id);
            self.audit.record(Action::Shred, dev.name(), file.key_id)?;
            zero_and_unlink(&path)?;
            destroyed += 1;
        }
        if destroyed > 0 {
            sync_dir(&dev.dir)?;
        }
        Ok(destroyed)
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<(String, u32), DeviceKey>> {
        // Every critical section is one map operation: a panic cannot leave it torn.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn evict(&self, device: &str, key_id: u32) {
        self.cache().remove(&(device.to_owned(), key_id));
    }

    fn forget_device(&self, device: &str) {
        self.cache().retain(|(cached, _), _| cached != device);
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("dir", &self.dir)
            .field("actor", &self.audit.actor())
            .finish_non_exhaustive()
    }
}

impl DeviceState {
    fn new(created_ms: u64) -> Self {
        Self {
            current: FIRST_KEY_ID,
            current_created_ms: created_ms,
            retired: Vec::new(),
            shredded_at_ms: None,
            next_downlink_seq: seq::FIRST,
        }
    }

    /// Whether `key_id` may open envelopes received at `now_ms`. Key ids are handed
    /// out in order, so an id below the current one that is not retired any more is a
    /// key whose grace period ended.
    fn check_usable(&self, device: &str, key_id: u32, now_ms: u64) -> Result<(), KeyStoreError> {
        if key_id == self.current {
            return Ok(());
        }
        if key_id == 0 || key_id > self.current {
            return Err(KeyStoreError::UnknownKey {
                device: device.to_owned(),
                key_id,
            });
        }
        match self.retired.iter().find(|r| r.key_id == key_id) {
            Some(retired) if now_ms < retired.until_ms => Ok(()),
            _ => Err(KeyStoreError::KeyExpired {
                device: device.to_owned(),
                key_id,
            }),
        }
    }

    /// True when `key_id` is the current key or a retired one.
    fn names(&self, key_id: u32) -> bool {
        key_id == self.current || self.retired.iter().any(|r| r.key_id == key_id)
    }

    fn retire_current(&mut self, new_id: u32, now_ms: u64, until_ms: u64) {
        self.retired.push(Retired {
            key_id: self.current,
            created_ms: self.current_created_ms,
            until_ms,
        });
        self.current = new_id;
        self.current_created_ms = now_ms;
    }

    fn status(&self, device: &str) -> DeviceStatus {
        DeviceStatus {
            device: device.to_owned(),
            current_key_id: self.current,
            current_created_ms: self.current_created_ms,
            retired: self
                .retired
                .iter()
                .map(|r| RetiredKey {
                    key_id: r.key_id,
                    until_ms: r.until_ms,
                })
                .collect(),
            shredded_at_ms: self.shredded_at_ms,
            next_downlink_seq: self.next_downlink_seq,
        }
    }
}

impl Device {
    fn name(&self) -> &str {
        self.id.as_str()
    }

    fn key_path(&self, key_id: u32) -> PathBuf {
        self.dir.join(format!("{key_id}{KEY_SUFFIX}"))
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
}

/// A key file's name: `<key_id>.key`, or `.<key_id>.key.tmp-<pid>` while
/// [`e3::write_key_file`] writes it.
#[derive(Debug, PartialEq, Eq)]
struct KeyFileName {
    key_id: u32,
    temporary: bool,
}

impl KeyFileName {
    fn parse(name: &str) -> Option<Self> {
        let (hidden, rest) = match name.strip_prefix('.') {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let (id, tail) = rest.split_once(KEY_SUFFIX)?;
        let temporary = match (hidden, tail) {
            (false, "") => false,
            (true, tail) if tail.starts_with(".tmp-") => true,
            _ => return None,
        };
        let key_id = id.parse().ok()?;
        Some(Self { key_id, temporary })
    }
}

/// The key files in a device directory.
fn key_files(dir: &Path) -> Result<Vec<(PathBuf, KeyFileName)>, KeyStoreError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(KeyStoreError::io(dir))? {
        let entry = entry.map_err(KeyStoreError::io(dir))?;
        let parsed = entry.file_name().to_str().and_then(KeyFileName::parse);
        if let Some(name) = parsed {
            files.push((entry.path(), name));
        }
    }
    Ok(files)
}

fn lock(dev: &Device) -> Result<DeviceLock, KeyStoreError> {
    let path = dev.dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => unknown_device(dev.name()),
            _ => KeyStoreError::io(&path)(err),
        })?;
    loop {
        match rustix::fs::flock(&file, FlockOperation::LockExclusive) {
            Ok(()) => return Ok(DeviceLock { _file: file }),
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(KeyStoreError::io(&path)(errno.into())),
        }
    }
}

fn read_state(dev: &Device) -> Result<Option<DeviceState>, KeyStoreError> {
    let path = dev.state_path();
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| KeyStoreError::State { path, source }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(KeyStoreError::io(&path)(err)),
    }
}

/// Replaces `state.json` atomically and durably. Call with the device's lock held.
fn write_state(dev: &Device, state: &DeviceState) -> Result<(), KeyStoreError> {
    let temp = dev.dir.join(STATE_TEMP);
    let path = dev.state_path();
    let mut bytes =
        serde_json::to_vec(state).map_err(|err| KeyStoreError::io(&path)(err.into()))?;
    bytes.push(b'\n');
    write_synced(&temp, &bytes).map_err(KeyStoreError::io(&temp))?;
    fs::rename(&temp, &path).map_err(KeyStoreError::io(&path))?;
    sync_dir(&dev.dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Writes a key file into the store. Overwriting is right here: a file with this key
/// id that `state.json` does not name is the leftover of a crash and was never handed
/// out.
fn write_key(dev: &Device, key: &DeviceKey) -> Result<(), KeyStoreError> {
    e3::write_key_file(&dev.key_path(key.key_id()), key, true).map_err(KeyStoreError::KeyFile)
}

/// Overwrites the file with zeros, fsyncs it and unlinks it. The caller fsyncs the
/// directory. A file that is already gone counts as destroyed.
fn zero_and_unlink(path: &Path) -> Result<(), KeyStoreError> {
    let result = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| {
            let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
            file.write_all(&vec![0u8; len])?;
            file.sync_all()?;
            fs::remove_file(path)
        });
    match result {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(KeyStoreError::io(path)(err)),
        _ => Ok(()),
    }
}

/// Creates a device directory (0700) if it does not exist, durably.
fn create_device_dir(dir: &Path, parent: &Path) -> Result<(), KeyStoreError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => sync_dir(parent),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(KeyStoreError::io(dir)(err)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), KeyStoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(KeyStoreError::io(dir))
}

/// A second handle on the same key (`DeviceKey` is deliberately not `Clone`).
fn copy_key(key: &DeviceKey) -> DeviceKey {
    DeviceKey::new(
        key.device_id().clone(),
        key.key_id(),
        key.suite(),
        *key.secret_bytes(),
    )
}

/// The `rekey` plaintext for `key`; zeroized on drop, like the hex it contains.
fn rekey_command(key: &DeviceKey) -> Zeroizing<Vec<u8>> {
    let hex = Zeroizing::new(hex::encode(key.secret_bytes()));
    let command = RekeyCommand {
        cmd: "rekey",
        key_id: key.key_id(),
        suite: key.suite().as_str(),
        key: &hex,
    };
    // Sized so that writing never reallocates (and leaves no unzeroized copy behind).
    let mut out = Zeroizing::new(Vec::with_capacity(256));
    serde_json::to_writer(&mut *out, &command)
        .expect("a struct of strings and integers always serializes into a Vec");
    out
}

fn unknown_device(device: &str) -> KeyStoreError {
    KeyStoreError::UnknownDevice {
        device: device.to_owned(),
    }
}

fn shredded(device: &str, at_ms: u64) -> KeyStoreError {
    KeyStoreError::Shredded {
        device: device.to_owned(),
        at_ms,
    }
}

fn exhausted(device: &str, what: &'static str) -> KeyStoreError {
    KeyStoreError::Exhausted {
        device: device.to_owned(),
        what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::open(&dir.path().join("keys")).expect("open");
        (dir, store)
    }

    #[test]
    fn key_file_names_are_recognised_and_nothing_else() {
        let parse = KeyFileName::parse;
        let real = |key_id| KeyFileName {
            key_id,
            temporary: false,
        };
        assert_eq!(parse("3.key"), Some(real(3)));
        assert_eq!(
            parse(".12.key.tmp-4711"),
            Some(KeyFileName {
                key_id: 12,
                temporary: true
            })
        );
        for other in [
            "state.json",
            ".lock",
            ".state.json.tmp",
            "3.key.bak",
            ".3.key",
            "x.key",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn usable_keys_are_the_current_one_and_retired_ones_within_their_grace() {
        let mut state = DeviceState::new(0);
        state.retire_current(2, 100, 1_000);
        state.retire_current(3, 200, 2_000);
        let reason = |state: &DeviceState, key_id, now| {
            state.check_usable("d", key_id, now).map_err(|e| e.reason())
        };
        assert_eq!(reason(&state, 3, 5_000), Ok(()));
        assert_eq!(reason(&state, 2, 1_999), Ok(()));
        assert_eq!(reason(&state, 2, 2_000), Err("key_expired"));
        assert_eq!(reason(&state, 1, 999), Ok(()));
        assert_eq!(reason(&state, 1, 1_000), Err("key_expired"));
        assert_eq!(reason(&state, 4, 0), Err("unknown_key"));
        assert_eq!(reason(&state, 0, 0), Err("unknown_key"));
        state.retired.clear();
        assert_eq!(reason(&state, 1, 0), Err("key_expired"));
    }

    #[test]
    fn rekey_command_is_the_documented_json() {
        let key = DeviceKey::new(
            DeviceId::new("d").expect("id"),
            2,
            Suite::Aes256Gcm,
            [0xAB; 32],
        );
        let json: serde_json::Value = serde_json::from_slice(&rekey_command(&key)).expect("json");
        assert_eq!(json["cmd"], "rekey");
        assert_eq!(json["key_id"], 2);
        assert_eq!(json["suite"], "aes-256-gcm");
        assert_eq!(json["key"], "ab".repeat(32));
    }

    #[test]
    fn dot_and_dot_dot_are_refused_as_device_ids() {
        let (_dir, store) = store();
        for id in [".", ".."] {
            let err = store.provision(id, Suite::Aes256Gcm).expect_err(id);
            assert_eq!(err.reason(), "invalid_device_id");
        }
        assert_eq!(
            store.current("a/b").expect_err("slash").reason(),
            "invalid_device_id"
        );
    }

    #[test]
    fn state_json_has_the_documented_fields() {
        let (dir, store) = store();
        store
            .provision("pump-17", Suite::Aes256Gcm)
            .expect("provision");
        let path = dir.path().join("keys/devices/pump-17/state.json");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(path).expect("read")).expect("json");
        assert_eq!(json["current"], 1);
        assert_eq!(json["retired"], serde_json::json!([]));
        assert_eq!(json["shredded_at_ms"], serde_json::Value::Null);
        assert_eq!(json["next_downlink_seq"], 1);
        assert!(json["current_created_ms"].as_u64().expect("number") > 0);
    }

    #[test]
    fn rotation_destroys_keys_whose_grace_ended_and_crash_leftovers() {
        let (dir, store) = store();
        store.provision("d", Suite::Aes256Gcm).expect("provision");
        store
            .rotate("d", Duration::from_millis(10), 1_000)
            .expect("rotate to 2");
        let device_dir = dir.path().join("keys/devices/d");
        fs::write(device_dir.join(".7.key.tmp-1"), b"leftover").expect("leftover");
        store
            .rotate("d", Duration::from_millis(10), 1_010)
            .expect("rotate to 3");
        let mut names: Vec<String> = fs::read_dir(&device_dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".key"))
            .collect();
        names.sort();
        assert_eq!(names, ["2.key", "3.key"]);
        let err = store.key_for_open("d", 1, 1_011).expect_err("expired");
        assert_eq!(err.reason(), "key_expired");
    }

    #[test]
    fn rotation_is_due_when_the_current_key_is_older_than_the_interval() {
        let (_dir, store) = store();
        store.provision("d", Suite::Aes256Gcm).expect("provision");
        let hour = Duration::from_secs(3600);
        store.rotate("d", hour, 1_000_000).expect("rotate");
        assert!(!store.rotation_due("d", hour, 1_000_000 + 3_599_999));
        assert!(store.rotation_due("d", hour, 1_000_000 + 3_600_000));
        assert!(!store.rotation_due("nobody", hour, u64::MAX));
        store.shred("d", 2_000_000).expect("shred");
        assert!(!store.rotation_due("d", hour, u64::MAX));
    }

    #[test]
    fn rotate_to_changes_the_suite() {
        let (_dir, store) = store();
        store.provision("d", Suite::Aes256Gcm).expect("provision");
        let rotation = store
            .rotate_to("d", Suite::ChaCha20Poly1305, Duration::ZERO, 1)
            .expect("rotate");
        assert_eq!(rotation.old.suite(), Suite::Aes256Gcm);
        assert_eq!(rotation.new.suite(), Suite::ChaCha20Poly1305);
        assert_eq!(
            store.current("d").expect("current").suite(),
            Suite::ChaCha20Poly1305
        );
    }
}
