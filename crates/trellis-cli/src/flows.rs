//! `trellis flows`: the flow logs of node agents (`trellis agent --flow-logs`), like `hubble
//! observe`: each connection's source and destination, port, verdict and the policy rule that
//! decided, aggregated per interval. Asks this node's agent over its socket, or every agent of
//! a lab (`--lab`, `--node` to pick one). `--follow` asks again every second for what closed
//! since. Does I/O: socket round trips.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use trellis_agent_api::flows::{FlowQuery, FlowRecord, FlowVerdict};
use trellis_agent_api::{Request, DEFAULT_SOCKET};

#[derive(Args, Debug)]
pub struct FlowsArgs {
    /// This node's agent socket (`trellis agent --socket`); not with --lab.
    #[arg(long, default_value = DEFAULT_SOCKET, conflicts_with = "lab")]
    socket: PathBuf,
    /// Every agent of this lab (or the one --node names).
    #[arg(long)]
    lab: Option<String>,
    /// Only this node's agent (with --lab).
    #[arg(long, requires = "lab")]
    node: Option<String>,
    /// Only flows with this verdict.
    #[arg(long, value_parser = ["allowed", "denied"])]
    verdict: Option<String>,
    /// Only flows from or to pods of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Keep printing flows as their intervals close (Ctrl-C ends).
    #[arg(short, long)]
    follow: bool,
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// The agents to ask: `(node name or "", socket)`.
fn agents(a: &FlowsArgs) -> Result<Vec<(String, PathBuf)>> {
    let Some(lab) = &a.lab else {
        return Ok(vec![(String::new(), a.socket.clone())]);
    };
    let state = trellis_lab::State::load(lab)?;
    let nodes: Vec<String> = match &a.node {
        Some(n) if state.node_ips.contains_key(n) => vec![n.clone()],
        Some(n) => bail!("lab {lab} has no node {n}"),
        None => state.node_ips.keys().cloned().collect(),
    };
    Ok(nodes
        .into_iter()
        .map(|n| {
            let s = trellis_lab::state::agent_socket(lab, &n);
            (n, s)
        })
        .collect())
}

pub fn run(a: &FlowsArgs) -> Result<ExitCode> {
    let agents = agents(a)?;
    let verdict = a.verdict.as_deref().map(|v| match v {
        "denied" => FlowVerdict::Denied,
        _ => FlowVerdict::Allowed,
    });
    let mut after: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut first = true;
    loop {
        let mut records = Vec::new();
        for (node, socket) in &agents {
            // Page by page: each reply carries a bounded number of records.
            loop {
                let query = FlowQuery {
                    after: after.get(socket).copied(),
                    verdict,
                    namespace: a.namespace.clone(),
                    // A one-off look includes what is still being aggregated.
                    open: !a.follow,
                };
                let done = crate::agent_client::ask(socket, &Request::Flows { query }, "flows")?;
                let Some(flows) = done.flows else {
                    bail!("the agent's answer holds no flows");
                };
                if !flows.enabled && first {
                    let who = if node.is_empty() {
                        "this node's agent"
                    } else {
                        node
                    };
                    eprintln!("flow logs are off at {who} (trellis agent --flow-logs)");
                }
                after.insert(socket.clone(), flows.next);
                records.extend(flows.records);
                if !flows.more {
                    break;
                }
            }
        }
        records.sort_by(|x, y| (x.end, &x.node).cmp(&(y.end, &y.node)));
        print(&records, &a.output, first)?;
        first = false;
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn print(records: &[FlowRecord], output: &str, header: bool) -> Result<()> {
    if output == "json" {
        for r in records {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if header {
        println!(
            "{:<8} {:<10} {:<28} {:<28} {:<10} {:<8} {:<8} POLICY/RULE",
            "NODE", "END", "SOURCE", "DESTINATION", "PORT", "VERDICT", "PACKETS"
        );
    }
    for r in records {
        println!(
            "{:<8} {:<10} {:<28} {:<28} {:<10} {:<8} {:<8} {} {} {}",
            r.node,
            clock(r.end),
            r.key.source.to_string(),
            r.key.destination.to_string(),
            port(r.key.protocol, r.key.port),
            match r.key.verdict {
                FlowVerdict::Allowed => "allowed",
                FlowVerdict::Denied => "DENIED",
            },
            r.packets,
            r.key.policy,
            r.key.direction,
            r.key.rule
        );
    }
    Ok(())
}

/// `HH:MM:SS` (UTC) of Unix milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `80/TCP`, `53/UDP`, `ICMP 8`, or the protocol number.
fn port(protocol: u8, port: Option<u16>) -> String {
    let name = match protocol {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        1 => "ICMP",
        58 => "ICMPv6",
        _ => return format!("proto {protocol}"),
    };
    match (protocol, port) {
        (1 | 58, Some(t)) => format!("{name} {t}"),
        (_, Some(p)) => format!("{p}/{name}"),
        (_, None) => name.to_string(),
    }
}
