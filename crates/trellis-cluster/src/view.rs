//! An in-memory copy of the kinds a loop follows, as Kubernetes informers keep one: built from
//! one listing per kind and then kept current by watch events, so a loop reads its inputs from
//! memory and the datastore sees one list per kind plus the changes. Pure: the agent's shell
//! lists, watches and feeds it.
//!
//! Every change reports whether its users can see it: a Node whose only change is
//! `status.lastHeartbeat` is stored but reported unchanged, so heartbeats wake no loop. A value
//! that does not decode drops the object (the store holds no valid version of it any more) and
//! is reported with its key; it never stops the view.

use std::collections::BTreeMap;

use trellis_resources::{
    BgpConfigurationSpec, BgpFilterSpec, BgpPeerSpec, IpPoolSpec, IpamBlockSpec, Kind, NodeSpec,
    Object, Resource,
};
use trellis_store::{KeyValue, Listing, TxnOp, WatchEvent, WatchEventKind};

use crate::objects::{decode, Stored};
use crate::ClusterError;

/// The followed kinds' objects by key, and how far each kind's listing reached.
#[derive(Debug, Clone)]
pub struct ClusterView {
    kinds: Vec<Kind>,
    /// Revision each kind was listed at: its events at or before it are already in.
    listed_at: BTreeMap<Kind, i64>,
    objects: BTreeMap<Kind, BTreeMap<String, Stored>>,
    /// Per kind, counts visible changes (a loop recomputes what it derives from a kind only
    /// when this moved).
    generation: BTreeMap<Kind, u64>,
    /// The newest revision anything in the view came from (listings and events): an own write
    /// older than it may already be superseded, so it waits for the watch.
    newest: i64,
    /// The store revision the view is complete up to (every change at or before it is in): the
    /// listings', then the watch's progress ([`ClusterView::reached`]).
    complete: i64,
    /// Own transactions applied ahead of the watch, past `complete`, with their writes (a
    /// relist older than one of them has it put back).
    own: BTreeMap<i64, Vec<TxnOp>>,
}

/// What one event did to the view.
#[derive(Debug, Default)]
pub struct Applied {
    /// The kind whose objects changed in a way users see; `None` when the event changed
    /// nothing visible (a heartbeat, a replay of something already listed, an unknown key).
    pub changed: Option<Kind>,
    /// The kind of the event's key when the view holds that kind and the event was new to it
    /// (so callers can track which records are currently invalid).
    pub kind: Option<Kind>,
    /// The event's value did not decode; the object was dropped.
    pub error: Option<ClusterError>,
}

/// Whether two versions of an object differ in anything a loop reads: everything but a Node's
/// status (its heartbeat).
fn differs(a: &Resource, b: &Resource) -> bool {
    match (a, b) {
        (Resource::Node(x), Resource::Node(y)) => x.metadata != y.metadata || x.spec != y.spec,
        _ => a != b,
    }
}

/// Decodes a stored value as an object of `kind` (a value of another kind under this kind's
/// prefix is as bad as one that does not parse).
fn decode_as(kind: Kind, kv: &KeyValue) -> Result<Stored, ClusterError> {
    let stored = decode(kv)?;
    if stored.resource.kind() != kind {
        return Err(ClusterError::Corrupt {
            key: kv.key.clone(),
            reason: format!(
                "a {} stored under the {} prefix",
                stored.resource.kind(),
                kind
            ),
        });
    }
    Ok(stored)
}

macro_rules! typed {
    ($fn:ident, $variant:ident, $spec:ty) => {
        /// This kind's objects, in key order.
        pub fn $fn(&self) -> impl Iterator<Item = &Object<$spec>> + '_ {
            self.stored(Kind::$variant)
                .filter_map(|s| match &s.resource {
                    Resource::$variant(o) => Some(o),
                    _ => None,
                })
        }
    };
}

impl ClusterView {
    /// An empty view of `kinds`, not loaded yet.
    pub fn new(kinds: &[Kind]) -> ClusterView {
        ClusterView {
            kinds: kinds.to_vec(),
            listed_at: BTreeMap::new(),
            objects: BTreeMap::new(),
            generation: BTreeMap::new(),
            newest: 0,
            complete: 0,
            own: BTreeMap::new(),
        }
    }

    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// Every followed kind has been listed at least once.
    pub fn loaded(&self) -> bool {
        self.kinds.iter().all(|k| self.listed_at.contains_key(k))
    }

