//! The agent's liveness and readiness (`/healthz`, `/readyz`, `trellis node status`). The
//! loops record what they saw in a [`Tracker`] (no I/O, a mutex held for an assignment);
//! [`readiness`] turns a snapshot of it into a [`HealthReport`] — a pure function of the
//! inputs and the time.
//!
//! What each check means:
//! - **liveness** (`loop/dataplane`): the dataplane loop — which works from the agent's
//!   in-memory view and runs a pass at least every resync period — has started a turn within
//!   [`loop_grace`] of its period. It does not wait on the datastore, so an unreachable store
//!   (a readiness matter) never makes the agent look dead and restarted for nothing; a wedged
//!   runtime or a pass that never ends does.
//! - **datastore**: the last heartbeat write succeeded, and within [`datastore_grace`] of the
//!   heartbeat period (a write that hangs goes stale rather than failing).
//! - **dataplane**: the last pass ran and every kernel change it made was applied (no failed
//!   route, neighbour, FDB, sysctl or NAT operation pending), and the policy table is in the
//!   kernel. Problems that stem from cluster state (a block of an unknown node, an IPIP pool)
//!   are logged by the pass but do not count: no retry on this node can clear them.
//! - **bgp**: when the speaker runs, it listens (a speaker that cannot bind its port never gets
//!   a session a peer opens, however few sessions are configured now) and every session it is
//!   configured for is Established, as calico-node's `-bird-ready` requires; with the speaker
//!   off the check passes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_agent_api::{HealthCheck, HealthReport};

/// How long past its period a loop may go without a turn before it counts as dead.
pub fn loop_grace(period: Duration) -> Duration {
    period * 3 + Duration::from_secs(30)
}

/// How long after the last successful heartbeat write the datastore still counts as reachable.
pub fn datastore_grace(heartbeat: Duration) -> Duration {
    heartbeat * 3 + Duration::from_secs(5)
}

/// A loop's last turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    pub last: Instant,
    pub period: Duration,
}

/// The outcome of the last dataplane pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassSeen {
    pub at: Instant,
    /// `Err`: the pass failed as a whole; `Ok(failures)`: the kernel changes that failed.
    pub outcome: Result<Vec<String>, String>,
}

/// What readiness is computed from (plain data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub loops: BTreeMap<&'static str, Beat>,
    pub heartbeat: Duration,
    pub datastore_ok: Option<Instant>,
    pub datastore_error: Option<(Instant, String)>,
    pub pass: Option<PassSeen>,
    pub policy_enforced: bool,
    /// `None`: the speaker is off. `Some(None)`: on, no status reported yet. Else each
    /// session's peer address, type and state.
    pub bgp: Option<Option<Vec<(String, String, String)>>>,
    /// Why the running speaker cannot listen (its address and error), if it cannot.
    pub bgp_listen_error: Option<String>,
}

fn ago(now: Instant, then: Instant) -> String {
    format!(
        "{:.1}s ago",
        now.saturating_duration_since(then).as_secs_f64()
    )
}

fn check(name: &str, liveness: bool, ok: bool, detail: String) -> HealthCheck {
    HealthCheck {
        name: name.to_string(),
        liveness,
        ok,
        detail,
    }
}

/// Every check, from `inputs` at `now`.
pub fn readiness(inputs: &Inputs, now: Instant) -> HealthReport {
    let mut checks: Vec<HealthCheck> = inputs
        .loops
        .iter()
        .map(|(name, b)| {
            let limit = loop_grace(b.period);
            let age = now.saturating_duration_since(b.last);
            let detail = if age <= limit {
                format!("last turn {}", ago(now, b.last))
            } else {
                format!(
                    "no turn for {:.1}s (limit {}s)",
                    age.as_secs_f64(),
                    limit.as_secs()
                )
            };
            check(&format!("loop/{name}"), true, age <= limit, detail)
        })
        .collect();
    checks.push(datastore(inputs, now));
    checks.push(dataplane(inputs, now));
    checks.push(bgp(inputs));
    HealthReport {
        live: checks.iter().filter(|c| c.liveness).all(|c| c.ok),
        ready: checks.iter().all(|c| c.ok),
        checks,
    }
}

