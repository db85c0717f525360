//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does.
//!
//! The pure core, [`Elector`], decides from the Lease it read and the local monotonic clock:
//! create the Lease, renew it (holder is us), take it over (the holder has not renewed it for
//! `lease_duration` as *we* observed it — no clock comparison across machines), or wait. Every
//! write carries the `resourceVersion` read, so two candidates never both win (the API server
//! answers 409 to the loser). A leader that has not renewed within `renew_deadline`
//! (< `lease_duration`) stops counting itself leader, so it has stopped writing before anyone
//! can take over; a conflict or another holder ends leadership at once.
//!
//! [`run`] is the shell: get, decide, create/replace, publish into [`Leadership`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

/// Election settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (`holderIdentity`).
    pub identity: String,
    /// How long a Lease not renewed stays the holder's.
    pub lease_duration: Duration,
    /// How long a leader goes without a successful renewal before it stops leading.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

/// What to do with the Lease.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Create(Lease),
    /// Replace (carries the `resourceVersion` read: a precondition).
    Replace(Lease),
    Wait,
}

/// What the last write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// 409: someone else wrote the Lease first.
    Conflict,
    /// Any other failure (the API server unreachable, say).
    Failed,
}

/// The pure election state.
#[derive(Debug, Clone)]
pub struct Elector {
    cfg: LeaseConfig,
    /// The Lease record as last seen and when it was first seen so (local clock).
    observed: Option<(String, Instant)>,
    /// When we last renewed successfully.
    renewed: Option<Instant>,
    /// Whether the pending write is ours to count as a renewal.
    pending: bool,
}

impl Elector {
    pub fn new(cfg: LeaseConfig) -> Elector {
        Elector {
            cfg,
            observed: None,
            renewed: None,
            pending: false,
        }
    }

    /// Decides from the Lease read at `now` (`wall` is what goes into `renewTime`).
    pub fn decide(&mut self, now: Instant, wall: Timestamp, current: Option<&Lease>) -> Action {
        self.pending = false;
        let Some(lease) = current else {
            self.pending = true;
            return Action::Create(self.lease(None, wall, 0, true));
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!(
            "{holder}|{:?}|{}",
            spec.renew_time,
            lease.metadata.resource_version.clone().unwrap_or_default()
        );
        if self.observed.as_ref().map(|(r, _)| r) != Some(&record) {
            self.observed = Some((record, now));
        }
        let seen_at = self.observed.as_ref().map(|(_, t)| *t).unwrap_or(now);
        let transitions = spec.lease_transitions.unwrap_or(0);
        if holder == self.cfg.identity {
            self.pending = true;
            return Action::Replace(self.lease(Some(lease), wall, transitions, false));
        }
        // Someone else holds it: we are not leading, whatever we thought.
        self.renewed = None;
        let duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.cfg.lease_duration);
        if holder.is_empty() || now.duration_since(seen_at) >= duration {
            self.pending = true;
            return Action::Replace(self.lease(Some(lease), wall, transitions + 1, true));
        }
        Action::Wait
    }

    /// Records what the write decided by [`Elector::decide`] did.
    pub fn outcome(&mut self, now: Instant, outcome: Outcome) {
        match outcome {
            Outcome::Written if self.pending => self.renewed = Some(now),
            Outcome::Written => {}
            Outcome::Conflict => self.renewed = None,
            Outcome::Failed => {}
        }
        self.pending = false;
    }

    /// Until when we may act as leader (`None`: we are not leading).
    pub fn leading_until(&self) -> Option<Instant> {
        self.renewed.map(|t| t + self.cfg.renew_deadline)
    }

    fn lease(
        &self,
        old: Option<&Lease>,
        wall: Timestamp,
        transitions: i32,
        acquire: bool,
    ) -> Lease {
        let old_spec = old.and_then(|l| l.spec.clone()).unwrap_or_default();
        let now = MicroTime(wall);
        Lease {
            metadata: ObjectMeta {
                name: Some(self.cfg.name.clone()),
                namespace: Some(self.cfg.namespace.clone()),
                resource_version: old.and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.cfg.identity.clone()),
                lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
                acquire_time: if acquire {
                    Some(now.clone())
                } else {
                    old_spec.acquire_time
                },
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }
}

/// Shared view of whether this process leads: writers check it before every write.
#[derive(Debug, Default)]
pub struct Leadership {
    until: Mutex<Option<Instant>>,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.until
            .lock()
            .expect("leadership lock")
            .is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn set(&self, until: Option<Instant>) {
        *self.until.lock().expect("leadership lock") = until;
    }

