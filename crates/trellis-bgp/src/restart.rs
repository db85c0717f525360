//! Graceful restart as the receiving speaker (RFC 4724 §4.2): which address families of a
//! peer's routes stay (marked stale) when its session is lost, for how long, and which go at
//! once when it comes back. The shell keeps one [`Stale`] per peer and applies the families
//! these functions name to the RIB. Pure: time is passed in.

use std::time::{Duration, Instant};

use crate::error::code;
use crate::fsm::{DownReason, Negotiated};
use crate::message::GracefulRestart;
use crate::nlri::SAFI_UNICAST;

/// A peer's routes kept as stale after a graceful session loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// AFIs (unicast) whose routes are retained; the peer's routes of other families went.
    pub families: Vec<u16>,
    /// The peer's restart time ends: whatever is still stale goes (§4.2).
    pub until: Instant,
}

/// Whether a session ended in a way that lets the peer restart gracefully: the transport went
/// away or the peer fell silent (our hold timer expired) — not a NOTIFICATION it sent or we
/// sent for any other reason (RFC 4724 §4.2; RFC 8538's N bit is not negotiated).
pub fn graceful_loss(reason: &DownReason) -> bool {
    match reason {
        DownReason::TransportClosed => true,
        DownReason::Sent(n) => n.code == code::HOLD_TIMER_EXPIRED,
        DownReason::Received(_) => false,
    }
}

/// The session with a peer ended. Returns what stays stale — only the families the peer listed
/// in its Graceful Restart capability (§4.2: "retain the routes received from the peer for all
/// the address families that were previously received in the Graceful Restart Capability"),
/// among those the session carried — or `None` when every route of the peer goes now: no
/// capability, a restart time of 0, no family listed (a helper-only speaker such as FRR's
/// default), or a loss that was not graceful.
pub fn on_session_loss(n: &Negotiated, reason: &DownReason, now: Instant) -> Option<Stale> {
    let gr = n.peer_graceful_restart.as_ref()?;
    if gr.restart_time == 0 || !graceful_loss(reason) {
        return None;
    }
    let families: Vec<u16> = n
        .families
        .iter()
        .copied()
        .filter(|afi| listed(gr, *afi).is_some())
        .collect();
    if families.is_empty() {
        return None;
    }
    Some(Stale {
        families,
        until: now + Duration::from_secs(u64::from(gr.restart_time)),
    })
}

/// Whether `gr` lists (`afi`, unicast), and if so its Forwarding State (F) bit.
fn listed(gr: &GracefulRestart, afi: u16) -> Option<bool> {
    gr.families
        .iter()
        .find(|(a, s, _)| *a == afi && *s == SAFI_UNICAST)
        .map(|(_, _, f)| *f)
}

impl Stale {
    /// The session is back with the peer's new OPEN. Returns the families whose stale routes
    /// go at once (§4.2): all when the capability is absent, else each family not listed or
    /// listed with the F bit clear (the peer did not preserve its forwarding state). The others
    /// stay stale until their End-of-RIB ([`Stale::end_of_rib`]) or [`Stale::expired`].
    pub fn on_reestablished(&mut self, new: Option<&GracefulRestart>) -> Vec<u16> {
        let (keep, drop): (Vec<u16>, Vec<u16>) = self
            .families
            .iter()
            .partition(|afi| new.and_then(|g| listed(g, **afi)) == Some(true));
        self.families = keep;
        drop
    }

    /// End-of-RIB for `afi` (RFC 4724 §2): its stale routes go. Returns whether it was stale.
    pub fn end_of_rib(&mut self, afi: u16) -> bool {
        let before = self.families.len();
        self.families.retain(|a| *a != afi);
        self.families.len() != before
    }

    /// Nothing is stale any more.
    pub fn is_done(&self) -> bool {
        self.families.is_empty()
    }

    /// The restart time passed.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }
}

#[cfg(test)]
mod tests;
