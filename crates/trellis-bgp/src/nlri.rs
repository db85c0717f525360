//! Prefix encoding shared by the UPDATE NLRI fields and MP_REACH/MP_UNREACH (RFC 4271 §4.3,
//! RFC 4760 §5). Pure.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Address family identifiers (IANA).
pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
/// Subsequent address family: unicast.
pub const SAFI_UNICAST: u8 = 1;

/// Decodes a run of `<length, prefix>` pairs for `afi`; `None` names the first bad byte offset.
pub fn decode_prefixes(afi: u16, mut b: &[u8]) -> Result<Vec<IpNet>, String> {
    let max = if afi == AFI_IPV6 { 128 } else { 32 };
    let mut out = Vec::with_capacity(b.len() / 4);
    while let Some((&len, rest)) = b.split_first() {
        if len > max {
            return Err(format!("prefix length {len} exceeds {max}"));
        }
        let n = (len as usize).div_ceil(8);
        if rest.len() < n {
            return Err(format!(
                "prefix of length {len} needs {n} bytes, {} left",
                rest.len()
            ));
        }
        let (bytes, tail) = rest.split_at(n);
        let net = if afi == AFI_IPV6 {
            let mut a = [0u8; 16];
            a[..n].copy_from_slice(bytes);
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(a), len)
                    .expect("len checked")
                    .trunc(),
            )
        } else {
            let mut a = [0u8; 4];
            a[..n].copy_from_slice(bytes);
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(a), len)
                    .expect("len checked")
                    .trunc(),
            )
        };
        out.push(net);
        b = tail;
    }
    Ok(out)
}

/// Encodes one prefix: its length, then just the bytes that length covers.
pub fn encode_prefix(p: &IpNet, out: &mut Vec<u8>) {
    let len = p.prefix_len();
    out.push(len);
    let n = (len as usize).div_ceil(8);
    match p {
        IpNet::V4(v) => out.extend_from_slice(&v.network().octets()[..n]),
        IpNet::V6(v) => out.extend_from_slice(&v.network().octets()[..n]),
    }
}

/// Bytes [`encode_prefix`] writes.
pub fn encoded_len(p: &IpNet) -> usize {
    1 + (p.prefix_len() as usize).div_ceil(8)
}

/// The AFI of a prefix.
pub fn afi_of(p: &IpNet) -> u16 {
    match p {
        IpNet::V4(_) => AFI_IPV4,
        IpNet::V6(_) => AFI_IPV6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip() {
        let ps: Vec<IpNet> = ["10.0.0.0/8", "10.1.2.0/24", "0.0.0.0/0", "192.0.2.1/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut b = Vec::new();
        for p in &ps {
            encode_prefix(p, &mut b);
        }
        assert_eq!(b[..2], [8, 10]);
        assert_eq!(decode_prefixes(AFI_IPV4, &b).unwrap(), ps);
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        let mut b = Vec::new();
        encode_prefix(&v6, &mut b);
        assert_eq!(decode_prefixes(AFI_IPV6, &b).unwrap(), vec![v6]);
    }

    #[test]
    fn bad_prefixes_are_errors() {
        assert!(decode_prefixes(AFI_IPV4, &[33, 1, 2, 3, 4, 5]).is_err());
        assert!(decode_prefixes(AFI_IPV4, &[24, 10, 0]).is_err());
        // Host bits past the length are cleared, never kept.
        assert_eq!(decode_prefixes(AFI_IPV4, &[8, 10, 0]).unwrap().len(), 2);
        assert_eq!(
            decode_prefixes(AFI_IPV4, &[7, 11]).unwrap()[0].to_string(),
            "10.0.0.0/7"
        );
    }
}
