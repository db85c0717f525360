//! `trellis`: the operator's command and the node agent. Thin: parses flags, opens the
//! datastore, and calls the library crates; all output formatting lives in [`table`].

mod agent_client;
mod commands;
mod flows;
mod install_cni;
mod kernel;
mod lab;
mod node;
mod policy;
mod policy_table;
mod table;
mod target;
mod trace;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Container networking for Kubernetes-style clusters: routable pod addresses, no NAT between
/// pods, policy on who may talk.
#[derive(Parser, Debug)]
#[command(name = "trellis", version, about, long_about = None)]
pub struct Cli {
    /// The datastore: sqlite:PATH or etcd:http://HOST:PORT[,HOST:PORT] (default
    /// sqlite:/var/lib/trellis/trellis.db).
    #[arg(long, global = true, env = "TRELLIS_DATASTORE")]
    pub datastore: Option<String>,
    /// Use the datastore of this running lab (`trellis lab up`), in place of --datastore; an
    /// etcd lab's commands run inside its control namespace.
    #[arg(long, global = true, env = "TRELLIS_LAB")]
    pub lab: Option<String>,
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
    /// ipreservations, ipamconfigurations, workloadendpoints, networkpolicies (Calico's and
    /// Kubernetes'), globalnetworkpolicies, tiers, networksets, globalnetworksets, profiles,
    /// namespaces, serviceaccounts, ...). Namespaced kinds: namespace `default` unless -n or -A.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        output: String,
    },
    /// Delete one resource (KIND NAME), or every resource of a file (-f) in one transaction.
    Delete {
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        kind: Option<String>,
        #[arg(required_unless_present = "file")]
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'f', long = "filename")]
        file: Option<String>,
    },
    /// Set (k=v) or remove (k-) labels of a pod's endpoints or of a namespace, like kubectl.
    Label {
        /// `pod` or `namespace`.
        #[arg(value_parser = ["pod", "pods", "po", "namespace", "namespaces", "ns"])]
        kind: String,
        name: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true)]
        labels: Vec<String>,
        /// The pod's namespace (default `default`).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Allow changing a label that already has another value.
        #[arg(long)]
        overwrite: bool,
    },
    /// Network policy: why a connection is allowed or denied, and which policies apply.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
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
    /// Flow logs: each connection's source, destination, port, verdict and the policy rule that
    /// decided (agents run with --flow-logs). This node's agent, or a lab's (--lab).
    Flows(flows::FlowsArgs),
    /// This node's agent: `status` prints its health checks (exit 1 when not ready).
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Install the CNI plugin and a conflist on the host mounted at --host-root (an init
    /// container's job); --check reports what is out of date, --uninstall removes them.
    InstallCni(install_cni::InstallCniArgs),
    /// Mirror Kubernetes namespaces, pods, service accounts and network policies into the
    /// datastore (one per cluster, leader-elected with a Lease).
    KubeController(trellis_kube::cli::KubeControllerArgs),
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
pub enum PolicyCommand {
    /// Evaluate a connection against the policy model: egress from SRC, then ingress to DST,
    /// each tier, policy and rule considered, and the verdict. SRC/DST: NS/POD, a pod's
    /// address, a node's address or any address. Exit 0 when allowed, 1 when denied.
    Trace {
        src: String,
        dst: String,
        /// Destination port (TCP, UDP, SCTP).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "sctp", "icmp", "icmpv6"])]
        protocol: String,
        /// The source port, for rules that match source ports (unknown otherwise).
        #[arg(long)]
        source_port: Option<u16>,
        /// ICMP type (default 8, echo request) and code.
        #[arg(long)]
        icmp_type: Option<u8>,
        #[arg(long)]
        icmp_code: Option<u8>,
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Also read the deciding rules' packet and byte counters from the node's kernel
        /// (the lab node's namespace with --lab, else this host when it is that node).
        #[arg(long)]
        kernel: bool,
    },
    /// The policies that apply to a pod (NS/POD), per direction, in evaluation order.
    Show {
        pod: String,
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
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
    /// Cross-check blocks, handles, affinities and endpoints, and in Kubernetes mode report
    /// addresses whose pod no longer exists (with how long kube-controller GC has seen it
    /// gone); exits 1 when anything is wrong.
    Check {
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
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
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
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
    // The lab's pod servers and probe clients are plain threads: no runtime, no datastore.
    if let Command::Lab { command } = &cli.command {
        if let Some(code) = lab::run_traffic(command) {
            return code;
        }
    }
    // Node-local commands: no datastore.
    let local = match &cli.command {
        Command::InstallCni(a) => Some(install_cni::run(a)),
        Command::Node { command } => Some(node::run(command)),
        Command::Flows(a) => Some(flows::run(a)),
        _ => None,
    };
    if let Some(r) = local {
        return r.unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        });
    }
    // Which datastore; for an etcd lab, the command runs again inside its control namespace.
    let datastore = match target::resolve(&cli, &matches) {
        Ok(target::Resolved::Datastore(d)) => d,
        Ok(target::Resolved::Reexec(code)) => return code,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Command::KubeController(args) = &cli.command {
        return match rt.block_on(trellis_kube::cli::run(&datastore, args.clone())) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(commands::run(cli, datastore)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