fn datastore(inputs: &Inputs, now: Instant) -> HealthCheck {
    let limit = datastore_grace(inputs.heartbeat);
    let failed_last = match (&inputs.datastore_error, inputs.datastore_ok) {
        (Some((at, e)), Some(ok)) if *at >= ok => Some(e),
        (Some((_, e)), None) => Some(e),
        _ => None,
    };
    let (ok, detail) = match (failed_last, inputs.datastore_ok) {
        (Some(e), last) => {
            let since = last.map_or("never reached".to_string(), |l| {
                format!("last reached {}", ago(now, l))
            });
            (false, format!("unreachable: {e} ({since})"))
        }
        (None, Some(l)) if now.saturating_duration_since(l) > limit => (
            false,
            format!(
                "no successful write for {:.1}s (limit {}s)",
                now.saturating_duration_since(l).as_secs_f64(),
                limit.as_secs()
            ),
        ),
        (None, Some(l)) => (true, format!("heartbeat written {}", ago(now, l))),
        (None, None) => (false, "not reached yet".to_string()),
    };
    check("datastore", false, ok, detail)
}

fn dataplane(inputs: &Inputs, now: Instant) -> HealthCheck {
    let (mut ok, mut detail) = match &inputs.pass {
        None => (false, "no pass has run yet".to_string()),
        Some(PassSeen {
            at,
            outcome: Err(e),
        }) => (
            false,
            format!("the last pass failed {}: {e}", ago(now, *at)),
        ),
        Some(PassSeen {
            at,
            outcome: Ok(failures),
        }) if !failures.is_empty() => (
            false,
            format!(
                "the last pass ({}) left {} kernel change(s) failed, first: {}",
                ago(now, *at),
                failures.len(),
                failures[0]
            ),
        ),
        Some(PassSeen { at, .. }) => (true, format!("last pass converged {}", ago(now, *at))),
    };
    if inputs.policy_enforced {
        detail.push_str("; policy table programmed");
    } else {
        ok = false;
        detail.push_str("; the policy table is not in the kernel yet");
    }
    check("dataplane", false, ok, detail)
}

fn bgp(inputs: &Inputs) -> HealthCheck {
    let (ok, detail) = match (&inputs.bgp, &inputs.bgp_listen_error) {
        (None, _) => (true, "speaker off".to_string()),
        (Some(_), Some(e)) => (false, e.clone()),
        (Some(b), None) => sessions(b.as_ref()),
    };
    check("bgp", false, ok, detail)
}

/// The sessions' part of the bgp check (`None`: not reported yet).
fn sessions(peers: Option<&Vec<(String, String, String)>>) -> (bool, String) {
    match peers {
        None => (
            false,
            "the speaker has not reported its sessions yet".to_string(),
        ),
        Some(peers) => {
            let down: Vec<String> = peers
                .iter()
                .filter(|(_, _, state)| state != "Established")
                .map(|(addr, kind, state)| format!("{addr} ({kind}) is {state}"))
                .collect();
            if down.is_empty() {
                (true, format!("{} session(s) Established", peers.len()))
            } else {
                (false, format!("not Established: {}", down.join(", ")))
            }
        }
    }
}

/// What the loops record for [`readiness`].
pub struct Tracker {
    inner: Mutex<Recorded>,
}

struct Recorded {
    loops: BTreeMap<&'static str, Beat>,
    heartbeat: Duration,
    datastore_ok: Option<Instant>,
    datastore_error: Option<(Instant, String)>,
    pass: Option<PassSeen>,
}

