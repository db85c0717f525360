//! The traffic of `lab probe` (I/O): the server each pod runs on its declared ports — TCP:
//! accept, send the pod's name, close; UDP: answer each datagram with the pod's name — and the
//! client that, from one namespace, tries many destinations at once and says for each whether
//! the right pod answered (so a wrong route cannot pass for a reached pod). Both run as hidden
//! subcommands of the `trellis` binary (`trellis lab serve`, `trellis lab connect`), started in
//! the pod's namespace; no interpreter starts. ICMP probes send one echo request from a raw
//! socket (RFC 792, RFC 4443) and wait for the reply.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use trellis_policy::conformance::ProbeProtocol;

/// Longest answer read from a server.
pub const ANSWER_MAX: usize = 256;
/// Destinations one client tries at the same time.
pub const PARALLEL: usize = 64;
/// Most destinations one client call takes.
pub const MAX_TARGETS: usize = 1000;

/// A destination: its address and the name its server answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: IpAddr,
    pub name: String,
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `ADDRESS=NAME`.
    fn from_str(s: &str) -> Result<Target, String> {
        let (a, n) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS=NAME"))?;
        let address = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        if n.is_empty() || n.len() > ANSWER_MAX || n.contains(char::is_whitespace) {
            return Err(format!(
                "{n:?} is not a name (1-{ANSWER_MAX} characters, no spaces)"
            ));
        }
        Ok(Target {
            address,
            name: n.to_string(),
        })
    }
}

/// What one try found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The destination answered with its name (or, for ICMP, echoed).
    Reached,
    /// Nothing came back within the timeout.
    Blocked,
    /// Something else: refused, answered by another name, a local error.
    Error(String),
}

/// One line of the client's report: `NAME<TAB>ok`, `NAME<TAB>blocked`, `NAME<TAB>error<TAB>why`.
pub fn report_line(target: &Target, reply: &Reply) -> String {
    match reply {
        Reply::Reached => format!("{}\tok", target.name),
        Reply::Blocked => format!("{}\tblocked", target.name),
        Reply::Error(why) => format!("{}\terror\t{}", target.name, why.replace(['\t', '\n'], " ")),
    }
}

/// Reads a report line back.
pub fn parse_report_line(line: &str) -> Option<(String, Reply)> {
    let mut f = line.splitn(3, '\t');
    let name = f.next()?.to_string();
    let reply = match (f.next()?, f.next()) {
        ("ok", None) => Reply::Reached,
        ("blocked", None) => Reply::Blocked,
        ("error", why) => Reply::Error(why.unwrap_or("").to_string()),
        _ => return None,
    };
    Some((name, reply))
}

/// A socket bound to `port` on `at`, or on every address: IPv6 and IPv4 when this namespace
/// has IPv6, else IPv4 alone.
fn bound(at: Option<IpAddr>, port: u16, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    if let Some(a) = at {
        let s = Socket::new(
            Domain::for_address(SocketAddr::new(a, port)),
            ty,
            Some(proto),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(a, port).into())?;
        return Ok(s);
    }
    let v6 = || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, ty, Some(proto))?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    };
    v6().or_else(|_| {
        let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        Ok(s)
    })
}

/// Serves `name` on the TCP and UDP ports, on every address, until killed. Every socket is
/// bound before `ready` is written, so a lab that waits for that file never probes a port
/// nobody listens on yet.
pub fn serve(name: &str, tcp: &[u16], udp: &[u16], ready: Option<&Path>) -> std::io::Result<()> {
    serve_at(None, name, tcp, udp, ready)
}

/// [`serve`] on one address (`None`: all).
pub fn serve_at(
    at: Option<IpAddr>,
    name: &str,
    tcp: &[u16],
    udp: &[u16],
    ready: Option<&Path>,
) -> std::io::Result<()> {
    let bind_err = |what: &str, port: u16, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} port {port}: {e}"))
    };
    let mut listeners = Vec::new();
    for &p in tcp {
        let s = bound(at, p, Type::STREAM, Protocol::TCP).map_err(|e| bind_err("TCP", p, e))?;
        s.listen(128).map_err(|e| bind_err("TCP", p, e))?;
        listeners.push(TcpListener::from(s));
    }
    let mut sockets = Vec::new();
    for &p in udp {
        let s = bound(at, p, Type::DGRAM, Protocol::UDP).map_err(|e| bind_err("UDP", p, e))?;
        sockets.push(UdpSocket::from(s));
    }
    if let Some(path) = ready {
        std::fs::write(path, "ready\n")?;
    }
    let answer = format!("{name}\n");
    std::thread::scope(|s| {
        for l in &listeners {
            s.spawn(|| serve_tcp(l, answer.as_bytes()));
        }
        for u in &sockets {
            s.spawn(|| serve_udp(u, name.as_bytes()));
        }
    });
    Ok(())
}

