//! Choosing addresses for one attachment from host-local style range sets.
//!
//! Pure: the caller passes the addresses already in use (with their owners) and the last address
//! handed out per set; [`plan_allocation`] says which address each set gives, or why it cannot.
//! Allocation is round-robin from the last reserved address, as host-local does, so a released
//! address is not reused at once.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::range::{Range, RangeSet};
use crate::IpamError;

/// Who holds an address: the CNI attachment key (the network is implied by the store).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// The address one range set gives to the attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Index of the range set in the configuration.
    pub set: usize,
    pub ip: IpAddr,
    /// The range the address came from (for prefix length and gateway).
    pub range: Range,
    /// True when the owner already held this address (a repeated ADD): nothing to record.
    pub existing: bool,
}

/// One address per range set, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationPlan {
    pub assignments: Vec<Assignment>,
}

/// Decides the addresses for `owner`: the requested ones (each must fall in a distinct set and be
/// free or already the owner's), the owner's existing ones, and otherwise the next free address
/// after `last_reserved[set]`.
pub fn plan_allocation(
    sets: &[RangeSet],
    used: &HashMap<IpAddr, Owner>,
    last_reserved: &[Option<IpAddr>],
    owner: &Owner,
    requested: &[IpAddr],
) -> Result<AllocationPlan, IpamError> {
    let mut chosen: Vec<Option<Assignment>> = vec![None; sets.len()];
    for (index, &ip) in requested.iter().enumerate() {
        let (set, range) = requested_range(sets, ip, index)?;
        if let Some(prev) = &chosen[set] {
            return Err(IpamError::TwoRequestsOneSet {
                set: sets[set].to_string(),
                ips: format!("{}, {}", prev.ip, ip),
                index,
            });
        }
        let existing = match used.get(&ip) {
            Some(o) if o == owner => true,
            Some(o) => {
                return Err(IpamError::RequestedInUse {
                    ip,
                    index,
                    owner: o.to_string(),
                })
            }
            None => false,
        };
        chosen[set] = Some(Assignment {
            set,
            ip,
            range: range.clone(),
            existing,
        });
    }
    for (i, set) in sets.iter().enumerate() {
        if chosen[i].is_some() {
            continue;
        }
        let held = used
            .iter()
            .filter(|(_, o)| *o == owner)
            .find_map(|(ip, _)| set.range_of(*ip).map(|r| (*ip, r)));
        chosen[i] = Some(match held {
            Some((ip, range)) => Assignment {
                set: i,
                ip,
                range: range.clone(),
                existing: true,
            },
            None => {
                let last = last_reserved.get(i).copied().flatten();
                let (ip, range) =
                    next_free(set, used, last).ok_or_else(|| IpamError::Exhausted {
                        set: set.to_string(),
                    })?;
                Assignment {
                    set: i,
                    ip,
                    range: range.clone(),
                    existing: false,
                }
            }
        });
    }
    Ok(AllocationPlan {
        assignments: chosen.into_iter().flatten().collect(),
    })
}

/// The set and range a requested address (number `index` of the request) is allocatable from,
/// or why it is not: the gateway, the network or broadcast address, outside rangeStart..rangeEnd,
/// or in no configured subnet at all.
fn requested_range(
    sets: &[RangeSet],
    ip: IpAddr,
    index: usize,
) -> Result<(usize, &Range), IpamError> {
    if let Some(found) = sets
        .iter()
        .enumerate()
        .find_map(|(i, s)| s.range_of(ip).map(|r| (i, r)))
    {
        return Ok(found);
    }
    match sets.iter().find_map(|s| s.unallocatable(ip)) {
        Some((range, _)) if Some(ip) == range.gateway => Err(IpamError::RequestedGateway {
            ip,
            index,
            range: range.to_string(),
        }),
        Some((range, reason)) => Err(IpamError::RequestedUnallocatable {
            ip,
            index,
            subnet: range.subnet.to_string(),
            reason,
        }),
        None => Err(IpamError::RequestedOutsideRanges { ip, index }),
    }
}

