//! `lab check`: every expectation of a lab (by default every pod reaches every other pod) tried
//! for real — pings between pods, a TCP connection to an external host that reports the source
//! address it saw — and the matrix the CLI prints, rows and columns in one member order. I/O,
//! except [`matrix`].

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::state::State;
use crate::topology::{self, Expectation};

/// One cell of the check matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub from: String,
    pub to: String,
    pub want: bool,
    pub got: bool,
    pub note: String,
}

/// The check as a table: a row per `from`, a column per `to`, both in the lab's member order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pub columns: Vec<String>,
    /// (from, a cell per column: `ok`, `blocked`, `FAIL`, `LEAK` or `-`).
    pub rows: Vec<(String, Vec<String>)>,
}

/// Lays outcomes out in `order` (members missing from it follow, in order of appearance).
pub fn matrix(outcomes: &[Outcome], order: &[String]) -> Matrix {
    let rank = |m: &str| order.iter().position(|o| o == m).unwrap_or(usize::MAX);
    let arrange = |names: Vec<&String>| {
        let mut v: Vec<String> = Vec::new();
        for n in names {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
        // Stable: unknown members keep their order of appearance after the known ones.
        v.sort_by_key(|m| rank(m));
        v
    };
    let froms = arrange(outcomes.iter().map(|o| &o.from).collect());
    let columns = arrange(outcomes.iter().map(|o| &o.to).collect());
    let cell = |f: &str, t: &str| match outcomes.iter().find(|o| o.from == f && o.to == t) {
        None => "-",
        Some(o) => match (o.got == o.want, o.want) {
            (true, true) => "ok",
            (true, false) => "blocked",
            (false, true) => "FAIL",
            (false, false) => "LEAK",
        },
    };
    let rows = froms
        .iter()
        .map(|f| {
            (
                f.clone(),
                columns.iter().map(|t| cell(f, t).to_string()).collect(),
            )
        })
        .collect();
    Matrix { columns, rows }
}

/// The lab's members in topology order: pods, then external hosts.
pub fn member_order(state: &State) -> Vec<String> {
    match &state.topology {
        Some(t) => t
            .pods
            .iter()
            .map(|p| p.name.clone())
            .chain(t.external.iter().map(|e| e.name.clone()))
            .collect(),
        None => state
            .pod_ips
            .keys()
            .chain(state.external_ips.keys())
            .cloned()
            .collect(),
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).args(args);
    c
}

/// Runs a command in a namespace; `Err` carries its stderr (or why it did not run).
fn ns_ok(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = in_ns(ns, args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("nsenter: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Pings with a bounded retry: right after `up` the agents may still be programming routes
/// (they converge within a resync period), so a miss is retried for up to ~6 s.
fn pings(ns: &str, dst: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        if ns_ok(ns, &["ping", "-c1", "-W1", dst]).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Listens on port 7070, says so once it does, and prints the source address of the first
/// connection (or exits after 6 s without one).
const LISTENER: &str = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7070));s.listen(1);print('listening',flush=True);s.settimeout(6);c,a=s.accept();print(a[0],flush=True)";

/// The source address `to` (an external host) sees for a connection from `from`, or why none
/// arrived.
fn seen_source(state: &State, from: &str, to: &str) -> Result<String, String> {
    let ext_ns = &state.namespaces[to];
    let dst = &state.external_ips[to];
    let mut listener = in_ns(ext_ns, &["python3", "-c", LISTENER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("listener on {to}: {e}"))?;
    let stdout = listener.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    // The listener's lines, read on a thread so each wait below has a deadline; the thread
    // ends when the listener does.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let client =
        format!("import socket;socket.create_connection(('{dst}',7070),timeout=4).close()");
    let result = match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(l) if l == "listening" => {
            let connected = ns_ok(&state.namespaces[from], &["python3", "-c", &client]);
            match (rx.recv_timeout(Duration::from_secs(8)), connected) {
                (Ok(addr), _) => Ok(addr),
                (Err(_), Err(e)) => {
                    Err(format!("no connection: {}", e.lines().last().unwrap_or("")))
                }
                (Err(_), Ok(())) => Err("connected, but the listener saw nothing".into()),
            }
        }
        other => Err(format!("listener on {to} did not start ({other:?})")),
    };
    // It has printed what it will print; end it if it still runs and reap it.
    let ended = listener
        .kill()
        .and_then(|()| listener.wait())
        .map_err(|e| format!("listener on {to}: {e}"));
    match (result, ended) {
        (Ok(a), Ok(_)) => Ok(a),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    }
}

/// The expectations to check: the topology's, or every pod to every other pod.
fn expectations(state: &State) -> Vec<Expectation> {
    let t = state.topology.clone().unwrap_or_else(topology::demo);
    if !t.expect.is_empty() {
        return t.expect;
    }
    let pods: Vec<String> = member_order(state)
        .into_iter()
        .filter(|m| state.pod_ips.contains_key(m))
        .collect();
    pods.iter()
        .flat_map(|a| {
            pods.iter()
                .filter(move |b| a != *b)
                .map(move |b| Expectation {
                    from: a.clone(),
                    to: b.clone(),
                    reach: true,
                    seen_as: None,
                })
        })
        .collect()
}

/// Checks every expectation (default: every pod reaches every other pod).
pub fn check(state: &State) -> Vec<Outcome> {
    expectations(state)
        .iter()
        .map(|x| {
            let from_ns = state.namespaces.get(&x.from).cloned().unwrap_or_default();
            let (got, note) = match state.pod_ips.get(&x.to) {
                Some(ip) => (pings(&from_ns, ip), String::new()),
                None => to_external(state, x),
            };
            Outcome {
                from: x.from.clone(),
                to: x.to.clone(),
                want: x.reach,
                got,
                note,
            }
        })
        .collect()
}

/// Whether `x.from` reaches the external host `x.to` with the source address `seenAs` asks
/// for, and a note saying what arrived.
fn to_external(state: &State, x: &Expectation) -> (bool, String) {
    let seen = match seen_source(state, &x.from, &x.to) {
        Ok(s) => s,
        Err(why) => return (false, why),
    };
    let Some(w) = &x.seen_as else {
        return (true, format!("seen as {seen}"));
    };
    let want = if w == "node" {
        state
            .pod_nodes
            .get(&x.from)
            .and_then(|n| state.node_ips.get(n))
    } else {
        state.pod_ips.get(&x.from)
    };
    (
        want.map(String::as_str) == Some(seen.as_str()),
        format!("seen as {seen} (want {w})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(from: &str, to: &str, got: bool) -> Outcome {
        Outcome {
            from: from.into(),
            to: to.into(),
            want: true,
            got,
            note: String::new(),
        }
    }

    #[test]
    fn columns_follow_the_row_order() {
        // Every pod to every other, as `check` lists them: the first row has no cell for
        // itself, so its name would otherwise become the last column.
        let order: Vec<String> = ["web-1", "web-2", "api-1"].map(String::from).to_vec();
        let mut outcomes = Vec::new();
        for a in &order {
            for b in order.iter().filter(|b| *b != a) {
                outcomes.push(o(a, b, !(a == "api-1" && b == "web-1")));
            }
        }
        let m = matrix(&outcomes, &order);
        assert_eq!(m.columns, order);
        let rows: Vec<&String> = m.rows.iter().map(|(f, _)| f).collect();
        assert_eq!(rows, order.iter().collect::<Vec<_>>());
        assert_eq!(m.rows[0].1, ["-", "ok", "ok"]);
        assert_eq!(m.rows[2].1, ["FAIL", "ok", "-"]);
    }

    #[test]
    fn external_targets_come_after_the_pods() {
        let order: Vec<String> = ["p1", "p2", "out"].map(String::from).to_vec();
        let outcomes = vec![
            o("p2", "out", true),
            o("p1", "p2", true),
            o("p2", "p1", true),
        ];
        let m = matrix(&outcomes, &order);
        assert_eq!(m.columns, ["p1", "p2", "out"]);
        assert_eq!(m.rows[0].0, "p1");
    }
}
