//! Opening paths that come from input (`CNI_NETNS`, `logFile`) without ever blocking or touching
//! a device: each path is first opened with `O_PATH`, which never blocks and has no side effects
//! (not on a FIFO, not on `/dev/watchdog`), its type is checked with `fstat`/`fstatfs`, and only
//! then is it reopened for use through `/proc/self/fd/N` — the very inode that was checked, so
//! swapping the path meanwhile changes nothing. Does I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::sys::stat::{fstat, FileStat};
use nix::sys::statfs::{self as sfs, fstatfs, FsType, NSFS_MAGIC};
use trellis_dataplane::Netns;

/// Why a `CNI_NETNS` path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsProblem {
    /// The path does not exist (a namespace that is gone: DEL proceeds without it).
    #[error("{path} does not exist")]
    Missing { path: String },
    #[error("{path} is not a network namespace: {why}")]
    NotNetns { path: String, why: String },
    /// The namespace the plugin itself runs in — the node's. Configuring it as a pod's would
    /// replace the node's default route.
    #[error("{path} is the plugin's own network namespace (the node's), not a container's")]
    Own { path: String },
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Opens `path` with `O_PATH` (following symbolic and /proc magic links).
fn open_o_path(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
}

/// Reopens the inode behind an `O_PATH` handle for real use, without blocking.
fn reopen(handle: &File, write: bool) -> io::Result<File> {
    let proc = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let mut o = OpenOptions::new();
    if write {
        o.append(true);
    } else {
        o.read(true);
    }
    o.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(proc)
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// The namespace type of an nsfs file (`NS_GET_NSTYPE`, Linux 4.11+); `None` if unknown.
fn ns_type(file: &File) -> Option<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor.
    let t = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    (t >= 0).then_some(t)
}

fn ns_type_name(t: libc::c_int) -> &'static str {
    match t {
        libc::CLONE_NEWNS => "a mount namespace",
        libc::CLONE_NEWPID => "a PID namespace",
        libc::CLONE_NEWUTS => "a UTS namespace",
        libc::CLONE_NEWIPC => "an IPC namespace",
        libc::CLONE_NEWUSER => "a user namespace",
        libc::CLONE_NEWCGROUP => "a cgroup namespace",
        libc::CLONE_NEWTIME => "a time namespace",
        _ => "another kind of namespace",
    }
}

/// Opens `CNI_NETNS`: it must be a network namespace file (nsfs) other than the plugin's own.
pub fn open_netns(path: &Path) -> Result<Netns, NetnsProblem> {
    let shown = path.display().to_string();
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => NetnsProblem::Missing {
            path: shown.clone(),
        },
        _ => NetnsProblem::Io {
            path: shown.clone(),
            source,
        },
    };
    let not = |why: String| NetnsProblem::NotNetns {
        path: shown.clone(),
        why,
    };
    let handle = open_o_path(path).map_err(io_err)?;
    let meta = handle.metadata().map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Err(not(format!("it is {}", kind_of(&meta))));
    }
    let fs = fstatfs(handle.as_fd()).map_err(|e| io_err(e.into()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(not("it is an ordinary file, not a namespace file".into()));
    }
    let file = reopen(&handle, false).map_err(io_err)?;
    match ns_type(&file) {
        Some(libc::CLONE_NEWNET) | None => {}
        Some(other) => return Err(not(format!("it is {}", ns_type_name(other)))),
    }
    let own = std::fs::metadata("/proc/thread-self/ns/net").map_err(io_err)?;
    if own.dev() == meta.dev() && own.ino() == meta.ino() {
        return Err(NetnsProblem::Own { path: shown });
    }
    Ok(Netns::from_file(file, path.to_path_buf()))
}

/// Opens a file in a directory named by input (the IPAM store, the lock directory) with
/// `options`, never following a symbolic link in the last component (`ELOOP`), never blocking
/// on a FIFO and never making a terminal the plugin's; anything but a regular file is refused.
/// (`O_NONBLOCK` changes nothing for regular files, and `flock` ignores it.)
pub fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidData,
                "it is a symbolic link, which is not followed",
            ),
            _ => e,
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is {}, not a regular file", kind_of(&meta)),
        ));
    }
    Ok(file)
}