/// Number of free addresses in a set given the used ones.
pub fn free_count(set: &RangeSet, used: &HashMap<IpAddr, Owner>) -> u128 {
    let taken = used
        .keys()
        .filter(|ip| set.range_of(**ip).is_some())
        .count() as u128;
    set.size().saturating_sub(taken)
}

/// Round-robin search for a free address, starting after `last` (or at the very first address).
fn next_free<'a>(
    set: &'a RangeSet,
    used: &HashMap<IpAddr, Owner>,
    last: Option<IpAddr>,
) -> Option<(IpAddr, &'a Range)> {
    let ranges = set.ranges();
    let cursor = last.and_then(|ip| ranges.iter().position(|r| r.spans(ip)).map(|ri| (ri, ip)));
    let mut cur = match cursor {
        Some((ri, ip)) => successor(ranges, ri, ip)?,
        None => first_from(ranges, 0)?,
    };
    // Each step visits a distinct address until we wrap; a free one turns up within
    // used+1 steps unless the set is full.
    let bound = set.size().min(used.len() as u128 + 1);
    for _ in 0..bound {
        let (ri, ip) = cur;
        if !used.contains_key(&ip) {
            return Some((ip, &ranges[ri]));
        }
        cur = successor(ranges, ri, ip)?;
    }
    None
}

fn first_from(ranges: &[Range], from: usize) -> Option<(usize, IpAddr)> {
    (0..ranges.len())
        .map(|k| (from + k) % ranges.len())
        .find_map(|ri| ranges[ri].first().map(|ip| (ri, ip)))
}

