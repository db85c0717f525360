//! `trellis lab` subcommands: thin wrappers around [`trellis_lab`] that print.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use trellis_lab::check::{matrix, member_order, Matrix};
use trellis_lab::probe::{probe, ProbeSpec};
use trellis_lab::traffic::{connect, report_line, serve, Target, MAX_TARGETS};
use trellis_lab::{check, down, exec_cmd, pick, topology, up, validate, State};
use trellis_policy::conformance::{ProbeProtocol, TruthTable};

use crate::table::render;
use crate::LabCommand;

pub fn run(cmd: LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up {
            file,
            datastore_kind,
            name,
        } => {
            let (mut t, source) = match file {
                Some(f) => {
                    let text = crate::commands::read_input(&f)?;
                    (topology::decode(&text).map_err(|e| anyhow!("{f}: {e}"))?, f)
                }
                None => (topology::demo(), "the built-in topology".to_string()),
            };
            if let Some(d) = datastore_kind {
                t.datastore = d;
            }
            if let Some(n) = name {
                t.name = n;
            }
            // Everything is checked before anything is made.
            let lab = validate(&t).map_err(|e| anyhow!("{source}: {e}"))?;
            let started = Instant::now();
            let state = up(&lab, &mut |line| eprintln!("{line}"))?;
            eprintln!(
                "lab {} is up in {:.1} s; try: trellis lab check {}",
                state.name,
                started.elapsed().as_secs_f64(),
                state.name
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status { lab } => {
            let state = State::load(&pick(lab)?)?;
            println!("lab {}  datastore {}", state.name, state.datastore);
            let nodes: Vec<Vec<String>> = state
                .node_ips
                .iter()
                .map(|(n, ip)| vec![n.clone(), ip.clone(), state.namespaces[n].clone()])
                .collect();
            print!("\n{}", render(&["NODE", "ADDRESS", "NAMESPACE"], &nodes));
            let pods: Vec<Vec<String>> = state
                .pod_ips
                .iter()
                .map(|(p, ip)| vec![p.clone(), state.pod_nodes[p].clone(), ip.clone()])
                .collect();
            print!("\n{}", render(&["POD", "NODE", "ADDRESS"], &pods));
            let trellis = std::env::current_exe()?;
            let mut show = match state.namespaces.get("control") {
                Some(ctl) => {
                    let mut c = std::process::Command::new("nsenter");
                    c.arg(format!("--net=/var/run/netns/{ctl}")).arg(&trellis);
                    c
                }
                None => std::process::Command::new(&trellis),
            };
            let out = show
                .args(["--datastore", &state.datastore, "ipam", "show"])
                .output()?;
            print!("\n{}", String::from_utf8_lossy(&out.stdout));
            for n in state.node_ips.keys() {
                let routes = exec_cmd(&state, n, &["ip".into(), "route".into()])?.output()?;
                println!(
                    "\nroutes on {n}:\n{}",
                    String::from_utf8_lossy(&routes.stdout).trim_end()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec { target, command } => {
            let (lab, member) = match target.as_slice() {
                [m] => (pick(None)?, m.clone()),
                [l, m] => (l.clone(), m.clone()),
                _ => bail!("usage: trellis lab exec [LAB] MEMBER -- CMD"),
            };
            let state = State::load(&lab)?;
            let status = exec_cmd(&state, &member, &command)?.status()?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        LabCommand::Check { lab } => {
            let state = State::load(&pick(lab)?)?;
            let outcomes = check(&state);
            print!("{}", check_table(matrix(&outcomes, &member_order(&state))));
            for o in outcomes.iter().filter(|o| !o.note.is_empty()) {
                println!("{} -> {}: {}", o.from, o.to, o.note);
            }
            let bad = outcomes.iter().filter(|o| o.got != o.want).count();
            println!(
                "{} of {} expectations hold",
                outcomes.len() - bad,
                outcomes.len()
            );
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Probe {
            lab,
            port,
            protocol,
            expect,
            externals,
            timeout_ms,
        } => {
            let want = match &expect {
                Some(f) => {
                    let text = std::fs::read_to_string(f).map_err(|e| anyhow!("{f}: {e}"))?;
                    Some(TruthTable::parse(&text).map_err(|e| anyhow!("{f}: {e}"))?)
                }
                None => None,
            };
            let state = State::load(&pick(lab)?)?;
            let spec = ProbeSpec {
                protocol: protocol_of(&protocol)?,
                port,
                timeout: Duration::from_millis(timeout_ms),
                externals,
                trellis: std::env::current_exe()?,
            };
            let got = probe(&state, &spec)?;
            print!("{}", got.table.render());
            if !got.notes.is_empty() {
                println!();
                for n in &got.notes {
                    println!("{n}");
                }
            }
            let Some(want) = want else {
                return Ok(ExitCode::SUCCESS);
            };
            let diffs = want.differences(&got.table);
            println!();
            for d in &diffs {
                println!("{d}");
            }
            if diffs.is_empty() {
                println!("the table matches {}", expect.unwrap_or_default());
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "{} cell(s) differ from {}",
                    diffs.len(),
                    expect.unwrap_or_default()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        LabCommand::Serve { .. } | LabCommand::Connect { .. } => {
            unreachable!("run before the runtime starts (run_traffic)")
        }
        LabCommand::Down { lab } => {
            let name = pick(lab)?;
            let td = down(&name);
            for p in &td.spared {
                println!(
                    "pid {} ({} {}) belongs to another process now; left alone",
                    p.pid, p.member, p.what
                );
            }
            println!(
                "lab {name} is down ({} namespace(s) removed)",
                td.removed.len()
            );
            for e in &td.errors {
                eprintln!("error: {e}");
            }
            Ok(if td.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The `lab check` matrix as text: a row per source, a column per target, both in the
/// matrix's order.
fn check_table(m: Matrix) -> String {
    let rows: Vec<Vec<String>> = m
        .rows
        .into_iter()
        .map(|(from, cells)| std::iter::once(from).chain(cells).collect())
        .collect();
    let mut header = vec!["FROM \\ TO"];
    header.extend(m.columns.iter().map(String::as_str));
    render(&header, &rows)
}

fn protocol_of(p: &str) -> Result<ProbeProtocol> {
    Ok(match p {
        "tcp" => ProbeProtocol::Tcp,
        "udp" => ProbeProtocol::Udp,
        "icmp" => ProbeProtocol::Icmp,
        other => bail!("--protocol {other:?}: must be tcp, udp or icmp"),
    })
}

/// The lab's traffic subcommands (`serve`, `connect`), which need no async runtime; `None` for
/// every other lab subcommand.
pub fn run_traffic(cmd: &LabCommand) -> Option<ExitCode> {
    let result = match cmd {
        LabCommand::Serve {
            name,
            tcp,
            udp,
            ready,
        } => serve(name, tcp, udp, ready.as_deref().map(std::path::Path::new))
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow!("serve {name}: {e}")),
        LabCommand::Connect {
            protocol,
            port,
            timeout_ms,
            targets,
        } => run_connect(protocol, *port, *timeout_ms, targets),
        _ => return None,
    };
    Some(result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    }))
}

fn run_connect(
    protocol: &str,
    port: Option<u16>,
    timeout_ms: u64,
    targets: &[String],
) -> Result<ExitCode> {
    if targets.len() > MAX_TARGETS {
        bail!("{} targets; at most {MAX_TARGETS}", targets.len());
    }
    if !(1..=10_000).contains(&timeout_ms) {
        bail!("--timeout-ms {timeout_ms}: must be 1-10000");
    }
    let targets: Vec<Target> = targets
        .iter()
        .map(|t| t.parse().map_err(|e: String| anyhow!(e)))
        .collect::<Result<_>>()?;
    let replies = connect(
        protocol_of(protocol)?,
        port,
        Duration::from_millis(timeout_ms),
        &targets,
    );
    for (t, r) in targets.iter().zip(&replies) {
        println!("{}", report_line(t, r));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_lab::check::Outcome;

    /// Issue 13.5: every pod to every other pod, as `check` tries them — the first pod has no
    /// cell of its own in the first row, and its column used to come last. The printed header
    /// lists the columns in the order of the rows, and each cell sits under its column.
    #[test]
    fn the_check_table_lists_columns_in_row_order() {
        let order: Vec<String> = ["web-1", "web-2", "api-1"].map(String::from).to_vec();
        let mut outcomes = Vec::new();
        for a in &order {
            for b in order.iter().filter(|b| *b != a) {
                outcomes.push(Outcome {
                    from: a.clone(),
                    to: b.clone(),
                    want: true,
                    got: !(a == "api-1" && b == "web-2"),
                    note: String::new(),
                });
            }
        }
        let text = check_table(matrix(&outcomes, &order));
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            ["FROM", "\\", "TO", "web-1", "web-2", "api-1"],
            "{text}"
        );
        assert_eq!(lines[1], ["web-1", "-", "ok", "ok"], "{text}");
        assert_eq!(lines[2], ["web-2", "ok", "-", "ok"], "{text}");
        assert_eq!(lines[3], ["api-1", "ok", "FAIL", "-"], "{text}");
    }
}
