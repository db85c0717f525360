//! BGP transport: the listening socket, outgoing connections with TCP MD5 signatures (RFC 2385)
//! and the TTL a [`TtlPolicy`] gives (1 for directly connected eBGP, 255 for multihop, GTSM's
//! minimum TTL, RFC 5082), and one reader and one writer task per connection that turn bytes
//! into decoded messages and back. Both are bounded: the reader waits (and so stops reading the
//! socket, letting TCP flow control slow the peer) while the speaker's queue is full, and the
//! writer's queue holds a bounded number of batches whose size the speaker can watch
//! ([`Writer`]). Does I/O.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use trellis_bgp::message::{self, MAX_LEN};
use trellis_bgp::{Context, DecodeError, Message};

use super::config::TtlPolicy;

/// `struct tcp_md5sig` from <linux/tcp.h>.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

/// Sets (or with `None`, removes) the MD5 key for `peer` on a socket (RFC 2385).
pub fn set_md5(fd: &impl AsRawFd, peer: IpAddr, key: Option<&str>) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid value for this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(a).to_be();
        }
        IpAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
        }
    }
    let key = key.unwrap_or("").as_bytes();
    if key.len() > sig.key.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "MD5 key longer than 80 bytes",
        ));
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    let rc = setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig);
    match rc {
        // Removing a key that is not there is success (idempotent teardown).
        Err(e) if key.is_empty() && e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// `setsockopt(2)` with a plain-data value.
fn setsockopt<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: passes a pointer to a live value of the size given; T is plain C data.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Applies a TTL policy to an IPv4 socket (the speaker's sessions are IPv4).
fn set_ttl(fd: &impl AsRawFd, policy: TtlPolicy) -> std::io::Result<()> {
    if let Some(t) = policy.ttl {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &(t as libc::c_int))?;
    }
    if let Some(t) = policy.min_ttl {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &(t as libc::c_int))?;
    }
    Ok(())
}

/// Binds the BGP listener (`at` is the unspecified address for every address of the node's
/// namespace).
pub fn listen(at: SocketAddr) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    // The listener answers SYNs itself: with TTL 255 its SYN-ACKs pass a GTSM peer's check
    // (as BIRD's listener does); each accepted socket then gets its peer's policy.
    set_ttl(
        &s,
        TtlPolicy {
            ttl: Some(255),
            min_ttl: None,
        },
    )?;
    // Keep each connection's SYN (its IP header) so an accepted connection can be checked
    // against its peer's GTSM minimum: the listener is shared by every peer, so it cannot
    // carry one peer's IP_MINTTL, and the handshake completes before the peer is known.
    setsockopt(
        &s,
        libc::IPPROTO_TCP,
        libc::TCP_SAVE_SYN,
        &(1 as libc::c_int),
    )?;
    s.bind(at)?;
    s.listen(64)
}

/// Options for one connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Source address to bind (`None`: the kernel's choice).
    pub local: Option<IpAddr>,
    pub peer: SocketAddr,
    pub password: Option<String>,
    pub ttl: TtlPolicy,
}

/// Opens a connection to a peer (bounded by a timeout).
pub async fn connect(o: &ConnectOptions) -> std::io::Result<TcpStream> {
    let s = if o.peer.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(p) = &o.password {
        set_md5(&s, o.peer.ip(), Some(p))?;
    }
    set_ttl(&s, o.ttl)?;
    if let Some(local) = o.local {
        s.bind(SocketAddr::new(local, 0))?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(5), s.connect(o.peer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets the TTL policy on an accepted connection. With a GTSM minimum the connection is
/// refused (an error of kind `PermissionDenied`) unless the SYN that opened it arrived with at
/// least that TTL (RFC 5082 §3: the check covers every packet of the session, and the
/// handshake happened before the peer's `IP_MINTTL` could be set). Without this a peer
/// sending TTL 1 gets a connection that stays in OpenSent for the whole open hold time while
/// every segment it sends is dropped — and the speaker's own attempts wait behind it.
pub fn accepted(stream: &TcpStream, ttl: TtlPolicy) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    set_ttl(stream, ttl)?;
    let Some(min) = ttl.min_ttl else {
        return Ok(());
    };
    let syn = saved_syn(stream)?;
    match syn_ttl(&syn) {
        Some(t) if t >= min => Ok(()),
        got => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            match got {
                Some(t) => format!("GTSM: the connection's SYN arrived with TTL {t}, below {min}"),
                None => "GTSM: the connection's SYN could not be read (TCP_SAVED_SYN)".to_string(),
            },
        )),
    }
}

