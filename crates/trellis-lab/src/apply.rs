//! Carries out a build plan (I/O): every program the steps need is found before anything is
//! made, then each step runs and what it made is recorded in the state file (a namespace before
//! it is created, a process as soon as it is started), so `down` removes it after a failure or
//! a crash. A failed step is reported with its member and what it was doing, never the raw
//! command line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::plan::{Role, Step};
use crate::process::start_time;
use crate::state::{Process, State};
use crate::LabError;

/// How long etcd and the agents get to answer after they are started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a step failed: the system's answer, in words.
struct Failure(String);

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure(e.to_string())
    }
}

impl From<LabError> for Failure {
    fn from(e: LabError) -> Failure {
        Failure(e.to_string())
    }
}

/// The programs a plan runs, found before anything is made.
#[derive(Debug, Clone, Default)]
pub struct Programs(BTreeMap<String, PathBuf>);

impl Programs {
    fn get(&self, name: &str) -> &Path {
        &self.0[name]
    }
}

/// The Debian package to install for a program the lab runs.
fn package(program: &str) -> &str {
    match program {
        "bird" => "bird2",
        "etcd" => "etcd-server",
        "etcdctl" => "etcd-client",
        "ip" => "iproute2",
        "nsenter" => "util-linux",
        "sysctl" => "procps",
        "chown" => "coreutils",
        p if p.starts_with("/usr/lib/frr/") => "frr",
        other => other,
    }
}

fn in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A binary of this workspace: the one next to the running executable.
fn sibling(binary: &str) -> Result<PathBuf, LabError> {
    let exe = std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe", e))?;
    let p = exe.with_file_name(binary);
    if p.exists() {
        Ok(p)
    } else {
        Err(LabError::MissingBinary { binary: p, exe })
    }
}

/// Finds every program `steps` run (`trellis` and `trellis-cni` next to the running binary,
/// the others in PATH); the error names the first step that could not run.
pub fn programs(steps: &[Step]) -> Result<Programs, LabError> {
    let mut out = Programs::default();
    let mut need = |name: &str, step: &Step| -> Result<(), LabError> {
        if out.0.contains_key(name) {
            return Ok(());
        }
        let path = match name {
            "trellis" | "trellis-cni" => sibling(name)?,
            // Run by name as found in PATH (argv[0] stays `bird`, as tools expect), now
            // that it is known to be there.
            _ => in_path(name)
                .map(|_| PathBuf::from(name))
                .ok_or_else(|| LabError::Step {
                    member: step.member().to_string(),
                    step: step.describe(),
                    detail: format!(
                        "{name} is not installed (not found in PATH; Debian package {})",
                        package(name)
                    ),
                })?,
        };
        out.0.insert(name.to_string(), path);
        Ok(())
    };
    for s in steps {
        need("ip", s)?;
        need("nsenter", s)?;
        match s {
            Step::Forward { .. } => need("sysctl", s)?,
            Step::Spawn { argv, .. } => need(&argv[0], s)?,
            Step::Own { .. } => need("chown", s)?,
            Step::WaitEtcd { .. } => need("etcdctl", s)?,
            Step::Apply { .. } | Step::Policies { .. } => need("trellis", s)?,
            Step::Plugin { .. } => need("trellis-cni", s)?,
            _ => {}
        }
    }
    Ok(out)
}

/// A read-only stdin holding `text` (a memfd, not a pipe: a child that exits without reading
/// it cannot stall or signal the lab).
fn input(text: &str) -> std::io::Result<File> {
    // SAFETY: memfd_create(2) with a NUL-terminated name and a flag; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"trellis-lab-input".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(text.as_bytes())?;
    f.rewind()?;
    Ok(f)
}

