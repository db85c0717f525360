//! BGP messages on the wire: header, OPEN with capabilities (RFC 5492; multiprotocol RFC 4760,
//! route refresh RFC 2918, graceful restart RFC 4724, 4-octet AS RFC 6793, extended message RFC
//! 8654), UPDATE, NOTIFICATION, KEEPALIVE and ROUTE-REFRESH (RFC 4271 §4). Decoding never
//! panics: every fault becomes the NOTIFICATION RFC 4271 §6 / RFC 7606 prescribe. Pure.

use std::net::Ipv4Addr;

use ipnet::IpNet;

use crate::attrs::{self, Context, MpReach, MpUnreach, PathAttrs};
use crate::error::{code, subcode, DecodeError, EncodeError, Notification};
use crate::nlri::{decode_prefixes, encode_prefix, encoded_len, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};

pub const HEADER_LEN: usize = 19;
/// The largest message without the extended message capability.
pub const MAX_LEN: usize = 4096;
/// The largest message with it (RFC 8654).
pub const MAX_EXTENDED_LEN: usize = 65535;

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;

/// A capability (RFC 5492) in an OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol {
        afi: u16,
        safi: u8,
    },
    RouteRefresh,
    ExtendedMessage,
    GracefulRestart(GracefulRestart),
    FourOctetAs(u32),
    EnhancedRouteRefresh,
    /// Anything else, kept as sent (RFC 5492 §5: unknown capabilities are ignored).
    Unknown {
        code: u8,
        data: Vec<u8>,
    },
}

/// The graceful restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The R bit: the sender has restarted.
    pub restarting: bool,
    /// The remaining three flag bits (N bit of RFC 8538 and reserved), kept as sent.
    pub other_flags: u8,
    /// Seconds the peer should keep our routes after the session drops (12 bits).
    pub restart_time: u16,
    /// (AFI, SAFI, forwarding state preserved).
    pub families: Vec<(u16, u8, bool)>,
    /// The low 7 bits of each family's flags, kept for byte-exact re-encoding.
    pub family_other_flags: Vec<u8>,
}

/// OPEN (RFC 4271 §4.2). Capabilities are grouped as their optional parameters were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The 2-octet "My Autonomous System" field (AS_TRANS when the real AS needs 4).
    pub my_as: u16,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub capability_groups: Vec<Vec<Capability>>,
}

impl Open {
    /// Every capability, whatever parameter carried it.
    pub fn capabilities(&self) -> impl Iterator<Item = &Capability> {
        self.capability_groups.iter().flatten()
    }

    /// The sender's AS: from the 4-octet capability when present (RFC 6793 §4).
    pub fn asn(&self) -> u32 {
        self.capabilities()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(self.my_as as u32)
    }
}

/// UPDATE (RFC 4271 §4.3) after RFC 7606 processing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<IpNet>,
    pub attrs: PathAttrs,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    pub nlri: Vec<IpNet>,
    /// Set when the announcements must be treated as withdrawals (RFC 7606 §2), with why.
    pub treat_as_withdraw: Option<String>,
    /// Attributes discarded (RFC 7606 attribute-discard), with why.
    pub discarded: Vec<String>,
}

impl Update {
    /// The End-of-RIB marker for a family (RFC 4724 §2).
    pub fn end_of_rib(afi: u16) -> Update {
        let mut u = Update::default();
        if afi != AFI_IPV4 {
            u.mp_unreach = Some(MpUnreach {
                afi,
                safi: SAFI_UNICAST,
                withdrawn: vec![],
            });
        }
        u
    }

    /// The family this UPDATE marks End-of-RIB for, if it is such a marker.
    pub fn end_of_rib_afi(&self) -> Option<u16> {
        let bare = self.withdrawn.is_empty() && self.nlri.is_empty() && self.mp_reach.is_none();
        match &self.mp_unreach {
            None if bare && self.attrs == PathAttrs::default() => Some(AFI_IPV4),
            Some(u) if bare && u.withdrawn.is_empty() => Some(u.afi),
            _ => None,
        }
    }