    /// Where a watch that follows on from the listings starts: after the oldest of them.
    pub fn watch_from(&self) -> i64 {
        self.listed_at.values().min().copied().unwrap_or(0) + 1
    }

    /// How many visible changes `kind` has had (to tell whether to recompute from it).
    pub fn generation(&self, kind: Kind) -> u64 {
        self.generation.get(&kind).copied().unwrap_or(0)
    }

    /// Replaces `kind`'s objects with a listing of them. Returns whether anything visible
    /// changed and the records skipped because they do not decode.
    pub fn load(&mut self, kind: Kind, listing: &Listing) -> (bool, Vec<ClusterError>) {
        let mut errors = Vec::new();
        let mut fresh = BTreeMap::new();
        for kv in &listing.items {
            match decode_as(kind, kv) {
                Ok(s) => {
                    fresh.insert(kv.key.clone(), s);
                }
                Err(e) => errors.push(e),
            }
        }
        if listing.revision < self.complete {
            // Older than what the view already had complete: the store went back (restored
            // from a backup, replaced). Its own writes are not this store's.
            self.own.clear();
        }
        self.overlay_own(kind, listing.revision, &mut fresh);
        let old = self.objects.get(&kind);
        let changed = match old {
            None => !fresh.is_empty() || !self.listed_at.contains_key(&kind),
            Some(old) => {
                old.len() != fresh.len()
                    || old
                        .iter()
                        .zip(&fresh)
                        .any(|((ka, a), (kb, b))| ka != kb || differs(&a.resource, &b.resource))
            }
        };
        self.objects.insert(kind, fresh);
        self.listed_at.insert(kind, listing.revision);
        self.newest = self.newest.max(listing.revision);
        if self.loaded() {
            // Each listing is complete as of its own revision; the view as of the oldest.
            let oldest = self.listed_at.values().min().copied().unwrap_or(0);
            self.reached(oldest);
        }
        if changed {
            *self.generation.entry(kind).or_default() += 1;
        }
        (changed, errors)
    }

    /// Every change at or before `revision` is in the view (the watch's progress): moves the
    /// point own writes must follow on from (never back).
    pub fn reached(&mut self, revision: i64) {
        self.complete = self.complete.max(revision);
        let complete = self.complete;
        self.own.retain(|r, _| *r > complete);
    }

