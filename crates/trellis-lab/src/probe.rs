//! `lab probe`: every ordered pair of pods (and, asked for, external hosts as sources) tried
//! for real, as a truth table (I/O). One client process per source runs in the source's
//! namespace (`trellis lab connect`) and tries every destination at once; the sources run in
//! parallel too. Bounded: at most [`MAX_PAIRS`] pairs, [`PARALLEL_SOURCES`] clients at a time,
//! each killed at its deadline (its destinations then count as errors).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_policy::conformance::{Cell, ProbeProtocol, TruthTable};

use crate::state::State;
use crate::traffic::{parse_report_line, Reply, PARALLEL};
use crate::LabError;

/// Most (source, destination) pairs one probe tries.
pub const MAX_PAIRS: usize = 70_000;
/// Clients running at the same time.
pub const PARALLEL_SOURCES: usize = 32;
/// Longest per-destination timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub protocol: ProbeProtocol,
    /// The destination port (none for ICMP).
    pub port: Option<u16>,
    /// How long each destination gets to answer.
    pub timeout: Duration,
    /// External hosts probe the pods too (as extra rows).
    pub externals: bool,
    /// The `trellis` binary the clients run.
    pub trellis: PathBuf,
}

/// The truth table and, for each cell that is an error, why.
#[derive(Debug, Clone)]
pub struct Probed {
    pub table: TruthTable,
    pub notes: Vec<String>,
}

/// A probe source or destination: lab member, how the table names it, its network namespace
/// and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub member: String,
    pub label: String,
    pub netns: String,
    pub address: String,
}

/// The lab's pods in topology order, named `namespace/pod`.
pub fn pods(state: &State) -> Vec<Endpoint> {
    let t = state.topology.clone().unwrap_or_else(crate::topology::demo);
    t.pods
        .iter()
        .filter_map(|p| {
            Some(Endpoint {
                member: p.name.clone(),
                label: p.qualified(),
                netns: state.namespaces.get(&p.name)?.clone(),
                address: state.pod_ips.get(&p.name)?.clone(),
            })
        })
        .collect()
}

fn externals(state: &State) -> Vec<Endpoint> {
    let t = state.topology.clone().unwrap_or_else(crate::topology::demo);
    t.external
        .iter()
        .filter_map(|e| {
            Some(Endpoint {
                member: e.name.clone(),
                label: e.name.clone(),
                netns: state.namespaces.get(&e.name)?.clone(),
                address: state.external_ips.get(&e.name)?.clone(),
            })
        })
        .collect()
}

/// Probes every ordered pair: rows are the sources (pods, then externals), columns the pods,
/// both in topology order; a pod to itself is not probed.
pub fn probe(state: &State, spec: &ProbeSpec) -> Result<Probed, LabError> {
    if spec.timeout.is_zero() || spec.timeout > MAX_TIMEOUT {
        return Err(LabError::Probe(format!(
            "the timeout must be between 1 ms and {} s",
            MAX_TIMEOUT.as_secs()
        )));
    }
    match (spec.protocol, spec.port) {
        (ProbeProtocol::Icmp, Some(_)) => {
            return Err(LabError::Probe("an ICMP probe has no port".into()))
        }
        (ProbeProtocol::Icmp, None) => {}
        (ProbeProtocol::Sctp, _) => return Err(LabError::Probe("this kernel has no SCTP".into())),
        (p, None) => return Err(LabError::Probe(format!("a {p} probe needs --port"))),
        (_, Some(_)) => {}
    }
    let targets = pods(state);
    let mut sources = targets.clone();
    if spec.externals {
        sources.extend(externals(state));
    }
    if targets.is_empty() {
        return Err(LabError::Probe(format!("lab {} has no pods", state.name)));
    }
    if sources.len() * targets.len() > MAX_PAIRS {
        return Err(LabError::Probe(format!(
            "{} pairs; a probe tries at most {MAX_PAIRS}",
            sources.len() * targets.len()
        )));
    }
    let mut table = TruthTable::new(
        sources.iter().map(|s| s.label.clone()).collect(),
        targets.iter().map(|t| t.label.clone()).collect(),
        Cell::Skip,
    );
    let mut notes = Vec::new();
    for batch in sources.chunks(PARALLEL_SOURCES) {
        let running: Vec<(&Endpoint, Result<Client, String>)> = batch
            .iter()
            .map(|s| (s, Client::start(spec, s, &targets)))
            .collect();
        for (source, client) in running {
            let reports = client.and_then(|c| c.finish(deadline(spec, targets.len())));
            record(&mut table, &mut notes, source, &targets, reports);
        }
    }
    Ok(Probed { table, notes })
}

/// How long a client may take: each round of [`PARALLEL`] destinations gets the timeout, plus
/// time to start.
fn deadline(spec: &ProbeSpec, targets: usize) -> Duration {
    spec.timeout * targets.div_ceil(PARALLEL) as u32 + Duration::from_secs(10)
}