    /// Every prefix announced (NLRI field and MP_REACH), unless treated as withdrawn.
    pub fn announced(&self) -> impl Iterator<Item = &IpNet> {
        let live = self.treat_as_withdraw.is_none();
        self.nlri
            .iter()
            .chain(self.mp_reach.iter().flat_map(|m| m.nlri.iter()))
            .filter(move |_| live)
    }

    /// Every prefix withdrawn, including announcements treated as withdrawals.
    pub fn withdrawals(&self) -> impl Iterator<Item = &IpNet> {
        let twa = self.treat_as_withdraw.is_some();
        self.withdrawn
            .iter()
            .chain(self.mp_unreach.iter().flat_map(|m| m.withdrawn.iter()))
            .chain(
                self.nlri
                    .iter()
                    .chain(self.mp_reach.iter().flat_map(|m| m.nlri.iter()))
                    .filter(move |_| twa),
            )
    }
}

/// ROUTE-REFRESH (RFC 2918 §3; the subtype octet of RFC 7313 is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    pub afi: u16,
    pub subtype: u8,
    pub safi: u8,
}

/// A BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Box<Update>),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

fn header_error(sub: u8, data: Vec<u8>, why: String) -> DecodeError {
    DecodeError::fatal(code::HEADER, sub, data, why)
}

/// Reads one message from the front of `buf`: `Ok(None)` when more bytes are needed, otherwise
/// the message and how many bytes it took.
pub fn decode(
    buf: &[u8],
    ctx: Context,
    max_len: usize,
) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16] != [0xff; 16] {
        return Err(header_error(
            subcode::CONNECTION_NOT_SYNCHRONIZED,
            vec![],
            "marker is not all ones".into(),
        ));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let kind = buf[18];
    let min = match kind {
        OPEN => 29,
        UPDATE => 23,
        NOTIFICATION => 21,
        KEEPALIVE => 19,
        ROUTE_REFRESH => 23,
        _ => {
            return Err(header_error(
                subcode::BAD_MESSAGE_TYPE,
                vec![kind],
                format!("message type {kind}"),
            ))
        }
    };
    let bad_len = len < min
        || len > max_len
        || (kind == KEEPALIVE && len != 19)
        || (kind == ROUTE_REFRESH && len != 23);
    if bad_len {
        return Err(header_error(
            subcode::BAD_MESSAGE_LENGTH,
            (len as u16).to_be_bytes().to_vec(),
            format!("length {len} for message type {kind}"),
        ));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    let msg = match kind {
        OPEN => Message::Open(decode_open(body)?),
        UPDATE => Message::Update(Box::new(decode_update(body, ctx)?)),
        NOTIFICATION => {
            Message::Notification(Notification::new(body[0], body[1], body[2..].to_vec()))
        }
        KEEPALIVE => Message::Keepalive,
        _ => Message::RouteRefresh(RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            subtype: body[2],
            safi: body[3],
        }),
    };
    Ok(Some((msg, len)))
}

fn open_error(sub: u8, why: String) -> DecodeError {
    DecodeError::fatal(code::OPEN, sub, vec![], why)
}

