//! Records in the datastore that do not decode (garbage, a kind stored under another kind's
//! key, values an older or newer version wrote that fail validation). Listings skip them so one
//! bad record never stops an agent; this module remembers which keys are currently bad, so each
//! is logged once per revision (not on every pass) and counted for metrics. A record that decodes
//! can still be unusable to a later layer (a policy in a tier that does not exist): such a layer
//! reports it under its own [`Layer`], which the decoder's observations never clear — a listing
//! or an event saying "decodes" says nothing about whether the policy compiler could use it. The
//! [`Tracker`] is pure; [`observe_listing`], [`observe_key`] and [`observe_translation`] update
//! one process-wide tracker and log.

use std::collections::BTreeMap;
use std::sync::Mutex;

use trellis_resources::Kind;

/// A stored record that cannot be used, with the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub revision: i64,
    pub reason: String,
}

/// What changed in the set of invalid records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key became invalid, or was rewritten and is still invalid (a new revision).
    Invalid(Kind, Invalid),
    /// A key that was invalid is now valid or gone.
    Cleared(Kind, String),
}

/// Which layer found a record unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    /// The record does not decode into its kind (listings and watch events).
    Decode,
    /// The record decodes, but the policy translation leaves it out.
    Policy,
}

/// The currently invalid records, by layer and key.
#[derive(Debug, Default)]
pub struct Tracker {
    bad: BTreeMap<(Layer, String), (Kind, Invalid)>,
}

impl Tracker {
    /// A full listing of `kind` found exactly `invalid` undecodable: keys of that kind not in it
    /// are cleared from the decode layer (other layers' reports stay). Returns what changed (a
    /// key seen again at the same revision is no change).
    pub fn listing(&mut self, kind: Kind, invalid: &[Invalid]) -> Vec<Change> {
        // A set, so that a listing of many bad records (all of an older version's endpoints,
        // say) costs O(n log n), not a comparison of every pair.
        let listed: std::collections::HashSet<&str> =
            invalid.iter().map(|i| i.key.as_str()).collect();
        let mut changes: Vec<Change> = self
            .bad
            .iter()
            .filter(|((layer, k), (kd, _))| {
                *layer == Layer::Decode && *kd == kind && !listed.contains(k.as_str())
            })
            .map(|((_, k), _)| Change::Cleared(kind, k.clone()))
            .collect();
        for c in &changes {
            if let Change::Cleared(_, k) = c {
                self.bad.remove(&(Layer::Decode, k.clone()));
            }
        }
        for i in invalid {
            changes.extend(self.set(Layer::Decode, kind, &i.key, Some(i)));
        }
        changes
    }

    /// `layer` found one key unusable (`Some`), or usable or deleted (`None`).
    pub fn set(
        &mut self,
        layer: Layer,
        kind: Kind,
        key: &str,
        invalid: Option<&Invalid>,
    ) -> Option<Change> {
        let id = (layer, key.to_string());
        match invalid {
            Some(i) => {
                let seen = self
                    .bad
                    .get(&id)
                    .is_some_and(|(_, old)| old.revision == i.revision);
                self.bad.insert(id, (kind, i.clone()));
                (!seen).then(|| Change::Invalid(kind, i.clone()))
            }
            None => self
                .bad
                .remove(&id)
                .map(|_| Change::Cleared(kind, key.to_string())),
        }
    }

    /// Currently invalid records per kind (kinds with none are left out); a key more than one
    /// layer reports counts once.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let keys: std::collections::BTreeSet<(&Kind, &str)> = self
            .bad
            .iter()
            .map(|((_, key), (kind, _))| (kind, key.as_str()))
            .collect();
        let mut out = BTreeMap::new();
        for (kind, _) in keys {
            *out.entry(*kind).or_default() += 1;
        }
        out
    }
}

static TRACKER: Mutex<Tracker> = Mutex::new(Tracker {
    bad: BTreeMap::new(),
});

fn log(changes: Vec<Change>) {
    for c in changes {
        match c {
            Change::Invalid(kind, i) => tracing::error!(
                key = %i.key, revision = i.revision, %kind,
                "skipping an invalid stored record: {}", i.reason
            ),
            Change::Cleared(kind, key) => {
                tracing::info!(%key, %kind, "stored record is valid again or gone")
            }
        }
    }
}

fn tracker() -> std::sync::MutexGuard<'static, Tracker> {
    // A panic while holding the lock cannot leave the map half-updated in a harmful way.
    TRACKER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records what a full listing of `kind` found (called by [`crate::objects::list`]).
