//! The engine's bookkeeping (pure): programming local endpoints, reference-counted shared
//! chains and sets, set membership, and the final diff of one change into ordered
//! operations.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    fam_index, Contributor, EpKey, PolicyEngine, Programmed, SetTouch, SharedState, SpecState, Tx,
};
use crate::compile::intervals::{self, Delta};
use crate::compile::rules::{CompiledChain, Families, Gen, Piece, SetSpec};
use crate::compile::ruleset::{
    Chain, Element, Family, NftOp, Ops, Ruleset, Set, FROM_ENDPOINT, TO_ENDPOINT,
};
use crate::compile::{endpoint_program, names, Shared};
use crate::model::{Direction, PolicyId};

impl PolicyEngine {
    /// Recomputes which policies apply to a local endpoint that owns its interface, and
    /// programs it.
    pub(super) fn program_full(&mut self, tx: &mut Tx, key: &EpKey) {
        let ep = &self.model.endpoints[key];
        let labels = &self.labels[key];
        let applying = self
            .model
            .policies
            .values()
            .filter(|p| self.model.policy_applies(p, ep, labels))
            .map(|p| p.id.clone())
            .collect();
        self.program(tx, key, applying);
    }

    /// Programs an endpoint with the given applying policies: its chains, map entries and the
    /// shared chains they use.
    pub(super) fn program(&mut self, tx: &mut Tx, key: &EpKey, applying: BTreeSet<PolicyId>) {
        let ep = &self.model.endpoints[key];
        let policies: Vec<_> = applying
            .iter()
            .filter_map(|id| self.model.policies.get(id))
            .collect();
        let (chains, shared) = endpoint_program(&self.model, ep, &policies, &self.cfg);
        let iface = ep.interface.clone().expect("programmed endpoints have one");
        let id = names::endpoint_id(&ep.namespace, &ep.name);
        let families = Families::of(&ep.addresses);
        // Programmed now from the current model: whatever the batch had pending is superseded.
        tx.pending.remove(key);
        self.endpoint_programs += 1;
        let old = self.programmed.remove(key);
        let names: BTreeSet<String> = chains.iter().map(|(n, _)| n.clone()).collect();
        for (n, c) in chains {
            self.set_chain(tx, &n, Some(c));
        }
        let (old_chains, old_shared) = match &old {
            Some(o) => (o.chains.clone(), o.shared.clone()),
            None => Default::default(),
        };
        for n in old_chains.difference(&names) {
            self.set_chain(tx, n, None);
        }
        for s in shared.difference(&old_shared) {
            self.use_shared(tx, s);
        }
        for s in old_shared.difference(&shared) {
            self.shared.get_mut(s).expect("used").users -= 1;
        }
        if let Some(o) = &old {
            self.count_families(o.families, false);
            if o.iface != iface {
                self.unmap(tx, &o.iface);
            }
        }
        self.count_families(families, true);
        self.set_map(
            tx,
            FROM_ENDPOINT,
            &iface,
            Some(names::endpoint_chain(&id, Direction::Egress)),
        );
        self.set_map(
            tx,
            TO_ENDPOINT,
            &iface,
            Some(names::endpoint_chain(&id, Direction::Ingress)),
        );
        self.by_iface.insert(iface.clone(), key.clone());
        let p = Programmed {
            iface,
            applying,
            chains: names,
            shared,
            families,
        };
        self.programmed.insert(key.clone(), p);
    }

    pub(super) fn unprogram(&mut self, tx: &mut Tx, key: &EpKey) {
        tx.pending.remove(key);
        let Some(p) = self.programmed.remove(key) else {
            return;
        };
        for c in &p.chains {
            self.set_chain(tx, c, None);
        }
        for s in &p.shared {
            self.shared.get_mut(s).expect("used").users -= 1;
        }
        self.count_families(p.families, false);
        self.unmap(tx, &p.iface);
    }

