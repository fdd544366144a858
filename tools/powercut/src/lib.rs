//! A FUSE filesystem for tests that models a power cut: what a program wrote but did
//! not fsync is gone afterwards.
//!
//! [`PowerCutFs::mount`] mounts a view of a backing directory. The backing directory is
//! "the disk": what it holds survives a power cut. Everything passes through to it
//! except file contents:
//!
//! - `write` and `truncate` (`ftruncate`, `O_TRUNC`) of a regular file are kept in
//!   memory, per file, in order, and are visible to every reader at once (like the page
//!   cache);
//! - `fsync` or `fdatasync` on any descriptor of a file writes that file's pending
//!   writes and truncations to the backing file: from then on they are durable;
//! - [`PowerCutFs::cut_power`] drops every pending write of every file and makes every
//!   later operation fail with `EIO` (the disk is gone); [`PowerCutFs::unmount`] then
//!   detaches the mount. A new mount over the same backing directory sees exactly what
//!   was durable.
//!
//! Files are opened with `FOPEN_DIRECT_IO`, so the kernel's page cache holds no file
//! data for this mount: the only copy of unsynced data is in this process's memory.
//!
//! # What is modelled
//!
//! - Loss of every file write, extension and truncation not covered by a later
//!   `fsync`/`fdatasync` of that file, whoever wrote it, at the moment of the cut.
//! - `sync_file_range(2)` is not a durability point (the kernel does not forward it to a
//!   FUSE filesystem, and its man page says it persists no metadata, such as a grown
//!   file size, and flushes no disk cache). Neither are `close`, `sync(2)` and
//!   `syncfs(2)` (the kernel does not forward them to a FUSE filesystem either).
//! - Nothing becomes durable by itself after some time: a real kernel writes dirty
//!   pages back within about 30 s, the model never does. It is the worst case.
//!
//! # What is not modelled
//!
//! - Metadata operations (create, mkdir, rename, unlink, rmdir, chmod, chown, utimes,
//!   symlink) are durable at once, as if every directory were fsync'd after each
//!   change. A file created and never fsync'd survives the cut with its durable
//!   length (usually 0), as ext4 often leaves it; a rename never comes undone.
//! - Torn or reordered writes within a file: a cut loses whole `write` calls, never
//!   part of one, and an fsync'd file never loses anything. Sector tearing, misdirected
//!   writes, bit rot and a disk that lies about flushing are outside the model.
//! - `mmap` of files on the mount (the direct-I/O mode does not support shared
//!   writable mappings), xattrs, hard links, device nodes, file locks across processes
//!   beyond what the kernel emulates locally.
//! - The power cut of the machine: processes keep running until the test kills them;
//!   after [`PowerCutFs::cut_power`] their file operations fail with `EIO`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// How long the kernel may cache names and attributes. Every change goes through this
/// filesystem, so the kernel's cache cannot go stale.
const TTL: Duration = Duration::from_secs(1);
/// How long [`PowerCutFs::unmount`] waits for the last open file to be closed (a
/// killed process's descriptors are closed by the kernel as it exits).
const UNMOUNT_PATIENCE: Duration = Duration::from_secs(10);

/// Counters of one mount, from its start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `write` calls accepted (kept in memory).
    pub writes: u64,
    /// Bytes in those writes.
    pub bytes_written: u64,
    /// `fsync`/`fdatasync` calls on files.
    pub fsyncs: u64,
    /// Bytes made durable by them.
    pub bytes_synced: u64,
    /// `fsync` calls on directories (accepted; metadata is durable at once anyway).
    pub dir_fsyncs: u64,
    /// Bytes written and not yet durable now.
    pub bytes_pending: u64,
    /// Writes dropped by [`PowerCutFs::cut_power`].
    pub writes_dropped: u64,
    /// Bytes dropped by [`PowerCutFs::cut_power`].
    pub bytes_dropped: u64,
    /// Files that had unsynced writes or truncations when the power was cut.
    pub files_dropped: u64,
    /// Operations refused with `EIO` after the cut.
    pub refused_after_cut: u64,
}

