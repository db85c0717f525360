//! The agent's view of the cluster: the kinds its dataplane, BGP and policy loops read
//! ([`KINDS`]) are listed once and then followed by one watch for all of them, applied to a
//! [`ClusterView`] the loops read from memory. The view also knows the store revision it is
//! complete up to ([`SharedView::revision`], from the watch's progress), so the policy applier
//! can say which datastore revision its kernel table reflects. The loops are woken only by changes they can see (a heartbeat is
//! not one), so the cost of an event is the event, not a relist of the cluster.
//!
//! A watch that fails, ends or falls behind a compaction is re-established by listing again
//! and watching from there, with backoff, and logged. Until then the loops keep the last view,
//! so kernel drift is still repaired while the datastore is unreachable.
//!
//! One view serves both loops rather than one each: they follow the same kinds but BGP's three,
//! so sharing halves the listings and watches every node puts on the datastore. Does datastore
//! I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trellis_cluster::invalid::{self, Invalid};
use trellis_cluster::view::ClusterView;
use trellis_cluster::ClusterError;
use trellis_resources::Kind;
use trellis_store::{Datastore, Listing, StoreError, Watch, WatchEvent};

/// What the dataplane and BGP loops read: the dataplane pools, nodes and blocks; BGP also its
/// configurations, peers and filters.
pub const LOOP_KINDS: [Kind; 6] = [
    Kind::IpPool,
    Kind::Node,
    Kind::IpamBlock,
    Kind::BgpConfiguration,
    Kind::BgpPeer,
    Kind::BgpFilter,
];

/// What the policy applier reads (`trellis_policy::translate`'s inputs).
pub const POLICY_KINDS: [Kind; 14] = trellis_policy::translate::INPUT_KINDS;

/// Every kind the view follows (pods' records for the allocator: see [`SharedView::subscribe_pods`]).
pub const KINDS: [Kind; 20] = [
    Kind::IpPool,
    Kind::Node,
    Kind::IpamBlock,
    Kind::BgpConfiguration,
    Kind::BgpPeer,
    Kind::BgpFilter,
    Kind::Tier,
    Kind::KubernetesNetworkPolicy,
    Kind::NetworkPolicy,
    Kind::GlobalNetworkPolicy,
    Kind::NetworkSet,
    Kind::GlobalNetworkSet,
    Kind::Profile,
    Kind::Namespace,
    Kind::ServiceAccount,
    Kind::WorkloadEndpoint,
    Kind::ClusterNetworkPolicy,
    Kind::AdminNetworkPolicy,
    Kind::BaselineAdminNetworkPolicy,
    Kind::Pod,
];

/// First wait before listing again after a failure; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a quiet watch's progress is carried into the view's revision.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// A watch that lived this long counts as healthy: its failure starts the backoff afresh.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// The view and the means to hear of its changes, shared by the follower task and the loops.
pub struct SharedView {
    view: RwLock<ClusterView>,
    /// Counts visible changes of [`LOOP_KINDS`]; the dataplane and BGP loops wait on it.
    changes: watch::Sender<u64>,
    /// Counts visible changes of [`POLICY_KINDS`]; the policy applier waits on it (a pod's
    /// label change wakes no route loop).
    policy_changes: watch::Sender<u64>,
    /// Counts visible changes of pods' records; an ADD waiting for its pod's record waits on it.
    pod_changes: watch::Sender<u64>,
    /// The store revision the view is complete up to (every change at or before it is in):
    /// the listings' revision, then the watch's progress. Written under the view's lock.
    revision: watch::Sender<i64>,
    /// When the oldest policy change the applier has not taken yet reached the agent.
    policy_changed_at: Mutex<Option<Instant>>,
    /// Full listings done (the first and one per re-established watch).
    pub lists: AtomicU64,
    /// Watch events received (visible or not).
    pub events: AtomicU64,
    /// Watches that broke and listings that failed.
    pub failures: AtomicU64,
}

