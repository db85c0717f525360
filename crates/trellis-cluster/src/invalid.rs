//! Records in the datastore that do not decode (garbage, a kind stored under another kind's
//! key, values an older or newer version wrote that fail validation). Listings skip them so one
//! bad record never stops an agent; this module remembers which keys are currently bad, so each
//! is logged once per revision (not on every pass) and counted for metrics. The [`Tracker`] is
//! pure; [`observe_listing`] and [`observe_key`] update one process-wide tracker and log.

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

/// The currently invalid records, by key.
#[derive(Debug, Default)]
pub struct Tracker {
    bad: BTreeMap<String, (Kind, Invalid)>,
}

impl Tracker {
    /// A full listing of `kind` found exactly `invalid` bad: keys of that kind not in it are
    /// cleared. Returns what changed (a key seen again at the same revision is no change).
    pub fn listing(&mut self, kind: Kind, invalid: &[Invalid]) -> Vec<Change> {
        // A set, so that a listing of many bad records (all of an older version's endpoints,
        // say) costs O(n log n), not a comparison of every pair.
        let listed: std::collections::HashSet<&str> =
            invalid.iter().map(|i| i.key.as_str()).collect();
        let mut changes: Vec<Change> = self
            .bad
            .iter()
            .filter(|(k, (kd, _))| *kd == kind && !listed.contains(k.as_str()))
            .map(|(k, _)| Change::Cleared(kind, k.clone()))
            .collect();
        for c in &changes {
            if let Change::Cleared(_, k) = c {
                self.bad.remove(k);
            }
        }
        for i in invalid {
            changes.extend(self.set(kind, &i.key, Some(i)));
        }
        changes
    }

    /// One key was read (`Some` when it is invalid) or deleted/valid (`None`).
    pub fn set(&mut self, kind: Kind, key: &str, invalid: Option<&Invalid>) -> Option<Change> {
        match invalid {
            Some(i) => {
                let seen = self
                    .bad
                    .get(key)
                    .is_some_and(|(_, old)| old.revision == i.revision);
                self.bad.insert(key.to_string(), (kind, i.clone()));
                (!seen).then(|| Change::Invalid(kind, i.clone()))
            }
            None => self
                .bad
                .remove(key)
                .map(|_| Change::Cleared(kind, key.to_string())),
        }
    }

    /// Currently invalid records per kind (kinds with none are left out).
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut out = BTreeMap::new();
        for (kind, _) in self.bad.values() {
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
    let change = tracker().set(kind, key, invalid);
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
        assert!(t.set(Kind::Node, "/trellis/v1/nodes/n", None).is_none());
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
