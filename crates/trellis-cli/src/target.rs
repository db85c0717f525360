//! Which datastore a command uses: `--datastore`, or a running lab's (`--lab LAB`,
//! `TRELLIS_LAB`), read from the lab's state file. An etcd lab's etcd listens inside the lab's
//! control namespace, so the command runs again there (`nsenter --net`, as `lab exec` does).
//! A flag beats an environment variable; `--lab` and `--datastore` together are refused. `lab`
//! and `agent` commands ignore the lab (the lab starts agents with their own `--datastore`).
//! I/O: the state file, and the re-executed command.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;

use crate::{Cli, Command};

/// Where the command goes.
pub enum Resolved {
    /// Run here, on this datastore.
    Datastore(String),
    /// Ran again in the lab's control namespace; this is its exit code.
    Reexec(ExitCode),
}

fn from_flag(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

pub fn resolve(cli: &Cli, m: &ArgMatches) -> Result<Resolved> {
    let default = || {
        cli.datastore
            .clone()
            .unwrap_or_else(|| trellis_store::DEFAULT_SPEC.to_string())
    };
    if matches!(cli.command, Command::Agent(_) | Command::Lab { .. }) {
        return Ok(Resolved::Datastore(default()));
    }
    let (lab_flag, ds_flag) = (from_flag(m, "lab"), from_flag(m, "datastore"));
    if lab_flag && ds_flag {
        bail!("give --lab or --datastore, not both");
    }
    let lab = match &cli.lab {
        Some(l) if !ds_flag => l,
        _ => return Ok(Resolved::Datastore(default())),
    };
    let state = trellis_lab::State::load(lab)?;
    if state.datastore.is_empty() {
        bail!("lab {lab} has no datastore yet (is it still coming up?)");
    }
    let Some(ctl) = state.namespaces.get("control") else {
        return Ok(Resolved::Datastore(state.datastore));
    };
    let ns = Path::new("/var/run/netns").join(ctl);
    if same_netns(&ns)? {
        return Ok(Resolved::Datastore(state.datastore));
    }
    let exe = std::env::current_exe().context("finding the trellis binary")?;
    let status = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .status()
        .with_context(|| format!("running the command in lab {lab}'s control namespace {ctl}"))?;
    Ok(Resolved::Reexec(ExitCode::from(
        status.code().map(|c| c as u8).unwrap_or(1),
    )))
}

/// Whether this process is in the network namespace `ns` names.
fn same_netns(ns: &Path) -> Result<bool> {
    let here = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    let there = std::fs::metadata(ns)
        .with_context(|| format!("the lab's control namespace {} is gone", ns.display()))?;
    Ok(here.dev() == there.dev() && here.ino() == there.ino())
}
