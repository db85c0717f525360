//! Path attributes (RFC 4271 §4.3, §5; RFC 1997 communities; RFC 4456 ORIGINATOR_ID and
//! CLUSTER_LIST; RFC 4760 MP_REACH/MP_UNREACH; RFC 6793 AS4_PATH) and their decoding under the
//! revised error handling of RFC 7606: each fault is classified as attribute-discard,
//! treat-as-withdraw or session reset. Pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::error::{code, subcode, DecodeError};
use crate::nlri::{decode_prefixes, encode_prefix, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};

/// Attribute type codes.
pub mod attr {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH: u8 = 14;
    pub const MP_UNREACH: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
}

const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const PARTIAL: u8 = 0x20;
const EXTENDED: u8 = 0x10;
/// The 2-octet stand-in for a 4-octet AS (RFC 6793).
pub const AS_TRANS: u32 = 23456;

/// ORIGIN values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

/// AS_PATH segment types (RFC 4271 §4.3, RFC 5065 for confederations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    Set = 1,
    Sequence = 2,
    ConfedSequence = 3,
    ConfedSet = 4,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AsSegment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

/// An AS_PATH.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AsPath(pub Vec<AsSegment>);

impl AsPath {
    /// Path length for the decision process (RFC 4271 §9.1.2.2 a: a set counts as one,
    /// confederation segments not at all).
    pub fn decision_len(&self) -> usize {
        self.0
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
                _ => 0,
            })
            .sum()
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.0.iter().any(|s| s.asns.contains(&asn))
    }

    /// How many times `asn` appears (in any segment).
    pub fn count(&self, asn: u32) -> usize {
        self.0
            .iter()
            .map(|s| s.asns.iter().filter(|a| **a == asn).count())
            .sum()
    }

    /// The neighbouring AS (first of the leading sequence).
    pub fn first_as(&self) -> Option<u32> {
        self.0
            .first()
            .filter(|s| s.kind == SegmentKind::Sequence)
            .and_then(|s| s.asns.first().copied())
    }

    /// Prepends `asn` (eBGP export, RFC 4271 §5.1.2).
    pub fn prepend(&self, asn: u32) -> AsPath {
        let mut segs = self.0.clone();
        match segs.first_mut() {
            Some(s) if s.kind == SegmentKind::Sequence && s.asns.len() < 255 => {
                s.asns.insert(0, asn)
            }
            _ => segs.insert(
                0,
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn],
                },
            ),
        }
        AsPath(segs)
    }

    fn asn_count(&self) -> usize {
        self.0.iter().map(|s| s.asns.len()).sum()
    }
}

/// An optional attribute Trellis does not interpret, passed on when transitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttr {
    pub flags: u8,
    pub code: u8,
    pub data: Vec<u8>,
}

/// The attributes of a path. `layout` remembers the order and flags seen on the wire so a
/// decoded message re-encodes byte for byte; built paths leave it empty (canonical order).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathAttrs {
    pub origin: Origin,
    pub as_path: AsPath,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<(u32, Ipv4Addr)>,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub other: Vec<RawAttr>,
    pub layout: Layout,
}

/// Wire order and flags of decoded attributes: an encoding hint only, so it takes no part in
/// comparing or hashing paths.
#[derive(Debug, Clone, Default)]
pub struct Layout(pub Vec<(u8, u8)>);

impl PartialEq for Layout {
    fn eq(&self, _: &Layout) -> bool {
        true
    }
}

impl Eq for Layout {}

impl std::hash::Hash for Layout {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl Default for PathAttrs {
    fn default() -> Self {
        PathAttrs {
            origin: Origin::Igp,
            as_path: AsPath::default(),
            next_hop: None,
            med: None,
            local_pref: None,
            atomic_aggregate: false,
            aggregator: None,
            communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
            other: Vec::new(),
            layout: Layout::default(),
        }
    }
}

/// MP_REACH_NLRI (RFC 4760 §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MpReach {
    pub afi: u16,
    pub safi: u8,
    /// Next hop bytes as sent (IPv6 may carry a global and a link-local address).
    pub next_hop: Vec<u8>,
    pub nlri: Vec<IpNet>,
}