/// Runs a command to completion; its stdout, or its stderr as the failure.
fn run(cmd: &mut Command) -> Result<String, Failure> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure(format!("{program}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Failure(if err.is_empty() {
            format!("{program} exited with {}", out.status)
        } else {
            err
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies plans, recording into `state` as it goes.
pub struct Applier<'a> {
    pub state: State,
    programs: Programs,
    progress: &'a mut dyn FnMut(&str),
    /// What was started, to notice one that exits while the lab waits for it.
    children: Vec<(String, String, Child)>,
    /// The Kubernetes API client (on the Kubernetes path), opened at the first write.
    kube: Option<crate::kube::Session>,
}

impl<'a> Applier<'a> {
    pub fn new(state: State, programs: Programs, progress: &'a mut dyn FnMut(&str)) -> Self {
        Applier {
            state,
            programs,
            progress,
            children: Vec::new(),
            kube: None,
        }
    }

    /// Runs every step in order; stops at the first that fails.
    pub fn run(&mut self, steps: &[Step]) -> Result<(), LabError> {
        for s in steps {
            self.step(s).map_err(|Failure(detail)| LabError::Step {
                member: s.member().to_string(),
                step: s.describe(),
                detail,
            })?;
        }
        Ok(())
    }

    fn ip(&self, args: &[&str]) -> Result<String, Failure> {
        run(Command::new(self.programs.get("ip")).args(args))
    }

    /// A command run in namespace `ns`.
    fn in_ns(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new(self.programs.get("nsenter"));
        c.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
        c
    }

    fn ns_ip(&self, ns: &str, args: &[&str]) -> Result<String, Failure> {
        run(self.in_ns(ns, self.programs.get("ip")).args(args))
    }

    fn step(&mut self, s: &Step) -> Result<(), Failure> {
        match s {
            Step::Namespace { member, ns, .. } => {
                // Recorded first: a crash right after the kernel made it still leaves it known.
                self.state.namespaces.insert(member.clone(), ns.clone());
                self.state.save()?;
                self.ip(&["netns", "add", ns])?;
                self.ns_ip(ns, &["link", "set", "lo", "up"])?;
            }
            Step::Bridge {
                ns, bridge, mac, ..
            } => {
                self.ns_ip(
                    ns,
                    &["link", "add", bridge, "address", mac, "type", "bridge"],
                )?;
                self.ns_ip(ns, &["link", "set", bridge, "up"])?;
            }
            Step::Link { .. } => self.link(s)?,
            Step::Route { ns, to, via, .. } => {
                self.ns_ip(ns, &["route", "replace", to, "via", via])?;
            }
            Step::Forward { ns, .. } => {
                run(self
                    .in_ns(ns, self.programs.get("sysctl"))
                    .args(["-qw", "net.ipv4.ip_forward=1"]))?;
            }
            Step::File { path, text, .. } => {
                if let Some(parent) = Path::new(path).parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(path, text)?;
            }
            Step::Own { path, user, .. } => {
                run(Command::new(self.programs.get("chown"))
                    .arg("-R")
                    .arg(format!("{user}:{user}"))
                    .arg(path))?;
            }
            Step::Spawn {
                member,
                ns,
                what,
                argv,
                log,
            } => self.spawn(member, ns.as_deref(), what, argv, log.as_deref())?,
            Step::WaitEtcd {
                member,
                ns,
                endpoint,
            } => self.wait_etcd(member, ns, endpoint)?,
            Step::Datastore { spec } => {
                self.state.datastore = spec.clone();
                self.state.save()?;
            }
            Step::Apply { yaml } => self.apply_resources(yaml)?,
            Step::WaitAgent {
                member,
                socket,
                log,
            } => self.wait_agent(member, socket, log)?,
            Step::Plugin { link } => {
                std::os::unix::fs::symlink(self.programs.get("trellis-cni"), link)?;
            }
            Step::Pod { .. } => self.pod(s)?,
            Step::Endpoint {
                member,
                labels,
                ports,
                service_account,
                ..
            } => {
                let change = crate::endpoint::EndpointChange::Pod {
                    labels: labels.clone(),
                    ports: ports.clone(),
                    service_account: service_account.clone(),
                };
                crate::endpoint::update(&self.state, member, &change)?;
            }
            Step::WaitServer { member, ready, log } => self.wait_server(member, ready, log)?,
            Step::Policies { yaml } => {
                self.apply_resources(yaml)?;
                (self.progress)("  policies applied");
            }
            Step::Kube {
                kubeconfig,
                objects,
                ..
            } => self.kube_objects(kubeconfig, objects)?,
        }
        Ok(())
    }

    /// Creates or replaces `objects` in the Kubernetes API; each one created is recorded at
    /// once (for `down` to delete).
    fn kube_objects(
        &mut self,
        kubeconfig: &str,
        objects: &[serde_json::Value],
    ) -> Result<(), Failure> {
        if self.kube.is_none() {
            self.kube = Some(crate::kube::Session::open(kubeconfig)?);
        }
        let session = self.kube.as_ref().expect("just opened");
        for o in objects {
            if let Some(created) = session.put(o)? {
                self.state.kube_objects.push(created);
                self.state.save()?;
            }
        }
        Ok(())
    }

    fn wait_server(&mut self, member: &str, ready: &str, log: &str) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !Path::new(ready).exists() {
            self.still_running(member, "server", log)?;
            if Instant::now() > deadline {
                return Err(Failure(format!(
                    "not serving within {} s; see {log}",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn link(&mut self, s: &Step) -> Result<(), Failure> {
        let Step::Link {
            member,
            role,
            ns,
            ifname,
            address,
            fabric,
            port,
            bridge,
        } = s
        else {
            unreachable!("called for links")
        };
        self.ip(&[
            "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns",
            fabric,
        ])?;
        self.ns_ip(fabric, &["link", "set", port, "master", bridge, "up"])?;
        self.ns_ip(ns, &["addr", "add", address, "dev", ifname])?;
        self.ns_ip(ns, &["link", "set", ifname, "up"])?;
        let ip = address.split('/').next().unwrap_or(address).to_string();
        match role {
            Role::Node => self.state.node_ips.insert(member.clone(), ip),
            Role::External => self.state.external_ips.insert(member.clone(), ip),
            _ => None,
        };
        self.state.save()?;
        Ok(())
    }

    /// `trellis apply` of the lab's documents, from the control namespace when etcd runs there.
    fn apply_resources(&self, yaml: &str) -> Result<(), Failure> {
        let trellis = self.programs.get("trellis").to_path_buf();
        let mut c = match self.state.namespaces.get("control") {
            Some(ctl) => self.in_ns(ctl, &trellis),
            None => Command::new(&trellis),
        };
        c.args(["--datastore", &self.state.datastore, "apply", "-f", "-"]);
        let out = c.stdin(input(yaml)?).output()?;
        if !out.status.success() {
            return Err(Failure(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        member: &str,
        ns: Option<&str>,
        what: &str,
        argv: &[String],
        log: Option<&str>,
    ) -> Result<(), Failure> {
        let (out, err) = match log {
            Some(l) => {
                let f = File::create(l).map_err(|e| Failure(format!("{l}: {e}")))?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let mut cmd = match ns {
            Some(ns) => self.in_ns(ns, self.programs.get(&argv[0])),
            None => Command::new(self.programs.get(&argv[0])),
        };
        let child = cmd
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()?;
        let pid = child.id() as i32;
        // Read while it is our unreaped child: the PID cannot have been reused yet.
        let started = start_time(pid)?;
        self.children
            .push((member.to_string(), what.to_string(), child));
        self.state.pids.push(Process {
            member: member.to_string(),
            what: what.to_string(),
            pid,
            start_time: Some(started),
        });
        self.state.save()?;
        (self.progress)(&format!("  {member}: {what} started"));
        Ok(())
    }

    /// Fails if `member`'s `what` has exited (pointing at its log).
    fn still_running(&mut self, member: &str, what: &str, log: &str) -> Result<(), Failure> {
        let Some((_, _, child)) = self
            .children
            .iter_mut()
            .find(|(m, w, _)| m == member && w == what)
        else {
            return Ok(());
        };
        match child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(Failure(format!("{what} exited ({status}); see {log}"))),
        }
    }

    fn wait_etcd(&mut self, member: &str, ns: &str, endpoint: &str) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        let log = crate::state::lab_dir(&self.state.name).join("etcd.log");
        loop {
            let health = run(self.in_ns(ns, self.programs.get("etcdctl")).args([
                "--endpoints",
                endpoint,
                "endpoint",
                "health",
            ]));
            match health {
                Ok(_) => break,
                Err(Failure(e)) if Instant::now() > deadline => {
                    return Err(Failure(format!(
                        "no answer within {} s ({e}); see {}",
                        START_TIMEOUT.as_secs(),
                        log.display()
                    )))
                }
                Err(_) => {}
            }
            self.still_running(member, "etcd", &log.display().to_string())?;
            std::thread::sleep(Duration::from_millis(100));
        }
        (self.progress)(&format!("  etcd answers at {endpoint}"));
        Ok(())
    }

    fn wait_agent(&mut self, member: &str, socket: &str, log: &str) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            self.still_running(member, "agent", log)?;
            if Instant::now() > deadline {
                return Err(Failure(format!(
                    "no answer on {socket} within {} s; see {log}",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (self.progress)(&format!("  {member}: agent is up"));
        Ok(())
    }

    fn pod(&mut self, s: &Step) -> Result<(), Failure> {
        let Step::Pod {
            member,
            node,
            node_ns,
            ns,
            namespace,
            pod,
            container_id,
            socket,
            cni_path,
        } = s
        else {
            unreachable!("called for pods")
        };
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
            "type": "trellis-cni", "ipam": {"type": "trellis-ipam", "agentSocket": socket}});
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}");
        let out = self
            .in_ns(node_ns, self.programs.get("trellis-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", args)
            .stdin(input(&conf.to_string())?)
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            Failure(format!(
                "unreadable CNI result ({e}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        if !out.status.success() {
            let text = ["msg", "details"]
                .iter()
                .filter_map(|k| v[k].as_str().filter(|s| !s.is_empty()))
                .collect::<Vec<_>>()
                .join(": ");
            return Err(Failure(format!("CNI error {}: {text}", v["code"])));
        }
        let addr = v["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .ok_or_else(|| Failure(format!("no address in the CNI result {v}")))?
            .to_string();
        (self.progress)(&format!("  pod {member:<12} on {node:<8} {addr}"));
        self.state.pod_ips.insert(member.clone(), addr);
        self.state.pod_nodes.insert(member.clone(), node.clone());
        self.state.save()?;
        Ok(())
    }
}
