//! Kernel feature probes that change nothing. A link kind (ipip, vxlan, ...) is available when
//! the kernel has registered its link operations; creating a link to find out would load a
//! module (and, for ipip, create `tunl0` in every namespace). Instead, a link dump filtered by
//! kind is asked for: the kernel filters only when it knows the kind (net/core/rtnetlink.c,
//! `linkinfo_to_kind_ops`/`link_kind_filtered`), so an unknown kind returns every link —
//! including `lo`, which has no kind — and a known one returns only links of that kind.
//! Limitation: a kind built as a module that is not loaded yet counts as absent.

use crate::types::Link;
use crate::{Netlink, Result};

/// Whether a link dump filtered by `kind` came back filtered (pure). Every namespace has `lo`,
/// so an unfiltered dump is never empty and always holds a link of another kind.
pub fn kind_filtered(kind: &str, dump: &[Link]) -> bool {
    dump.iter().all(|l| l.kind.as_deref() == Some(kind))
}

/// Whether the kernel knows the link kind, probed in the calling thread's namespace.
pub fn link_kind_available(nl: &mut Netlink, kind: &str) -> Result<bool> {
    let dump = nl.links_filtered_by_kind(kind)?;
    Ok(kind_filtered(kind, &dump))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, kind: Option<&str>) -> Link {
        Link {
            index: 1,
            name: name.into(),
            mac: None,
            mtu: 1500,
            up: true,
            master: None,
            kind: kind.map(str::to_string),
        }
    }

    #[test]
    fn an_unfiltered_dump_means_the_kind_is_unknown() {
        assert!(!kind_filtered(
            "ipip",
            &[link("lo", None), link("eth0", Some("veth"))]
        ));
        assert!(kind_filtered("ipip", &[link("tunl0", Some("ipip"))]));
        assert!(kind_filtered("ipip", &[]), "known kind, no such links yet");
    }
}