impl MpReach {
    /// The (first, global) next hop address.
    pub fn next_hop_addr(&self) -> Option<IpAddr> {
        match self.next_hop.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::new(
                self.next_hop[0],
                self.next_hop[1],
                self.next_hop[2],
                self.next_hop[3],
            ))),
            16 | 32 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&self.next_hop[..16]);
                Some(IpAddr::V6(Ipv6Addr::from(a)))
            }
            _ => None,
        }
    }
}

/// MP_UNREACH_NLRI (RFC 4760 §4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MpUnreach {
    pub afi: u16,
    pub safi: u8,
    pub withdrawn: Vec<IpNet>,
}

/// What the peer session tells the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// Both sides advertised 4-octet AS support (RFC 6793).
    pub four_octet_as: bool,
    /// The peer is in our AS (some attributes are discarded from external peers).
    pub ibgp: bool,
}

/// The attribute section of an UPDATE after RFC 7606 processing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodedAttrs {
    pub attrs: PathAttrs,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// Set when the UPDATE must be treated as withdrawing its NLRI (RFC 7606 §2).
    pub treat_as_withdraw: Option<String>,
    /// Attributes dropped under attribute-discard (RFC 7606 §2), for logging.
    pub discarded: Vec<String>,
    /// Which well-known mandatory attributes were present.
    pub(crate) seen: u32,
}