/// Where log lines go.
#[derive(Debug)]
pub enum LogTarget {
    File(File),
    /// `logFile` is the plugin's stderr (e.g. `/dev/stderr`).
    Stderr,
    /// `logFile` is `/dev/null`.
    Discard,
}

/// Why `logFile` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogProblem {
    /// A path that must never receive logs (stdout, a FIFO, a device): a config error.
    #[error("{0}")]
    Refused(String),
    /// The file could not be opened or created (a missing directory, permissions).
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

// `dev_t`/`ino_t` are not u64 on every target.
#[allow(clippy::unnecessary_cast)]
fn same_inode(meta: &std::fs::Metadata, st: &FileStat) -> bool {
    meta.dev() == st.st_dev as u64 && meta.ino() == st.st_ino as u64
}

/// `/dev/null`: character device 1:3.
fn is_dev_null(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == libc::makedev(1, 3)
}

/// Filesystems whose regular files are the kernel's controls, not storage: a log line appended
/// to one (`/proc/sys/...`, `/proc/sysrq-trigger`, `/sys/class/net/*/...`, a cgroup's
/// `cgroup.procs`, a binfmt_misc `register`) would change the node. With their names, for the
/// error.
fn kernel_interface_fs(t: FsType) -> Option<&'static str> {
    const CONFIGFS_MAGIC: FsType = FsType(0x6265_6570);
    const EFIVARFS_MAGIC: FsType = FsType(0xde5e_81e4);
    const PSTOREFS_MAGIC: FsType = FsType(0x6165_676c);
    const FUSECTL_SUPER_MAGIC: FsType = FsType(0x6573_5543);
    const BINFMTFS_MAGIC: FsType = FsType(0x4249_4e4d);
    [
        (sfs::PROC_SUPER_MAGIC, "proc"),
        (sfs::SYSFS_MAGIC, "sysfs"),
        (sfs::CGROUP_SUPER_MAGIC, "cgroup"),
        (sfs::CGROUP2_SUPER_MAGIC, "cgroup2"),
        (sfs::DEBUGFS_MAGIC, "debugfs"),
        (sfs::TRACEFS_MAGIC, "tracefs"),
        (sfs::SECURITYFS_MAGIC, "securityfs"),
        (sfs::SELINUX_MAGIC, "selinuxfs"),
        (sfs::SMACK_MAGIC, "smackfs"),
        (sfs::BPF_FS_MAGIC, "bpf"),
        (sfs::RDTGROUP_SUPER_MAGIC, "resctrl"),
        (sfs::XENFS_SUPER_MAGIC, "xenfs"),
        (sfs::USBDEVICE_SUPER_MAGIC, "usbdevfs"),
        (sfs::OPENPROM_SUPER_MAGIC, "openpromfs"),
        (CONFIGFS_MAGIC, "configfs"),
        (EFIVARFS_MAGIC, "efivarfs"),
        (PSTOREFS_MAGIC, "pstore"),
        (FUSECTL_SUPER_MAGIC, "fusectl"),
        (BINFMTFS_MAGIC, "binfmt_misc"),
    ]
    .into_iter()
    .find_map(|(magic, name)| (magic == t).then_some(name))
}