/// Fills one row from a client's report.
fn record(
    table: &mut TruthTable,
    notes: &mut Vec<String>,
    source: &Endpoint,
    targets: &[Endpoint],
    reports: Result<Vec<(String, Reply)>, String>,
) {
    let reports = match reports {
        Ok(r) => r,
        Err(why) => {
            for t in targets.iter().filter(|t| t.label != source.label) {
                table.set(&source.label, &t.label, Cell::Error);
            }
            notes.push(format!("{}: {why}", source.label));
            return;
        }
    };
    for t in targets.iter().filter(|t| t.label != source.label) {
        let cell = match reports.iter().find(|(name, _)| *name == t.label) {
            Some((_, Reply::Reached)) => Cell::Reach,
            Some((_, Reply::Blocked)) => Cell::Blocked,
            Some((_, Reply::Error(why))) => {
                notes.push(format!("{} -> {}: {why}", source.label, t.label));
                Cell::Error
            }
            None => {
                notes.push(format!(
                    "{} -> {}: the client did not report it",
                    source.label, t.label
                ));
                Cell::Error
            }
        };
        table.set(&source.label, &t.label, cell);
    }
}

/// A running `trellis lab connect` and the thread reading its report.
struct Client {
    child: Child,
    reader: std::thread::JoinHandle<String>,
    started: Instant,
}

impl Client {
    fn start(spec: &ProbeSpec, source: &Endpoint, targets: &[Endpoint]) -> Result<Client, String> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", source.netns))
            .arg(&spec.trellis)
            .args(["lab", "connect", "--protocol", spec.protocol.as_str()])
            .args(["--timeout-ms", &spec.timeout.as_millis().to_string()]);
        if let Some(p) = spec.port {
            c.args(["--port", &p.to_string()]);
        }
        c.args(
            targets
                .iter()
                .filter(|t| t.label != source.label)
                .map(|t| format!("{}={}", t.address, t.label)),
        );
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("the client did not start: {e}"))?;
        let mut out = child.stdout.take().expect("piped");
        // Read on a thread so waiting for the client keeps its deadline; it ends when the
        // client's stdout closes.
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Ok(Client {
            child,
            reader,
            started: Instant::now(),
        })
    }

    /// Waits for the client (killing it at `limit`) and reads its report.
    fn finish(mut self, limit: Duration) -> Result<Vec<(String, Reply)>, String> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if self.started.elapsed() > limit => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let _ = self.reader.join();
                    return Err(format!("the client took longer than {} s", limit.as_secs()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("waiting for the client: {e}")),
            }
        };
        let out = self
            .reader
            .join()
            .map_err(|_| "the reader thread panicked".to_string())?;
        if !status.success() {
            return Err(format!("the client failed ({status})"));
        }
        Ok(out.lines().filter_map(parse_report_line).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(label: &str) -> Endpoint {
        Endpoint {
            member: label.replace('/', "-"),
            label: label.into(),
            netns: String::new(),
            address: String::new(),
        }
    }

    #[test]
    fn a_row_records_each_reply_and_a_failed_client_fails_its_row() {
        let targets = [ep("x/a"), ep("x/b"), ep("y/a")];
        let names: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();
        let mut t = TruthTable::new(names.clone(), names, Cell::Skip);
        let mut notes = Vec::new();
        record(
            &mut t,
            &mut notes,
            &targets[0],
            &targets,
            Ok(vec![
                ("x/b".into(), Reply::Reached),
                (
                    "y/a".into(),
                    Reply::Error("answered by \"y/b\", not y/a".into()),
                ),
            ]),
        );
        assert_eq!(t.get("x/a", "x/a"), Some(Cell::Skip));
        assert_eq!(t.get("x/a", "x/b"), Some(Cell::Reach));
        assert_eq!(t.get("x/a", "y/a"), Some(Cell::Error));
        record(
            &mut t,
            &mut notes,
            &targets[1],
            &targets,
            Ok(vec![("x/a".into(), Reply::Blocked)]),
        );
        assert_eq!(t.get("x/b", "x/a"), Some(Cell::Blocked));
        assert_eq!(t.get("x/b", "y/a"), Some(Cell::Error), "not reported");
        record(
            &mut t,
            &mut notes,
            &targets[2],
            &targets,
            Err("the client failed".into()),
        );
        assert_eq!(t.get("y/a", "x/a"), Some(Cell::Error));
        assert_eq!(t.get("y/a", "y/a"), Some(Cell::Skip));
        assert_eq!(
            notes,
            [
                "x/a -> y/a: answered by \"y/b\", not y/a",
                "x/b -> y/a: the client did not report it",
                "y/a: the client failed"
            ]
        );
    }

    #[test]
    fn client_deadlines_grow_with_rounds_of_destinations() {
        let spec = ProbeSpec {
            protocol: ProbeProtocol::Tcp,
            port: Some(80),
            timeout: Duration::from_secs(1),
            externals: false,
            trellis: PathBuf::new(),
        };
        assert_eq!(deadline(&spec, 8), Duration::from_secs(11));
        assert_eq!(deadline(&spec, 65), Duration::from_secs(12));
    }
}