/// Whether this process can mount a FUSE filesystem: `/dev/fuse` exists and either we
/// are root (the mount is a plain `mount(2)`) or `fusermount3` is installed. `Err`
/// says what is missing.
pub fn check_available() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (modprobe fuse, or a container without it)".into());
    }
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let helper = [
        "/usr/bin/fusermount3",
        "/bin/fusermount3",
        "/usr/bin/fusermount",
    ];
    if helper.iter().any(|p| Path::new(p).exists()) {
        Ok(())
    } else {
        Err("not root and no fusermount3 (Debian: apt-get install fuse3)".into())
    }
}

/// A mounted power-cut filesystem. Dropping it unmounts it (pending data is dropped
/// without being counted).
#[derive(Debug)]
pub struct PowerCutFs {
    state: Arc<Mutex<Inner>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl PowerCutFs {
    /// Mounts a view of `backing` (an existing directory, "the disk") on `mountpoint`
    /// (an existing empty directory).
    ///
    /// # Errors
    /// If either directory is missing or the mount fails (no `/dev/fuse`, not root and
    /// no `fusermount3`, no permission to mount).
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Self> {
        let backing = backing.canonicalize()?;
        let mountpoint = mountpoint.canonicalize()?;
        let state = Arc::new(Mutex::new(Inner::new(backing)));
        let fs = Fs {
            state: Arc::clone(&state),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".into()),
            MountOption::Subtype("powercut".into()),
            MountOption::NoAtime,
        ];
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, &mountpoint, &config)?;
        Ok(Self {
            state,
            session: Some(session),
            mountpoint,
        })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let inner = lock(&self.state);
        let mut stats = inner.stats;
        stats.bytes_pending = inner.nodes.values().map(|n| n.pending_bytes).sum();
        stats
    }

    /// Cuts the power: drops every unsynced write and truncation of every file, and
    /// refuses every later operation with `EIO`. Returns the counters, with what was
    /// dropped. Call [`unmount`](Self::unmount) once the processes using the mount are
    /// gone.
    pub fn cut_power(&self) -> Stats {
        let mut inner = lock(&self.state);
        if !inner.cut {
            inner.cut = true;
            let mut dropped = (0, 0, 0);
            for node in inner.nodes.values_mut() {
                if !node.pending.is_empty() {
                    dropped.0 += node.pending_writes;
                    dropped.1 += node.pending_bytes;
                    dropped.2 += 1;
                }
                node.drop_pending();
            }
            inner.stats.writes_dropped += dropped.0;
            inner.stats.bytes_dropped += dropped.1;
            inner.stats.files_dropped += dropped.2;
        }
        inner.stats
    }

    /// Makes every pending write durable, as an orderly shutdown (or the kernel's
    /// writeback, given time) would. Returns the counters.
    ///
    /// # Errors
    /// If a backing file cannot be written.
    pub fn sync_all(&self) -> io::Result<Stats> {
        let mut inner = lock(&self.state);
        let dirty: Vec<(u64, PathBuf)> = inner
            .nodes
            .iter()
            .filter(|(_, n)| !n.pending.is_empty())
            .filter_map(|(ino, n)| n.path.clone().map(|p| (*ino, p)))
            .collect();
        for (ino, rel) in dirty {
            let file = OpenOptions::new().write(true).open(inner.abs(&rel))?;
            inner
                .sync(ino, &file)
                .map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        }
        Ok(inner.stats)
    }

    /// Unmounts: waits (up to 10 s) until no file on the mount is open any more, then
    /// unmounts and stops the server threads. Pending data that was not cut is dropped
    /// (call [`cut_power`](Self::cut_power) first to count it). Returns the counters.
    ///
    /// # Errors
    /// If the mount is still busy after 10 s (it is then detached lazily) or the
    /// unmount fails otherwise.
    pub fn unmount(mut self) -> io::Result<Stats> {
        let stats = self.stats();
        self.unmount_inner()?;
        Ok(stats)
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let result = loop {
            match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => break Ok(()),
                Err(rustix::io::Errno::BUSY) if started.elapsed() < UNMOUNT_PATIENCE => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(rustix::io::Errno::BUSY) => {
                    let _ = rustix::mount::unmount(
                        &self.mountpoint,
                        rustix::mount::UnmountFlags::DETACH,
                    );
                    break Err(io::Error::other(format!(
                        "{} still busy after {UNMOUNT_PATIENCE:?}; detached lazily",
                        self.mountpoint.display()
                    )));
                }
                Err(e) => break Err(e.into()),
            }
        };
        if result.is_ok() {
            // The kernel ended the connection; the server threads stop. (fuser's own
            // unmount on drop then finds nothing mounted there.)
            session.join()?;
        } else {
            // Lazily detached: the threads stop when the last user goes; do not wait.
            std::mem::forget(session);
        }
        result
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if self.session.is_some() {
            self.cut_power();
            let _ = self.unmount_inner();
        }
    }
}