fn decode_open(b: &[u8]) -> Result<Open, DecodeError> {
    let version = b[0];
    let my_as = u16::from_be_bytes([b[1], b[2]]);
    let hold_time = u16::from_be_bytes([b[3], b[4]]);
    let router_id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
    let plen = b[9] as usize;
    if b.len() != 10 + plen {
        return Err(open_error(
            subcode::UNSPECIFIC,
            format!("optional parameters length {plen} does not match the message"),
        ));
    }
    let mut p = &b[10..];
    let mut groups = Vec::new();
    while !p.is_empty() {
        if p.len() < 2 || p.len() < 2 + p[1] as usize {
            return Err(open_error(
                subcode::UNSPECIFIC,
                "optional parameter overruns the OPEN".into(),
            ));
        }
        let (ty, len) = (p[0], p[1] as usize);
        if ty != 2 {
            return Err(DecodeError::fatal(
                code::OPEN,
                subcode::UNSUPPORTED_OPTIONAL_PARAMETER,
                vec![],
                format!("optional parameter type {ty}"),
            ));
        }
        groups.push(decode_capabilities(&p[2..2 + len])?);
        p = &p[2 + len..];
    }
    Ok(Open {
        version,
        my_as,
        hold_time,
        router_id,
        capability_groups: groups,
    })
}

fn decode_capabilities(mut b: &[u8]) -> Result<Vec<Capability>, DecodeError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 2 || b.len() < 2 + b[1] as usize {
            return Err(open_error(
                subcode::UNSPECIFIC,
                "capability overruns its parameter".into(),
            ));
        }
        let (c, d) = (b[0], &b[2..2 + b[1] as usize]);
        b = &b[2 + d.len()..];
        let bad = |what: &str| {
            open_error(
                subcode::UNSPECIFIC,
                format!("capability {c} ({what}) has length {}", d.len()),
            )
        };
        out.push(match c {
            1 if d.len() == 4 => Capability::Multiprotocol {
                afi: u16::from_be_bytes([d[0], d[1]]),
                safi: d[3],
            },
            1 => return Err(bad("multiprotocol")),
            2 if d.is_empty() => Capability::RouteRefresh,
            2 => return Err(bad("route refresh")),
            6 if d.is_empty() => Capability::ExtendedMessage,
            6 => return Err(bad("extended message")),
            64 if d.len() >= 2 && (d.len() - 2) % 4 == 0 => {
                let fams = d[2..].chunks(4);
                Capability::GracefulRestart(GracefulRestart {
                    restarting: d[0] & 0x80 != 0,
                    other_flags: (d[0] >> 4) & 0x7,
                    restart_time: u16::from_be_bytes([d[0] & 0x0f, d[1]]),
                    families: fams
                        .clone()
                        .map(|f| (u16::from_be_bytes([f[0], f[1]]), f[2], f[3] & 0x80 != 0))
                        .collect(),
                    family_other_flags: fams.map(|f| f[3] & 0x7f).collect(),
                })
            }
            64 => return Err(bad("graceful restart")),
            65 if d.len() == 4 => {
                Capability::FourOctetAs(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
            }
            65 => return Err(bad("4-octet AS")),
            70 if d.is_empty() => Capability::EnhancedRouteRefresh,
            _ => Capability::Unknown {
                code: c,
                data: d.to_vec(),
            },
        });
    }
    Ok(out)
}

