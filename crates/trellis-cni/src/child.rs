//! Running another program (a delegated IPAM plugin) so that it cannot hold the plugin: its
//! stdin is written while its output is read (a child that does not read its stdin cannot
//! deadlock us), its stdout is bounded, and the whole run has a deadline, after which its
//! process group is killed. A child that exits while something it started keeps its stdout
//! open (a background process) does not hold us either: once it has exited, only what it
//! already wrote is read. Does I/O.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bounds of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the spawn to the child's exit.
    pub timeout: Duration,
    /// The most stdout accepted; more kills the child.
    pub max_stdout: usize,
    /// The most stderr kept (the rest is read and dropped).
    pub max_stderr: usize,
}

/// What a finished child left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a run did not finish normally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run it: {0}")]
    Spawn(#[source] io::Error),
    #[error("it did not finish within {} s and was killed", .0.as_secs())]
    TimedOut(Duration),
    #[error("it printed more than {0} bytes and was killed")]
    TooMuchOutput(usize),
    #[error("talking to it failed: {0}")]
    Io(#[source] io::Error),
}

/// A descriptor that becomes readable when the process exits (pidfd_open(2), Linux 5.3);
/// `None` on older kernels, which then poll for the exit at short intervals.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a PID and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    // SAFETY: `fd` is open for the duration of the call (the caller holds its owner).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits until one of `fds` is ready or `timeout` passes.
fn wait_ready(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: poll(2) on a slice of pollfds we own, of the given length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// One output pipe being read into a bounded buffer.
struct Sink<R> {
    pipe: Option<R>,
    data: Vec<u8>,
    /// Bytes read in all (kept or not).
    total: usize,
    keep: usize,
}

impl<R: Read + AsRawFd> Sink<R> {
    fn new(pipe: Option<R>, keep: usize) -> io::Result<Sink<R>> {
        if let Some(p) = &pipe {
            set_nonblocking(p.as_raw_fd())?;
        }
        Ok(Sink {
            pipe,
            data: Vec::new(),
            total: 0,
            keep,
        })
    }

    /// Reads what is there now (until it would block or the pipe ends).
    fn drain(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while let Some(p) = &mut self.pipe {
            match p.read(&mut buf) {
                Ok(0) => self.pipe = None,
                Ok(n) => {
                    self.total += n;
                    let room = self.keep.saturating_sub(self.data.len());
                    self.data.extend_from_slice(&buf[..n.min(room)]);
                    if self.total > self.keep {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Kills the child's process group (it leads one) and reaps the child.
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) with the negated process group ID the child leads (spawned with
    // `process_group(0)`, so its PID); no memory is involved.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

/// Runs `cmd` with `stdin` as its input, within `limits`.
pub fn run(mut cmd: Command, stdin: &[u8], limits: Limits) -> Result<Output, RunError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let deadline = Instant::now() + limits.timeout;
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let outcome = pump(&mut child, stdin, limits, deadline);
    if outcome.is_err() {
        kill_group(&mut child);
    }
    outcome
}

/// Feeds stdin and collects stdout and stderr until the child exits or a limit is hit.
fn pump(
    child: &mut Child,
    input: &[u8],
    limits: Limits,
    deadline: Instant,
) -> Result<Output, RunError> {
    let exit = pidfd(child.id());
    let mut stdin = child.stdin.take();
    if let Some(s) = &stdin {
        set_nonblocking(s.as_raw_fd()).map_err(RunError::Io)?;
    }
    let mut written = 0;
    let mut out = Sink::new(child.stdout.take(), limits.max_stdout).map_err(RunError::Io)?;
    let mut err = Sink::new(child.stderr.take(), limits.max_stderr).map_err(RunError::Io)?;
    loop {
        if written == input.len() {
            stdin = None;
        }
        if let Some(s) = &mut stdin {
            match s.write(&input[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // It stopped reading (closed its stdin or exited): what it did not read is
                // its business.
                Err(_) => stdin = None,
            }
        }
        out.drain().map_err(RunError::Io)?;
        if out.total > limits.max_stdout {
            return Err(RunError::TooMuchOutput(limits.max_stdout));
        }
        err.drain().map_err(RunError::Io)?;
        if let Some(status) = child.try_wait().map_err(RunError::Io)? {
            // Everything it wrote before exiting is in the pipes: read that, not what
            // something it left behind may still write.
            out.drain().map_err(RunError::Io)?;
            if out.total > limits.max_stdout {
                return Err(RunError::TooMuchOutput(limits.max_stdout));
            }
            err.drain().map_err(RunError::Io)?;
            return Ok(Output {
                status,
                stdout: out.data,
                stderr: err.data,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RunError::TimedOut(limits.timeout));
        }
        let mut fds = Vec::with_capacity(4);
        let mut watch = |fd: RawFd, events: libc::c_short| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            })
        };
        if let Some(s) = &stdin {
            watch(s.as_raw_fd(), libc::POLLOUT);
        }
        for p in [
            out.pipe.as_ref().map(|p| p.as_raw_fd()),
            err.pipe.as_ref().map(|p| p.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            watch(p, libc::POLLIN);
        }
        let tick = match &exit {
            Some(fd) => {
                watch(fd.as_raw_fd(), libc::POLLIN);
                left
            }
            None => left.min(Duration::from_millis(20)),
        };
        wait_ready(&mut fds, tick).map_err(RunError::Io)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, name: &str, body: &str) -> Command {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Command::new(path)
    }

    const SHORT: Limits = Limits {
        timeout: Duration::from_secs(2),
        max_stdout: 64 * 1024,
        max_stderr: 1024,
    };

    /// Runs `cmd` on a thread and fails the test if it does not return within `secs`.
    fn bounded(
        cmd: Command,
        stdin: Vec<u8>,
        limits: Limits,
        secs: u64,
    ) -> Result<Output, RunError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(run(cmd, &stdin, limits)));
        rx.recv_timeout(Duration::from_secs(secs))
            .expect("the run did not return: the child held the caller")
    }

    /// Waits (at most 5 s) until no process has `pid`.
    fn gone(pid: i32) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_child_that_never_exits_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = script(
            dir.path(),
            "hang",
            &format!("sleep 1000 & echo $! > {}\nwait", pidfile.display()),
        );
        match bounded(cmd, Vec::new(), SHORT, 20) {
            Err(RunError::TimedOut(_)) => {}
            other => panic!("{other:?}"),
        }
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid), "its background process {pid} survived");
    }

    #[test]
    fn output_beyond_the_limit_kills_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "flood", "exec yes");
        match bounded(cmd, Vec::new(), SHORT, 20) {
            Err(RunError::TooMuchOutput(n)) => assert_eq!(n, SHORT.max_stdout),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_background_process_holding_stdout_does_not_hold_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = script(
            dir.path(),
            "bg",
            &format!(
                "sleep 1000 &\necho $! > {}\necho '{{\"ok\":1}}'\necho oops >&2",
                pidfile.display()
            ),
        );
        let limits = Limits {
            timeout: Duration::from_secs(30),
            ..SHORT
        };
        let out = bounded(cmd, Vec::new(), limits, 20).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"{\"ok\":1}\n");
        assert_eq!(out.stderr, b"oops\n");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) of the test's own background process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    #[test]
    fn a_child_that_ignores_a_large_stdin_cannot_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        // Prints more than a pipe holds before reading anything.
        let cmd = script(dir.path(), "noread", "head -c 200000 /dev/zero\nexit 3");
        let limits = Limits {
            max_stdout: 1 << 20,
            ..SHORT
        };
        let out = bounded(cmd, vec![b'x'; 1 << 20], limits, 20).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout.len(), 200_000);
        let cat = Command::new("cat");
        let input: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let out = bounded(cat, input.clone(), limits, 20).unwrap();
        assert_eq!(out.stdout, input, "stdin is passed on whole");
    }

    #[test]
    fn stderr_is_kept_only_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(
            dir.path(),
            "chatty",
            "head -c 100000 /dev/zero >&2\necho done",
        );
        let out = bounded(cmd, Vec::new(), SHORT, 20).unwrap();
        assert_eq!(out.stderr.len(), SHORT.max_stderr);
        assert_eq!(out.stdout, b"done\n");
    }
}
