//! `trellis node status`: this node's agent's health checks — the ones its `/healthz` and
//! `/readyz` serve — asked over the agent's Unix socket (the one the CNI plugin uses, so it is
//! there whether or not `--metrics-listen` is set, and reachable from the node wherever the
//! agent runs). Needs no datastore. Does I/O: one socket round trip.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use trellis_agent_api::{Reply, Request, DEFAULT_SOCKET};

/// How long the agent has to answer (it answers from memory; a busy agent queues the request).
const TIMEOUT: Duration = Duration::from_secs(40);
/// The longest answer read (a report is a few hundred bytes).
const MAX_REPLY: u64 = 1 << 20;

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
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent at {} (is `trellis agent` running on this node? --socket names another socket)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_vec(&Request::Health {})?;
    line.push(b'\n');
    s.write_all(&line)
        .with_context(|| format!("asking the agent at {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_REPLY))
        .read_line(&mut answer)
        .with_context(|| format!("reading the agent's answer on {}", socket.display()))?;
    let done = match serde_json::from_str::<Reply>(&answer) {
        Ok(Reply::Ok(done)) => done,
        // An agent older than the health request cannot decode it (code 6, unknown variant).
        Ok(Reply::Error(e)) if e.code == 6 && e.msg.contains("unknown variant") => bail!(
            "the agent at {} does not know the health request (it is older than this command): {}",
            socket.display(),
            e.msg
        ),
        Ok(Reply::Error(e)) => bail!("the agent answered error {}: {}", e.code, e.msg),
        Err(e) => bail!(
            "the agent at {} gave no health report ({e}); is it older than this command?",
            socket.display()
        ),
    };
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