impl SharedView {
    /// An empty view of [`KINDS`].
    pub fn new() -> Arc<SharedView> {
        Arc::new(SharedView {
            view: RwLock::new(ClusterView::new(&KINDS)),
            changes: watch::channel(0).0,
            policy_changes: watch::channel(0).0,
            pod_changes: watch::channel(0).0,
            revision: watch::channel(0).0,
            policy_changed_at: Mutex::new(None),
            lists: AtomicU64::new(0),
            events: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// The current view; hold it briefly (the follower waits to write).
    pub fn read(&self) -> RwLockReadGuard<'_, ClusterView> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes on every visible change of [`LOOP_KINDS`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes on every visible change of [`POLICY_KINDS`].
    pub fn subscribe_policy(&self) -> watch::Receiver<u64> {
        self.policy_changes.subscribe()
    }

    /// Wakes on every visible change of a pod's record ([`Kind::Pod`]).
    pub fn subscribe_pods(&self) -> watch::Receiver<u64> {
        self.pod_changes.subscribe()
    }

    /// Wakes when [`SharedView::revision`] moves.
    pub fn subscribe_revision(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }

    /// The store revision the view is complete up to. Read it before [`SharedView::read`]:
    /// what the view then holds is at least that recent.
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    fn changed(&self, kinds: Touched) {
        if kinds.loops {
            self.changes.send_modify(|n| *n += 1);
        }
        if kinds.policy {
            self.policy_changed_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(Instant::now);
            self.policy_changes.send_modify(|n| *n += 1);
        }
        if kinds.pods {
            self.pod_changes.send_modify(|n| *n += 1);
        }
    }

    /// When the oldest policy change not taken yet reached the agent (and takes it).
    pub fn take_policy_changed_at(&self) -> Option<Instant> {
        self.policy_changed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Moves the complete-up-to revision forward (never back).
    fn reached(&self, revision: i64) {
        self.revision.send_if_modified(|r| {
            let moved = revision > *r;
            *r = (*r).max(revision);
            moved
        });
    }
}

/// The allocator's own writes go into the view as they commit (see
/// [`ClusterView::apply_own`]): a new pod's endpoint reaches the policy applier without the
/// watch's delay, which on SQLite is its change-log poll.
impl trellis_cluster::ipam::CommitObserver for SharedView {
    fn committed(&self, revision: i64, writes: &[trellis_store::TxnOp]) {
        let mut changed = Touched::default();
        {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            for (w, a) in writes.iter().zip(view.apply_own(revision, writes)) {
                if let Some(k) = a.changed {
                    changed.add(k);
                }
                // As for a watch event: a key held as invalid is valid again once written
                // (the event that follows is skipped as already seen).
                if let Some(kind) = a.kind {
                    let key = match w {
                        trellis_store::TxnOp::Put(k, _) | trellis_store::TxnOp::Delete(k) => k,
                    };
                    let bad = a.error.as_ref().map(|e| Invalid {
                        key: key.clone(),
                        revision,
                        reason: e.to_string(),
                    });
                    invalid::observe_key(kind, key, bad.as_ref());
                }
            }
        }
        self.changed(changed);
    }
}

/// Which groups of loops a burst of changes concerns.
#[derive(Debug, Default, Clone, Copy)]
struct Touched {
    loops: bool,
    policy: bool,
    pods: bool,
}

impl Touched {
    fn add(&mut self, kind: Kind) {
        self.loops |= LOOP_KINDS.contains(&kind);
        self.policy |= POLICY_KINDS.contains(&kind);
        self.pods |= kind == Kind::Pod;
    }
}

/// The allocator reads a pod's record from the view first (a miss or a conflict reads the
/// store), so an ADD costs no extra datastore read.
impl trellis_cluster::ipam::PodRecords for SharedView {
    fn pod_record(&self, key: &str) -> Option<trellis_cluster::objects::Stored> {
        self.read().get(key).cloned()
    }
}

/// Lists every kind and replaces the view's objects with the listings (one lock, so a loop never
/// sees half a relist). Records that do not decode are skipped and logged with their key.
pub async fn load(store: &dyn Datastore, shared: &SharedView) -> Result<(), StoreError> {
    let mut listings = Vec::new();
    for kind in KINDS {
        listings.push((kind, store.list(&kind.prefix()).await?));
    }
    shared.lists.fetch_add(1, Ordering::Relaxed);
    let mut changed = Touched::default();
    {
        let mut view = shared.view.write().unwrap_or_else(|e| e.into_inner());
        for (kind, listing) in &listings {
            let (c, errors) = view.load(*kind, listing);
            if c {
                changed.add(*kind);
            }
            // Logged once per key and revision, and counted for metrics.
            invalid::observe_listing(*kind, &invalid_records(&errors, listing));
        }
        // Each listing is complete as of its own revision; the view as of the oldest.
        let complete = listings.iter().map(|(_, l)| l.revision).min().unwrap_or(0);
        shared.reached(complete);
    }
    shared.changed(changed);
    Ok(())
}

/// The listed records that did not decode, as the invalid-records tracker takes them, each with
/// its own revision. The revisions are looked up in one index of the listing: a search of the
/// listing per bad record made a listing of many bad records quadratic, and it runs under the
/// view's write lock (so every loop waited) and before the agent serves its socket.
fn invalid_records(errors: &[ClusterError], listing: &Listing) -> Vec<Invalid> {
    if errors.is_empty() {
        return Vec::new();
    }
    let revisions: std::collections::HashMap<&str, i64> = listing
        .items
        .iter()
        .map(|kv| (kv.key.as_str(), kv.mod_revision))
        .collect();
    errors
        .iter()
        .map(|e| {
            let key = match e {
                ClusterError::Corrupt { key, .. } => key.clone(),
                other => other.to_string(),
            };
            let revision = revisions
                .get(key.as_str())
                .copied()
                .unwrap_or(listing.revision);
            Invalid {
                key,
                revision,
                reason: e.to_string(),
            }
        })
        .collect()
}

/// Applies a burst of events (the first, then whatever is already queued) under one lock and
/// wakes the loops once. Returns the error that ended the stream, if one came.
fn apply_burst(
    shared: &SharedView,
    first: Option<WatchEvent>,
    watch: &mut Watch,
) -> Option<StoreError> {
    let mut changed = Touched::default();
    let mut end = None;
    {
        // Read before draining: every event up to it is then in the channel.
        let progress = watch.progress();
        let mut view = shared.view.write().unwrap_or_else(|e| e.into_inner());
        let mut next = first.map(Ok).or_else(|| watch.try_next());
        while let Some(item) = next {
            match item {
                Ok(ev) => {
                    shared.events.fetch_add(1, Ordering::Relaxed);
                    let applied = view.apply(&ev);
                    if let Some(k) = applied.changed {
                        changed.add(k);
                    }
                    if let Some(kind) = applied.kind {
                        let bad = applied.error.as_ref().map(|e| Invalid {
                            key: ev.key.clone(),
                            revision: ev.revision,
                            reason: e.to_string(),
                        });
                        invalid::observe_key(kind, &ev.key, bad.as_ref());
                    }
                }
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
            next = watch.try_next();
        }
        if let (Some(p), None) = (progress, &end) {
            // The view's own copy gates the allocator's writes (`ClusterView::apply_own`).
            view.reached(p);
            shared.reached(p);
        }
    }
    shared.changed(changed);
    end
}

/// Follows the datastore forever: watches from where the view's listings end, applies events,
/// and on any failure lists again and re-watches, with backoff.
pub async fn follow(store: Arc<dyn Datastore>, shared: Arc<SharedView>) {
    let prefixes: Vec<String> = KINDS.iter().map(|k| k.prefix()).collect();
    let mut need_list = !shared.read().loaded();
    let mut delay = BACKOFF_MIN;
    let mut broken = false;
    loop {
        if need_list {
            if let Err(e) = load(&*store, &shared).await {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?delay, "listing the cluster failed; the loops keep the last view");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        // However this watch ends, the next one starts from a fresh listing: events of
        // different kinds may arrive out of revision order, so there is no safe resume point.
        need_list = true;
        let from = shared.read().watch_from();
        let mut w = match store.watch_prefixes(&prefixes, from).await {
            Ok(w) => w,
            Err(e) => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?delay, "watching the cluster failed; listing again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if broken {
            tracing::info!(from, "datastore watch re-established");
        }
        let started = Instant::now();
        // A quiet watch still moves the view's revision (other kinds' writes move the store's).
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let end = loop {
            let item = tokio::select! {
                item = w.next() => item,
                _ = progress.tick() => {
                    if w.progress().is_some_and(|p| p > shared.revision()) {
                        if let Some(e) = apply_burst(&shared, None, &mut w) {
                            break Some(e);
                        }
                    }
                    continue;
                }
            };
            let Some(item) = item else {
                break None;
            };
            let first = match item {
                Ok(ev) => ev,
                Err(e) => break Some(e),
            };
            if let Some(e) = apply_burst(&shared, Some(first), &mut w) {
                break Some(e);
            }
        };
        broken = true;
        shared.failures.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() >= HEALTHY_AFTER {
            delay = BACKOFF_MIN;
        }
        match end {
            Some(StoreError::Compacted {
                requested,
                compacted,
            }) => tracing::info!(
                requested,
                compacted,
                "the datastore watch fell behind a compaction; listing again"
            ),
            Some(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "the datastore watch failed; listing again")
            }
            None => {
                tracing::warn!(retry_in = ?delay, "the datastore watch ended; listing again")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// A loaded view holding `resources` (for tests of what the loops derive from it).
#[cfg(test)]
pub(crate) fn view_of(resources: &[trellis_resources::Resource]) -> ClusterView {
    let mut view = ClusterView::new(&KINDS);
    for kind in KINDS {
        let items = resources
            .iter()
            .filter(|r| r.kind() == kind)
            .map(|r| trellis_store::KeyValue {
                key: r.key(),
                value: trellis_cluster::objects::encode(r),
                create_revision: 1,
                mod_revision: 1,
            })
            .collect();
        let (_, errors) = view.load(kind, &trellis_store::Listing { items, revision: 1 });
        assert!(errors.is_empty(), "{errors:?}");
    }
    view
}

#[cfg(test)]
mod tests;