fn decode_update(b: &[u8], ctx: Context) -> Result<Update, DecodeError> {
    let malformed = |why: String| {
        DecodeError::fatal(code::UPDATE, subcode::MALFORMED_ATTRIBUTE_LIST, vec![], why)
    };
    let wlen = u16::from_be_bytes([b[0], b[1]]) as usize;
    if 2 + wlen + 2 > b.len() {
        return Err(malformed(format!(
            "withdrawn routes length {wlen} overruns the message"
        )));
    }
    let invalid =
        |e: String| DecodeError::fatal(code::UPDATE, subcode::INVALID_NETWORK_FIELD, vec![], e);
    let withdrawn = decode_prefixes(AFI_IPV4, &b[2..2 + wlen]).map_err(invalid)?;
    let alen = u16::from_be_bytes([b[2 + wlen], b[3 + wlen]]) as usize;
    let astart = 4 + wlen;
    if astart + alen > b.len() {
        return Err(malformed(format!(
            "total path attribute length {alen} overruns the message"
        )));
    }
    let nlri = decode_prefixes(AFI_IPV4, &b[astart + alen..]).map_err(invalid)?;
    let d = attrs::decode(&b[astart..astart + alen], ctx)?;
    let mut u = Update {
        withdrawn,
        attrs: d.attrs,
        mp_reach: d.mp_reach,
        mp_unreach: d.mp_unreach,
        nlri,
        treat_as_withdraw: d.treat_as_withdraw,
        discarded: d.discarded,
    };
    // RFC 7606 §3 d: a missing well-known mandatory attribute means treat-as-withdraw.
    let announces = !u.nlri.is_empty() || u.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
    if announces && u.treat_as_withdraw.is_none() {
        let has = |c: u8| d.seen & (1 << c) != 0;
        let missing = if !has(attrs::attr::ORIGIN) {
            Some("ORIGIN")
        } else if !has(attrs::attr::AS_PATH) {
            Some("AS_PATH")
        } else if !u.nlri.is_empty() && !has(attrs::attr::NEXT_HOP) {
            Some("NEXT_HOP")
        } else {
            None
        };
        if let Some(m) = missing {
            u.treat_as_withdraw = Some(format!("missing well-known attribute {m}"));
        }
    }
    Ok(u)
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body.len());
    v.extend_from_slice(&[0xff; 16]);
    v.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    v.push(kind);
    v.extend_from_slice(body);
    v
}

fn encode_capability(c: &Capability, out: &mut Vec<u8>) {
    let (code, data): (u8, Vec<u8>) = match c {
        Capability::Multiprotocol { afi, safi } => {
            let a = afi.to_be_bytes();
            (1, vec![a[0], a[1], 0, *safi])
        }
        Capability::RouteRefresh => (2, vec![]),
        Capability::ExtendedMessage => (6, vec![]),
        Capability::GracefulRestart(g) => {
            let t = g.restart_time.min(0x0fff);
            let mut d = vec![
                (if g.restarting { 0x80 } else { 0 }) | (g.other_flags & 7) << 4 | (t >> 8) as u8,
                t as u8,
            ];
            for (i, (afi, safi, fwd)) in g.families.iter().enumerate() {
                d.extend_from_slice(&afi.to_be_bytes());
                d.push(*safi);
                let low = g.family_other_flags.get(i).copied().unwrap_or(0) & 0x7f;
                d.push(if *fwd { 0x80 } else { 0 } | low);
            }
            (64, d)
        }
        Capability::FourOctetAs(a) => (65, a.to_be_bytes().to_vec()),
        Capability::EnhancedRouteRefresh => (70, vec![]),
        Capability::Unknown { code, data } => (*code, data.clone()),
    };
    out.push(code);
    out.push(data.len() as u8);
    out.extend(data);
}

impl Message {
    /// The message on the wire.
    pub fn encode(&self, ctx: Context) -> Vec<u8> {
        match self {
            Message::Open(o) => {
                let mut b = vec![o.version];
                b.extend_from_slice(&o.my_as.to_be_bytes());
                b.extend_from_slice(&o.hold_time.to_be_bytes());
                b.extend_from_slice(&o.router_id.octets());
                let mut params = Vec::new();
                for g in &o.capability_groups {
                    let mut caps = Vec::new();
                    for c in g {
                        encode_capability(c, &mut caps);
                    }
                    params.push(2);
                    params.push(caps.len() as u8);
                    params.extend(caps);
                }
                b.push(params.len() as u8);
                b.extend(params);
                frame(OPEN, &b)
            }
            Message::Update(u) => frame(UPDATE, &encode_update_body(u, ctx)),
            Message::Notification(n) => {
                let mut b = vec![n.code, n.subcode];
                b.extend_from_slice(&n.data);
                frame(NOTIFICATION, &b)
            }
            Message::Keepalive => frame(KEEPALIVE, &[]),
            Message::RouteRefresh(r) => {
                let a = r.afi.to_be_bytes();
                frame(ROUTE_REFRESH, &[a[0], a[1], r.subtype, r.safi])
            }
        }
    }
}