    fn unmap(&mut self, tx: &mut Tx, iface: &str) {
        self.set_map(tx, FROM_ENDPOINT, iface, None);
        self.set_map(tx, TO_ENDPOINT, iface, None);
        self.by_iface.remove(iface);
    }

    fn count_families(&mut self, f: Families, add: bool) {
        for fam in f.list() {
            let n = &mut self.fam_counts[fam_index(fam)];
            *n = if add { *n + 1 } else { *n - 1 };
        }
    }

    // ---- shared chains and sets -----------------------------------------------------------

    /// A shared chain as it should be now (set names follow the sets' current kinds).
    fn compile_shared(&self, s: &Shared) -> Option<CompiledChain> {
        let specs = &self.specs;
        let nets = |k: &str, f: Family| specs.get(k).is_some_and(|st| st.has_nets(f));
        let gen = Gen {
            cfg: &self.cfg,
            fams: self.fams,
            nets: &nets,
        };
        s.compile(&self.model, &gen)
    }

    fn use_shared(&mut self, tx: &mut Tx, s: &Shared) {
        if let Some(st) = self.shared.get_mut(s) {
            st.users += 1;
            return;
        }
        let cc = self.compile_shared(s).unwrap_or_default();
        let state = self.install_shared(tx, s, cc, 1);
        self.shared.insert(s.clone(), state);
    }

    /// Rebuilds a shared chain whose policy or profile changed (if it is in use).
    pub(super) fn refresh_shared(&mut self, tx: &mut Tx, s: &Shared) {
        let Some(users) = self.shared.get(s).map(|st| st.users) else {
            return;
        };
        if users == 0 {
            // Unused since earlier in the batch: drop it now, so a user later in the batch
            // compiles it afresh instead of taking the stale chain.
            let st = self.shared.remove(s).expect("present");
            self.set_chain(tx, &s.chain_name(), None);
            self.release(s, st);
            return;
        }
        let Some(cc) = self.compile_shared(s) else {
            return; // gone: its users are going too, and the GC removes it
        };
        // Release first: the sets stay (collection waits for the end of the change), and the
        // new chain's references, referrers included, are the ones that remain.
        let old = self.shared.remove(s).expect("present");
        self.release(s, old);
        let state = self.install_shared(tx, s, cc, users);
        self.shared.insert(s.clone(), state);
    }

    /// Rewrites the shared chains that look up sets which changed between hash and interval
    /// (a NetworkSet began or stopped contributing nets).
    pub(super) fn rewrite_flipped(&mut self, tx: &mut Tx) {
        while let Some(key) = tx.flipped.pop_first() {
            let referrers: Vec<Shared> = self
                .specs
                .get(&key)
                .map(|st| st.referrers.iter().cloned().collect())
                .unwrap_or_default();
            for s in referrers {
                self.refresh_shared(tx, &s);
            }
        }
    }

    /// Puts a shared chain into the table, referencing its sets.
    fn install_shared(
        &mut self,
        tx: &mut Tx,
        s: &Shared,
        cc: CompiledChain,
        users: usize,
    ) -> SharedState {
        let specs: Vec<String> = cc.specs.iter().map(|s| s.key.clone()).collect();
        for spec in cc.specs {
            self.ref_spec(tx, spec);
        }
        for k in &specs {
            let st = self.specs.get_mut(k).expect("just referenced");
            st.referrers.insert(s.clone());
        }
        // A set created just now may hold nets: then the chain names its interval set.
        let nets = specs.iter().any(|k| {
            let st = &self.specs[k];
            Family::BOTH.into_iter().any(|f| st.has_nets(f))
        });
        let chain = match nets {
            true => self.compile_shared(s).expect("compiled a moment ago").chain,
            false => cc.chain,
        };
        self.set_chain(tx, &s.chain_name(), Some(chain));
        SharedState { users, specs }
    }

    /// Drops a shared chain's references (its sets go at the end of the change if unused).
    fn release(&mut self, s: &Shared, st: SharedState) {
        for k in &st.specs {
            let spec = self.specs.get_mut(k).expect("referenced");
            spec.refs -= 1;
            spec.referrers.remove(s);
        }
    }

