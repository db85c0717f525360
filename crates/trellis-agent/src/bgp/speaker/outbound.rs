//! What the speaker sends and hands out: the RIB's UPDATEs to every peer that keeps up — a
//! peer whose socket has [`HIGH_WATER`] bytes unsent waits while the RIB coalesces its changes
//! — the progress reports that keep a connection's send hold timer (RFC 9687) from expiring,
//! and the learned routes for the kernel, built when the dataplane loop asks. Does I/O (queues
//! bytes for the sockets).

use super::*;

impl Speaker {
    /// Whether a connection's socket took bytes since the last tick or has nothing queued — the
    /// send hold timer (RFC 9687) starts again.
    pub(super) fn conn_progressed(&mut self, addr: IpAddr, second: bool) -> bool {
        let Some(p) = self.peers.get_mut(&addr) else {
            return false;
        };
        let c = if second {
            p.second.as_mut()
        } else {
            Some(&mut p.main)
        };
        let Some(c) = c else { return false };
        let Some(w) = &c.tx else { return false };
        let written = w.written();
        let progressed = w.queued() == 0 || written != c.written_seen;
        c.written_seen = written;
        progressed
    }

    /// Sends what the RIB decided and publishes kernel routes when they changed.
    pub(super) fn flush(&mut self) {
        // A peer whose socket is behind waits; the RIB keeps what changed for it meanwhile.
        let behind: Vec<PeerId> = self
            .peers
            .values()
            .filter(|p| p.main.tx.as_ref().is_some_and(|w| w.queued() >= HIGH_WATER))
            .map(|p| p.id)
            .collect();
        let (outs, kernel_changed) = self.rib.flush_when(|id| !behind.contains(&id));
        let by_id: HashMap<PeerId, IpAddr> = self.peers.iter().map(|(a, p)| (p.id, *a)).collect();
        for (id, ob) in outs {
            let Some(p) = by_id.get(&id).and_then(|a| self.peers.get_mut(a)) else {
                continue;
            };
            let Some(n) = &p.negotiated else {
                continue;
            };
            let ctx = ctx_for(Some(n), p.cfg.asn == self.cfg.asn);
            let mut bytes = Vec::new();
            let mut sent = 0;
            for u in pack_withdrawals(&ob.withdraw, MAX_LEN) {
                bytes.extend(Message::Update(Box::new(u)).encode(ctx));
                sent += 1;
            }
            for (attrs, nh, prefixes) in &ob.announce {
                let v6 = match nh {
                    IpAddr::V6(a) => Some(a.octets()),
                    _ => None,
                };
                let v6 = v6.as_ref().map(|o| &o[..]);
                match pack_announcements(attrs, prefixes, v6, ctx, MAX_LEN) {
                    Ok(updates) => {
                        for u in updates {
                            bytes.extend(Message::Update(Box::new(u)).encode(ctx));
                            sent += 1;
                        }
                    }
                    // Only these routes are held back; the session and other routes go on.
                    Err(e) => {
                        tracing::error!(peer = %p.cfg.address, prefixes = prefixes.len(), error = %e, "routes not announced")
                    }
                }
            }
            if let Some(full) = p.main.send(bytes) {
                p.reset.get_or_insert((full, CONNECT_RETRY));
            }
            p.counters.updates_out += sent;
        }
        if kernel_changed {
            self.publish_routes();
        }
    }

    /// Tells the dataplane loop the routes for the kernel changed.
    pub(super) fn publish_routes(&self) {
        self.shared.routes_changed();
    }

    /// What the kernel should route: what the RIB installs plus the peers' `reachableBy` routes
    /// (which win over a learned route to the same /32: the session must not ride on its own
    /// routes); sorted by prefix, one route per prefix.
    pub(super) fn learned_routes(&self) -> Vec<(IpNet, IpAddr)> {
        let peer_routes: BTreeMap<IpNet, IpAddr> = self.cfg.peer_routes().collect();
        let installed = self.rib.installed();
        let mut routes = Vec::with_capacity(installed.len() + peer_routes.len());
        routes.extend(
            installed
                .iter()
                .filter(|(k, _)| !peer_routes.contains_key(k)),
        );
        routes.extend(peer_routes);
        routes.sort_unstable_by_key(|(k, _)| *k);
        routes
    }
}