fn encode_update_body(u: &Update, ctx: Context) -> Vec<u8> {
    let mut w = Vec::new();
    for p in &u.withdrawn {
        encode_prefix(p, &mut w);
    }
    let a = attrs::encode(&u.attrs, u.mp_reach.as_ref(), u.mp_unreach.as_ref(), ctx);
    let mut b = Vec::with_capacity(4 + w.len() + a.len() + u.nlri.len() * 4);
    b.extend_from_slice(&(w.len() as u16).to_be_bytes());
    b.extend(w);
    b.extend_from_slice(&(a.len() as u16).to_be_bytes());
    b.extend(a);
    for p in &u.nlri {
        encode_prefix(p, &mut b);
    }
    b
}

/// UPDATEs announcing `prefixes` (one family) with `attrs`, each within `max_len` bytes; an
/// error when the attributes alone leave no room for a prefix (never a short or oversized
/// message).
/// IPv4 uses the NLRI field and NEXT_HOP; IPv6 uses MP_REACH with `v6_next_hop`.
pub fn pack_announcements(
    attrs: &PathAttrs,
    prefixes: &[IpNet],
    v6_next_hop: Option<&[u8]>,
    ctx: Context,
    max_len: usize,
) -> Result<Vec<Update>, EncodeError> {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
        prefixes.iter().partition(|p| matches!(p, IpNet::V4(_)));
    // Room left for NLRI once the header, the two length fields and the attributes are in;
    // the longest prefix takes 17 bytes, so less than that cannot carry every prefix.
    let room = |attrs_len: usize| {
        max_len
            .checked_sub(HEADER_LEN + 4 + attrs_len)
            .filter(|r| *r >= 17)
            .ok_or(EncodeError::AttributesTooLarge { attrs_len, max_len })
    };
    let mut out = Vec::new();
    if !v4.is_empty() {
        let base = attrs::encode(attrs, None, None, ctx).len();
        for chunk in chunks_within(&v4, room(base)?) {
            out.push(Update {
                attrs: attrs.clone(),
                nlri: chunk,
                ..Default::default()
            });
        }
    }
    if let (Some(nh), false) = (v6_next_hop, v6.is_empty()) {
        let mut a6 = attrs.clone();
        a6.next_hop = None;
        let base6 = attrs::encode(&a6, None, None, ctx).len() + 4 + 5 + nh.len();
        for chunk in chunks_within(&v6, room(base6)?) {
            out.push(Update {
                attrs: a6.clone(),
                mp_reach: Some(MpReach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    next_hop: nh.to_vec(),
                    nlri: chunk,
                }),
                ..Default::default()
            });
        }
    }
    Ok(out)
}

/// UPDATEs withdrawing `prefixes`, each within `max_len` bytes.
pub fn pack_withdrawals(prefixes: &[IpNet], max_len: usize) -> Vec<Update> {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
        prefixes.iter().partition(|p| matches!(p, IpNet::V4(_)));
    let mut out: Vec<Update> = chunks_within(&v4, max_len - HEADER_LEN - 4)
        .into_iter()
        .map(|c| Update {
            withdrawn: c,
            ..Default::default()
        })
        .collect();
    for c in chunks_within(&v6, max_len - HEADER_LEN - 4 - 4 - 3) {
        out.push(Update {
            mp_unreach: Some(MpUnreach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                withdrawn: c,
            }),
            ..Default::default()
        });
    }
    out
}

fn chunks_within(ps: &[IpNet], room: usize) -> Vec<Vec<IpNet>> {
    let mut out = Vec::new();
    let (mut cur, mut used) = (Vec::new(), 0);
    for p in ps {
        let n = encoded_len(p);
        if used + n > room && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(*p);
        used += n;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests;
