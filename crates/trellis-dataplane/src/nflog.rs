//! NFLOG receiver: the packets nftables rules send to a log group (`log group N`), read from an
//! `nfnetlink_log` socket bound to that group (linux `net/netfilter/nfnetlink_log.c`,
//! `include/uapi/linux/netfilter/nfnetlink_log.h`). The kernel queues the copies and sends them
//! in batches (queue threshold, flush timeout), so the packet path only copies a header's worth
//! of bytes; a reader that falls behind loses copies (ENOBUFS), never packets. Parsing is pure;
//! [`NflogSocket`] does I/O in the network namespace of the thread that opens it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::nfnl::NLMSG_ERROR;
use crate::nfnl::{attributes, error_code, message, messages, put_attr, set_recv_timeout};
use crate::{DataplaneError, Result};

// From <linux/netfilter/nfnetlink.h> and <linux/netfilter/nfnetlink_log.h>.
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_NLBUFSIZ: u16 = 3;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Bytes of each packet the socket takes at most (the instance's copy range; a rule's own
/// `snaplen` can only lower it): an IPv6 header with a few extension headers and the ports.
const COPY_RANGE: u32 = 128;
/// How many copies the kernel gathers before sending (or [`FLUSH`] passes).
const QUEUE_THRESHOLD: u32 = 64;
/// The kernel's flush timeout for a partly filled batch (it counts hundredths of a second).
const FLUSH: Duration = Duration::from_millis(100);
/// The receive buffer asked for: bursts of new connections queue here while the reader works.
const RECV_BUFFER: usize = 4 << 20;

/// One logged packet: the rule's prefix and the packet's addresses, protocol and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPacket {
    pub prefix: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct Batch {
    pub packets: Vec<LoggedPacket>,
    /// Messages that did not parse (counted, skipped).
    pub malformed: usize,
    /// The kernel dropped copies because the socket's buffer was full.
    pub overrun: bool,
}

/// An `nfnetlink_log` socket bound to one group in the calling thread's network namespace.
/// Only one socket per namespace can hold a group: a second bind fails with EBUSY.
pub struct NflogSocket {
    sock: Socket,
    group: u16,
    buf: Vec<u8>,
}

fn nl_err(op: &str, source: std::io::Error) -> DataplaneError {
    DataplaneError::Netlink {
        op: op.to_string(),
        source,
    }
}

impl NflogSocket {
    /// Binds `group`, copying at most 128 bytes of each packet; reads wait at most `poll`.
    pub fn open(group: u16, poll: Duration) -> Result<NflogSocket> {
        let op = format!("bind NFLOG group {group}");
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| nl_err(&op, e))?;
        sock.bind_auto().map_err(|e| nl_err(&op, e))?;
        set_recv_timeout(&sock, Duration::from_secs(5)).map_err(|e| nl_err(&op, e))?;
        // Best effort: a smaller buffer only means copies lost in a burst (reported).
        let _ = sock.set_rx_buf_sz(RECV_BUFFER);
        let mut s = NflogSocket {
            sock,
            group,
            buf: vec![0u8; 256 * 1024],
        };
        s.configure(&op)?;
        set_recv_timeout(&s.sock, poll).map_err(|e| nl_err(&op, e))?;
        Ok(s)
    }

    /// Binds the group and sets copy mode, batching and buffer size, each acknowledged.
    fn configure(&mut self, op: &str) -> Result<()> {
        let be32 = |v: u32| v.to_be_bytes().to_vec();
        let mut mode = be32(COPY_RANGE);
        mode.extend([NFULNL_COPY_PACKET, 0]);
        let steps: [(u16, Vec<u8>); 5] = [
            (NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
            (NFULA_CFG_MODE, mode),
            (NFULA_CFG_QTHRESH, be32(QUEUE_THRESHOLD)),
            (NFULA_CFG_TIMEOUT, be32((FLUSH.as_millis() / 10) as u32)),
            (NFULA_CFG_NLBUFSIZ, be32(64 * 1024)),
        ];
        for (seq, (attr, payload)) in steps.into_iter().enumerate() {
            let mut attrs = Vec::new();
            put_attr(&mut attrs, attr, &payload);
            let seq = seq as u32 + 1;
            let kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
            let m = message(kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0, self.group, &attrs);
            self.sock
                .send_to(&m, &SocketAddr::new(0, 0), 0)
                .map_err(|e| nl_err(op, e))?;
            self.wait_ack(op, seq)?;
        }
        Ok(())
    }

    fn wait_ack(&mut self, op: &str, seq: u32) -> Result<()> {
        for _ in 0..64 {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| nl_err(op, e))?;
            let msgs = messages(&self.buf[..n]).map_err(|reason| DataplaneError::Decode {
                op: op.into(),
                reason,
            })?;
            for (kind, s, body) in msgs {
                if kind == NLMSG_ERROR && s == seq {
                    return match error_code(body) {
                        Some(0) => Ok(()),
                        Some(code) => Err(nl_err(op, std::io::Error::from_raw_os_error(-code))),
                        None => Err(DataplaneError::Decode {
                            op: op.into(),
                            reason: "a short error message".into(),
                        }),
                    };
                }
            }
        }
        Err(DataplaneError::Decode {
            op: op.into(),
            reason: "no acknowledgement".into(),
        })
    }

    /// Reads one datagram (waiting at most the `poll` given to [`NflogSocket::open`]): an empty
    /// batch when nothing came.
    pub fn read(&mut self) -> Result<Batch> {
        let op = "read NFLOG";
        match self.sock.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => Ok(parse_datagram(&self.buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(Batch::default())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Batch {
                overrun: true,
                ..Batch::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Batch::default()),
            Err(e) => Err(nl_err(op, e)),
        }
    }
}

/// Every packet message of one datagram (pure); messages that do not parse are counted.
pub fn parse_datagram(buf: &[u8]) -> Batch {
    let mut batch = Batch::default();
    let Ok(msgs) = messages(buf) else {
        batch.malformed += 1;
        return batch;
    };
    let packet = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET;
    for (kind, _, body) in msgs {
        if kind != packet {
            continue;
        }
        match parse_packet(body) {
            Some(p) => batch.packets.push(p),
            None => batch.malformed += 1,
        }
    }
    batch
}

/// One NFULNL_MSG_PACKET body: `nfgenmsg` (the family), then attributes (pure).
fn parse_packet(body: &[u8]) -> Option<LoggedPacket> {
    let family = *body.first()?;
    let attrs = attributes(body.get(4..)?).ok()?;
    let find = |k: u16| attrs.iter().find(|(kind, _)| *kind == k).map(|(_, p)| *p);
    let prefix = find(NFULA_PREFIX).unwrap_or_default();
    let prefix = String::from_utf8_lossy(prefix.split(|b| *b == 0).next().unwrap_or_default());
    let payload = find(NFULA_PAYLOAD)?;
    let mut p = parse_ip(family, payload)?;
    p.prefix = prefix.into_owned();
    Some(p)
}

/// Addresses, protocol and ports of an IP packet's first bytes (pure). IPv6 extension headers
/// are not walked: the protocol is the first next-header value (what Trellis's rules match
/// is `meta l4proto`, which does walk them, so a packet with extension headers is reported
/// with that header's number and no ports).
pub fn parse_ip(family: u8, b: &[u8]) -> Option<LoggedPacket> {
    let (src, dst, protocol, l4) = match family {
        AF_INET if b.len() >= 20 && b[0] >> 4 == 4 => {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let frag_offset = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
            let l4 = if frag_offset == 0 { b.get(ihl..) } else { None };
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]));
            (a(12), a(16), b[9], l4)
        }
        AF_INET6 if b.len() >= 40 && b[0] >> 4 == 6 => {
            let a = |o: usize| {
                let bytes: [u8; 16] = b[o..o + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(bytes))
            };
            (a(8), a(24), b[6], b.get(40..))
        }
        _ => return None,
    };
    let mut p = LoggedPacket {
        prefix: String::new(),
        src,
        dst,
        protocol,
        src_port: None,
        dst_port: None,
        icmp: None,
    };
    let l4 = l4.unwrap_or_default();
    match protocol {
        6 | 17 | 132 | 136 if l4.len() >= 4 => {
            p.src_port = Some(u16::from_be_bytes([l4[0], l4[1]]));
            p.dst_port = Some(u16::from_be_bytes([l4[2], l4[3]]));
        }
        1 | 58 if l4.len() >= 2 => p.icmp = Some((l4[0], l4[1])),
        _ => {}
    }
    Some(p)
}

#[cfg(test)]
mod tests;