/// Opens `logFile` for appending: an existing regular file, or a new one (created exclusively,
/// mode 0640). Refused: the plugin's stdout (it carries only the result), FIFOs, sockets,
/// directories, devices other than `/dev/null`, and files of the kernel's interface
/// filesystems (`/proc`, `/sys`, cgroups, ...), where a log line would be a command.
pub fn open_log(path: &Path) -> Result<LogTarget, LogProblem> {
    let shown = path.display().to_string();
    let io_err = |source: io::Error| LogProblem::Io {
        path: shown.clone(),
        source,
    };
    // Bounded: each round either opens, creates, or lost a race to a concurrent creator.
    for _ in 0..3 {
        let handle = match open_o_path(path) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match OpenOptions::new()
                    .append(true)
                    .create_new(true)
                    .mode(0o640)
                    .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
                    .open(path)
                {
                    Ok(f) => return Ok(LogTarget::File(f)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(io_err(e)),
                }
            }
            Err(e) => return Err(io_err(e)),
        };
        let meta = handle.metadata().map_err(io_err)?;
        if is_dev_null(&meta) {
            return Ok(LogTarget::Discard);
        }
        if fstat(io::stdout().as_fd()).is_ok_and(|st| same_inode(&meta, &st)) {
            return Err(LogProblem::Refused(format!(
                "{shown} is the plugin's stdout, which carries only the result"
            )));
        }
        if fstat(io::stderr().as_fd()).is_ok_and(|st| same_inode(&meta, &st)) {
            return Ok(LogTarget::Stderr);
        }
        if !meta.file_type().is_file() {
            return Err(LogProblem::Refused(format!(
                "{shown} is {}; logFile must be a regular file",
                kind_of(&meta)
            )));
        }
        let fs = fstatfs(handle.as_fd()).map_err(|e| io_err(e.into()))?;
        if let Some(name) = kernel_interface_fs(fs.filesystem_type()) {
            return Err(LogProblem::Refused(format!(
                "{shown} is a file of the kernel's {name} filesystem, where writing changes \
                 the node; logFile must be a file on ordinary storage"
            )));
        }
        return reopen(&handle, true).map(LogTarget::File).map_err(io_err);
    }
    Err(io_err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "it is a dangling symbolic link, or keeps appearing and disappearing",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_are_not_network_namespaces_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for (p, needle) in [
            (file.as_path(), "ordinary file"),
            (dir.path(), "directory"),
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/null"), "character device"),
            (Path::new("/proc/self/ns/mnt"), "mount namespace"),
        ] {
            match open_netns(p) {
                Err(NetnsProblem::NotNetns { why, .. }) => {
                    assert!(why.contains(needle), "{}: {why}", p.display())
                }
                other => panic!("{}: {other:?}", p.display()),
            }
        }
        assert!(matches!(
            open_netns(&dir.path().join("none")),
            Err(NetnsProblem::Missing { .. })
        ));
        assert!(matches!(
            open_netns(Path::new("/proc/self/ns/net")),
            Err(NetnsProblem::Own { .. })
        ));
        assert!(matches!(
            open_netns(Path::new("/proc/thread-self/ns/net")),
            Err(NetnsProblem::Own { .. })
        ));
    }

    #[test]
    fn log_files_must_be_regular_and_never_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(open_log(&fifo), Err(LogProblem::Refused(m)) if m.contains("FIFO")));
        assert!(matches!(open_log(dir.path()), Err(LogProblem::Refused(_))));
        assert!(matches!(
            open_log(Path::new("/dev/null")),
            Ok(LogTarget::Discard)
        ));
        let new = dir.path().join("new.log");
        assert!(matches!(open_log(&new), Ok(LogTarget::File(_))));
        assert!(new.is_file());
        assert!(matches!(open_log(&new), Ok(LogTarget::File(_))));
        assert!(matches!(
            open_log(&dir.path().join("missing/dir.log")),
            Err(LogProblem::Io { .. })
        ));
    }

    /// Regular files of /proc and /sys are the kernel's controls: a log line appended to
    /// `/proc/sys/...` or `/sys/class/net/*/ifalias` would change the node. (Only opened here,
    /// never written.)
    #[test]
    fn log_files_on_kernel_interface_filesystems_are_refused() {
        for (path, fs) in [
            ("/proc/self/comm", "proc"),
            ("/proc/sys/net/ipv4/ip_forward", "proc"),
            ("/sys/class/net/lo/ifalias", "sysfs"),
        ] {
            match open_log(Path::new(path)) {
                Err(LogProblem::Refused(m)) => assert!(m.contains(fs), "{path}: {m}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        // Through a symbolic link elsewhere too: the file is checked, not its name.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("innocent.log");
        std::os::unix::fs::symlink("/proc/sys/net/ipv4/ip_forward", &link).unwrap();
        assert!(matches!(open_log(&link), Err(LogProblem::Refused(_))));
    }
}