/// The headers of the SYN that opened an accepted connection (`TCP_SAVED_SYN`, kept because
/// the listener set `TCP_SAVE_SYN`; readable once).
fn saved_syn(stream: &TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf` and stores the length used.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// The TTL (IPv4) or hop limit (IPv6) of a saved SYN's IP header; `None` when it is not one.
fn syn_ttl(headers: &[u8]) -> Option<u8> {
    match headers.first()? >> 4 {
        4 if headers.len() >= 20 => Some(headers[8]),
        6 if headers.len() >= 40 => Some(headers[7]),
        _ => None,
    }
}

/// What a reader reports.
#[derive(Debug)]
pub enum Read {
    Message(Message),
    Malformed(DecodeError),
    Closed,
}

/// Encoded batches a connection's writer holds at most. The speaker stops handing a peer
/// UPDATEs long before this fills ([`Writer::queued`]); control messages are few.
const WRITE_QUEUE: usize = 64;

/// How long a dropped connection's writer may still flush what was queued (a NOTIFICATION
/// above all) before the socket is closed regardless: a peer that does not read cannot hold
/// the task, nor the connection, for longer.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// The sending half of a connection: a bounded queue of encoded messages, with counts of the
/// bytes queued and written, so the speaker sees a peer falling behind. Dropping it ends the
/// connection: the reader forwards nothing more from that moment (what the peer sends after
/// the speaker gave the connection up must never reach a later session), and the writer
/// flushes what is queued for at most [`CLOSE_LINGER`], then closes the socket.
pub struct Writer {
    tx: mpsc::Sender<Vec<u8>>,
    state: Arc<WriteState>,
    /// Dropped with the writer: its receivers (the reader and the writer task) see it closed.
    _alive: watch::Sender<()>,
}

#[derive(Default)]
struct WriteState {
    queued: AtomicUsize,
    written: AtomicU64,
}

impl Writer {
    /// Queues bytes; false when the queue is full (the peer is not reading) or the connection
    /// is gone.
    pub fn send(&self, bytes: Vec<u8>) -> bool {
        let n = bytes.len();
        self.state.queued.fetch_add(n, Ordering::Relaxed);
        if self.tx.try_send(bytes).is_err() {
            self.state.queued.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn queued(&self) -> usize {
        self.state.queued.load(Ordering::Relaxed)
    }

    /// Bytes the socket has taken so far.
    pub fn written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }
}

/// Splits a connection into a reader task (sending decoded messages, then `Closed`, waiting
/// while `events` is full; it ends without a word once the [`Writer`] is dropped) and a
/// [`Writer`].
pub fn spawn_io<T: Clone + Send + 'static>(
    stream: TcpStream,
    ibgp: bool,
    tag: T,
    events: mpsc::Sender<(T, Read)>,
) -> Writer {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let (alive, alive_rx) = watch::channel(());
    let state = Arc::new(WriteState::default());
    tokio::spawn(write_loop(wr, rx, state.clone(), alive_rx.clone()));
    tokio::spawn(async move {
        let mut alive = alive_rx.clone();
        tokio::select! {
            // `changed` fails only when the writer is gone (nothing ever sends on it).
            _ = alive.changed() => {}
            () = read_loop(rd, ibgp, tag, events, alive_rx) => {}
        }
    });
    Writer {
        tx,
        state,
        _alive: alive,
    }
}

async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    state: Arc<WriteState>,
    mut alive: watch::Receiver<()>,
) {
    let finished = {
        let drain = async {
            while let Some(b) = rx.recv().await {
                let mut at = 0;
                while at < b.len() {
                    match wr.write(&b[at..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => {
                            at += n;
                            state.queued.fetch_sub(n, Ordering::Relaxed);
                            state.written.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
            true
        };
        tokio::pin!(drain);
        tokio::select! {
            done = &mut drain => done,
            // The writer was dropped: what is queued gets the linger, no more.
            _ = alive.changed() => tokio::time::timeout(CLOSE_LINGER, &mut drain)
                .await
                .unwrap_or(false),
        }
    };
    if finished {
        let _ = wr.shutdown().await;
    }
}

async fn read_loop<T: Clone>(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    ibgp: bool,
    tag: T,
    events: mpsc::Sender<(T, Read)>,
    alive: watch::Receiver<()>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    // Until the peer's OPEN says otherwise, decode as a 4-octet session (only OPEN comes first).
    let mut ctx = Context {
        four_octet_as: true,
        ibgp,
    };
    // A message decoded in the same read as the drop must not slip through either.
    let gone = || alive.has_changed().is_err();
    loop {
        let mut start = 0;
        loop {
            match message::decode(&buf[start..], ctx, MAX_LEN) {
                Ok(Some((m, n))) => {
                    start += n;
                    if let Message::Open(o) = &m {
                        ctx.four_octet_as = o
                            .capabilities()
                            .any(|c| matches!(c, trellis_bgp::Capability::FourOctetAs(_)));
                    }
                    // Waits while the speaker is behind: the socket is not read meanwhile.
                    if gone() || events.send((tag.clone(), Read::Message(m))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if !gone() {
                        let _ = events.send((tag.clone(), Read::Malformed(e))).await;
                    }
                    return;
                }
            }
        }
        buf.drain(..start);
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !gone() {
                    let _ = events.send((tag, Read::Closed)).await;
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests;
