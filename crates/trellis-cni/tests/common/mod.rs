//! Shared harness for the plugin's integration tests: runs the built `trellis-cni` binary (and
//! its `trellis-ipam` name) inside a test "node" namespace with the environment a runtime gives.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use serde_json::{json, Value};
use tempfile::TempDir;
use trellis_testutil::{temp_dir, TestNetns};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis-cni");

/// A node namespace plus a CNI_PATH holding the plugin under both its names.
pub struct Node {
    pub ns: TestNetns,
    pub dir: TempDir,
}

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "plugin failed: {} {}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn err_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected failure, got {}", self.stdout);
        self.json()["code"].as_u64().expect("error code")
    }
}

impl Node {
    pub fn new(tag: &str) -> Node {
        let ns = TestNetns::new(tag);
        let dir = temp_dir(tag);
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::os::unix::fs::symlink(BIN, bin_dir.join("trellis-cni")).unwrap();
        std::os::unix::fs::symlink(BIN, bin_dir.join("trellis-ipam")).unwrap();
        Node { ns, dir }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    pub fn cni_path(&self) -> String {
        format!("{}:/usr/lib/cni", self.dir.path().join("bin").display())
    }

    /// A routed-mode config with one IPv4 range (and optionally more fields).
    pub fn conf(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({"cniVersion": version, "name": "testnet", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.77.0.0/24"}]],
                     "dataDir": self.data_dir()}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    /// Starts the plugin (named `name`) inside the node namespace. The arguments mirror the CNI
    /// environment one for one, hence their number.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        &self,
        name: &str,
        command: &str,
        cid: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> Child {
        let bin = self.dir.path().join("bin").join(name);
        let mut c = self.ns.command(bin.to_str().unwrap());
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", self.cni_path())
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
            )
            .env_remove("CNI_NETNS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = netns {
            c.env("CNI_NETNS", n);
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child
    }

    #[allow(clippy::too_many_arguments)]
    pub fn call_as(
        &self,
        name: &str,
        command: &str,
        cid: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> Outcome {
        let out = self
            .spawn(name, command, cid, netns, ifname, conf, extra_env)
            .wait_with_output()
            .unwrap();
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn call(&self, command: &str, cid: &str, netns: Option<&Path>, conf: &Value) -> Outcome {
        self.call_as("trellis-cni", command, cid, netns, "eth0", conf, &[])
    }

    /// Files in the IPAM store of network `net` that are allocations.
    pub fn allocations(&self, net: &str) -> Vec<(String, String)> {
        let dir = self.data_dir().join(net);
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.parse::<std::net::IpAddr>().is_ok() {
                    let owner = std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push((name, owner));
                }
            }
        }
        out.sort();
        out
    }
}

/// A pod namespace (its own guard).
pub fn pod(tag: &str) -> TestNetns {
    TestNetns::new(tag)
}

/// The address (without prefix) of `ips[i]` in a result.
pub fn ip_of(result: &Value, i: usize) -> String {
    result["ips"][i]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// `ping -c1 -W1` from `from` to `to`, up to 3 tries.
pub fn ping(from: &TestNetns, to: &str) -> bool {
    let prog = if to.contains(':') { "-6" } else { "-4" };
    (0..3).any(|_| {
        from.exec(&["ping", prog, "-c1", "-W1", to])
            .status
            .success()
    })
}

/// Waits (up to 10 s) for a link to disappear: DEL takes the host end down at once and deletes
/// it from a detached child right after answering, so a test must not expect it gone at once.
pub fn link_gone(ns: &TestNetns, name: &str) -> bool {
    for _ in 0..200 {
        if !ns.exec(&["ip", "link", "show", name]).status.success() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
