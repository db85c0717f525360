//! The speaker's status report: per peer its state, prefix counts and message counters, as
//! `trellis bgp status` and the metrics show them. Pure (reads the speaker's state).

use super::*;

impl Speaker {
    /// The status report (`trellis bgp status`).
    pub(super) fn status(&self) -> BgpStatusSpec {
        BgpStatusSpec {
            node: String::new(),
            router_id: self.cfg.router_id.to_string(),
            as_number: self.cfg.asn,
            route_reflector_cluster_id: self.cfg.cluster_id.map(|c| c.to_string()),
            peers: self
                .peers
                .iter()
                .map(|(a, p)| {
                    let c = self.rib.counters(p.id);
                    BgpSessionStatus {
                        address: a.to_string(),
                        as_number: p.cfg.asn,
                        kind: format!(
                            "{}{}",
                            p.cfg.kind.name(),
                            if p.cfg.rr_client { " (RR client)" } else { "" }
                        ),
                        state: p.main.fsm.state().name().to_string(),
                        since: Some(p.since),
                        received: c.received as u64,
                        accepted: c.accepted as u64,
                        advertised: c.advertised as u64,
                        last_error: p.last_error.clone(),
                        updates_received: p.counters.updates_in,
                        updates_sent: p.counters.updates_out,
                        notifications_received: p.counters.notifications_in,
                        notifications_sent: p.counters.notifications_out,
                        established_transitions: p.counters.established,
                        prefixes_over_limit: p.counters.over_limit,
                    }
                })
                .collect(),
            updated: 0,
        }
    }
}
