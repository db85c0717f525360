//! Client of the node agent's socket (cluster IPAM): one JSON line out, one back. An agent
//! that cannot be reached, or does not accept or answer in time, is "try again later" (code 11),
//! as the spec intends for transient unavailability. Every step has a deadline: the connect
//! (non-blocking, so a full accept queue cannot hold the plugin), the write and the reply, which
//! is also bounded in size. Does I/O.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use trellis_agent_api::{Ok as Done, Reply, Request};
use trellis_cni_types::{codes, CniError};

use crate::error::Result;

/// How long the agent may take to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent may take to answer (it may be waiting on the datastore).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest reply accepted.
const MAX_REPLY: usize = 1 << 20;

/// A non-blocking `AF_UNIX` stream socket and its address.
fn unix_socket(socket: &Path) -> std::io::Result<(OwnedFd, libc::sockaddr_un)> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = socket.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long or containing NUL",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok((fd, addr))
}

/// Connects without ever blocking: while the agent's accept queue is full (EAGAIN on a
/// non-blocking connect — a burst of pods can briefly outrun it) it retries until `timeout`;
/// a missing socket or a refused connection fails at once. Returns a blocking stream.
fn connect(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let (fd, addr) = unix_socket(socket)?;
    loop {
        // SAFETY: addr is a valid sockaddr_un of the given length; fd is open.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            let stream = UnixStream::from(fd);
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(libc::EAGAIN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the agent did not accept the connection within {} s (its accept queue is full)",
                        timeout.as_secs()
                    ),
                ))
            }
            _ => return Err(err),
        }
    }
}

/// Reads one line (without the newline), at most [`MAX_REPLY`] bytes, before `deadline`.
fn read_reply(stream: &mut UnixStream, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no complete reply within {} s", REPLY_TIMEOUT.as_secs()),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(reply);
        }
        if let Some(end) = buf[..n].iter().position(|b| *b == b'\n') {
            reply.extend_from_slice(&buf[..end]);
            return Ok(reply);
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > MAX_REPLY {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the reply exceeds {MAX_REPLY} bytes"),
            ));
        }
    }
}

/// Sends one request and waits (up to [`REPLY_TIMEOUT`]) for the reply.
pub fn call(socket: &Path, req: &Request) -> Result<Done> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            codes::TRY_AGAIN,
            format!("the trellis agent is not reachable at {}: {e} (is `trellis agent` running on this node? try again later)", socket.display()),
        )
    };
    let mut stream = connect(socket, CONNECT_TIMEOUT).map_err(unreachable)?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).expect("requests serialise");
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let reply = read_reply(&mut stream, deadline).map_err(unreachable)?;
    if reply.is_empty() {
        return Err(CniError::new(
            codes::TRY_AGAIN,
            format!(
                "the trellis agent at {} closed the connection without answering",
                socket.display()
            ),
        )
        .into());
    }
    match serde_json::from_slice::<Reply>(&reply) {
        Ok(Reply::Ok(ok)) => Ok(ok),
        Ok(Reply::Error(e)) => {
            Err(CniError::new(e.code, format!("trellis agent: {}", e.msg)).into())
        }
        Err(e) => Err(CniError::new(
            codes::DECODE,
            format!("cannot decode the agent's reply: {e}"),
        )
        .into()),
    }
}