fn serve_tcp(l: &TcpListener, answer: &[u8]) {
    for conn in l.incoming() {
        match conn {
            Ok(mut c) => {
                // A client that went away is its own business; the server goes on.
                let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = c.write_all(answer);
            }
            // Out of descriptors, say: wait instead of spinning on the error.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_udp(u: &UdpSocket, answer: &[u8]) {
    let mut buf = [0u8; 512];
    loop {
        match u.recv_from(&mut buf) {
            Ok((_, from)) => {
                let _ = u.send_to(answer, from);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Tries every target (at most [`PARALLEL`] at a time, each within `timeout`); one reply per
/// target, in order.
pub fn connect(
    protocol: ProbeProtocol,
    port: Option<u16>,
    timeout: Duration,
    targets: &[Target],
) -> Vec<Reply> {
    let mut out = Vec::with_capacity(targets.len());
    for (chunk_no, chunk) in targets.chunks(PARALLEL).enumerate() {
        let replies: Vec<Reply> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let seq = (chunk_no * PARALLEL + i) as u16;
                    s.spawn(move || try_one(protocol, port, timeout, t, seq))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Reply::Error("client thread panicked".into()))
                })
                .collect()
        });
        out.extend(replies);
    }
    out
}

fn try_one(
    protocol: ProbeProtocol,
    port: Option<u16>,
    timeout: Duration,
    t: &Target,
    seq: u16,
) -> Reply {
    match (protocol, port) {
        (ProbeProtocol::Tcp, Some(p)) => tcp(SocketAddr::new(t.address, p), timeout, &t.name),
        (ProbeProtocol::Udp, Some(p)) => udp(SocketAddr::new(t.address, p), timeout, &t.name),
        (ProbeProtocol::Icmp, _) => icmp(t.address, timeout, seq),
        (ProbeProtocol::Sctp, _) => Reply::Error("this kernel has no SCTP".into()),
        (_, None) => Reply::Error(format!("a {protocol} probe needs a port")),
    }
}

/// Compares an answer with the name expected.
fn judge(answer: &[u8], want: &str) -> Reply {
    let got = String::from_utf8_lossy(answer);
    if got.trim_end() == want {
        Reply::Reached
    } else {
        Reply::Error(format!("answered by {:?}, not {want}", got.trim_end()))
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

fn tcp(to: SocketAddr, timeout: Duration, want: &str) -> Reply {
    let deadline = Instant::now() + timeout;
    let mut c = match TcpStream::connect_timeout(&to, timeout) {
        Ok(c) => c,
        Err(e) if is_timeout(&e) => return Reply::Blocked,
        Err(e) => return Reply::Error(format!("connect: {e}")),
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    if let Err(e) = c.set_read_timeout(Some(left)) {
        return Reply::Error(e.to_string());
    }
    let mut answer = Vec::new();
    match (&mut c).take(ANSWER_MAX as u64).read_to_end(&mut answer) {
        Ok(_) => judge(&answer, want),
        Err(e) if is_timeout(&e) => Reply::Error("connected, but no answer".into()),
        Err(e) => Reply::Error(format!("read: {e}")),
    }
}

fn udp(to: SocketAddr, timeout: Duration, want: &str) -> Reply {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let run = || -> std::io::Result<Reply> {
        let s = UdpSocket::bind(local)?;
        s.connect(to)?;
        let mut buf = [0u8; ANSWER_MAX];
        // Two datagrams, half the time each: one lost datagram is not a blocked path.
        for _ in 0..2 {
            s.send(b"probe\n")?;
            s.set_read_timeout(Some((timeout / 2).max(Duration::from_millis(10))))?;
            match s.recv(&mut buf) {
                Ok(n) => return Ok(judge(&buf[..n], want)),
                Err(e) if is_timeout(&e) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Ok(Reply::Error("refused (port unreachable)".into()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Reply::Blocked)
    };
    run().unwrap_or_else(|e| Reply::Error(e.to_string()))
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: type 8 (ICMP) or 128 (ICMPv6), code 0, identifier, sequence, payload.
/// ICMPv6's checksum covers a pseudo-header the kernel fills in for raw ICMPv6 sockets.
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"trellis-lab-probe");
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Whether `packet` (after any IPv4 header) is the echo reply to (id, seq).
fn is_echo_reply(v6: bool, packet: &[u8], id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        packet
    } else {
        let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
        packet.get(ihl..).unwrap_or_default()
    };
    icmp.len() >= 8
        && icmp[0] == if v6 { 129 } else { 0 }
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

fn icmp(to: IpAddr, timeout: Duration, seq: u16) -> Reply {
    let v6 = to.is_ipv6();
    let id = (std::process::id() as u16).wrapping_add(seq);
    let run = || -> std::io::Result<Reply> {
        let (domain, proto) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let s = Socket::new(domain, Type::RAW, Some(proto))?;
        // A connected raw socket receives only what comes from that address.
        let addr: SockAddr = SocketAddr::new(to, 0).into();
        s.connect(&addr)?;
        s.send(&echo_request(v6, id, seq))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        let mut r = &s;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Reply::Blocked);
            }
            s.set_read_timeout(Some(left))?;
            match r.read(&mut buf) {
                Ok(n) if is_echo_reply(v6, &buf[..n], id, seq) => return Ok(Reply::Reached),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Ok(Reply::Blocked),
                Err(e) => return Err(e),
            }
        }
    };
    run().unwrap_or_else(|e| Reply::Error(format!("ICMP: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_report_lines_round_trip() {
        let t: Target = "10.0.0.5=x/a".parse().unwrap();
        assert_eq!(t.name, "x/a");
        assert!("10.0.0.5".parse::<Target>().is_err());
        assert!("nope=x/a".parse::<Target>().is_err());
        assert!("10.0.0.5=a b".parse::<Target>().is_err());
        for r in [
            Reply::Reached,
            Reply::Blocked,
            Reply::Error("answered by \"y/a\"\tnot x/a".into()),
        ] {
            let line = report_line(&t, &r);
            let (name, back) = parse_report_line(&line).unwrap();
            assert_eq!(name, "x/a");
            match (&r, back) {
                (Reply::Error(_), Reply::Error(w)) => assert!(!w.contains('\t')),
                (r, b) => assert_eq!(*r, b),
            }
        }
        assert_eq!(parse_report_line("x/a\tmaybe"), None);
    }

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_are_matched() {
        let p = echo_request(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        let mut reply = vec![0x45u8; 20];
        reply.extend_from_slice(&p);
        reply[20] = 0;
        assert!(is_echo_reply(false, &reply, 0x1234, 7));
        assert!(!is_echo_reply(false, &reply, 0x1234, 8));
        assert!(!is_echo_reply(false, &reply[..24], 0x1234, 7));
        let mut v6 = echo_request(true, 1, 2);
        v6[0] = 129;
        assert!(is_echo_reply(true, &v6, 1, 2));
    }

    /// A server and the client on loopback: the right name is reached, another name is an
    /// error (a wrong route), a closed port is refused, and ICMP echoes.
    #[test]
    fn the_client_tells_the_right_pod_from_a_wrong_one() {
        let free = |ty| {
            let s = Socket::new(Domain::IPV4, ty, None).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
                .unwrap();
            s.local_addr().unwrap().as_socket().unwrap().port()
        };
        let (tp, up, closed_port) = (free(Type::STREAM), free(Type::DGRAM), free(Type::STREAM));
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let r = ready.clone();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        std::thread::spawn(move || serve_at(Some(lo), "x/a", &[tp], &[up], Some(&r)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the server did not get ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = |name: &str| Target {
            address: lo,
            name: name.into(),
        };
        let second = Duration::from_secs(1);
        for (proto, port) in [(ProbeProtocol::Tcp, tp), (ProbeProtocol::Udp, up)] {
            let got = connect(proto, Some(port), second, &[t("x/a"), t("y/a")]);
            assert_eq!(got[0], Reply::Reached, "{proto}");
            assert!(
                matches!(&got[1], Reply::Error(e) if e.contains("answered by \"x/a\"")),
                "{proto}: {got:?}"
            );
        }
        let closed = connect(ProbeProtocol::Tcp, Some(closed_port), second, &[t("x/a")]);
        assert!(matches!(&closed[0], Reply::Error(_)), "{closed:?}");
        assert_eq!(
            connect(ProbeProtocol::Icmp, None, second, &[t("x/a")]),
            [Reply::Reached]
        );
    }
}
