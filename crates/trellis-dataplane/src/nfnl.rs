//! Netfilter netlink framing shared by Trellis's `NETLINK_NETFILTER` clients (nf_tables
//! element batches, NFLOG): attributes, `nfgenmsg` messages, walking a datagram's messages.
//! Pure, except [`set_recv_timeout`].

use std::time::Duration;

use netlink_sys::Socket;

pub(crate) const NLA_F_NESTED: u16 = 0x8000;
pub(crate) const NLMSG_ERROR: u16 = 0x2;

pub(crate) fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

pub(crate) fn nested(kind: u16, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut inner = Vec::new();
    fill(&mut inner);
    let mut buf = Vec::with_capacity(inner.len() + 4);
    put_attr(&mut buf, kind | NLA_F_NESTED, &inner);
    buf
}

pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netlink message: header, `nfgenmsg` (family, version 0, resource id), attributes.
pub(crate) fn message(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

/// One netlink message of a datagram: its type, sequence number and the bytes after its
/// 16-byte header.
pub(crate) type Message<'a> = (u16, u32, &'a [u8]);

/// The netlink messages in one datagram (pure); an error when a length runs past it.
pub(crate) fn messages(buf: &[u8]) -> std::result::Result<Vec<Message<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < 16 || at + len > buf.len() {
            return Err(format!(
                "a reply of {len} bytes at offset {at} of {}",
                buf.len()
            ));
        }
        out.push((kind, word(at + 8), &buf[at + 16..at + len]));
        at += len.next_multiple_of(4);
    }
    Ok(out)
}

/// The error code of an NLMSG_ERROR's body (0: an acknowledgement).
pub(crate) fn error_code(body: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(
        body.get(..4)?.try_into().expect("4 bytes"),
    ))
}

/// A receive timeout on a netlink socket, so a wedged kernel (or no message) cannot hold the
/// caller.
pub(crate) fn set_recv_timeout(sock: &Socket, timeout: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket descriptor and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The attributes of a message's body after its `nfgenmsg` (pure): `(type without the
/// nested/byte-order flags, payload)`; an error when a length runs past the body.
pub(crate) fn attributes(attrs: &[u8]) -> std::result::Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    let mut a = 0;
    while a + 4 <= attrs.len() {
        let alen = u16::from_ne_bytes(attrs[a..a + 2].try_into().expect("2")) as usize;
        let akind = u16::from_ne_bytes(attrs[a + 2..a + 4].try_into().expect("2"));
        if alen < 4 || a + alen > attrs.len() {
            return Err(format!("an attribute of {alen} bytes at offset {a}"));
        }
        out.push((akind & 0x3fff, &attrs[a + 4..a + alen]));
        a += alen.next_multiple_of(4);
    }
    Ok(out)
}