fn lock(state: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The state holds plain maps and counters; a panicked request cannot tear it.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A file change not yet durable.
#[derive(Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug)]
struct Node {
    /// Relative to the backing directory; `None` once unlinked (or replaced by a
    /// rename) while still open.
    path: Option<PathBuf>,
    /// Open handles (files and directories).
    open: u32,
    /// Unsynced changes, oldest first.
    pending: Vec<Op>,
    pending_writes: u64,
    pending_bytes: u64,
    /// The file's size as readers see it while `pending` is not empty.
    size: Option<u64>,
}

impl Node {
    fn drop_pending(&mut self) {
        self.pending.clear();
        self.pending_writes = 0;
        self.pending_bytes = 0;
        self.size = None;
    }
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    /// `None` for directories.
    file: Option<Arc<File>>,
}

#[derive(Debug)]
struct Inner {
    backing: PathBuf,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    cut: bool,
    stats: Stats,
}

impl Inner {
    fn new(backing: PathBuf) -> Self {
        let root = Node {
            path: Some(PathBuf::new()),
            open: 0,
            pending: Vec::new(),
            pending_writes: 0,
            pending_bytes: 0,
            size: None,
        };
        Self {
            backing,
            nodes: HashMap::from([(INodeNo::ROOT.0, root)]),
            by_path: HashMap::from([(PathBuf::new(), INodeNo::ROOT.0)]),
            next_ino: INodeNo::ROOT.0 + 1,
            handles: HashMap::new(),
            next_fh: 1,
            cut: false,
            stats: Stats::default(),
        }
    }

    /// Refuses the operation after the cut.
    fn alive(&mut self) -> Result<(), Errno> {
        if self.cut {
            self.stats.refused_after_cut += 1;
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn rel(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino)
            .and_then(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/')
        {
            return Err(Errno::EINVAL);
        }
        Ok(self.rel(parent)?.join(name))
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    /// The inode number for `rel`, made up on first sight.
    fn ino_for(&mut self, rel: &Path) -> u64 {
        if let Some(ino) = self.by_path.get(rel) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(rel.to_owned()),
                open: 0,
                pending: Vec::new(),
                pending_writes: 0,
                pending_bytes: 0,
                size: None,
            },
        );
        self.by_path.insert(rel.to_owned(), ino);
        ino
    }

    /// Forgets the name `rel` (unlinked, or replaced by a rename); the node goes too
    /// unless it is open.
    fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.by_path.remove(rel) {
            let remove = match self.nodes.get_mut(&ino) {
                Some(node) => {
                    node.path = None;
                    node.open == 0
                }
                None => false,
            };
            if remove {
                self.nodes.remove(&ino);
            }
        }
    }

    fn attr_of(&mut self, rel: &Path) -> Result<FileAttr, Errno> {
        let md = fs::symlink_metadata(self.abs(rel)).map_err(Errno::from)?;
        let ino = self.ino_for(rel);
        let size = self
            .nodes
            .get(&ino)
            .and_then(|n| n.size)
            .unwrap_or(md.len());
        Ok(file_attr(ino, &md, size))
    }

    fn attr_of_ino(&mut self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let md = match self.nodes.get(&ino).and_then(|n| n.path.clone()) {
            Some(rel) => fs::symlink_metadata(self.abs(&rel)),
            None => {
                let file = fh
                    .and_then(|fh| self.handles.get(&fh.0))
                    .and_then(|h| h.file.clone())
                    .ok_or(Errno::ENOENT)?;
                file.metadata()
            }
        }
        .map_err(Errno::from)?;
        let size = self
            .nodes
            .get(&ino)
            .and_then(|n| n.size)
            .unwrap_or(md.len());
        Ok(file_attr(ino, &md, size))
    }

    fn new_handle(&mut self, ino: u64, file: Option<Arc<File>>) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, file });
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open += 1;
        }
        fh
    }

    fn release(&mut self, fh: u64) {
        if let Some(handle) = self.handles.remove(&fh) {
            let remove = match self.nodes.get_mut(&handle.ino) {
                Some(node) => {
                    node.open = node.open.saturating_sub(1);
                    node.open == 0 && node.path.is_none()
                }
                None => false,
            };
            if remove {
                self.nodes.remove(&handle.ino);
            }
        }
    }

    fn file_of(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.handles
            .get(&fh.0)
            .and_then(|h| h.file.clone())
            .ok_or(Errno::EBADF)
    }

    /// Records a change of `ino`'s content; `durable_len` is the backing file's size.
    fn push(&mut self, ino: u64, op: Op, durable_len: u64) -> Result<(), Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let size = node.size.unwrap_or(durable_len);
        let (size, bytes, writes) = match &op {
            Op::Write { offset, data } => {
                let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
                (size.max(end), data.len() as u64, 1)
            }
            Op::SetLen(len) => (*len, 0, 0),
        };
        node.pending.push(op);
        node.size = Some(size);
        node.pending_bytes += bytes;
        node.pending_writes += writes;
        self.stats.writes += writes;
        self.stats.bytes_written += bytes;
        Ok(())
    }

    /// Makes `ino`'s pending changes durable through `file` (a descriptor of it).
    fn sync(&mut self, ino: u64, file: &File) -> Result<(), Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        for op in &node.pending {
            match op {
                Op::Write { offset, data } => file.write_all_at(data, *offset),
                Op::SetLen(len) => file.set_len(*len),
            }
            .map_err(Errno::from)?;
        }
        self.stats.bytes_synced += node.pending_bytes;
        node.drop_pending();
        Ok(())
    }

    /// Reads `size` bytes at `offset` as readers see them: the backing file, then the
    /// pending changes on top, in order.
    fn read(&mut self, ino: u64, file: &File, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let durable_len = file.metadata().map_err(Errno::from)?.len();
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let len = node.size.unwrap_or(durable_len);
        if offset >= len {
            return Ok(Vec::new());
        }
        let n = (len - offset).min(u64::from(size));
        let mut buf = vec![0; usize::try_from(n).map_err(|_| Errno::EINVAL)?];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let end = offset + n;
        for op in &node.pending {
            match op {
                Op::Write { offset: at, data } => {
                    let from = (*at).max(offset);
                    let to = (at + data.len() as u64).min(end);
                    if from < to {
                        let src = (from - at) as usize..(to - at) as usize;
                        let dst = (from - offset) as usize..(to - offset) as usize;
                        buf[dst].copy_from_slice(&data[src]);
                    }
                }
                Op::SetLen(cut) => {
                    // Bytes past a truncation read as zeros if the file grows again.
                    if *cut < end {
                        let from = (*cut).max(offset) - offset;
                        buf[from as usize..].fill(0);
                    }
                }
            }
        }
        Ok(buf)
    }
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::new(secs, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

fn file_attr(ino: u64, md: &fs::Metadata, size: u64) -> FileAttr {
    let kind = FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: system_time(md.atime(), md.atime_nsec()),
        mtime: system_time(md.mtime(), md.mtime_nsec()),
        ctime: system_time(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink: u32::try_from(md.nlink()).unwrap_or(u32::MAX),
        uid: md.uid(),
        gid: md.gid(),
        rdev: u32::try_from(md.rdev()).unwrap_or(0),
        blksize: 4096,
        flags: 0,
    }
}

/// Opens the backing file for a FUSE open: always read-write when possible (a later
/// fsync may come through this descriptor), never truncating or appending (those
/// are applied by the model).
fn open_backing(path: &Path, create: Option<(u32, bool)>) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if let Some((mode, exclusive)) = create {
        options.mode(mode & 0o7777);
        if exclusive {
            options.create_new(true);
        } else {
            options.create(true);
        }
    }
    match options.open(path) {
        Err(e) if create.is_none() && e.raw_os_error() == Some(libc::EISDIR) => File::open(path),
        other => other,
    }
}

