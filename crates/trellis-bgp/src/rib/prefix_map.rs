//! A map keyed by prefix that stores an IPv4 prefix in 8 bytes (address and length in one
//! `u64`) instead of an [`IpNet`]'s 18 padded to 24: the RIB's table is mostly IPv4, and its key
//! is a third of each entry. IPv6 prefixes get a map of their own; [`PrefixSet`] is the set.
//! Pure.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug)]
pub(super) struct PrefixMap<V> {
    v4: HashMap<u64, V>,
    v6: HashMap<(u128, u8), V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: HashMap::new(),
            v6: HashMap::new(),
        }
    }
}

enum Key {
    V4(u64),
    V6((u128, u8)),
}

fn key(p: &IpNet) -> Key {
    match p {
        IpNet::V4(n) => Key::V4(u64::from(u32::from(n.addr())) << 8 | u64::from(n.prefix_len())),
        IpNet::V6(n) => Key::V6((u128::from(n.addr()), n.prefix_len())),
    }
}

fn v4(k: u64) -> IpNet {
    let addr = Ipv4Addr::from((k >> 8) as u32);
    IpNet::V4(Ipv4Net::new(addr, (k & 0xff) as u8).expect("stored from a valid prefix"))
}

fn v6(&(a, len): &(u128, u8)) -> IpNet {
    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).expect("stored from a valid prefix"))
}

impl<V> PrefixMap<V> {
    pub fn get(&self, p: &IpNet) -> Option<&V> {
        match key(p) {
            Key::V4(k) => self.v4.get(&k),
            Key::V6(k) => self.v6.get(&k),
        }
    }

    pub fn get_mut(&mut self, p: &IpNet) -> Option<&mut V> {
        match key(p) {
            Key::V4(k) => self.v4.get_mut(&k),
            Key::V6(k) => self.v6.get_mut(&k),
        }
    }

    pub fn insert(&mut self, p: IpNet, v: V) -> Option<V> {
        match key(&p) {
            Key::V4(k) => self.v4.insert(k, v),
            Key::V6(k) => self.v6.insert(k, v),
        }
    }

    pub fn remove(&mut self, p: &IpNet) -> Option<V> {
        match key(p) {
            Key::V4(k) => self.v4.remove(&k),
            Key::V6(k) => self.v6.remove(&k),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.v4.values().chain(self.v6.values())
    }

    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        let v4s = self.v4.iter().map(|(k, v)| (v4(*k), v));
        v4s.chain(self.v6.iter().map(|(k, v)| (v6(k), v)))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (IpNet, &mut V)> + '_ {
        let v4s = self.v4.iter_mut().map(|(k, v)| (v4(*k), v));
        v4s.chain(self.v6.iter_mut().map(|(k, v)| (v6(k), v)))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(IpNet, &mut V) -> bool) {
        self.v4.retain(|k, v| keep(v4(*k), v));
        self.v6.retain(|k, v| keep(v6(k), v));
    }
}

/// A set of prefixes, as compact as [`PrefixMap`]'s keys (a full table is changed at once
/// when it arrives).
pub(super) type PrefixSet = PrefixMap<()>;

impl PrefixSet {
    pub fn add(&mut self, p: IpNet) {
        self.insert(p, ());
    }

    pub fn contains(&self, p: &IpNet) -> bool {
        self.get(p).is_some()
    }
}

impl Extend<IpNet> for PrefixSet {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, ps: I) {
        for p in ps {
            self.add(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip_exactly() {
        let mut m = PrefixMap::default();
        let ps: Vec<IpNet> = [
            "10.1.0.0/24",
            "10.1.0.0/25",
            "10.1.0.1/24",
            "0.0.0.0/0",
            "255.255.255.255/32",
            "fd00::/64",
            "::/0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for (i, p) in ps.iter().enumerate() {
            assert_eq!(m.insert(*p, i), None);
        }
        assert_eq!(m.keys().count(), ps.len());
        for (i, p) in ps.iter().enumerate() {
            assert_eq!(m.get(p), Some(&i), "{p}");
        }
        let mut keys: Vec<IpNet> = m.keys().collect();
        keys.sort();
        let mut want = ps.clone();
        want.sort();
        assert_eq!(keys, want);
        m.retain(|p, _| p.addr().is_ipv4());
        assert_eq!(m.keys().count(), 5);
        assert_eq!(m.remove(&ps[0]), Some(0));
        assert_eq!(m.get(&ps[0]), None);
    }

    #[test]
    fn an_ipv4_entry_is_small() {
        assert_eq!(std::mem::size_of::<(u64, super::super::Paths)>(), 24);
    }
}