impl Tracker {
    /// A tracker expecting the loops `loops` (name, period), counted from `now`.
    pub fn new(loops: &[(&'static str, Duration)], heartbeat: Duration, now: Instant) -> Self {
        let loops = loops
            .iter()
            .map(|(n, period)| {
                (
                    *n,
                    Beat {
                        last: now,
                        period: *period,
                    },
                )
            })
            .collect();
        Tracker {
            inner: Mutex::new(Recorded {
                loops,
                heartbeat,
                datastore_ok: None,
                datastore_error: None,
                pass: None,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Loop `name` starts a turn.
    pub fn beat(&self, name: &'static str, now: Instant) {
        self.with(|r| {
            if let Some(b) = r.loops.get_mut(name) {
                b.last = now;
            }
        });
    }

    /// A datastore round trip ended (`Err`: its error).
    pub fn datastore<E: std::fmt::Display>(&self, now: Instant, result: Result<(), E>) {
        self.with(|r| match result {
            Ok(()) => r.datastore_ok = Some(now),
            Err(e) => r.datastore_error = Some((now, e.to_string())),
        });
    }

    /// A dataplane pass ended.
    pub fn pass(&self, now: Instant, outcome: Result<Vec<String>, String>) {
        self.with(|r| r.pass = Some(PassSeen { at: now, outcome }));
    }

    /// A snapshot, completed with what others hold.
    pub fn inputs(
        &self,
        policy_enforced: bool,
        bgp: Option<Option<Vec<(String, String, String)>>>,
        bgp_listen_error: Option<String>,
    ) -> Inputs {
        self.with(|r| Inputs {
            loops: r.loops.clone(),
            heartbeat: r.heartbeat,
            datastore_ok: r.datastore_ok,
            datastore_error: r.datastore_error.clone(),
            pass: r.pass.clone(),
            policy_enforced,
            bgp,
            bgp_listen_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// A healthy agent at `t0 + 10 s`: every input fresh.
    fn healthy(t0: Instant) -> Inputs {
        let now = t0 + 10 * S;
        Inputs {
            loops: BTreeMap::from([(
                "dataplane",
                Beat {
                    last: now - S,
                    period: 2 * S,
                },
            )]),
            heartbeat: S,
            datastore_ok: Some(now - S),
            datastore_error: None,
            pass: Some(PassSeen {
                at: now - S,
                outcome: Ok(vec![]),
            }),
            policy_enforced: true,
            bgp: None,
            bgp_listen_error: None,
        }
    }

    fn failing(r: &HealthReport) -> Vec<&str> {
        r.failing()
    }

    #[test]
    fn a_healthy_agent_is_live_and_ready() {
        let t0 = Instant::now();
        let r = readiness(&healthy(t0), t0 + 10 * S);
        assert!(r.live && r.ready, "{r:?}");
        let names: Vec<_> = r.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["loop/dataplane", "datastore", "dataplane", "bgp"]);
        assert!(r.text(false).ends_with("\nready\n"), "{}", r.text(false));
        assert_eq!(
            r.text(true),
            format!("ok   loop/dataplane: last turn 1.0s ago\nlive\n")
        );
    }

    #[test]
    fn a_stale_loop_is_not_live_but_a_slow_one_within_grace_is() {
        let t0 = Instant::now();
        let mut i = healthy(t0);
        let now = t0 + 100 * S;
        i.datastore_ok = Some(now);
        i.pass = Some(PassSeen {
            at: now,
            outcome: Ok(vec![]),
        });
        // Period 2 s: the limit is 36 s.
        i.loops.get_mut("dataplane").unwrap().last = now - 36 * S;
        assert!(readiness(&i, now).live);
        i.loops.get_mut("dataplane").unwrap().last = now - 37 * S;
        let r = readiness(&i, now);
        assert!(!r.live && !r.ready, "{r:?}");
        assert_eq!(failing(&r), ["loop/dataplane"]);
        assert!(
            r.text(true).ends_with("not live: loop/dataplane\n"),
            "{}",
            r.text(true)
        );
    }

    #[test]
    fn the_datastore_fails_on_an_error_after_the_last_success_or_when_stale() {
        let t0 = Instant::now();
        let now = t0 + 10 * S;
        let mut i = healthy(t0);
        i.datastore_error = Some((now - 2 * S, "old".into()));
        assert!(
            readiness(&i, now).ready,
            "an error before the last success is over"
        );
        i.datastore_error = Some((now - S, "connection refused".into()));
        let r = readiness(&i, now);
        assert!(r.live && !r.ready);
        assert_eq!(failing(&r), ["datastore"]);
        assert!(r.checks[1].detail.contains("connection refused"), "{r:?}");
        // No error, but no success for longer than 3 heartbeats + 5 s: a hung write.
        let mut i = healthy(t0);
        i.datastore_ok = Some(now - 8 * S);
        assert!(readiness(&i, now).ready);
        i.datastore_ok = Some(now - 9 * S);
        assert_eq!(failing(&readiness(&i, now)), ["datastore"]);
        i.datastore_ok = None;
        assert_eq!(failing(&readiness(&i, now)), ["datastore"]);
        i.datastore_error = Some((now, "refused".into()));
        let r = readiness(&i, now);
        assert!(r.checks[1].detail.contains("never reached"), "{r:?}");
    }

    #[test]
    fn the_dataplane_needs_a_clean_pass_and_the_policy_table() {
        let t0 = Instant::now();
        let now = t0 + 10 * S;
        let mut i = healthy(t0);
        i.pass = None;
        assert_eq!(failing(&readiness(&i, now)), ["dataplane"]);
        i.pass = Some(PassSeen {
            at: now,
            outcome: Err("netlink: EPERM".into()),
        });
        let r = readiness(&i, now);
        assert_eq!(failing(&r), ["dataplane"]);
        assert!(r.checks[2].detail.contains("EPERM"));
        i.pass = Some(PassSeen {
            at: now,
            outcome: Ok(vec!["add route 10.0.0.0/26: EEXIST".into()]),
        });
        let r = readiness(&i, now);
        assert_eq!(failing(&r), ["dataplane"]);
        assert!(r.checks[2].detail.contains("1 kernel change(s) failed"));
        let mut i = healthy(t0);
        i.policy_enforced = false;
        let r = readiness(&i, now);
        assert_eq!(failing(&r), ["dataplane"]);
        assert!(r.checks[2].detail.contains("policy table"));
    }

    #[test]
    fn bgp_needs_every_session_established_when_the_speaker_runs() {
        let t0 = Instant::now();
        let now = t0 + 10 * S;
        let mut i = healthy(t0);
        let peer = |a: &str, s: &str| (a.to_string(), "global".to_string(), s.to_string());
        i.bgp = Some(None);
        assert_eq!(failing(&readiness(&i, now)), ["bgp"]);
        i.bgp = Some(Some(vec![]));
        assert!(readiness(&i, now).ready, "no sessions configured");
        i.bgp = Some(Some(vec![
            peer("192.0.2.1", "Established"),
            peer("192.0.2.99", "Active"),
        ]));
        let r = readiness(&i, now);
        assert!(r.live && !r.ready);
        assert_eq!(failing(&r), ["bgp"]);
        assert_eq!(
            r.checks[3].detail,
            "not Established: 192.0.2.99 (global) is Active"
        );
        assert!(r.text(false).ends_with("not ready: bgp\n"));
        i.bgp = Some(Some(vec![peer("192.0.2.1", "Established")]));
        assert!(readiness(&i, now).ready);
    }

    /// A speaker that cannot bind its port is not ready, with sessions Established or none
    /// configured; with the speaker off a leftover error does not count.
    #[test]
    fn bgp_needs_the_listener_when_the_speaker_runs() {
        let t0 = Instant::now();
        let now = t0 + 10 * S;
        let mut i = healthy(t0);
        let error = "cannot listen on 0.0.0.0:179: Address in use (os error 98)";
        i.bgp_listen_error = Some(error.into());
        assert!(readiness(&i, now).ready, "speaker off");
        for sessions in [
            vec![],
            vec![("192.0.2.1".into(), "global".into(), "Established".into())],
        ] {
            i.bgp = Some(Some(sessions));
            let r = readiness(&i, now);
            assert!(r.live && !r.ready, "{r:?}");
            assert_eq!(failing(&r), ["bgp"]);
            assert_eq!(r.checks[3].detail, error);
        }
        i.bgp_listen_error = None;
        assert!(readiness(&i, now).ready);
    }

    #[test]
    fn the_tracker_records_what_the_loops_report() {
        let t0 = Instant::now();
        let t = Tracker::new(&[("dataplane", 2 * S)], S, t0);
        t.beat("dataplane", t0 + S);
        t.beat("unknown", t0 + S);
        t.datastore::<String>(t0 + S, Ok(()));
        t.datastore(t0 + 2 * S, Err("refused"));
        t.pass(t0 + S, Ok(vec![]));
        let i = t.inputs(true, None, None);
        assert_eq!(i.loops.len(), 1);
        assert_eq!(i.loops["dataplane"].last, t0 + S);
        assert_eq!(i.datastore_ok, Some(t0 + S));
        assert_eq!(i.datastore_error, Some((t0 + 2 * S, "refused".to_string())));
        assert_eq!(failing(&readiness(&i, t0 + 2 * S)), ["datastore"]);
    }
}
