//! `trellis node status`: this node's agent's health checks — the ones its `/healthz` and
//! `/readyz` serve — asked over the agent's Unix socket (the one the CNI plugin uses, so it is
//! there whether or not `--metrics-listen` is set, and reachable from the node wherever the
//! agent runs). Needs no datastore. Does I/O: one socket round trip.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;
use trellis_agent_api::{Request, DEFAULT_SOCKET};

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// The agent's liveness and readiness checks (datastore, dataplane, BGP) on this node, as
    /// its /readyz serves them. Exits 1 when the agent is not ready or cannot be reached.
    Status {
        /// The agent's socket (`trellis agent --socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
}

pub fn run(cmd: &NodeCommand) -> Result<ExitCode> {
    let NodeCommand::Status { socket, output } = cmd;
    let done = crate::agent_client::ask(socket, &Request::Health {}, "health")?;
    let Some(report) = done.health else {
        bail!("the agent's answer holds no health report");
    };
    if output == "json" {
        let v = serde_json::json!({"node": done.node, "report": report});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if let Some(node) = &done.node {
            println!("node {node}");
        }
        print!("{}", report.text(false));
    }
    Ok(if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