    fn ref_spec(&mut self, tx: &mut Tx, spec: SetSpec) {
        if let Some(st) = self.specs.get_mut(&spec.key) {
            st.refs += 1;
            return;
        }
        // A new set: create it for each family and fill it from every contributor.
        let mut st = SpecState {
            spec,
            refs: 1,
            members: HashMap::new(),
            nets: [0, 0],
            referrers: BTreeSet::new(),
            addrs: Default::default(),
            ports: Default::default(),
        };
        for f in self.fams.list() {
            let name = st.set_name(f);
            touch_set(tx, &self.ruleset, &name);
            let set = Set {
                kind: st.spec.kind(f, false),
                elements: BTreeSet::new(),
            };
            self.ruleset.sets.insert(name, set);
        }
        for (key, ep) in &self.model.endpoints {
            let pieces = st
                .spec
                .endpoint_pieces(&self.model, ep, &self.labels[key], self.fams);
            let c = Contributor::Endpoint(key.clone());
            st.update(c, pieces, &mut self.ruleset, tx);
        }
        for set in &self.model.network_sets {
            let pieces = st.spec.network_set_pieces(&self.model, set, self.fams);
            let c = Contributor::NetworkSet(set.namespace.clone(), set.name.clone());
            st.update(c, pieces, &mut self.ruleset, tx);
        }
        self.specs.insert(st.spec.key.clone(), st);
    }

    /// Re-evaluates every active set against one contributor.
    pub(super) fn refresh_member(&mut self, tx: &mut Tx, c: &Contributor) {
        let (model, fams) = (&self.model, self.fams);
        enum Subject<'a> {
            Ep(&'a crate::model::Endpoint, &'a crate::model::Labels),
            Set(&'a crate::model::NetworkSet),
            Gone,
        }
        let subject = match c {
            Contributor::Endpoint(k) => match model.endpoints.get(k) {
                Some(ep) => Subject::Ep(ep, &self.labels[k]),
                None => Subject::Gone,
            },
            Contributor::NetworkSet(ns, n) => model
                .network_sets
                .iter()
                .find(|s| &s.namespace == ns && &s.name == n)
                .map_or(Subject::Gone, Subject::Set),
        };
        for st in self.specs.values_mut() {
            let pieces = match &subject {
                Subject::Ep(ep, labels) => st.spec.endpoint_pieces(model, ep, labels, fams),
                Subject::Set(s) => st.spec.network_set_pieces(model, s, fams),
                Subject::Gone => Vec::new(),
            };
            st.update(c.clone(), pieces, &mut self.ruleset, tx);
        }
    }

    // ---- touching the table --------------------------------------------------------------

    fn set_chain(&mut self, tx: &mut Tx, name: &str, chain: Option<Chain>) {
        tx.chains
            .entry(name.to_string())
            .or_insert_with(|| self.ruleset.chains.get(name).cloned());
        match chain {
            Some(c) => self.ruleset.chains.insert(name.to_string(), c),
            None => self.ruleset.chains.remove(name),
        };
    }

    fn set_map(&mut self, tx: &mut Tx, map: &'static str, key: &str, target: Option<String>) {
        let m = &mut self
            .ruleset
            .maps
            .get_mut(map)
            .expect("skeleton map")
            .elements;
        tx.maps
            .entry((map, key.to_string()))
            .or_insert_with(|| m.get(key).cloned());
        match target {
            Some(t) => m.insert(key.to_string(), t),
            None => m.remove(key),
        };
    }

    /// Removes what nothing uses any more: shared chains without users, then sets without
    /// references.
    pub(super) fn gc(&mut self, tx: &mut Tx) {
        let dead: Vec<Shared> = self
            .shared
            .iter()
            .filter(|(_, st)| st.users == 0)
            .map(|(s, _)| s.clone())
            .collect();
        for s in dead {
            let st = self.shared.remove(&s).expect("present");
            self.set_chain(tx, &s.chain_name(), None);
            self.release(&s, st);
        }
        let dead: Vec<String> = self
            .specs
            .iter()
            .filter(|(_, st)| st.refs == 0)
            .map(|(k, _)| k.clone())
            .collect();
        for k in dead {
            let st = self.specs.remove(&k).expect("present");
            for f in self.fams.list() {
                let name = st.set_name(f);
                touch_set(tx, &self.ruleset, &name);
                self.ruleset.sets.remove(&name);
            }
        }
    }

