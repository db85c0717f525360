//! `trellis lab` subcommands: thin wrappers around [`trellis_lab`] that print.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use trellis_lab::{check, down, exec_cmd, pick, topology, up, State};

use crate::table::render;
use crate::LabCommand;

pub fn run(cmd: LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up {
            file,
            datastore_kind,
            name,
        } => {
            let mut t = match file {
                Some(f) => {
                    topology::parse(&std::fs::read_to_string(&f).map_err(|e| anyhow!("{f}: {e}"))?)
                        .map_err(|e| anyhow!("{f}: {e}"))?
                }
                None => topology::demo(),
            };
            if let Some(d) = datastore_kind {
                t.datastore = d;
            }
            if let Some(n) = name {
                t.name = n;
                topology::parse(&serde_norway::to_string(&t)?)
                    .map_err(|e| anyhow!("--name: {e}"))?;
            }
            let started = Instant::now();
            let state = up(t, |line| eprintln!("{line}")).map_err(|e| anyhow!(e))?;
            eprintln!(
                "lab {} is up in {:.1} s; try: trellis lab check {}",
                state.name,
                started.elapsed().as_secs_f64(),
                state.name
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status { lab } => {
            let state = State::load(&pick(lab).map_err(|e| anyhow!(e))?).map_err(|e| anyhow!(e))?;
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
                let routes = exec_cmd(&state, n, &["ip".into(), "route".into()])
                    .map_err(|e| anyhow!(e))?
                    .output()?;
                println!(
                    "\nroutes on {n}:\n{}",
                    String::from_utf8_lossy(&routes.stdout).trim_end()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec { target, command } => {
            let (lab, member) = match target.as_slice() {
                [m] => (pick(None).map_err(|e| anyhow!(e))?, m.clone()),
                [l, m] => (l.clone(), m.clone()),
                _ => bail!("usage: trellis lab exec [LAB] MEMBER -- CMD"),
            };
            let state = State::load(&lab).map_err(|e| anyhow!(e))?;
            let status = exec_cmd(&state, &member, &command)
                .map_err(|e| anyhow!(e))?
                .status()?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        LabCommand::Check { lab } => {
            let state = State::load(&pick(lab).map_err(|e| anyhow!(e))?).map_err(|e| anyhow!(e))?;
            let outcomes = check(&state);
            let mut froms: Vec<String> = outcomes.iter().map(|o| o.from.clone()).collect();
            froms.sort();
            froms.dedup();
            let mut tos: Vec<String> = Vec::new();
            for o in &outcomes {
                if !tos.contains(&o.to) {
                    tos.push(o.to.clone());
                }
            }
            let rows: Vec<Vec<String>> = froms
                .iter()
                .map(|f| {
                    let mut row = vec![f.clone()];
                    for t in &tos {
                        row.push(match outcomes.iter().find(|o| &o.from == f && &o.to == t) {
                            None => "-".into(),
                            Some(o) if o.got == o.want => {
                                if o.want {
                                    "ok".into()
                                } else {
                                    "blocked".into()
                                }
                            }
                            Some(o) => {
                                if o.want {
                                    "FAIL".into()
                                } else {
                                    "LEAK".into()
                                }
                            }
                        });
                    }
                    row
                })
                .collect();
            let mut header = vec!["FROM \\ TO"];
            header.extend(tos.iter().map(String::as_str));
            print!("{}", render(&header, &rows));
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
        LabCommand::Down { lab } => {
            let name = match lab {
                Some(l) => l,
                None => pick(None).map_err(|e| anyhow!(e))?,
            };
            let removed = down(&name).map_err(|e| anyhow!(e))?;
            println!(
                "lab {name} is down ({} namespace(s) removed)",
                removed.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
