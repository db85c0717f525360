//! Names of everything in the table (pure): stable across runs and versions, derived from the
//! model's identities by SHA-256 where the identity is too long or too free-form for nft.

use sha2::{Digest, Sha256};

use crate::model::{Direction, PolicyId, RuleId};

/// Hex characters of a hash kept in names (48 bits: collision-free for any realistic cluster).
const HASH_HEX: usize = 12;
/// Rule labels longer than this are shortened (nft comments hold 128 bytes, log prefixes 127).
const MAX_LABEL: usize = 100;

pub fn short_hash(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(HASH_HEX);
    for b in d.iter().take(HASH_HEX / 2) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `in` for ingress, `out` for egress.
pub fn dir_tag(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

/// An endpoint's id in chain names: a hash of `namespace/name`.
pub fn endpoint_id(namespace: &str, name: &str) -> String {
    short_hash(&format!("{namespace}/{name}"))
}

/// The endpoint's chain for a direction: `ep_in_<id>` / `ep_out_<id>`.
pub fn endpoint_chain(id: &str, d: Direction) -> String {
    format!("ep_{}_{id}", dir_tag(d))
}

/// The endpoint's chain for its `n`th applying tier: `ep_<id>_<dir>_t<n>`.
pub fn tier_chain(id: &str, d: Direction, n: usize) -> String {
    format!("ep_{id}_{}_t{n}", dir_tag(d))
}

/// A policy's chain for a direction, shared by every endpoint it applies to.
pub fn policy_chain(id: &PolicyId, d: Direction) -> String {
    format!("pol_{}_{}", short_hash(&id.to_string()), dir_tag(d))
}

/// A profile's chain for a direction.
pub fn profile_chain(name: &str, d: Direction) -> String {
    format!("pro_{}_{}", short_hash(name), dir_tag(d))
}

/// The label of a policy rule: its comment and log prefix in the kernel (`knp/NS/NAME/in/0`,
/// `gnp/NAME/out/2`, ...). Metrics and `policy trace --kernel` read its counters by it
/// (`drift::rule_counters`).
pub fn rule_label(id: &RuleId) -> String {
    bounded(format!(
        "{}/{}/{}",
        id.policy,
        dir_tag(id.direction),
        id.index
    ))
}

/// The label of a profile rule (`pro/NAME/in/0`).
pub fn profile_rule_label(profile: &str, d: Direction, index: usize) -> String {
    bounded(format!("pro/{profile}/{}/{index}", dir_tag(d)))
}

/// The label of a tier's default Deny (`tier/NAME/in/default`).
pub fn tier_default_label(tier: &str, d: Direction) -> String {
    bounded(format!("tier/{tier}/{}/default", dir_tag(d)))
}

/// The label of an endpoint's last rule: `profiles/in/default` (it lists profiles and none
/// allowed: dropped), `none/in/default` (no policy decided and it lists no profile: allowed).
pub fn endpoint_default_label(lists_profiles: bool, d: Direction) -> String {
    let what = if lists_profiles { "profiles" } else { "none" };
    format!("{what}/{}/default", dir_tag(d))
}

/// The parts of a rule label: `(policy, direction tag, rule)` — `knp/NS/NAME/in/0` gives
/// `("knp/NS/NAME", "in", "0")`, `tier/default/out/default` gives `("tier/default", "out",
/// "default")`; `None` for what no Trellis label looks like.
pub fn split_label(label: &str) -> Option<(&str, &str, &str)> {
    let mut parts = label.rsplitn(3, '/');
    let (rule, dir, policy) = (parts.next()?, parts.next()?, parts.next()?);
    matches!(dir, "in" | "out").then_some((policy, dir, rule))
}

/// A flow-log copy's prefix: the verdict, a space, the deciding rule's label (`allow
/// knp/x/a/in/0`, `deny tier/default/in/default`); within nft's 127 bytes since labels are.
pub fn flow_log_prefix(allowed: bool, label: &str) -> String {
    format!("{} {label}", if allowed { "allow" } else { "deny" })
}

/// Whether a flow-log prefix says allowed, and its label (`None`: not one of Trellis's).
pub fn parse_flow_log_prefix(prefix: &str) -> Option<(bool, &str)> {
    match prefix.split_once(' ')? {
        ("allow", label) => Some((true, label)),
        ("deny", label) => Some((false, label)),
        _ => None,
    }
}

/// Keeps a label within [`MAX_LABEL`] bytes: a readable prefix and a hash of the whole.
fn bounded(label: String) -> String {
    if label.len() <= MAX_LABEL {
        return label;
    }
    let mut cut = MAX_LABEL - HASH_HEX - 1;
    while !label.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{}", &label[..cut], short_hash(&label))
}

/// Whether an interface name can key the verdict maps: what the kernel allows in a name that
/// Trellis creates (1–15 bytes, no wildcard or separator characters). Anything else is not
/// programmed (and, if it is a `trl*` interface, stays closed).
pub fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyKind;

    #[test]
    fn labels_are_readable_and_bounded() {
        let id = |name: &str| RuleId {
            policy: PolicyId {
                kind: PolicyKind::Kubernetes,
                namespace: Some("x".into()),
                name: name.into(),
            },
            direction: Direction::Ingress,
            index: 3,
        };
        assert_eq!(rule_label(&id("allow-a")), "knp/x/allow-a/in/3");
        let long = rule_label(&id(&"é".repeat(120)));
        assert!(long.len() <= MAX_LABEL, "{}", long.len());
        assert_ne!(long, rule_label(&id(&"é".repeat(121))));
    }

    #[test]
    fn interface_names() {
        assert!(valid_interface("trl0123456789a"));
        assert!(!valid_interface("trl*"));
        assert!(!valid_interface(""));
        assert!(!valid_interface("trl0123456789abc"));
        assert!(!valid_interface("a b"));
    }
}
