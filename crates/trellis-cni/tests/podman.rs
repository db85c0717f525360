//! End to end with a real container runtime: podman (CNI backend) + runc start busybox
//! containers on a Trellis network inside a test node namespace, in routed and bridge mode;
//! the containers reach each other; removing them releases their addresses.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::BIN;
use serde_json::json;
use trellis_testutil::{temp_dir, TestNetns};

/// One podman "installation" in temp dirs, run with `nsenter --net=<node>`; removes its
/// containers on drop.
struct Podman {
    node: TestNetns,
    dir: tempfile::TempDir,
}

impl Podman {
    fn new(tag: &str, plugin_conf: serde_json::Value) -> Podman {
        for tool in ["podman", "runc", "busybox"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "{tool} is not installed; run scripts/setup.sh"
            );
        }
        let node = TestNetns::new(tag);
        let dir = temp_dir(tag);
        let d = dir.path();
        for sub in ["bin", "conf", "root", "runroot", "rootfs/bin", "ipam"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(BIN, d.join("bin/trellis-cni")).unwrap();
        std::os::unix::fs::symlink(BIN, d.join("bin/trellis-ipam")).unwrap();
        let busybox = which("busybox");
        std::fs::copy(&busybox, d.join("rootfs/bin/busybox")).unwrap();
        for applet in ["sh", "ping", "sleep", "ip", "cat"] {
            std::os::unix::fs::symlink("busybox", d.join("rootfs/bin").join(applet)).unwrap();
        }
        let mut plugin = plugin_conf;
        plugin["type"] = json!("trellis-cni");
        plugin["ipam"]["dataDir"] = json!(d.join("ipam"));
        let conflist = json!({"cniVersion": "1.0.0", "name": "trellis-e2e", "plugins": [plugin]});
        std::fs::write(d.join("conf/trellis-e2e.conflist"), conflist.to_string()).unwrap();
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
                d.join("bin").display(),
                d.join("conf").display()
            ),
        )
        .unwrap();
        Podman { node, dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        Command::new("nsenter")
            .arg(format!("--net={}", self.node.path().display()))
            .arg("podman")
            .args([
                "--root",
                d.join("root").to_str().unwrap(),
                "--runroot",
                d.join("runroot").to_str().unwrap(),
            ])
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .output()
            .expect("run podman")
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Starts a sleeping busybox container on the Trellis network. Limits are pinned low because
    /// podman's defaults exceed what an unprivileged sandbox may set.
    fn start(&self, name: &str) {
        let rootfs = self.dir.path().join("rootfs");
        self.run_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "trellis-e2e",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "sleep",
            "600",
        ]);
    }

    fn ip(&self, name: &str) -> String {
        let out = self.run_ok(&[
            "exec", name, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
        ]);
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .expect("an inet address")
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    fn allocations(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("ipam/trellis-e2e"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::IpAddr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-af", "-t", "0"]);
    }
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn two_containers_talk(pm: &Podman) {
    pm.start("c1");
    pm.start("c2");
    let ip1 = pm.ip("c1");
    let ip2 = pm.ip("c2");
    assert_ne!(ip1, ip2);
    assert_eq!(pm.allocations(), 2);
    let ping = pm.run(&["exec", "c1", "ping", "-c", "2", "-W", "2", &ip2]);
    assert!(
        ping.status.success(),
        "c1 -> c2: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let ping = pm.run(&["exec", "c2", "ping", "-c", "2", "-W", "2", &ip1]);
    assert!(
        ping.status.success(),
        "c2 -> c1: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    pm.run_ok(&["rm", "-f", "-t", "0", "c1", "c2"]);
    assert_eq!(pm.allocations(), 0, "removal must release the addresses");
    // DEL deletes the host ends from a detached child after answering: wait (bounded).
    let mut veths = Vec::new();
    for _ in 0..200 {
        let links = pm.node.exec_ok(&["ip", "-o", "link"]);
        veths = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|name| name.starts_with("trl") && name.len() >= 15)
            .map(str::to_string)
            .collect();
        if veths.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(veths.is_empty(), "host interfaces left behind: {veths:?}");
}

#[test]
fn podman_routed_mode() {
    let pm = Podman::new(
        "pmrouted",
        json!({"ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.90.0.0/24"}]]}}),
    );
    two_containers_talk(&pm);
}

#[test]
fn podman_bridge_mode() {
    let pm = Podman::new(
        "pmbridge",
        json!({"mode": "bridge", "bridge": "trle2e0", "isGateway": true,
        "isDefaultGateway": true, "ipMasq": true,
        "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.91.0.0/24"}]]}}),
    );
    two_containers_talk(&pm);
}