/// The filesystem the FUSE threads serve.
#[derive(Debug)]
struct Fs {
    state: Arc<Mutex<Inner>>,
}

impl Fs {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.child(parent.0, name)?;
            inner.attr_of(&rel)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let mut inner = self.inner();
        match inner.alive().and_then(|()| inner.attr_of_ino(ino.0, fh)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let path = inner.rel(ino.0).map(|rel| inner.abs(&rel));
            if let Some(mode) = mode {
                fs::set_permissions(path.clone()?, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(Errno::from)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(path.clone()?, uid, gid).map_err(Errno::from)?;
            }
            if atime.is_some() || mtime.is_some() {
                let when = |t: TimeOrNow| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let mut times = FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(when(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(when(t));
                }
                File::open(path.clone()?)
                    .and_then(|f| f.set_times(times))
                    .map_err(Errno::from)?;
            }
            if let Some(len) = size {
                // A truncation is a change of content: durable only after fsync.
                let durable_len = match fh.and_then(|fh| inner.file_of(fh).ok()) {
                    Some(file) => file.metadata(),
                    None => fs::metadata(path?),
                }
                .map_err(Errno::from)?
                .len();
                inner.push(ino.0, Op::SetLen(len), durable_len)?;
            }
            inner.attr_of_ino(ino.0, fh)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let path = inner.abs(&inner.rel(ino.0)?);
            fs::read_link(path).map_err(Errno::from)
        });
        match result {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.child(parent.0, name)?;
            let path = inner.abs(&rel);
            fs::DirBuilder::new()
                .mode(mode & 0o7777)
                .create(&path)
                .and_then(|()| {
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))
                })
                .map_err(Errno::from)?;
            inner.attr_of(&rel)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.child(parent.0, name)?;
            fs::remove_file(inner.abs(&rel)).map_err(Errno::from)?;
            inner.forget_path(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.child(parent.0, name)?;
            fs::remove_dir(inner.abs(&rel)).map_err(Errno::from)?;
            inner.forget_path(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.child(parent.0, link_name)?;
            std::os::unix::fs::symlink(target, inner.abs(&rel)).map_err(Errno::from)?;
            inner.attr_of(&rel)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            let from = inner.child(parent.0, name)?;
            let to = inner.child(newparent.0, newname)?;
            fs::rename(inner.abs(&from), inner.abs(&to)).map_err(Errno::from)?;
            if from == to {
                return Ok(());
            }
            inner.forget_path(&to);
            // The node and everything below it (a directory) change names.
            let moved: Vec<(PathBuf, u64)> = inner
                .by_path
                .iter()
                .filter(|(p, _)| p.starts_with(&from))
                .map(|(p, i)| (p.clone(), *i))
                .collect();
            for (old, ino) in moved {
                inner.by_path.remove(&old);
                let new = match old.strip_prefix(&from) {
                    Ok(rest) if rest.as_os_str().is_empty() => to.clone(),
                    Ok(rest) => to.join(rest),
                    Err(_) => continue,
                };
                inner.forget_path(&new);
                if let Some(node) = inner.nodes.get_mut(&ino) {
                    node.path = Some(new.clone());
                }
                inner.by_path.insert(new, ino);
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let path = inner.abs(&inner.rel(ino.0)?);
            let file = Arc::new(open_backing(&path, None).map_err(Errno::from)?);
            if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                let durable_len = file.metadata().map_err(Errno::from)?.len();
                inner.push(ino.0, Op::SetLen(0), durable_len)?;
            }
            Ok(inner.new_handle(ino.0, Some(file)))
        });
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let file = inner.file_of(fh)?;
            inner.read(ino.0, &file, offset, size)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let len = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
            let file = inner.file_of(fh)?;
            let durable_len = file.metadata().map_err(Errno::from)?.len();
            let op = Op::Write {
                offset,
                data: data.to_vec(),
            };
            inner.push(ino.0, op, durable_len)?;
            Ok(len)
        });
        match result {
            Ok(len) => reply.written(len),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): not a durability point.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Always succeeds, also after the cut: the descriptor is gone either way.
        self.inner().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let file = inner.file_of(fh)?;
            inner.stats.fsyncs += 1;
            inner.sync(ino.0, &file)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let path = inner.abs(&inner.rel(ino.0)?);
            if !fs::metadata(path).map_err(Errno::from)?.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            Ok(inner.new_handle(ino.0, None))
        });
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.rel(ino.0)?;
            let mut names: Vec<(std::ffi::OsString, FileType)> = fs::read_dir(inner.abs(&rel))
                .map_err(Errno::from)?
                .filter_map(Result::ok)
                .map(|e| {
                    let kind = e
                        .file_type()
                        .ok()
                        .and_then(FileType::from_std)
                        .unwrap_or(FileType::RegularFile);
                    (e.file_name(), kind)
                })
                .collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            let parent = match rel.parent() {
                Some(p) => inner.ino_for(p),
                None => INodeNo::ROOT.0,
            };
            let mut entries = vec![
                (ino.0, FileType::Directory, std::ffi::OsString::from(".")),
                (parent, FileType::Directory, std::ffi::OsString::from("..")),
            ];
            for (name, kind) in names {
                let child = inner.ino_for(&rel.join(&name));
                entries.push((child, kind, name));
            }
            Ok(entries)
        });
        match result {
            Ok(entries) => {
                for (i, (child, kind, name)) in
                    entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.inner();
        match inner.alive() {
            Ok(()) => {
                inner.stats.dir_fsyncs += 1;
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            rustix::fs::statvfs(&inner.backing).map_err(|e| Errno::from_i32(e.raw_os_error()))
        });
        match result {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                u32::try_from(s.f_bsize).unwrap_or(4096),
                u32::try_from(s.f_namemax).unwrap_or(255),
                u32::try_from(s.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let path = inner.abs(&inner.rel(ino.0)?);
            fs::symlink_metadata(path).map(drop).map_err(Errno::from)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut inner = self.inner();
        let result = inner.alive().and_then(|()| {
            let rel = inner.child(parent.0, name)?;
            let path = inner.abs(&rel);
            let exclusive = flags & libc::O_EXCL != 0;
            let file = open_backing(&path, Some((mode, exclusive))).map_err(Errno::from)?;
            let durable_len = file.metadata().map_err(Errno::from)?.len();
            let ino = inner.ino_for(&rel);
            if flags & libc::O_TRUNC != 0 && durable_len > 0 {
                inner.push(ino, Op::SetLen(0), durable_len)?;
            }
            let fh = inner.new_handle(ino, Some(Arc::new(file)));
            let attr = inner.attr_of(&rel)?;
            Ok((attr, fh))
        });
        match result {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Not modelled; posix_fallocate(3) falls back to writing zeros.
        reply.error(Errno::EOPNOTSUPP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_overlay_pending_writes_and_truncations_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("f"), b"0123456789").expect("write");
        let mut inner = Inner::new(dir.path().to_owned());
        let ino = inner.ino_for(Path::new("f"));
        let file = File::open(dir.path().join("f")).expect("open");
        let w = |offset, data: &[u8]| Op::Write {
            offset,
            data: data.to_vec(),
        };
        inner.push(ino, w(8, b"abcd"), 10).expect("push");
        assert_eq!(
            inner.read(ino, &file, 0, 100).expect("read"),
            b"01234567abcd"
        );
        inner.push(ino, Op::SetLen(3), 10).expect("push");
        inner.push(ino, w(5, b"Z"), 10).expect("push");
        assert_eq!(inner.read(ino, &file, 0, 100).expect("read"), b"012\0\0Z");
        assert_eq!(inner.read(ino, &file, 4, 1).expect("read"), b"\0");
        // The backing file is untouched until a sync.
        assert_eq!(fs::read(dir.path().join("f")).expect("read"), b"0123456789");
    }
}