fn successor(ranges: &[Range], ri: usize, ip: IpAddr) -> Option<(usize, IpAddr)> {
    match ranges[ri].after(ip) {
        Some(next) => Some((ri, next)),
        None => first_from(ranges, (ri + 1) % ranges.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn owner(c: &str) -> Owner {
        Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }
    fn set(cidr: &str) -> RangeSet {
        RangeSet::new(vec![
            Range::new(cidr.parse().unwrap(), None, None, None).unwrap()
        ])
        .unwrap()
    }

    #[test]
    fn first_allocation_skips_gateway() {
        let p = plan_allocation(
            &[set("10.0.0.0/24")],
            &HashMap::new(),
            &[None],
            &owner("a"),
            &[],
        )
        .unwrap();
        assert_eq!(p.assignments[0].ip, ip("10.0.0.2"));
        assert!(!p.assignments[0].existing);
    }

    #[test]
    fn round_robin_after_last_reserved() {
        let used = HashMap::from([(ip("10.0.0.2"), owner("x"))]);
        let p = plan_allocation(
            &[set("10.0.0.0/24")],
            &used,
            &[Some(ip("10.0.0.5"))],
            &owner("a"),
            &[],
        )
        .unwrap();
        assert_eq!(p.assignments[0].ip, ip("10.0.0.6"));
        // wrap-around at the end of the range
        let p = plan_allocation(
            &[set("10.0.0.0/24")],
            &used,
            &[Some(ip("10.0.0.254"))],
            &owner("a"),
            &[],
        )
        .unwrap();
        assert_eq!(p.assignments[0].ip, ip("10.0.0.3"));
    }

    #[test]
    fn dual_stack_gives_one_per_set_and_repeat_add_is_idempotent() {
        let sets = [set("10.0.0.0/24"), set("fd00::/120")];
        let p = plan_allocation(&sets, &HashMap::new(), &[None, None], &owner("a"), &[]).unwrap();
        assert_eq!(p.assignments.len(), 2);
        let used: HashMap<_, _> = p.assignments.iter().map(|a| (a.ip, owner("a"))).collect();
        let again = plan_allocation(&sets, &used, &[None, None], &owner("a"), &[]).unwrap();
        assert!(again.assignments.iter().all(|a| a.existing));
    }

    #[test]
    fn requested_addresses_checked() {
        let sets = [set("10.0.0.0/24")];
        let used = HashMap::from([(ip("10.0.0.7"), owner("x"))]);
        let err = plan_allocation(&sets, &used, &[None], &owner("a"), &[ip("10.0.0.7")]);
        assert!(matches!(err, Err(IpamError::RequestedInUse { .. })));
        let err = plan_allocation(&sets, &used, &[None], &owner("a"), &[ip("10.9.0.7")]);
        assert!(matches!(
            err,
            Err(IpamError::RequestedOutsideRanges { index: 0, .. })
        ));
        let err = plan_allocation(&sets, &used, &[None], &owner("a"), &[ip("10.0.0.1")]);
        assert!(
            matches!(err, Err(IpamError::RequestedGateway { index: 0, .. })),
            "{err:?}"
        );
        let err = plan_allocation(&sets, &used, &[None], &owner("a"), &[ip("10.0.0.255")]);
        assert!(
            matches!(&err, Err(IpamError::RequestedUnallocatable { reason, .. }) if reason.contains("broadcast")),
            "{err:?}"
        );
        let err = plan_allocation(
            &sets,
            &used,
            &[None],
            &owner("a"),
            &[ip("10.0.0.8"), ip("10.0.0.9")],
        );
        assert!(matches!(
            err,
            Err(IpamError::TwoRequestsOneSet { index: 1, .. })
        ));
        let ok = plan_allocation(&sets, &used, &[None], &owner("a"), &[ip("10.0.0.8")]).unwrap();
        assert_eq!(ok.assignments[0].ip, ip("10.0.0.8"));
    }

    #[test]
    fn exhaustion_reported() {
        let sets = [set("10.0.0.0/30")]; // .1 gateway, .2 only usable
        let used = HashMap::from([(ip("10.0.0.2"), owner("x"))]);
        let err = plan_allocation(&sets, &used, &[None], &owner("a"), &[]);
        assert!(matches!(err, Err(IpamError::Exhausted { .. })));
        assert_eq!(free_count(&sets[0], &used), 0);
    }

    #[test]
    fn multiple_ranges_in_a_set_are_walked_in_order() {
        let r1 = Range::new("10.0.0.0/30".parse().unwrap(), None, None, None).unwrap();
        let r2 = Range::new("10.0.1.0/30".parse().unwrap(), None, None, None).unwrap();
        let s = RangeSet::new(vec![r1, r2]).unwrap();
        let used = HashMap::from([(ip("10.0.0.2"), owner("x"))]);
        let p = plan_allocation(&[s], &used, &[None], &owner("a"), &[]).unwrap();
        assert_eq!(p.assignments[0].ip, ip("10.0.1.2"));
    }

    proptest! {
        /// Allocating repeatedly never returns a used address, the gateway, or one outside the
        /// range, and fills the range exactly before reporting exhaustion.
        #[test]
        fn fills_range_without_duplicates(prefix in 26u8..=29, start_off in 0u32..3) {
            let net: ipnet::IpNet = format!("10.4.0.0/{prefix}").parse().unwrap();
            let start = ip(&format!("10.4.0.{}", 1 + start_off));
            let range = Range::new(net, Some(start), None, None).unwrap();
            let s = RangeSet::new(vec![range.clone()]).unwrap();
            let mut used = HashMap::new();
            let mut last = None;
            for n in 0..range.size() {
                let o = owner(&format!("c{n}"));
                let p = plan_allocation(std::slice::from_ref(&s), &used, &[last], &o, &[]).unwrap();
                let got = p.assignments[0].ip;
                prop_assert!(range.contains(got));
                prop_assert!(!used.contains_key(&got));
                used.insert(got, o);
                last = Some(got);
            }
            let full = plan_allocation(&[s], &used, &[last], &owner("z"), &[]);
            prop_assert!(matches!(full, Err(IpamError::Exhausted { .. })), "{:?}", full);
        }
    }
}
