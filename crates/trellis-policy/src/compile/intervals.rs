//! Address intervals (pure): the canonical element lists of nftables interval sets.
//!
//! A named interval set refuses overlapping elements (and nft does not merge them unless the
//! set has `auto-merge`, whose partial deletes would punch holes into a network another
//! contributor still needs). So a set's elements are the *connected components* of what its
//! contributors (endpoint addresses, NetworkSet nets) cover: overlapping intervals merge,
//! adjacent ones stay apart (nft keeps them apart in named sets, so the listing matches).
//! [`IntervalSet`] maintains that incrementally, reference-counting contributions so a removal
//! recomputes only its own component. Anonymous sets in rules are different: nft merges
//! adjacent intervals there too, which [`merge_touching`] mirrors.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::ruleset::{Element, Family};

/// An inclusive interval of addresses of one family, as integers.
pub type Interval = (u128, u128);

pub fn addr_bits(a: &IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(*v) as u128,
        IpAddr::V6(v) => u128::from(*v),
    }
}

pub fn bits_addr(f: Family, v: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// The interval a network covers.
pub fn net_interval(n: &IpNet) -> (Family, Interval) {
    let f = Family::of(&n.network());
    (f, (addr_bits(&n.network()), addr_bits(&n.broadcast())))
}

pub fn element(f: Family, (first, last): Interval) -> Element {
    Element::Addr {
        first: bits_addr(f, first),
        last: bits_addr(f, last),
    }
}

/// The prefix length when `first..=last` is exactly one CIDR block.
pub fn prefix_len(first: &IpAddr, last: &IpAddr) -> Option<u8> {
    let bits: u32 = if first.is_ipv4() { 32 } else { 128 };
    let (s, e) = (addr_bits(first), addr_bits(last));
    if e < s {
        return None;
    }
    let span = e - s;
    // span + 1 must be a power of two, and `s` aligned to it.
    if span & span.wrapping_add(1) != 0 || s & span != 0 {
        return None;
    }
    Some((bits - span.count_ones()) as u8)
}

/// Sorts and merges intervals that overlap (share an address); adjacent ones stay apart.
pub fn merge_overlapping(mut v: Vec<Interval>) -> Vec<Interval> {
    merge(&mut v, false)
}

/// Sorts and merges intervals that overlap or are adjacent (what nft does in anonymous sets).
pub fn merge_touching(mut v: Vec<Interval>) -> Vec<Interval> {
    merge(&mut v, true)
}

fn merge(v: &mut [Interval], adjacent: bool) -> Vec<Interval> {
    v.sort_unstable();
    let mut out: Vec<Interval> = Vec::with_capacity(v.len());
    for &(s, e) in v.iter() {
        match out.last_mut() {
            Some((_, le)) if s <= *le || (adjacent && s == le.saturating_add(1)) => {
                *le = (*le).max(e)
            }
            _ => out.push((s, e)),
        }
    }
    out
}

/// The elements of a named interval set, kept incrementally: contributions are counted, and
/// the elements are their overlap components.
#[derive(Debug, Clone, Default)]
pub struct IntervalSet {
    /// Contribution → how many contributors gave it.
    raw: BTreeMap<Interval, u32>,
    /// Component start → end.
    merged: BTreeMap<u128, u128>,
}

/// What a change did to a set's elements.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub removed: Vec<Interval>,
    pub added: Vec<Interval>,
}

impl IntervalSet {
    pub fn elements(&self) -> impl Iterator<Item = Interval> + '_ {
        self.merged.iter().map(|(s, e)| (*s, *e))
    }

    /// Adds one contribution.
    pub fn add(&mut self, iv: Interval) -> Delta {
        let n = self.raw.entry(iv).or_insert(0);
        *n += 1;
        if *n > 1 {
            return Delta::default();
        }
        let (s, e) = iv;
        // The components overlapping [s, e]: those starting at or before `e` that end at or
        // after `s` (components are disjoint and sorted, so they are consecutive).
        let removed: Vec<Interval> = self
            .merged
            .range(..=e)
            .rev()
            .take_while(|(_, ce)| **ce >= s)
            .map(|(cs, ce)| (*cs, *ce))
            .collect();
        let start = removed.iter().map(|c| c.0).fold(s, u128::min);
        let end = removed.iter().map(|c| c.1).fold(e, u128::max);
        if removed == [(start, end)] {
            return Delta::default(); // inside an existing component
        }
        for (cs, _) in &removed {
            self.merged.remove(cs);
        }
        self.merged.insert(start, end);
        Delta {
            removed,
            added: vec![(start, end)],
        }
    }

    /// Removes one contribution (which must have been added).
    pub fn remove(&mut self, iv: Interval) -> Delta {
        match self.raw.get_mut(&iv) {
            None => return Delta::default(),
            Some(n) if *n > 1 => {
                *n -= 1;
                return Delta::default();
            }
            Some(_) => {
                self.raw.remove(&iv);
            }
        }
        // The component that held it; recompute it from the contributions inside it.
        let Some((&cs, &ce)) = self.merged.range(..=iv.0).next_back() else {
            return Delta::default();
        };
        let parts: Vec<Interval> = self
            .raw
            .range((cs, 0)..=(ce, u128::MAX))
            .map(|(k, _)| *k)
            .collect();
        let added = merge_overlapping(parts);
        if added == [(cs, ce)] {
            return Delta::default();
        }
        self.merged.remove(&cs);
        for (s, e) in &added {
            self.merged.insert(*s, *e);
        }
        Delta {
            removed: vec![(cs, ce)],
            added,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_ranges_and_single_addresses() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(prefix_len(&a("10.0.0.0"), &a("10.0.0.255")), Some(24));
        assert_eq!(prefix_len(&a("10.0.0.4"), &a("10.0.0.7")), Some(30));
        assert_eq!(prefix_len(&a("10.0.0.1"), &a("10.0.0.1")), Some(32));
        assert_eq!(prefix_len(&a("10.0.0.3"), &a("10.0.0.9")), None);
        assert_eq!(prefix_len(&a("10.0.0.2"), &a("10.0.0.5")), None);
        assert_eq!(prefix_len(&a("0.0.0.0"), &a("255.255.255.255")), Some(0));
        assert_eq!(
            prefix_len(&a("::"), &a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(0)
        );
    }

    #[test]
    fn merging_keeps_adjacent_apart_unless_asked() {
        let v = vec![(5, 9), (1, 2), (3, 4), (8, 12)];
        assert_eq!(merge_overlapping(v.clone()), [(1, 2), (3, 4), (5, 12)]);
        assert_eq!(merge_touching(v), [(1, 12)]);
    }

    /// The incremental set always equals the batch merge of its contributions.
    #[test]
    fn incremental_equals_batch_merge() {
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let mut set = IntervalSet::default();
            let mut contributions: Vec<Interval> = Vec::new();
            for _ in 0..40 {
                if !contributions.is_empty() && next() % 3 == 0 {
                    let i = (next() as usize) % contributions.len();
                    set.remove(contributions.swap_remove(i));
                } else {
                    let s = (next() % 64) as u128;
                    let iv = (s, s + (next() % 6) as u128);
                    contributions.push(iv);
                    set.add(iv);
                }
                let want = merge_overlapping(contributions.clone());
                assert_eq!(set.elements().collect::<Vec<_>>(), want);
            }
        }
    }
}