pub fn observe_listing(kind: Kind, invalid: &[Invalid]) {
    let changes = tracker().listing(kind, invalid);
    log(changes);
}

/// Records one key read from a watch event or a get: `Some` when it did not decode, `None` when
/// it decoded or was deleted.
pub fn observe_key(kind: Kind, key: &str, invalid: Option<&Invalid>) {
    let change = tracker().set(Layer::Decode, kind, key, invalid);
    log(change.into_iter().collect());
}

/// Records what the policy translation made of one decoded key: `Some` when it left the record
/// out, `None` when it took it (back) or the record is gone.
pub fn observe_translation(kind: Kind, key: &str, invalid: Option<&Invalid>) {
    let change = tracker().set(Layer::Policy, kind, key, invalid);
    log(change.into_iter().collect());
}

/// Currently invalid records per kind, in this process (for metrics).
pub fn counts() -> BTreeMap<Kind, usize> {
    tracker().counts()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(key: &str, revision: i64) -> Invalid {
        Invalid {
            key: key.into(),
            revision,
            reason: "garbage".into(),
        }
    }

    #[test]
    fn each_key_is_reported_once_per_revision_and_cleared_when_fixed() {
        let mut t = Tracker::default();
        let a = bad("/trellis/v1/ippools/a", 5);
        assert_eq!(
            t.listing(Kind::IpPool, std::slice::from_ref(&a)),
            vec![Change::Invalid(Kind::IpPool, a.clone())]
        );
        assert!(t.listing(Kind::IpPool, std::slice::from_ref(&a)).is_empty());
        assert_eq!(t.counts().get(&Kind::IpPool), Some(&1));
        // Rewritten, still bad: reported again.
        let a7 = bad("/trellis/v1/ippools/a", 7);
        assert_eq!(t.listing(Kind::IpPool, std::slice::from_ref(&a7)).len(), 1);
        // Another kind's listing does not clear it.
        assert!(t.listing(Kind::Node, &[]).is_empty());
        assert_eq!(t.counts().get(&Kind::IpPool), Some(&1));
        assert_eq!(
            t.listing(Kind::IpPool, &[]),
            vec![Change::Cleared(Kind::IpPool, a.key.clone())]
        );
        assert!(t.counts().is_empty());
        assert!(t
            .set(Layer::Decode, Kind::Node, "/trellis/v1/nodes/n", None)
            .is_none());
    }

    /// A policy the translation left out stays reported while the decoder keeps seeing it decode
    /// (events, relists); only the policy layer takes it back.
    #[test]
    fn a_later_layer_s_report_survives_the_decoder_s() {
        let mut t = Tracker::default();
        let key = "/trellis/v1/globalnetworkpolicies/orphan";
        let orphan = bad(key, 7);
        let gnp = Kind::GlobalNetworkPolicy;
        assert!(t.set(Layer::Policy, gnp, key, Some(&orphan)).is_some());
        assert!(t.set(Layer::Decode, gnp, key, None).is_none());
        assert!(t.listing(gnp, &[]).is_empty());
        assert_eq!(t.counts().get(&gnp), Some(&1));
        // Undecodable as well: still one record.
        assert!(t.set(Layer::Decode, gnp, key, Some(&bad(key, 8))).is_some());
        assert_eq!(t.counts().get(&gnp), Some(&1));
        assert!(t.listing(gnp, &[]).len() == 1);
        assert!(t.set(Layer::Policy, gnp, key, None).is_some());
        assert!(t.counts().is_empty());
    }

    /// An agent lists every kind on every pass: 100 000 invalid records (an older version's
    /// endpoints, say) used to cost a comparison of every pair per listing, minutes of CPU.
    /// The deadline only catches that (it is far above what the listing takes).
    #[test]
    fn a_listing_of_many_invalid_records_is_not_quadratic() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut t = Tracker::default();
            let many: Vec<Invalid> = (0..100_000)
                .map(|i| bad(&format!("/trellis/v1/workloadendpoints/ns/e{i}"), 3))
                .collect();
            let first = t.listing(Kind::WorkloadEndpoint, &many).len();
            let again = t.listing(Kind::WorkloadEndpoint, &many).len();
            let cleared = t.listing(Kind::WorkloadEndpoint, &many[1..]).len();
            let _ = tx.send((first, again, cleared));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("listing 100 000 invalid records twice did not finish");
        assert_eq!(got, (100_000, 0, 1));
    }
}
