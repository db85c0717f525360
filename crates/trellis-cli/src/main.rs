//! `trellis`: the operator's command. This first shape answers `--version` and `--help`; the
//! datastore, agent and lab subcommands arrive with their crates.

use clap::Parser;

/// Container networking for Kubernetes-style clusters: routable pod addresses, no NAT between
/// pods, policy on who may talk.
#[derive(Parser, Debug)]
#[command(name = "trellis", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    println!(
        "trellis {}: the CNI plugin is `trellis-cni`; see README.md. Run `trellis --help`.",
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}