    /// The operations that carry the table from before the change to now, in an order every
    /// step of which is valid: objects are created before what refers to them and deleted
    /// after what referred to them is gone.
    pub(super) fn finish(&self, tx: Tx) -> Ops {
        let rs = &self.ruleset;
        let mut ops = Vec::new();
        for (n, t) in &tx.sets {
            let Some(set) = rs.sets.get(n) else { continue };
            let add = |elements: Vec<Element>, ops: &mut Vec<NftOp>| {
                if !elements.is_empty() {
                    let set = n.clone();
                    ops.push(NftOp::AddElements { set, elements });
                }
            };
            if t.existed {
                if !t.dels.is_empty() {
                    let elements = t.dels.iter().cloned().collect();
                    ops.push(NftOp::DeleteElements {
                        set: n.clone(),
                        elements,
                    });
                }
                add(t.adds.iter().cloned().collect(), &mut ops);
            } else {
                ops.push(NftOp::AddSet {
                    name: n.clone(),
                    kind: set.kind,
                });
                add(set.elements.iter().cloned().collect(), &mut ops);
            }
        }
        for (n, old) in &tx.chains {
            if old.is_none() && rs.chains.contains_key(n) {
                ops.push(NftOp::AddChain(n.clone()));
            }
        }
        let map_now = |(m, k): &(&str, String)| rs.maps[*m].elements.get(k);
        let mut dels: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut adds: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
        for (mk, old) in &tx.maps {
            let now = map_now(mk);
            if old.as_ref() == now {
                continue;
            }
            if old.is_some() {
                dels.entry(mk.0).or_default().push(mk.1.clone());
            }
            if let Some(t) = now {
                adds.entry(mk.0)
                    .or_default()
                    .push((mk.1.clone(), t.clone()));
            }
        }
        for (map, keys) in dels {
            ops.push(NftOp::DeleteMapElements {
                map: map.into(),
                keys,
            });
        }
        for (n, old) in &tx.chains {
            if old.is_some() && old.as_ref() != rs.chains.get(n) {
                ops.push(NftOp::FlushChain(n.clone()));
            }
        }
        for (n, old) in &tx.chains {
            match rs.chains.get(n) {
                Some(c) if old.as_ref() != Some(c) => {
                    ops.extend(c.rules.iter().map(|r| NftOp::AddRule {
                        chain: n.clone(),
                        rule: r.clone(),
                    }))
                }
                _ => {}
            }
        }
        for (map, elements) in adds {
            ops.push(NftOp::AddMapElements {
                map: map.into(),
                elements,
            });
        }
        for (n, old) in &tx.chains {
            if old.is_some() && !rs.chains.contains_key(n) {
                ops.push(NftOp::DeleteChain(n.clone()));
            }
        }
        for (n, t) in &tx.sets {
            if t.existed && !rs.sets.contains_key(n) {
                ops.push(NftOp::DeleteSet(n.clone()));
            }
        }
        Ops { ops }
    }
}

/// Records that a set is touched (and whether it existed before the change).
fn touch_set<'a>(tx: &'a mut Tx, rs: &Ruleset, name: &str) -> &'a mut SetTouch {
    tx.sets.entry(name.to_string()).or_insert_with(|| SetTouch {
        existed: rs.sets.contains_key(name),
        adds: BTreeSet::new(),
        dels: BTreeSet::new(),
    })
}

