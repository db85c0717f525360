//! Test support (tests only): network namespaces with unique names that are removed — with
//! every process inside them — when the guard drops, on success, failure and panic alike.
//! Never touches the root namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Prefix of every namespace the tests make (CI sweeps leftovers by it).
pub const NETNS_PREFIX: &str = "trlt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics with a clear message unless running as root (the integration tests need it).
pub fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this integration test needs root (it creates network namespaces); run the suite as root");
    }
}

/// A named network namespace (`/var/run/netns/NAME`), deleted on drop.
pub struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    /// Creates `trlt-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> TestNetns {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let name = format!("{NETNS_PREFIX}{tag}-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = TestNetns {
            path: PathBuf::from(format!("/var/run/netns/{name}")),
            name,
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `Command` that runs `program` inside this namespace (via nsenter, which keeps /sys).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display())).arg(program);
        c
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        c.output().expect("run nsenter")
    }

    /// Like [`exec`](Self::exec) but panics on failure; returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell snippet inside the namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        kill_netns_pids(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Kills every process living in the named namespace.
pub fn kill_netns_pids(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A pair of namespaces joined by a veth, addressed `a_addr`/`b_addr` (CIDR notation).
pub fn veth_between(
    a: &TestNetns,
    a_if: &str,
    a_addr: &str,
    b: &TestNetns,
    b_if: &str,
    b_addr: &str,
) {
    run_ok(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
    a.exec_ok(&["ip", "addr", "add", a_addr, "dev", a_if]);
    a.exec_ok(&["ip", "link", "set", a_if, "up"]);
    b.exec_ok(&["ip", "addr", "add", b_addr, "dev", b_if]);
    b.exec_ok(&["ip", "link", "set", b_if, "up"]);
}

fn run_ok(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary directory removed on drop.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("trellis-{tag}-"))
        .tempdir()
        .expect("create temp dir")
}

/// Writes an executable file (mode 0755) with `content`. The file is written by a child
/// process (`sh`), never held open for writing by this one: a test in another thread that
/// forks meanwhile would inherit the write descriptor, and exec'ing the file would then fail
/// with ETXTBSY ("Text file busy").
pub fn write_executable(path: &std::path::Path, content: &str) {
    use std::io::Write as _;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"cat > "$1" && chmod 755 "$1""#)
        .arg("sh")
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(content.as_bytes())
        .expect("write the script");
    assert!(child.wait().expect("wait sh").success(), "writing {path:?}");
}

/// A throwaway etcd (Debian's `etcd-server`) on loopback ports with a temp data dir; killed and
/// removed on drop.
pub struct EtcdServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
    how: Launch,
}

/// etcd's data dir: on tmpfs when there is one, so the tests measure Trellis and not the disk's
/// fsync latency (etcd fsyncs every write; a shared CI disk can stall it for seconds).
fn etcd_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("trellis-etcd-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    temp_dir("etcd")
}

/// Debian's etcd binary.
fn etcd_binary() -> &'static str {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("etcd is not installed (Debian package etcd-server); run scripts/setup.sh")
}

/// A single-member etcd on `client`/`peer` URLs with its data in `dir`.
fn etcd_args<'a>(
    c: &'a mut Command,
    dir: &tempfile::TempDir,
    client: &str,
    peer: &str,
) -> &'a mut Command {
    c.args(["--name", "trellis-test", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("trellis-test={peer}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// Starts etcd inside `ns`, listening on `ip` (an address of that namespace), and waits until
    /// it is healthy: for agents that live in other namespaces joined to it.
    pub fn start_in(ns: &TestNetns, ip: &str) -> EtcdServer {
        EtcdServer::launch(
            Launch {
                netns: Some(ns.path().to_path_buf()),
                peer: format!("http://{ip}:2380"),
                extra: Vec::new(),
            },
            format!("http://{ip}:2379"),
        )
    }

    /// Starts etcd and waits (up to 20 s) until it answers.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(&[])
    }

    /// Starts etcd on loopback with `extra` flags (e.g. `--auto-compaction-retention`).
    pub fn start_with(extra: &[&str]) -> EtcdServer {
        let (client, peer) = (free_port(), free_port());
        EtcdServer::launch(
            Launch {
                netns: None,
                peer: format!("http://127.0.0.1:{peer}"),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            },
            format!("http://127.0.0.1:{client}"),
        )
    }

    fn launch(how: Launch, endpoint: String) -> EtcdServer {
        let dir = etcd_dir();
        let child = how.spawn(&dir, &endpoint);
        let server = EtcdServer {
            child,
            _dir: dir,
            endpoint,
            how,
        };
        server.wait_ready();
        server
    }

    /// Kills etcd and starts it again on the same addresses and data: for tests of clients
    /// that must survive a restart.
    pub fn restart(&mut self) {
        self.stop();
        self.child = self.how.spawn(&self._dir, &self.endpoint);
        self.wait_ready();
    }

    /// Freezes etcd (SIGSTOP) with its connections open: a server that stops answering without
    /// closing anything, as a dead host or a partition looks to its clients. Dropping the
    /// server still kills it.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal etcd");
    }

    /// Stops etcd (until [`EtcdServer::restart`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to 20 s): for a loopback server until it listens, inside a namespace until
    /// `etcdctl endpoint health` passes there.
    fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let ready = match &self.how.netns {
                Some(ns) => Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .args([
                        "etcdctl",
                        "--endpoints",
                        &self.endpoint,
                        "endpoint",
                        "health",
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success()),
                None => {
                    let port: u16 = self.endpoint.rsplit(':').next().unwrap().parse().unwrap();
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                }
            };
            if ready {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("etcd did not become ready on {}", self.endpoint);
    }
}

/// How an [`EtcdServer`] was started, to start it again.
struct Launch {
    netns: Option<PathBuf>,
    peer: String,
    extra: Vec<String>,
}

impl Launch {
    fn spawn(&self, dir: &tempfile::TempDir, endpoint: &str) -> std::process::Child {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(etcd_binary());
                c
            }
            None => Command::new(etcd_binary()),
        };
        etcd_args(&mut c, dir, endpoint, &self.peer)
            .args(&self.extra)
            .spawn()
            .expect("start etcd")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` with `input` on its stdin (closed once written) and its stdout piped.
pub fn spawn_with_input(cmd: &mut Command, input: &str) -> Child {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child
}

/// Runs `cmd` the way a container runtime runs a CNI plugin from inside a node namespace:
/// forked, entered into the network namespace at `netns` between fork and exec (so no helper
/// process such as `nsenter` is timed), `input` on its stdin, stdout and stderr captured.
/// Returns the time from spawn to exit with the output. For benchmarks.
pub fn timed_in_netns(netns: &Path, cmd: &mut Command, input: &[u8]) -> (Duration, Output) {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    let ns = std::fs::File::open(netns).expect("open the namespace");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setns(2) is async-signal-safe; the closure touches only the namespace file.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    // A program that exits without reading its stdin (the spawn floor's /bin/true) is fine.
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (start.elapsed(), out)
}

/// CPU time of a process from `/proc/PID/stat`, in seconds: (its own utime + stime, utime +
/// stime of its waited-for children). For benchmarks.
pub fn proc_cpu_secs(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<f64> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ((f[11] + f[12]) / hz, (f[13] + f[14]) / hz)
}

/// A memory figure of a process from `/proc/PID/status` in kB (`VmRSS` now, `VmHWM` its
/// peak); 0 when the process or the field is gone. For benchmarks.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
