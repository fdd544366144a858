//! What a config needs from this host: listeners that can bind, a writable data
//! directory with room for the queue, files readable with the OS's reason if not.

use super::*;

impl Env<'_> {
    /// Binds `addr` and releases it at once.
    pub(super) fn listener(&mut self, key: &str, addr: SocketAddr) {
        if self.skip(key) {
            return;
        }
        let Err(err) = TcpListener::bind(addr) else {
            return;
        };
        let problem = Problem::new(format!("cannot listen on {addr}: {err}"));
        let problem = match err.kind() {
            io::ErrorKind::AddrInUse => problem.hint(format!(
                "another process listens on port {} (`ss -ltnp 'sport = :{}'` names it); before a reload of the running gateway use --reload",
                addr.port(),
                addr.port()
            )),
            io::ErrorKind::AddrNotAvailable => problem.hint(format!(
                "{} is not an address of this machine (`ip -brief address`)",
                addr.ip()
            )),
            io::ErrorKind::PermissionDenied => problem
                .hint("ports below 1024 need privileges the gateway does not have: use e.g. 8883"),
            _ => problem,
        };
        self.error(key, problem);
    }

    /// A directory the program creates when missing: it is a writable directory, or
    /// its nearest existing ancestor is (nothing is created here). Returns the
    /// existing path that will hold it, for the disk check.
    pub(super) fn state_dir(&mut self, key: &str, dir: &Path) -> Option<PathBuf> {
        if self.skip(key) {
            return None;
        }
        let shown = dir.display();
        let install = format!("install -d -o blindgate -g blindgate -m 0700 {shown}");
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                let problem = Problem::new(format!("{shown} exists and is not a directory"));
                self.error(key, problem);
                None
            }
            Ok(_) => match writable(dir) {
                Ok(()) => Some(dir.to_owned()),
                Err(err) => {
                    let problem = Problem::new(format!("{shown} is not writable: {err}"))
                        .hint(format!("the gateway's user must own it: {install}"));
                    self.error(key, problem);
                    None
                }
            },
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                let ancestor = dir.ancestors().skip(1).find(|p| p.exists())?;
                let above = ancestor.display();
                if !ancestor.is_dir() {
                    let problem = Problem::new(format!(
                        "{shown} cannot be created: {above} is not a directory"
                    ));
                    self.error(key, problem);
                    return None;
                }
                match writable(ancestor) {
                    Ok(()) => Some(ancestor.to_owned()),
                    Err(err) => {
                        let problem = Problem::new(format!(
                            "{shown} does not exist and cannot be created: {above} is not writable ({err})"
                        ))
                        .hint(format!("create it: {install}"));
                        self.error(key, problem);
                        None
                    }
                }
            }
            Err(err) => {
                let problem = Problem::new(format!("cannot inspect {shown}: {err}"));
                self.error(key, problem);
                None
            }
        }
    }

    /// Warns if the queue at its cap plus the free-disk reserve does not fit the file
    /// system that holds (or will hold) `data_dir` today.
    pub(super) fn queue_fits(&mut self, data_dir: &Path, existing: &Path, queue: &QueueSection) {
        let key = "queue.max_bytes";
        if self.skip(key) || self.skip("queue.min_free_disk") {
            return;
        }
        let Ok(stat) = rustix::fs::statvfs(existing) else {
            return;
        };
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let used = disk_usage(&data_dir.join("queue"));
        let needed = queue.max_bytes.saturating_add(queue.min_free_disk);
        if needed <= free.saturating_add(used) {
            return;
        }
        let already = match used {
            0 => String::new(),
            used => format!(", besides the {} the queue already uses", approx_size(used)),
        };
        let problem = Problem::new(format!(
            "max_bytes {} plus min_free_disk {} do not fit: the file system holding {} has {} free{already}",
            format_byte_size(queue.max_bytes),
            format_byte_size(queue.min_free_disk),
            data_dir.display(),
            approx_size(free),
        ))
        .hint("the queue will refuse new messages before max_bytes (at the min_free_disk reserve); lower max_bytes or give data_dir a larger file system");
        self.warning(key, problem);
    }
}

/// Adds what to do about a file that cannot be read.
pub(super) fn unreadable_hint(problem: Problem, err: &io::Error) -> Problem {
    match err.kind() {
        io::ErrorKind::NotFound => problem.hint(
            "put the file there or correct the path (a relative path starts at the config file's directory)",
        ),
        io::ErrorKind::PermissionDenied => problem.hint(format!(
            "the gateway's user must be able to read it: chgrp {SERVICE_GROUP} and chmod 0640 (and the directories must be searchable)"
        )),
        _ => problem,
    }
}

/// `access(W_OK | X_OK)` for the calling user (a reload runs as the service's user).
pub(super) fn writable(dir: &Path) -> io::Result<()> {
    use rustix::fs::{Access, access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK).map_err(io::Error::from)
}

/// Whether group read on a key file is for the service's group (or the caller's).
pub(super) fn group_may_read(gid: u32) -> bool {
    gid == rustix::process::getegid().as_raw()
        || group_name(gid).is_some_and(|name| name == SERVICE_GROUP)
}

/// The name of group `gid` from /etc/group, if listed there.
pub(super) fn group_name(gid: u32) -> Option<String> {
    let groups = fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse::<u32>().ok()? == gid).then(|| name.to_owned())
    })
}

/// Disk blocks used by the files under `path` (0 if it does not exist).
pub(super) fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks().saturating_mul(512);
    if !meta.is_dir() {
        return own;
    }
    let entries = fs::read_dir(path).into_iter().flatten().flatten();
    entries.fold(own, |sum, entry| {
        sum.saturating_add(disk_usage(&entry.path()))
    })
}

/// "1.4GiB", "312MiB", "20KiB", "512B": an approximate size for messages.
pub(super) fn approx_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit {
            let tenths = bytes.saturating_mul(10) / unit;
            return match tenths {
                t if t >= 100 => format!("{}{name}", t / 10),
                t => format!("{}.{}{name}", t / 10, t % 10),
            };
        }
    }
    format!("{bytes}B")
}