    /// Stops leading at once (shutdown).
    pub fn resign(&self) {
        self.set(None);
    }
}

/// Runs the election until the task is dropped, publishing into `leadership`.
pub async fn run(api: Api<Lease>, cfg: LeaseConfig, leadership: Arc<Leadership>) {
    let mut elector = Elector::new(cfg.clone());
    let mut was_leader = false;
    loop {
        // A renewal counts from before it was sent: the others' clocks start when they see
        // it, which is no earlier, so we stop writing before any of them may take over.
        let started = Instant::now();
        let outcome = attempt(&api, &cfg, &mut elector).await;
        elector.outcome(started, outcome);
        leadership.set(elector.leading_until());
        let leading = leadership.is_leader();
        if leading != was_leader {
            if leading {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
            } else {
                tracing::warn!(lease = %cfg.name, identity = %cfg.identity, "stopped leading");
            }
            was_leader = leading;
        }
        tokio::time::sleep(cfg.retry_period).await;
    }
}

/// Gives the Lease up if we hold it (holder cleared), so a successor need not wait for it to
/// expire (client-go's `ReleaseOnCancel`). Call only after this process stopped writing.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let lease = match api.get_opt(&cfg.name).await {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "reading the lease to release it failed");
            return;
        }
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    let released = Lease {
        metadata: lease.metadata.clone(),
        spec: Some(spec),
    };
    match api
        .replace(&cfg.name, &PostParams::default(), &released)
        .await
    {
        Ok(_) => tracing::info!(lease = %cfg.name, identity = %cfg.identity, "released the lease"),
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "releasing the lease failed; it expires by itself")
        }
    }
}

async fn attempt(api: &Api<Lease>, cfg: &LeaseConfig, elector: &mut Elector) -> Outcome {
    let current = match api.get_opt(&cfg.name).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "reading the lease failed");
            return Outcome::Failed;
        }
    };
    let action = elector.decide(Instant::now(), Timestamp::now(), current.as_ref());
    tracing::debug!(identity = %cfg.identity, ?action, "lease decision");
    let result = match action {
        Action::Wait => return Outcome::Written,
        Action::Create(l) => api.create(&PostParams::default(), &l).await,
        Action::Replace(l) => api.replace(&cfg.name, &PostParams::default(), &l).await,
    };
    match result {
        Ok(_) => Outcome::Written,
        Err(kube::Error::Api(s)) if s.code == 409 => Outcome::Conflict,
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "writing the lease failed");
            Outcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: "kube-system".into(),
            name: "trellis".into(),
            identity: id.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn stored(a: Action, rv: &str) -> Lease {
        let (Action::Create(mut l) | Action::Replace(mut l)) = a else {
            panic!("expected a write")
        };
        l.metadata.resource_version = Some(rv.into());
        l
    }

    #[test]
    fn creates_then_renews_and_leads_until_the_renew_deadline() {
        let t0 = Instant::now();
        let mut e = Elector::new(cfg("a"));
        let a = e.decide(t0, Timestamp::UNIX_EPOCH, None);
        assert!(matches!(a, Action::Create(_)));
        e.outcome(t0, Outcome::Written);
        assert_eq!(e.leading_until(), Some(t0 + Duration::from_secs(10)));
        let l = stored(a, "1");
        let r = e.decide(t0 + Duration::from_secs(2), Timestamp::UNIX_EPOCH, Some(&l));
        let Action::Replace(r) = r else {
            panic!("renew")
        };
        assert_eq!(r.metadata.resource_version.as_deref(), Some("1"));
        // A renewal that fails keeps leadership only until the deadline of the last success.
        e.outcome(t0 + Duration::from_secs(2), Outcome::Failed);
        assert_eq!(e.leading_until(), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_conflict_ends_leadership_at_once() {
        let t0 = Instant::now();
        let mut e = Elector::new(cfg("a"));
        let l = stored(e.decide(t0, Timestamp::UNIX_EPOCH, None), "1");
        e.outcome(t0, Outcome::Written);
        e.decide(t0, Timestamp::UNIX_EPOCH, Some(&l));
        e.outcome(t0, Outcome::Conflict);
        assert_eq!(e.leading_until(), None);
    }

    #[test]
    fn another_candidate_takes_over_only_after_the_lease_went_unrenewed_for_its_duration() {
        let t0 = Instant::now();
        let mut a = Elector::new(cfg("a"));
        let held = stored(a.decide(t0, Timestamp::UNIX_EPOCH, None), "1");
        let mut b = Elector::new(cfg("b"));
        assert_eq!(
            b.decide(t0, Timestamp::UNIX_EPOCH, Some(&held)),
            Action::Wait
        );
        let later = t0 + Duration::from_secs(14);
        assert_eq!(
            b.decide(later, Timestamp::UNIX_EPOCH, Some(&held)),
            Action::Wait
        );
        let expired = t0 + Duration::from_secs(15);
        let Action::Replace(taken) = b.decide(expired, Timestamp::UNIX_EPOCH, Some(&held)) else {
            panic!("take over")
        };
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("1"));
    }

    #[test]
    fn a_renewed_lease_restarts_the_observers_clock() {
        let t0 = Instant::now();
        let mut b = Elector::new(cfg("b"));
        let mut a = Elector::new(cfg("a"));
        let l1 = stored(a.decide(t0, Timestamp::UNIX_EPOCH, None), "1");
        b.decide(t0, Timestamp::UNIX_EPOCH, Some(&l1));
        let l2 = stored(a.decide(t0, Timestamp::UNIX_EPOCH, Some(&l1)), "2");
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.decide(t1, Timestamp::UNIX_EPOCH, Some(&l2)), Action::Wait);
        // 15 s after the first sighting but only 5 s after the renewal was seen.
        let t2 = t0 + Duration::from_secs(15);
        assert_eq!(b.decide(t2, Timestamp::UNIX_EPOCH, Some(&l2)), Action::Wait);
    }
}
