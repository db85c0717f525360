//! `trellis`: the operator's command and the node agent. Thin: parses flags, opens the
//! datastore, and calls the library crates; all output formatting lives in [`table`].

mod commands;
mod lab;
mod table;

use clap::{Parser, Subcommand};

/// Container networking for Kubernetes-style clusters: routable pod addresses, no NAT between
/// pods, policy on who may talk.
#[derive(Parser, Debug)]
#[command(name = "trellis", version, about, long_about = None)]
pub struct Cli {
    /// The datastore: sqlite:PATH or etcd:http://HOST:PORT[,HOST:PORT].
    #[arg(long, global = true, env = "TRELLIS_DATASTORE", default_value = trellis_store::DEFAULT_SPEC)]
    pub datastore: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or update resources from a YAML/JSON file (`-` for stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// Create resources; fails if one exists.
    Create {
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// Show resources of a kind (ippools, nodes, ipamblocks, ipamhandles, blockaffinities,
    /// ipreservations, ipamconfigurations, workloadendpoints).
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        output: String,
    },
    /// Delete one resource.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// IP address management.
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// BGP: the speakers' sessions as their agents report them.
    Bgp {
        #[command(subcommand)]
        command: BgpCommand,
    },
    /// Run the node agent.
    Agent(commands::AgentArgs),
    /// A cluster built from network namespaces on this machine.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build a lab (no file: the built-in 3-node VXLAN lab `demo`).
    Up {
        #[arg(short = 'f', long = "filename")]
        file: Option<String>,
        /// Override the topology's datastore: embedded or etcd.
        #[arg(long, value_parser = ["embedded", "etcd"])]
        datastore_kind: Option<String>,
        /// Override the topology's name (run two copies side by side).
        #[arg(long)]
        name: Option<String>,
    },
    /// Nodes, pods, addresses, blocks and routes.
    Status { lab: Option<String> },
    /// Run a command in a member's namespace: trellis lab exec [LAB] MEMBER -- CMD...
    Exec {
        /// LAB and MEMBER, or just MEMBER when one lab is up.
        #[arg(num_args = 1..=2)]
        target: Vec<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Ping matrix between pods (and the topology's expectations); exit 1 if any fails.
    Check { lab: Option<String> },
    /// Truth table of every ordered pair of pods on a port (`.` blocked, `ok` reached by the
    /// right pod); with --expect, exit 1 unless it matches that table.
    Probe {
        lab: Option<String>,
        /// Destination port (not for ICMP).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "icmp"])]
        protocol: String,
        /// A truth table file (as `lab probe` prints) the result must match.
        #[arg(long)]
        expect: Option<String>,
        /// External hosts probe the pods too (extra rows).
        #[arg(long)]
        externals: bool,
        /// How long each destination gets to answer.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// A pod's server: answers with NAME on the TCP and UDP ports (run by `lab up`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        /// Written once every port is bound.
        #[arg(long)]
        ready: Option<String>,
    },
    /// The probe client: tries ADDRESS=NAME targets, one report line each (run by `lab probe`).
    #[command(hide = true)]
    Connect {
        #[arg(long, value_parser = ["tcp", "udp", "icmp"])]
        protocol: String,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        targets: Vec<String>,
    },
    /// Remove every namespace, process and file the lab made.
    Down { lab: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum BgpCommand {
    /// Peers of every node (or one) with address, AS, type, state, uptime and prefix counts,
    /// like `calicoctl node status`. Exits 1 when a configured session is not Established.
    Status {
        #[arg(long)]
        node: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum IpamCommand {
    /// Usage per pool and block.
    Show,
    /// Cross-check blocks, handles, affinities and endpoints; exits 1 when anything is wrong.
    Check,
    /// Release one address or everything a handle holds.
    Release {
        #[arg(long, conflicts_with = "handle", required_unless_present = "handle")]
        ip: Option<std::net::IpAddr>,
        #[arg(long)]
        handle: Option<String>,
    },
    /// Release what belongs to nodes that no longer exist or to nobody; delete blocks empty for
    /// longer than --grace seconds.
    Gc {
        #[arg(long, default_value_t = 300)]
        grace: u64,
    },
}

fn main() -> std::process::ExitCode {
    // Like other Unix tools: `trellis get ... | head` ends quietly instead of panicking.
    // SAFETY: resetting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if matches!(cli.command, Command::Agent(_)) {
        trellis_agent::limit_malloc_arenas();
    }
    // The lab's pod servers and probe clients are plain threads: no runtime to start.
    if let Command::Lab { command } = &cli.command {
        if let Some(code) = lab::run_traffic(command) {
            return code;
        }
    }
    run_async(cli)
}

fn run_async(cli: Cli) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
