//! Telling the lab's processes apart from unrelated ones that reuse their PIDs, and signalling
//! exactly them: a pidfd is opened first, the process is identified through `/proc` (its start
//! time, or its network namespace), and the signal goes through the pidfd — so a PID recycled
//! after the check never receives it (pidfd_open(2), pidfd_send_signal(2)). I/O.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// When a process started: field 22 of `/proc/PID/stat`, in clock ticks after boot. Unchanged
/// by exec; a later process with the same PID has a later one.
pub fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/PID/stat"))
}

/// Field 22 of a `/proc/PID/stat` line. Field 2 (the command name, in parentheses) may hold
/// spaces and parentheses, so fields are counted from the last ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// A network namespace's identity: (device, inode) of its nsfs file.
pub type NetnsId = (u64, u64);

/// The identity of a named namespace (`/var/run/netns/NAME`).
pub fn netns_id(name: &str) -> io::Result<NetnsId> {
    let m = std::fs::metadata(Path::new("/var/run/netns").join(name))?;
    Ok((m.dev(), m.ino()))
}

/// The network namespace a process is in.
pub fn netns_of(pid: i32) -> io::Result<NetnsId> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
    Ok((m.dev(), m.ino()))
}

/// A handle on one process, valid however its PID is reused later.
pub struct PidFd(OwnedFd);

impl PidFd {
    /// `Ok(None)` when no process has this PID.
    pub fn open(pid: i32) -> io::Result<Option<PidFd>> {
        // SAFETY: pidfd_open(2) takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        Ok(Some(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) })))
    }

    /// Sends SIGKILL to this process (not to whatever holds its PID now). `Ok(false)` when it
    /// has already exited.
    pub fn kill(&self) -> io::Result<bool> {
        // SAFETY: pidfd_send_signal(2) on a descriptor we own, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    /// Waits until the process has exited (a pidfd becomes readable then), at most `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: poll(2) on one pollfd we own.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r >= 0 {
                return Ok(r == 1);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// How to recognise a process as one of the lab's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// It started at this time (recorded when the lab spawned it).
    StartedAt(u64),
    /// It runs in one of these network namespaces.
    InNetns(Vec<NetnsId>),
}

/// What became of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It was the lab's and is gone now.
    Killed,
    /// No process had the PID any more.
    Gone,
    /// The PID belongs to another process now: left alone.
    Spared,
}

/// Kills `pid` if it is the process `identity` describes, and waits (at most `timeout`) until
/// it has exited.
pub fn kill_if(pid: i32, identity: &Identity, timeout: Duration) -> io::Result<Fate> {
    let Some(fd) = PidFd::open(pid)? else {
        return Ok(Fate::Gone);
    };
    // Read after the pidfd was opened: if the process is still alive when the signal is sent,
    // what was read is its own.
    let ours = match identity {
        Identity::StartedAt(t) => start_time(pid).ok() == Some(*t),
        Identity::InNetns(ids) => netns_of(pid).is_ok_and(|id| ids.contains(&id)),
    };
    if !ours {
        return Ok(Fate::Spared);
    }
    if !fd.kill()? {
        return Ok(Fate::Gone);
    }
    if !fd.wait_exit(timeout)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("still running {} ms after SIGKILL", timeout.as_millis()),
        ));
    }
    Ok(Fate::Killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn a_process_with_another_start_time_is_spared_and_the_right_one_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t = start_time(pid).unwrap();
        let wait = Duration::from_secs(5);
        assert_eq!(
            kill_if(pid, &Identity::StartedAt(t - 1), wait).unwrap(),
            Fate::Spared
        );
        assert_eq!(
            kill_if(pid, &Identity::InNetns(vec![(0, 0)]), wait).unwrap(),
            Fate::Spared
        );
        assert!(child.try_wait().unwrap().is_none(), "still running");
        assert_eq!(
            kill_if(pid, &Identity::StartedAt(t), wait).unwrap(),
            Fate::Killed
        );
        assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
    }
}