impl SpecState {
    /// Replaces a contributor's pieces, updating the sets' elements and the change record.
    fn update(&mut self, c: Contributor, pieces: Vec<Piece>, rs: &mut Ruleset, tx: &mut Tx) {
        let old = self.members.remove(&c).unwrap_or_default();
        if old != pieces {
            for p in &old {
                self.piece(p, false, rs, tx);
            }
            if matches!(c, Contributor::NetworkSet(..)) {
                self.count_nets(&old, &pieces, rs, tx);
            }
            for p in &pieces {
                self.piece(p, true, rs, tx);
            }
        }
        if !pieces.is_empty() {
            self.members.insert(c, pieces);
        }
    }

    /// Counts a network set's families; when a family's set starts or stops holding nets, it
    /// moves between a hash set and an interval set (another name) with the same elements.
    fn count_nets(&mut self, old: &[Piece], new: &[Piece], rs: &mut Ruleset, tx: &mut Tx) {
        let has = |ps: &[Piece], f: Family| {
            ps.iter()
                .any(|p| matches!(p, Piece::Addr(pf, _) if *pf == f))
        };
        for f in Family::BOTH {
            let before = self.has_nets(f);
            let n = &mut self.nets[fam_index(f)];
            match (has(old, f), has(new, f)) {
                (false, true) => *n += 1,
                (true, false) => *n -= 1,
                _ => continue,
            }
            let after = self.has_nets(f);
            let (from, to) = (self.spec.name(f, before), self.spec.name(f, after));
            if before == after || !rs.sets.contains_key(&from) {
                continue;
            }
            // Recorded as element changes too, so a set that goes and comes back within one
            // change ends with the right difference.
            let elements: Vec<Element> = rs.sets[&from].elements.iter().cloned().collect();
            touch_set(tx, rs, &from);
            record(tx, rs, &from, elements.clone(), Vec::new());
            rs.sets.remove(&from);
            touch_set(tx, rs, &to);
            let kind = self.spec.kind(f, after);
            let empty = BTreeSet::new();
            rs.sets.insert(
                to.clone(),
                Set {
                    kind,
                    elements: empty,
                },
            );
            record(tx, rs, &to, Vec::new(), elements);
            tx.flipped.insert(self.spec.key.clone());
        }
    }

    fn piece(&mut self, p: &Piece, add: bool, rs: &mut Ruleset, tx: &mut Tx) {
        let (f, removed, added) = match p {
            Piece::Addr(f, iv) => {
                let set = &mut self.addrs[fam_index(*f)];
                let Delta { removed, added } = if add { set.add(*iv) } else { set.remove(*iv) };
                let el = |v: Vec<_>| v.into_iter().map(|iv| intervals::element(*f, iv)).collect();
                (*f, el(removed), el(added))
            }
            Piece::Port(a, proto, port) => {
                let f = Family::of(a);
                let n = self.ports[fam_index(f)]
                    .entry((*a, *proto, *port))
                    .or_insert(0);
                let before = *n;
                *n = if add { *n + 1 } else { *n - 1 };
                let e = vec![Element::NamedPort {
                    addr: *a,
                    proto: *proto,
                    port: *port,
                }];
                match (before, *n) {
                    (0, 1) => (f, vec![], e),
                    (1, 0) => {
                        self.ports[fam_index(f)].remove(&(*a, *proto, *port));
                        (f, e, vec![])
                    }
                    _ => return,
                }
            }
        };
        record(tx, rs, &self.set_name(f), removed, added);
    }
}

/// Applies element changes to a set and records their net effect on the change.
fn record(tx: &mut Tx, rs: &mut Ruleset, name: &str, removed: Vec<Element>, added: Vec<Element>) {
    if removed.is_empty() && added.is_empty() {
        return;
    }
    let t = touch_set(tx, rs, name);
    let set = rs.sets.get_mut(name).expect("active sets exist");
    for e in removed {
        set.elements.remove(&e);
        if !t.adds.remove(&e) {
            t.dels.insert(e);
        }
    }
    for e in added {
        set.elements.insert(e.clone());
        if !t.dels.remove(&e) {
            t.adds.insert(e);
        }
    }
}
