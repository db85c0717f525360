//! Per-peer route filters with Calico's BGPFilter semantics: an ordered list of rules, the
//! first rule that matches a route decides, and a route no rule matches is accepted. A rule
//! matches by family, optionally by prefix (equal / not equal / inside / outside a CIDR, with a
//! range of prefix lengths) and, on export, optionally only routes learned from peers. Pure.

use ipnet::IpNet;

/// How a rule compares its CIDR with a route's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixOp {
    Equal,
    NotEqual,
    /// Inside the CIDR with a prefix length in `lengths`.
    In,
    NotIn,
}

/// A prefix condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    pub cidr: IpNet,
    pub op: PrefixOp,
    /// Prefix lengths `In` / `NotIn` cover (inclusive).
    pub lengths: (u8, u8),
}

impl PrefixMatch {
    /// `In`/`NotIn` covering the CIDR's own length up to the family's longest.
    pub fn new(cidr: IpNet, op: PrefixOp) -> PrefixMatch {
        PrefixMatch {
            cidr,
            op,
            lengths: (cidr.prefix_len(), cidr.max_prefix_len()),
        }
    }

    fn matches(&self, prefix: &IpNet) -> bool {
        let inside = || {
            self.cidr.contains(prefix)
                && (self.lengths.0..=self.lengths.1).contains(&prefix.prefix_len())
        };
        match self.op {
            PrefixOp::Equal => *prefix == self.cidr,
            PrefixOp::NotEqual => *prefix != self.cidr,
            PrefixOp::In => inside(),
            PrefixOp::NotIn => !inside(),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule's family: it never matches a route of the other.
    pub ipv6: bool,
    pub prefix: Option<PrefixMatch>,
    /// Only routes learned from peers (not originated here).
    pub learned_only: bool,
    pub accept: bool,
}

impl Rule {
    fn matches(&self, prefix: &IpNet, learned: bool) -> bool {
        self.ipv6 == prefix.addr().is_ipv6()
            && (!self.learned_only || learned)
            && self.prefix.is_none_or(|m| m.matches(prefix))
    }
}

/// Whether `rules` let a route to `prefix` through; `learned` says it came from a peer.
pub fn accepts(rules: &[Rule], prefix: &IpNet, learned: bool) -> bool {
    rules
        .iter()
        .find(|r| r.matches(prefix, learned))
        .is_none_or(|r| r.accept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn rule(prefix: Option<PrefixMatch>, accept: bool) -> Rule {
        Rule {
            ipv6: false,
            prefix,
            learned_only: false,
            accept,
        }
    }

    #[test]
    fn first_match_decides_and_no_match_accepts() {
        // Calico's sample: accept 55.0.0.0/16 from /30 on, reject what is outside 44.0.0.0/16.
        let rules = [
            rule(
                Some(PrefixMatch {
                    lengths: (30, 32),
                    ..PrefixMatch::new(p("55.0.0.0/16"), PrefixOp::In)
                }),
                true,
            ),
            rule(
                Some(PrefixMatch::new(p("44.0.0.0/16"), PrefixOp::NotIn)),
                false,
            ),
        ];
        assert!(accepts(&rules, &p("55.0.1.0/30"), true));
        assert!(
            !accepts(&rules, &p("55.0.1.0/24"), true),
            "too short for rule 1, outside 44/16"
        );
        assert!(
            accepts(&rules, &p("44.0.3.0/24"), true),
            "no rule matches: accepted"
        );
        assert!(!accepts(&rules, &p("10.0.0.0/8"), true));
        assert!(accepts(&[], &p("10.0.0.0/8"), true));
    }

    #[test]
    fn operators_families_and_sources() {
        let eq = rule(
            Some(PrefixMatch::new(p("10.1.0.0/16"), PrefixOp::Equal)),
            false,
        );
        assert!(!accepts(std::slice::from_ref(&eq), &p("10.1.0.0/16"), true));
        assert!(accepts(std::slice::from_ref(&eq), &p("10.1.0.0/24"), true));
        let ne = rule(
            Some(PrefixMatch::new(p("10.1.0.0/16"), PrefixOp::NotEqual)),
            false,
        );
        assert!(accepts(std::slice::from_ref(&ne), &p("10.1.0.0/16"), true));
        assert!(!accepts(std::slice::from_ref(&ne), &p("10.2.0.0/16"), true));
        // A catch-all IPv4 rule leaves IPv6 routes alone.
        let all_v4 = rule(None, false);
        assert!(!accepts(
            std::slice::from_ref(&all_v4),
            &p("10.0.0.0/8"),
            true
        ));
        assert!(accepts(
            std::slice::from_ref(&all_v4),
            &p("2001:db8::/32"),
            true
        ));
        // RemotePeers: only what was learned.
        let learned = Rule {
            learned_only: true,
            ..rule(None, false)
        };
        assert!(!accepts(
            std::slice::from_ref(&learned),
            &p("10.0.0.0/8"),
            true
        ));
        assert!(accepts(
            std::slice::from_ref(&learned),
            &p("10.0.0.0/8"),
            false
        ));
    }
}