    /// Puts the own writes newer than a listing of `kind` back over it: the listing was taken
    /// before they committed (a relist lists before it takes the view's lock), and since each
    /// followed on from the view ([`ClusterView::follows_on`]) nobody else wrote in between.
    fn overlay_own(&self, kind: Kind, listed: i64, fresh: &mut BTreeMap<String, Stored>) {
        let prefix = kind.prefix();
        for (revision, writes) in self.own.range(listed + 1..) {
            for w in writes {
                match w {
                    TxnOp::Put(key, value) if key.starts_with(&prefix) => {
                        let kv = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: 0,
                            mod_revision: *revision,
                        };
                        if let Ok(s) = decode_as(kind, &kv) {
                            fresh.insert(key.clone(), s);
                        }
                    }
                    TxnOp::Delete(key) if key.starts_with(&prefix) => {
                        fresh.remove(key);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Whether a transaction at `revision` is the store's next change after what the view
    /// holds: every revision between the view's complete point and it was an own write
    /// already applied. Revisions are consecutive (each writing transaction takes the next one,
    /// on etcd and SQLite alike), so any other revision in between is someone else's change the
    /// view has not seen — a release of the address this write hands out again, a policy
    /// written just before the pod — and applying this write ahead of it would show a state
    /// the store never passed through.
    fn follows_on(&self, revision: i64) -> bool {
        let gap = revision - self.complete - 1;
        gap >= 0
            && usize::try_from(gap).is_ok_and(|g| g <= self.own.len())
            && (self.complete + 1..revision).all(|r| self.own.contains_key(&r))
    }

    /// Applies one watch event.
    pub fn apply(&mut self, ev: &WatchEvent) -> Applied {
        let Some(kind) = self
            .kinds
            .iter()
            .copied()
            .find(|k| ev.key.starts_with(&k.prefix()))
        else {
            return Applied::default();
        };
        if ev.revision <= self.listed_at.get(&kind).copied().unwrap_or(0) {
            return Applied::default(); // the listing already has it
        }
        let objects = self.objects.entry(kind).or_default();
        if objects
            .get(&ev.key)
            .is_some_and(|o| o.revision >= ev.revision)
        {
            // Already this version or a newer one (an own write applied ahead of its event).
            return Applied::default();
        }
        self.newest = self.newest.max(ev.revision);
        let (changed, error) = match ev.kind {
            WatchEventKind::Delete => (objects.remove(&ev.key).is_some(), None),
            WatchEventKind::Put => {
                let kv = KeyValue {
                    key: ev.key.clone(),
                    value: ev.value.clone(),
                    create_revision: 0,
                    mod_revision: ev.revision,
                };
                match decode_as(kind, &kv) {
                    Ok(s) => {
                        let changed = objects
                            .get(&ev.key)
                            .is_none_or(|old| differs(&old.resource, &s.resource));
                        objects.insert(ev.key.clone(), s);
                        (changed, None)
                    }
                    Err(e) => (objects.remove(&ev.key).is_some(), Some(e)),
                }
            }
        };
        if changed {
            *self.generation.entry(kind).or_default() += 1;
        }
        Applied {
            changed: changed.then_some(kind),
            kind: Some(kind),
            error,
        }
    }

    /// Applies the writes of a transaction this process committed at `revision`, ahead of their
    /// watch events, so its own loops see them without waiting for the watch (read your
    /// writes). Only when the transaction follows on from what the view holds
    /// ([`ClusterView::follows_on`]: no change of anyone else's is missing before it) and
    /// nothing newer is in the view yet: then the view shows a state the store passed through,
    /// and the writes' events, when they come, change nothing. Returns what each write did
    /// (nothing at all when the write must wait for the watch).
    pub fn apply_own(&mut self, revision: i64, writes: &[TxnOp]) -> Vec<Applied> {
        if revision <= self.newest || !self.follows_on(revision) {
            return Vec::new();
        }
        self.own.insert(revision, writes.to_vec());
        writes
            .iter()
            .map(|w| {
                let (kind, key, value) = match w {
                    TxnOp::Put(k, v) => (WatchEventKind::Put, k, v.clone()),
                    TxnOp::Delete(k) => (WatchEventKind::Delete, k, Vec::new()),
                };
                self.apply(&WatchEvent {
                    kind,
                    key: key.clone(),
                    value,
                    revision,
                })
            })
            .collect()
    }

    /// One kind's objects with their revisions, in key order.
    pub fn stored(&self, kind: Kind) -> impl Iterator<Item = &Stored> + '_ {
        self.objects.get(&kind).into_iter().flat_map(|m| m.values())
    }

    /// One object by key.
    pub fn get(&self, key: &str) -> Option<&Stored> {
        let kind = self.kinds.iter().find(|k| key.starts_with(&k.prefix()))?;
        self.objects.get(kind)?.get(key)
    }

    typed!(pools, IpPool, IpPoolSpec);
    typed!(nodes, Node, NodeSpec);
    typed!(blocks, IpamBlock, IpamBlockSpec);
    typed!(bgp_configurations, BgpConfiguration, BgpConfigurationSpec);
    typed!(bgp_peers, BgpPeer, BgpPeerSpec);
    typed!(bgp_filters, BgpFilter, BgpFilterSpec);
    typed!(
        endpoints,
        WorkloadEndpoint,
        trellis_resources::WorkloadEndpointSpec
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::encode;
    use trellis_resources::{key_for, Metadata, NodeStatus};

    fn node(name: &str, addr: &str, heartbeat: u64) -> Resource {
        Resource::Node(Object {
            metadata: Metadata {
                name: name.into(),
                ..Default::default()
            },
            spec: NodeSpec {
                addresses: vec![trellis_resources::NodeAddress {
                    address: addr.into(),
                    kind: None,
                }],
                ..Default::default()
            },
            status: Some(NodeStatus {
                last_heartbeat: Some(heartbeat),
            }),
        })
    }

    fn pool(name: &str, cidr: &str) -> Resource {
        let docs = trellis_resources::parse_documents(&format!(
            "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n"
        ))
        .unwrap();
        docs.into_iter().next().unwrap()
    }

    fn kv(r: &Resource, rev: i64) -> KeyValue {
        KeyValue {
            key: r.key(),
            value: encode(r),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn put(r: &Resource, rev: i64) -> WatchEvent {
        WatchEvent {
            kind: WatchEventKind::Put,
            key: r.key(),
            value: encode(r),
            revision: rev,
        }
    }

    fn loaded(items: Vec<KeyValue>, rev: i64) -> ClusterView {
        let mut v = ClusterView::new(&[Kind::Node, Kind::IpPool]);
        let (nodes, pools): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|kv| kv.key.starts_with(&Kind::Node.prefix()));
        for (kind, items) in [(Kind::Node, nodes), (Kind::IpPool, pools)] {
            let (_, errors) = v.load(
                kind,
                &Listing {
                    items,
                    revision: rev,
                },
            );
            assert!(errors.is_empty());
        }
        v
    }

    fn names(v: &ClusterView) -> Vec<String> {
        v.nodes().map(|n| n.metadata.name.clone()).collect()
    }

    #[test]
    fn own_writes_are_seen_before_their_events_and_their_events_change_nothing() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        let b = node("b", "192.0.2.2/24", 1);
        let applied = v.apply_own(6, &[TxnOp::Put(b.key(), encode(&b))]);
        assert_eq!(applied[0].changed, Some(Kind::Node));
        assert_eq!(names(&v), ["a", "b"]);
        // The next own write follows on from it.
        let c = node("c", "192.0.2.3/24", 1);
        assert_eq!(
            v.apply_own(7, &[TxnOp::Put(c.key(), encode(&c))])[0].changed,
            Some(Kind::Node)
        );
        // The writes' own events are no-ops; later events of other keys come in.
        assert!(v.apply(&put(&b, 6)).changed.is_none());
        assert!(v.apply(&put(&c, 7)).changed.is_none());
        assert!(v
            .apply(&put(&pool("p", "10.1.0.0/16"), 8))
            .changed
            .is_some());
        // A delete after it applies.
        let del = WatchEvent {
            kind: WatchEventKind::Delete,
            key: b.key(),
            value: Vec::new(),
            revision: 9,
        };
        assert_eq!(v.apply(&del).changed, Some(Kind::Node));
        assert_eq!(names(&v), ["a", "c"]);
    }

    /// Someone else's change at 6 is not in the view yet (the watch lags): an own write at 7
    /// waits for the watch, or the view would show 7 without 6 — a state the store never held
    /// (a released address on its old endpoint and its new one; a pod without the policy
    /// written just before it).
    #[test]
    fn own_writes_after_an_unseen_change_wait_for_the_watch() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        let b = node("b", "192.0.2.2/24", 1);
        assert!(v
            .apply_own(7, &[TxnOp::Put(b.key(), encode(&b))])
            .is_empty());
        assert_eq!(names(&v), ["a"]);
        // Once the watch says the view is complete up to 6, the next own write goes in.
        v.reached(6);
        let c = node("c", "192.0.2.3/24", 1);
        assert!(v
            .apply_own(8, &[TxnOp::Put(c.key(), encode(&c))])
            .is_empty());
        v.reached(7);
        assert_eq!(
            v.apply_own(8, &[TxnOp::Put(c.key(), encode(&c))])[0].changed,
            Some(Kind::Node)
        );
        assert_eq!(names(&v), ["a", "c"]);
    }

    /// A relist lists (outside the agent's lock) before an own write commits and installs the
    /// listings after the write went into the view: the write must stay (the listing is older
    /// than it), not vanish until the watch brings it again — a new pod's endpoint confirmed
    /// programmed would be unprogrammed meanwhile, its block withdrawn from the routes.
    #[test]
    fn a_relist_older_than_an_own_write_keeps_it() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        let b = node("b", "192.0.2.2/24", 1);
        let a = node("a", "192.0.2.1/24", 1);
        assert!(!v
            .apply_own(
                6,
                &[TxnOp::Put(b.key(), encode(&b)), TxnOp::Delete(a.key())]
            )
            .is_empty());
        assert_eq!(names(&v), ["b"]);
        let listing = Listing {
            items: vec![kv(&a, 3)],
            revision: 5,
        };
        v.load(Kind::Node, &listing);
        assert_eq!(
            names(&v),
            ["b"],
            "the own write at 6 is newer than the listing at 5"
        );
        // A listing that has the write (or anything newer) replaces it as usual.
        let listing = Listing {
            items: vec![kv(&a, 7)],
            revision: 7,
        };
        v.load(Kind::Node, &listing);
        assert_eq!(names(&v), ["a"]);
    }

    /// A store that went back (restored from a backup) lists older than the view was
    /// complete: own writes of the store before are not put back over its listings.
    #[test]
    fn a_relist_of_a_store_that_went_back_drops_own_writes() {
        let mut v = loaded(vec![], 5);
        v.reached(9);
        let b = node("b", "192.0.2.2/24", 1);
        assert!(!v
            .apply_own(10, &[TxnOp::Put(b.key(), encode(&b))])
            .is_empty());
        let a = node("a", "192.0.2.1/24", 1);
        v.load(
            Kind::Node,
            &Listing {
                items: vec![kv(&a, 2)],
                revision: 3,
            },
        );
        assert_eq!(names(&v), ["a"]);
    }

    #[test]
    fn own_writes_older_than_the_view_wait_for_the_watch() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        let b = node("b", "192.0.2.2/24", 1);
        // The key was written at 8 and deleted at 9, and the watch brought both already: the
        // write at 8 must not come back.
        v.apply(&put(&b, 8));
        v.apply(&WatchEvent {
            kind: WatchEventKind::Delete,
            key: b.key(),
            value: Vec::new(),
            revision: 9,
        });
        assert!(v
            .apply_own(8, &[TxnOp::Put(b.key(), encode(&b))])
            .is_empty());
        assert_eq!(names(&v), ["a"]);
        // Not newer than the listing either.
        let mut v = loaded(vec![], 5);
        assert!(v
            .apply_own(5, &[TxnOp::Put(b.key(), encode(&b))])
            .is_empty());
        assert!(names(&v).is_empty());
    }

    #[test]
    fn events_after_the_listing_are_applied() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        assert!(v.loaded());
        assert_eq!(v.watch_from(), 6);
        let g = v.generation(Kind::Node);
        let applied = v.apply(&put(&node("b", "192.0.2.2/24", 1), 6));
        assert_eq!(applied.changed, Some(Kind::Node));
        assert_eq!(v.generation(Kind::Node), g + 1);
        let names: Vec<&str> = v.nodes().map(|n| n.metadata.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let applied = v.apply(&put(&pool("p", "10.1.0.0/16"), 7));
        assert_eq!(applied.changed, Some(Kind::IpPool));
        assert_eq!(v.pools().count(), 1);
        let del = WatchEvent {
            kind: WatchEventKind::Delete,
            key: key_for(Kind::Node, None, "a"),
            value: Vec::new(),
            revision: 8,
        };
        assert_eq!(v.apply(&del).changed, Some(Kind::Node));
        let names: Vec<&str> = v.nodes().map(|n| n.metadata.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        // A delete of something not there changes nothing.
        assert_eq!(v.apply(&del).changed, None);
    }

    #[test]
    fn a_heartbeat_alone_is_not_a_visible_change() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        let g = v.generation(Kind::Node);
        let applied = v.apply(&put(&node("a", "192.0.2.1/24", 99), 6));
        assert_eq!(applied.changed, None);
        assert_eq!(v.generation(Kind::Node), g);
        // The view still holds the newest version.
        let n = v.nodes().next().unwrap();
        assert_eq!(n.status.as_ref().unwrap().last_heartbeat, Some(99));
        assert_eq!(v.get(&node("a", "", 0).key()).unwrap().revision, 6);
        // An address change is.
        let applied = v.apply(&put(&node("a", "192.0.2.9/24", 100), 7));
        assert_eq!(applied.changed, Some(Kind::Node));
    }

    #[test]
    fn events_the_listing_already_has_are_skipped() {
        // Nodes listed at 10, pools at 5: the watch starts at 6 and replays node events up to 10.
        let mut v = ClusterView::new(&[Kind::Node, Kind::IpPool]);
        v.load(
            Kind::Node,
            &Listing {
                items: vec![kv(&node("a", "192.0.2.1/24", 1), 9)],
                revision: 10,
            },
        );
        v.load(
            Kind::IpPool,
            &Listing {
                items: Vec::new(),
                revision: 5,
            },
        );
        assert_eq!(v.watch_from(), 6);
        // Node "a" was created at 7 and deleted at 8, before the node listing: both replays are no-ops.
        let gone = node("gone", "192.0.2.7/24", 1);
        assert_eq!(v.apply(&put(&gone, 7)).changed, None);
        let del = WatchEvent {
            kind: WatchEventKind::Delete,
            key: gone.key(),
            value: Vec::new(),
            revision: 8,
        };
        assert_eq!(v.apply(&del).changed, None);
        assert_eq!(v.nodes().count(), 1);
        // A pool created at 6 is newer than the pool listing.
        assert_eq!(
            v.apply(&put(&pool("p", "10.1.0.0/16"), 6)).changed,
            Some(Kind::IpPool)
        );
    }

    #[test]
    fn a_relist_after_compaction_replaces_the_objects() {
        let mut v = loaded(
            vec![
                kv(&node("a", "192.0.2.1/24", 1), 3),
                kv(&node("b", "192.0.2.2/24", 1), 4),
            ],
            5,
        );
        // While the watch was broken, "a" went away, "b" only heartbeated: one visible change.
        let g = v.generation(Kind::Node);
        let (changed, _) = v.load(
            Kind::Node,
            &Listing {
                items: vec![kv(&node("b", "192.0.2.2/24", 50), 40)],
                revision: 60,
            },
        );
        assert!(changed);
        assert_eq!(v.generation(Kind::Node), g + 1);
        assert_eq!(v.nodes().count(), 1);
        // Listing the same objects again (heartbeats aside) is no change at all.
        let g = v.generation(Kind::Node);
        let (changed, _) = v.load(
            Kind::Node,
            &Listing {
                items: vec![kv(&node("b", "192.0.2.2/24", 51), 61)],
                revision: 61,
            },
        );
        assert!(!changed);
        assert_eq!(v.generation(Kind::Node), g);
        // A relist at 61 moves the watch start, so events it already has are not replayed.
        let (_, _) = v.load(
            Kind::IpPool,
            &Listing {
                items: Vec::new(),
                revision: 61,
            },
        );
        assert_eq!(v.watch_from(), 62);
    }

    #[test]
    fn undecodable_values_drop_the_object_and_name_the_key() {
        let mut v = loaded(vec![kv(&node("a", "192.0.2.1/24", 1), 3)], 5);
        let mut bad = put(&node("a", "192.0.2.1/24", 2), 6);
        bad.value = b"{not json".to_vec();
        let applied = v.apply(&bad);
        assert_eq!(applied.changed, Some(Kind::Node));
        let err = applied.error.expect("reported").to_string();
        assert!(err.contains("/trellis/v1/nodes/a"), "{err}");
        assert_eq!(v.nodes().count(), 0);
        // A pool stored under the nodes prefix is as bad.
        let mut wrong = put(&pool("p", "10.1.0.0/16"), 7);
        wrong.key = key_for(Kind::Node, None, "p");
        let applied = v.apply(&wrong);
        assert!(applied.error.is_some());
        assert_eq!(v.nodes().count(), 0);
        // A listing skips bad records and keeps the rest.
        let mut bad_kv = kv(&node("c", "192.0.2.3/24", 1), 8);
        bad_kv.value = b"[]".to_vec();
        let (_, errors) = v.load(
            Kind::Node,
            &Listing {
                items: vec![kv(&node("b", "192.0.2.2/24", 1), 8), bad_kv],
                revision: 9,
            },
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("/trellis/v1/nodes/c"));
        assert_eq!(v.nodes().count(), 1);
    }

    #[test]
    fn keys_of_other_kinds_are_ignored() {
        let mut v = loaded(Vec::new(), 5);
        let ev = WatchEvent {
            kind: WatchEventKind::Put,
            key: "/trellis/v1/workloadendpoints/ns/x".into(),
            value: b"whatever".to_vec(),
            revision: 6,
        };
        let applied = v.apply(&ev);
        assert!(applied.changed.is_none() && applied.error.is_none());
        assert!(!ClusterView::new(&[Kind::Node]).loaded());
    }
}