fn expected_flags(c: u8) -> Option<u8> {
    Some(match c {
        attr::ORIGIN
        | attr::AS_PATH
        | attr::NEXT_HOP
        | attr::LOCAL_PREF
        | attr::ATOMIC_AGGREGATE => TRANSITIVE,
        attr::MED
        | attr::ORIGINATOR_ID
        | attr::CLUSTER_LIST
        | attr::MP_REACH
        | attr::MP_UNREACH => OPTIONAL,
        attr::AGGREGATOR | attr::COMMUNITIES | attr::AS4_PATH | attr::AS4_AGGREGATOR => {
            OPTIONAL | TRANSITIVE
        }
        _ => return None,
    })
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn ipv4_at(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn attr_bytes(flags: u8, c: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![flags, c];
    if flags & EXTENDED != 0 {
        v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    } else {
        v.push(data.len() as u8);
    }
    v.extend_from_slice(data);
    v
}

fn parse_as_path(d: &[u8], four: bool) -> Result<AsPath, String> {
    let w = if four { 4 } else { 2 };
    let mut segs = Vec::new();
    let mut b = d;
    while !b.is_empty() {
        if b.len() < 2 {
            return Err("truncated segment header".into());
        }
        let kind = match b[0] {
            1 => SegmentKind::Set,
            2 => SegmentKind::Sequence,
            3 => SegmentKind::ConfedSequence,
            4 => SegmentKind::ConfedSet,
            t => return Err(format!("segment type {t}")),
        };
        let n = b[1] as usize;
        if n == 0 {
            return Err("empty segment".into());
        }
        if b.len() < 2 + n * w {
            return Err(format!("segment of {n} ASes overruns the attribute"));
        }
        let asns = b[2..2 + n * w]
            .chunks(w)
            .map(|c| {
                if four {
                    u32_at(c)
                } else {
                    u16::from_be_bytes([c[0], c[1]]) as u32
                }
            })
            .collect();
        segs.push(AsSegment { kind, asns });
        b = &b[2 + n * w..];
    }
    Ok(AsPath(segs))
}

fn encode_as_path(p: &AsPath, four: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for s in &p.0 {
        v.push(s.kind as u8);
        v.push(s.asns.len() as u8);
        for a in &s.asns {
            if four {
                v.extend_from_slice(&a.to_be_bytes());
            } else {
                let a2 = if *a > 0xffff { AS_TRANS } else { *a } as u16;
                v.extend_from_slice(&a2.to_be_bytes());
            }
        }
    }
    v
}

/// RFC 6793 §4.2.3: rebuild the 4-octet path from AS_PATH and AS4_PATH.
fn merge_as4(path: AsPath, as4: AsPath) -> AsPath {
    let (n, n4) = (path.asn_count(), as4.asn_count());
    if n < n4 {
        return path;
    }
    let mut keep = n - n4;
    let mut segs = Vec::new();
    for s in path.0 {
        if keep == 0 {
            break;
        }
        let take = s.asns.len().min(keep);
        keep -= take;
        segs.push(AsSegment {
            kind: s.kind,
            asns: s.asns[..take].to_vec(),
        });
    }
    segs.extend(as4.0);
    AsPath(segs)
}

fn mp_reach(d: &[u8]) -> Result<MpReach, String> {
    if d.len() < 5 {
        return Err("shorter than its fixed part".into());
    }
    let afi = u16::from_be_bytes([d[0], d[1]]);
    let safi = d[2];
    let nhl = d[3] as usize;
    if d.len() < 4 + nhl + 1 {
        return Err(format!("next hop length {nhl} overruns the attribute"));
    }
    let next_hop = d[4..4 + nhl].to_vec();
    let ok_len = match afi {
        AFI_IPV4 => nhl == 4,
        AFI_IPV6 => nhl == 16 || nhl == 32,
        _ => true,
    };
    if !ok_len {
        return Err(format!("next hop length {nhl} for AFI {afi}"));
    }
    // d[4 + nhl] is the reserved octet (RFC 4760 §3: ignored on receipt).
    let nlri = if safi == SAFI_UNICAST && (afi == AFI_IPV4 || afi == AFI_IPV6) {
        decode_prefixes(afi, &d[5 + nhl..])?
    } else {
        Vec::new()
    };
    Ok(MpReach {
        afi,
        safi,
        next_hop,
        nlri,
    })
}

fn mp_unreach(d: &[u8]) -> Result<MpUnreach, String> {
    if d.len() < 3 {
        return Err("shorter than its fixed part".into());
    }
    let afi = u16::from_be_bytes([d[0], d[1]]);
    let safi = d[2];
    let withdrawn = if safi == SAFI_UNICAST && (afi == AFI_IPV4 || afi == AFI_IPV6) {
        decode_prefixes(afi, &d[3..])?
    } else {
        Vec::new()
    };
    Ok(MpUnreach {
        afi,
        safi,
        withdrawn,
    })
}

/// How one attribute fault is handled (RFC 7606 §2).
enum Fault {
    Discard(String),
    Withdraw(String),
    Reset(DecodeError),
}

fn bit(c: u8) -> u32 {
    1u32 << (c as u32 & 31)
}

/// Decodes the path attribute section of an UPDATE. `Err` means session reset with the
/// NOTIFICATION it carries; everything else is in [`DecodedAttrs`].
pub fn decode(mut b: &[u8], ctx: Context) -> Result<DecodedAttrs, DecodeError> {
    let mut out = DecodedAttrs::default();
    let mut as4_path: Option<AsPath> = None;
    while !b.is_empty() {
        if b.len() < 3 {
            return overrun(&mut out, "attribute header is truncated");
        }
        let (flags, c) = (b[0], b[1]);
        let (hlen, len) = if flags & EXTENDED != 0 {
            if b.len() < 4 {
                return overrun(&mut out, "attribute header is truncated");
            }
            (4, u16::from_be_bytes([b[2], b[3]]) as usize)
        } else {
            (3, b[2] as usize)
        };
        if b.len() < hlen + len {
            return overrun(
                &mut out,
                &format!("attribute {c} of length {len} overruns the attribute list"),
            );
        }
        let d = &b[hlen..hlen + len];
        let whole = &b[..hlen + len];
        b = &b[hlen + len..];
        if out.seen & bit(c) != 0 && c <= 31 {
            if c == attr::MP_REACH || c == attr::MP_UNREACH {
                return Err(DecodeError::fatal(
                    code::UPDATE,
                    subcode::MALFORMED_ATTRIBUTE_LIST,
                    vec![],
                    format!("attribute {c} appears twice"),
                ));
            }
            out.discarded.push(format!("duplicate attribute {c}"));
            continue; // RFC 7606 §3 g: all but the first are discarded
        }
        if c <= 31 {
            out.seen |= bit(c);
        }
        out.attrs.layout.0.push((c, flags));
        match one(&mut out, flags, c, d, whole, ctx, &mut as4_path) {
            Ok(()) => {}
            Err(Fault::Discard(why)) => out.discarded.push(why),
            Err(Fault::Withdraw(why)) => {
                out.treat_as_withdraw.get_or_insert(why);
            }
            Err(Fault::Reset(e)) => return Err(e),
        }
    }
    if let Some(p4) = as4_path {
        if !ctx.four_octet_as {
            let p = std::mem::take(&mut out.attrs.as_path);
            out.attrs.as_path = merge_as4(p, p4);
        }
    }
    Ok(out)
}

/// RFC 7606 §4: an overrunning attribute means the rest cannot be found; if an MP attribute
/// might be hidden there the session must be reset, otherwise treat-as-withdraw.
fn overrun(out: &mut DecodedAttrs, why: &str) -> Result<DecodedAttrs, DecodeError> {
    if out.mp_reach.is_some() || out.mp_unreach.is_some() {
        out.treat_as_withdraw.get_or_insert(why.to_string());
        return Ok(std::mem::take(out));
    }
    Err(DecodeError::fatal(
        code::UPDATE,
        subcode::MALFORMED_ATTRIBUTE_LIST,
        vec![],
        why,
    ))
}

fn one(
    out: &mut DecodedAttrs,
    flags: u8,
    c: u8,
    d: &[u8],
    whole: &[u8],
    ctx: Context,
    as4_path: &mut Option<AsPath>,
) -> Result<(), Fault> {
    let Some(want) = expected_flags(c) else {
        if flags & OPTIONAL == 0 {
            return Err(Fault::Reset(DecodeError::fatal(
                code::UPDATE,
                subcode::UNRECOGNIZED_WELL_KNOWN,
                whole.to_vec(),
                format!("unrecognized well-known attribute {c}"),
            )));
        }
        if flags & TRANSITIVE != 0 {
            out.attrs.other.push(RawAttr {
                flags: flags | PARTIAL,
                code: c,
                data: d.to_vec(),
            });
        }
        return Ok(());
    };
    let withdraw = |why: String| Err(Fault::Withdraw(why));
    let reset_mp = |why: String| {
        Err(Fault::Reset(DecodeError::fatal(
            code::UPDATE,
            subcode::OPTIONAL_ATTRIBUTE_ERROR,
            whole.to_vec(),
            why,
        )))
    };
    if flags & (OPTIONAL | TRANSITIVE) != want {
        let why = format!("attribute {c} has flags {flags:#04x}");
        return match c {
            attr::MP_REACH | attr::MP_UNREACH => reset_mp(why),
            attr::ATOMIC_AGGREGATE | attr::AGGREGATOR | attr::AS4_AGGREGATOR | attr::AS4_PATH => {
                Err(Fault::Discard(why))
            }
            _ => withdraw(why),
        };
    }
    let a = &mut out.attrs;
    match c {
        attr::ORIGIN => match d {
            [0] => a.origin = Origin::Igp,
            [1] => a.origin = Origin::Egp,
            [2] => a.origin = Origin::Incomplete,
            _ => return withdraw(format!("ORIGIN {d:?} is invalid")),
        },
        attr::AS_PATH => match parse_as_path(d, ctx.four_octet_as) {
            Ok(p) => a.as_path = p,
            Err(e) => return withdraw(format!("malformed AS_PATH: {e}")),
        },
        attr::NEXT_HOP => {
            if d.len() != 4 {
                return withdraw(format!("NEXT_HOP has length {}", d.len()));
            }
            let nh = ipv4_at(d);
            if nh.is_unspecified() || nh.is_multicast() || nh.is_broadcast() {
                return withdraw(format!("NEXT_HOP {nh} is not a unicast address"));
            }
            a.next_hop = Some(nh);
        }
        attr::MED => {
            if d.len() != 4 {
                return withdraw(format!("MULTI_EXIT_DISC has length {}", d.len()));
            }
            a.med = Some(u32_at(d));
        }
        attr::LOCAL_PREF => {
            if !ctx.ibgp {
                return Err(Fault::Discard("LOCAL_PREF from an external peer".into()));
            }
            if d.len() != 4 {
                return withdraw(format!("LOCAL_PREF has length {}", d.len()));
            }
            a.local_pref = Some(u32_at(d));
        }
        attr::ATOMIC_AGGREGATE => {
            if !d.is_empty() {
                return Err(Fault::Discard(format!(
                    "ATOMIC_AGGREGATE has length {}",
                    d.len()
                )));
            }
            a.atomic_aggregate = true;
        }
        attr::AGGREGATOR => {
            let w = if ctx.four_octet_as { 8 } else { 6 };
            if d.len() != w {
                return Err(Fault::Discard(format!("AGGREGATOR has length {}", d.len())));
            }
            let asn = if w == 8 {
                u32_at(d)
            } else {
                u16::from_be_bytes([d[0], d[1]]) as u32
            };
            a.aggregator = Some((asn, ipv4_at(&d[w - 4..])));
        }
        attr::COMMUNITIES => {
            if d.is_empty() || !d.len().is_multiple_of(4) {
                return withdraw(format!("COMMUNITIES has length {}", d.len()));
            }
            a.communities = d.chunks(4).map(u32_at).collect();
        }
        attr::ORIGINATOR_ID | attr::CLUSTER_LIST if !ctx.ibgp => {
            return Err(Fault::Discard(format!(
                "attribute {c} from an external peer"
            )));
        }
        attr::ORIGINATOR_ID => {
            if d.len() != 4 {
                return withdraw(format!("ORIGINATOR_ID has length {}", d.len()));
            }
            a.originator_id = Some(ipv4_at(d));
        }
        attr::CLUSTER_LIST => {
            if d.is_empty() || !d.len().is_multiple_of(4) {
                return withdraw(format!("CLUSTER_LIST has length {}", d.len()));
            }
            a.cluster_list = d.chunks(4).map(ipv4_at).collect();
        }
        attr::MP_REACH => match mp_reach(d) {
            Ok(m) => out.mp_reach = Some(m),
            Err(e) => return reset_mp(format!("malformed MP_REACH_NLRI: {e}")),
        },
        attr::MP_UNREACH => match mp_unreach(d) {
            Ok(m) => out.mp_unreach = Some(m),
            Err(e) => return reset_mp(format!("malformed MP_UNREACH_NLRI: {e}")),
        },
        attr::AS4_PATH => {
            if ctx.four_octet_as {
                // RFC 6793 §4.1: a NEW speaker ignores AS4_PATH from a NEW speaker.
                return Err(Fault::Discard("AS4_PATH on a 4-octet session".into()));
            }
            match parse_as_path(d, true) {
                Ok(p) => *as4_path = Some(p),
                Err(e) => return Err(Fault::Discard(format!("malformed AS4_PATH: {e}"))),
            }
        }
        attr::AS4_AGGREGATOR => {
            if d.len() != 8 {
                return Err(Fault::Discard(format!(
                    "AS4_AGGREGATOR has length {}",
                    d.len()
                )));
            }
            if !ctx.four_octet_as {
                a.aggregator = Some((u32_at(d), ipv4_at(&d[4..])));
            }
        }
        _ => unreachable!("expected_flags covers exactly these codes"),
    }
    Ok(())
}

/// The flags Trellis uses when it builds an attribute itself.
fn canonical_flags(c: u8, len: usize) -> u8 {
    let f = expected_flags(c).unwrap_or(OPTIONAL | TRANSITIVE);
    if len > 255 {
        f | EXTENDED
    } else {
        f
    }
}

/// Encodes the attribute section: the attributes, plus MP_REACH/MP_UNREACH when given.
pub fn encode(
    a: &PathAttrs,
    reach: Option<&MpReach>,
    unreach: Option<&MpUnreach>,
    ctx: Context,
) -> Vec<u8> {
    let mut bodies: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut push = |c: u8, d: Vec<u8>| bodies.push((c, d));
    if let Some(u) = unreach {
        let mut d = u.afi.to_be_bytes().to_vec();
        d.push(u.safi);
        for p in &u.withdrawn {
            encode_prefix(p, &mut d);
        }
        push(attr::MP_UNREACH, d);
    }
    let has_path = reach.is_some()
        || a.next_hop.is_some()
        || !a.as_path.0.is_empty()
        || a.layout
            .0
            .iter()
            .any(|(c, _)| *c == attr::ORIGIN || *c == attr::AS_PATH);
    if has_path {
        push(attr::ORIGIN, vec![a.origin as u8]);
        push(attr::AS_PATH, encode_as_path(&a.as_path, ctx.four_octet_as));
        if !ctx.four_octet_as
            && a.as_path
                .0
                .iter()
                .any(|s| s.asns.iter().any(|x| *x > 0xffff))
        {
            push(attr::AS4_PATH, encode_as_path(&a.as_path, true));
        }
    }
    if let Some(nh) = a.next_hop {
        push(attr::NEXT_HOP, nh.octets().to_vec());
    }
    if let Some(m) = a.med {
        push(attr::MED, m.to_be_bytes().to_vec());
    }
    if let Some(l) = a.local_pref {
        push(attr::LOCAL_PREF, l.to_be_bytes().to_vec());
    }
    if a.atomic_aggregate {
        push(attr::ATOMIC_AGGREGATE, vec![]);
    }
    if let Some((asn, id)) = a.aggregator {
        let mut d = Vec::new();
        if ctx.four_octet_as {
            d.extend_from_slice(&asn.to_be_bytes());
        } else {
            d.extend_from_slice(
                &((if asn > 0xffff { AS_TRANS } else { asn }) as u16).to_be_bytes(),
            );
        }
        d.extend_from_slice(&id.octets());
        push(attr::AGGREGATOR, d);
    }
    if !a.communities.is_empty() {
        push(
            attr::COMMUNITIES,
            a.communities.iter().flat_map(|c| c.to_be_bytes()).collect(),
        );
    }
    if let Some(o) = a.originator_id {
        push(attr::ORIGINATOR_ID, o.octets().to_vec());
    }
    if !a.cluster_list.is_empty() {
        push(
            attr::CLUSTER_LIST,
            a.cluster_list.iter().flat_map(|c| c.octets()).collect(),
        );
    }
    if let Some(r) = reach {
        let mut d = r.afi.to_be_bytes().to_vec();
        d.push(r.safi);
        d.push(r.next_hop.len() as u8);
        d.extend_from_slice(&r.next_hop);
        d.push(0);
        for p in &r.nlri {
            encode_prefix(p, &mut d);
        }
        push(attr::MP_REACH, d);
    }
    let mut out = Vec::new();
    // Wire order and flags as decoded, when known; then whatever the layout did not name.
    for (c, flags) in &a.layout.0 {
        if let Some(i) = bodies.iter().position(|(bc, _)| bc == c) {
            let (_, d) = bodies.remove(i);
            let f = if d.len() > 255 {
                flags | EXTENDED
            } else {
                *flags
            };
            out.extend(attr_bytes(f, *c, &d));
        } else if let Some(r) = a.other.iter().find(|r| r.code == *c) {
            out.extend(attr_bytes(*flags, r.code, &r.data));
        }
    }
    bodies.sort_by_key(|(c, _)| *c);
    for (c, d) in bodies {
        out.extend(attr_bytes(canonical_flags(c, d.len()), c, &d));
    }
    for r in &a.other {
        if !a.layout.0.iter().any(|(c, _)| *c == r.code) {
            let f = if r.data.len() > 255 {
                r.flags | EXTENDED
            } else {
                r.flags & !EXTENDED
            };
            out.extend(attr_bytes(f, r.code, &r.data));
        }
    }
    out
}
