//! Hostile input, one defect at a time (issue 15 items 1–5, issue 9 item 10): the plugin runs
//! inside a throwaway "node" namespace, so that "its own namespace" is never the machine's. Every
//! call has a deadline; a hang fails the test instead of stalling it.

mod common;

use std::time::Duration;

use common::{give_default_route, net_state, pod, Node};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(10);

fn msg(o: &common::Outcome) -> String {
    o.json()["msg"].as_str().unwrap_or_default().to_string()
}

/// Runs `command` with `netns`/`ifname`, bounded, and returns the outcome.
fn call(
    node: &Node,
    command: &str,
    cid: &str,
    netns: Option<&str>,
    ifname: &str,
    conf: &Value,
) -> common::Outcome {
    let path = node.cni_path();
    let env = node.env(command, cid, netns, ifname, &path);
    node.run_bounded(
        "trellis-cni",
        &env,
        conf.to_string().as_bytes(),
        DEADLINE,
        None,
    )
    .finished(&format!("{command} {cid} netns={netns:?} ifname={ifname}"))
}

#[test]
fn own_namespace_and_non_namespaces_are_refused_for_every_verb() {
    let node = Node::new("ownns");
    give_default_route(&node.ns);
    let conf = node.conf("1.0.0", json!({}));
    let before = net_state(&node.ns);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let own_by_name = node.ns.path().display().to_string();
    let cases = [
        ("/proc/self/ns/net", "own"),
        ("/proc/thread-self/ns/net", "own"),
        (own_by_name.as_str(), "own"),
        (file.to_str().unwrap(), "not a network namespace"),
        (dir.path().to_str().unwrap(), "not a network namespace"),
        ("/dev/null", "not a network namespace"),
        ("/proc/self/ns/mnt", "not a network namespace"),
    ];
    for (netns, why) in cases {
        for command in ["ADD", "DEL"] {
            let out = call(&node, command, "own-1", Some(netns), "eth5", &conf);
            assert_eq!(out.err_code(), 4, "{command} {netns}: {}", out.stdout);
            let m = msg(&out);
            assert!(
                m.contains("CNI_NETNS") && m.contains(why),
                "{command} {netns}: {m}"
            );
            assert_eq!(
                net_state(&node.ns),
                before,
                "{command} {netns} changed the node"
            );
        }
        let mut check = conf.clone();
        check["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.2/32"}]});
        let out = call(&node, "CHECK", "own-1", Some(netns), "eth5", &check);
        assert_eq!(out.err_code(), 4, "CHECK {netns}: {}", out.stdout);
    }
    assert!(node.allocations("testnet").is_empty());
    // A namespace that is gone is still fine for DEL.
    call(
        &node,
        "DEL",
        "own-1",
        Some("/var/run/netns/trlt-none-such"),
        "eth5",
        &conf,
    )
    .ok();
}

#[test]
fn fifos_never_hang_a_verb() {
    let node = Node::new("fifo");
    let p = pod("fifo");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let fifo = fifo.to_str().unwrap();
    let conf = node.conf("1.0.0", json!({}));
    for command in ["ADD", "DEL"] {
        let out = call(&node, command, "fifo-1", Some(fifo), "eth0", &conf);
        assert_eq!(out.err_code(), 4, "{command}: {}", out.stdout);
        assert!(
            msg(&out).contains("CNI_NETNS") && msg(&out).contains("FIFO"),
            "{}",
            out.stdout
        );
    }
    // The container's lock was not left held: a normal ADD of that container goes through.
    let pod_path = p.path().display().to_string();
    call(&node, "ADD", "fifo-1", Some(&pod_path), "eth0", &conf).ok();
    call(&node, "DEL", "fifo-1", Some(&pod_path), "eth0", &conf).ok();

    let logged = node.conf("1.0.0", json!({"logFile": fifo, "logLevel": "debug"}));
    let out = call(&node, "VERSION", "fifo-2", None, "eth0", &logged)
        .ok()
        .json();
    assert!(out["supportedVersions"].is_array());
    for command in ["ADD", "DEL"] {
        let out = call(&node, command, "fifo-2", Some(&pod_path), "eth0", &logged);
        assert_eq!(out.err_code(), 7, "{command}: {}", out.stdout);
        assert!(
            msg(&out).contains("`logFile`") && msg(&out).contains("FIFO"),
            "{}",
            out.stdout
        );
    }
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn log_file_on_stdout_is_refused_and_stdout_stays_one_document() {
    let node = Node::new("logout");
    let p = pod("logout");
    let pod_path = p.path().display().to_string();
    for target in ["/dev/stdout", "/proc/self/fd/1"] {
        let conf = node.conf("1.0.0", json!({"logFile": target, "logLevel": "debug"}));
        let out = call(&node, "ADD", "lo-1", Some(&pod_path), "eth0", &conf);
        assert_eq!(out.err_code(), 7, "{target}: {}", out.stdout);
        assert!(
            msg(&out).contains("`logFile`") && msg(&out).contains("stdout"),
            "{}",
            out.stdout
        );
    }
    // A kernel control file: a log line there would be a command to the kernel. (The plugin's
    // own `comm` is the harmless one to try: before the fix, ADD went ahead and wrote to it.)
    for target in ["/proc/self/comm", "/proc/thread-self/comm"] {
        let conf = node.conf("1.0.0", json!({"logFile": target, "logLevel": "debug"}));
        let out = call(&node, "ADD", "lo-1", Some(&pod_path), "eth0", &conf);
        assert_eq!(out.err_code(), 7, "{target}: {}", out.stdout);
        assert!(
            msg(&out).contains("`logFile`") && msg(&out).contains("proc"),
            "{}",
            out.stdout
        );
        assert!(node.allocations("testnet").is_empty(), "{target}");
    }
    // stderr is a fine log target.
    let conf = node.conf(
        "1.0.0",
        json!({"logFile": "/dev/stderr", "logLevel": "debug"}),
    );
    let out = call(&node, "ADD", "lo-1", Some(&pod_path), "eth0", &conf).ok();
    assert!(out.json()["ips"].is_array());
    assert!(out.stderr.contains("attached"), "{}", out.stderr);
    call(&node, "DEL", "lo-1", Some(&pod_path), "eth0", &conf).ok();
}

#[test]
fn interface_names_the_kernel_rewrites_are_refused_and_leave_nothing() {
    let node = Node::new("ifname");
    let p = pod("ifname");
    let pod_path = p.path().display().to_string();
    let conf = node.conf("1.0.0", json!({}));
    let node_before = net_state(&node.ns);
    let pod_before = net_state(&p);
    for ifname in ["eth%d", "e%s", "all", "default", "a:b"] {
        let out = call(&node, "ADD", "ifn-1", Some(&pod_path), ifname, &conf);
        assert_eq!(out.err_code(), 4, "{ifname}: {}", out.stdout);
        assert!(msg(&out).contains("CNI_IFNAME"), "{ifname}: {}", out.stdout);
        assert_eq!(net_state(&node.ns), node_before, "{ifname}: node changed");
        assert_eq!(net_state(&p), pod_before, "{ifname}: pod changed");
    }
    for bridge in ["fzbr%d", "all", "br\u{0}x", "two words"] {
        let conf = node.conf("1.0.0", json!({"mode": "bridge", "bridge": bridge,
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.79.0.0/24"}]], "dataDir": node.data_dir()}}));
        for _ in 0..2 {
            let out = call(&node, "ADD", "ifn-2", Some(&pod_path), "eth0", &conf);
            assert_eq!(out.err_code(), 7, "{bridge:?}: {}", out.stdout);
            assert!(msg(&out).contains("`bridge`"), "{bridge:?}: {}", out.stdout);
        }
        assert_eq!(net_state(&node.ns), node_before, "{bridge:?}: node changed");
    }
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn failed_bridge_add_removes_the_bridge_it_created_but_not_one_in_use() {
    let node = Node::new("brleak");
    let p1 = pod("brleak1");
    let p2 = pod("brleak2");
    // The pod already has an eth0 of its own: ADD fails after creating the bridge.
    p2.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let conf = node.conf("1.0.0", json!({"mode": "bridge", "bridge": "trlleak0", "isGateway": true,
        "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.80.0.0/24"}]], "dataDir": node.data_dir()}}));
    let (p1_path, p2_path) = (
        p1.path().display().to_string(),
        p2.path().display().to_string(),
    );
    let before = net_state(&node.ns);
    let out = call(&node, "ADD", "leak-2", Some(&p2_path), "eth0", &conf);
    assert_eq!(out.err_code(), 4, "{}", out.stdout);
    assert_eq!(
        net_state(&node.ns),
        before,
        "the failed ADD left its bridge or veth behind"
    );
    assert!(node.allocations("testnet").is_empty());
    // With a pod on the bridge, a failed ADD leaves the bridge alone.
    call(&node, "ADD", "leak-1", Some(&p1_path), "eth0", &conf).ok();
    let with_pod = net_state(&node.ns);
    let out = call(&node, "ADD", "leak-2", Some(&p2_path), "eth0", &conf);
    assert_eq!(out.err_code(), 4, "{}", out.stdout);
    assert_eq!(net_state(&node.ns), with_pod);
    call(&node, "DEL", "leak-1", Some(&p1_path), "eth0", &conf).ok();
}

#[test]
fn errors_name_the_field_not_a_path() {
    let node = Node::new("fields");
    let p = pod("fields");
    let pod_path = p.path().display().to_string();
    let conf = node.conf("1.0.0", json!({}));
    let long_id = "c".repeat(251);
    let out = call(&node, "ADD", &long_id, Some(&pod_path), "eth0", &conf);
    assert_eq!(out.err_code(), 4, "{}", out.stdout);
    assert!(msg(&out).contains("CNI_CONTAINERID"), "{}", out.stdout);
    let cases = [
        (json!({"name": "n".repeat(251)}), 7, "`name`"),
        (
            json!({"ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.77.0.0/24"}]],
                "dataDir": "/tmp/a\u{0}b"}}),
            7,
            "`ipam.dataDir`",
        ),
        (
            json!({"runtimeConfig": {"ips": ["10.99.0.5"]}}),
            7,
            "`runtimeConfig.ips[0]`",
        ),
        (
            json!({"args": {"cni": {"ips": ["10.77.0.1"]}}}),
            7,
            "`args.cni.ips[0]`",
        ),
        (
            json!({"runtimeConfig": {"ips": ["10.77.0.5", "10.77.0.6"]}}),
            7,
            "`runtimeConfig.ips[1]`",
        ),
        (
            json!({"runtimeConfig": {"ips": ["10.77.0.255"]}}),
            7,
            "broadcast",
        ),
    ];
    for (extra, code, needle) in cases {
        let out = call(
            &node,
            "ADD",
            "f-1",
            Some(&pod_path),
            "eth0",
            &node.conf("1.0.0", extra.clone()),
        );
        assert_eq!(out.err_code(), code, "{extra}: {}", out.stdout);
        assert!(msg(&out).contains(needle), "{extra}: {}", out.stdout);
    }
    // A data directory that cannot be created (under a regular file) is an I/O error naming it.
    let blocker = node.dir.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let out = call(
        &node,
        "ADD",
        "f-1",
        Some(&pod_path),
        "eth0",
        &node.conf(
            "1.0.0",
            json!({"ipam": {"type": "trellis-ipam",
            "ranges": [[{"subnet": "10.77.0.0/24"}]], "dataDir": blocker.join("sub")}}),
        ),
    );
    assert_eq!(out.err_code(), 5, "{}", out.stdout);
    assert!(msg(&out).contains("`ipam.dataDir`"), "{}", out.stdout);
    // The gateway is not "outside any range".
    let out = call(
        &node,
        "ADD",
        "f-1",
        Some(&pod_path),
        "eth0",
        &node.conf("1.0.0", json!({"args": {"cni": {"ips": ["10.77.0.1"]}}})),
    );
    assert!(
        msg(&out).contains("gateway") && !msg(&out).contains("outside"),
        "{}",
        out.stdout
    );
    let path = node.cni_path();
    let mut env = node.env("ADD", "f-1", Some(&pod_path), "eth0", &path);
    env.push(("CNI_ARGS", "IP=10.77.0.5,10.77.0.9"));
    let out = node
        .run_bounded(
            "trellis-cni",
            &env,
            conf.to_string().as_bytes(),
            DEADLINE,
            None,
        )
        .finished("CNI_ARGS IP");
    assert_eq!(out.err_code(), 4, "{}", out.stdout);
    assert!(
        msg(&out).contains("CNI_ARGS") && msg(&out).contains("IP[1]"),
        "{}",
        out.stdout
    );
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn ranges_holding_addresses_no_pod_may_have_are_refused() {
    let node = Node::new("reserved");
    let p = pod("reserved");
    let pod_path = p.path().display().to_string();
    for (i, subnet) in [
        "127.0.0.0/8",
        "0.0.0.0/8",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "0.0.0.0/0",
    ]
    .iter()
    .enumerate()
    {
        let conf = node.conf("1.0.0", json!({"ipam": {"type": "trellis-ipam",
            "ranges": [[{"subnet": "10.81.0.0/24"}], [{"subnet": subnet}]], "dataDir": node.data_dir()}}));
        let out = call(
            &node,
            "ADD",
            &format!("rs-{i}"),
            Some(&pod_path),
            "eth0",
            &conf,
        );
        assert_eq!(out.err_code(), 7, "{subnet}: {}", out.stdout);
        assert!(
            msg(&out).contains("`ipam.ranges[1][0].subnet`"),
            "{subnet}: {}",
            out.stdout
        );
    }
    for subnet in ["::1/128", "ff00::/8", "::/128"] {
        let conf = node.conf(
            "1.0.0",
            json!({"ipam": {"type": "trellis-ipam",
            "ranges": [[{"subnet": subnet}]], "dataDir": node.data_dir()}}),
        );
        let out = call(&node, "ADD", "rs-6", Some(&pod_path), "eth0", &conf);
        assert_eq!(out.err_code(), 7, "{subnet}: {}", out.stdout);
        assert!(
            msg(&out).contains("`ipam.ranges[0][0].subnet`"),
            "{subnet}: {}",
            out.stdout
        );
    }
    assert!(!p.exec_ok(&["ip", "link"]).contains("eth0"));
}

/// A listening socket with a full accept queue (backlog 0, one connection queued, never
/// accepted); dropped with the test.
struct FullBacklog {
    _listener: std::os::fd::OwnedFd,
    _queued: Vec<std::os::unix::net::UnixStream>,
}

fn full_backlog(path: &std::path::Path) -> FullBacklog {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    // SAFETY: listen(2) on a socket we own; backlog 0 admits one pending connection.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    // SAFETY: take over the descriptor from the std listener.
    let listener = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(listener)) };
    let mut queued = Vec::new();
    // Fill the queue: non-blocking connects until the kernel says EAGAIN (bounded).
    for _ in 0..8 {
        match nonblocking_connect(path) {
            Some(s) => queued.push(s),
            None => {
                return FullBacklog {
                    _listener: listener,
                    _queued: queued,
                }
            }
        }
    }
    panic!("the accept queue of {} never filled", path.display());
}

fn nonblocking_connect(path: &std::path::Path) -> Option<std::os::unix::net::UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket/connect calls on a descriptor we own.
    unsafe {
        let fd = OwnedFd::from_raw_fd(libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
            0,
        ));
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let rc = libc::connect(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        if rc == 0 {
            return Some(std::os::unix::net::UnixStream::from(fd));
        }
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN)
        );
        None
    }
}

#[test]
fn agent_with_a_full_accept_queue_is_try_again_later() {
    let node = Node::new("agentq");
    let p = pod("agentq");
    let pod_path = p.path().display().to_string();
    let sock = node.dir.path().join("agent.sock");
    let _queue = full_backlog(&sock);
    let conf = json!({"cniVersion": "1.0.0", "name": "agentnet", "type": "trellis-cni",
        "ipam": {"type": "trellis-ipam", "agentSocket": sock}});
    let started = std::time::Instant::now();
    let out = call(&node, "ADD", "aq-1", Some(&pod_path), "eth0", &conf);
    assert_eq!(out.err_code(), 11, "{}", out.stdout);
    let m = msg(&out);
    assert!(
        m.contains(sock.to_str().unwrap()) && m.contains("5 s"),
        "{m}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "took {:?}",
        started.elapsed()
    );
    assert!(!p.exec_ok(&["ip", "link"]).contains("eth0"));
}

/// A fake IPAM plugin that prints `result` for ADD and nothing otherwise.
fn fake_ipam(node: &Node, name: &str, result: &Value) {
    let path = node.dir.path().join("bin").join(name);
    trellis_testutil::write_executable(
        &path,
        &format!(
            "#!/bin/sh\ncat >/dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then echo '{result}'; fi\n"
        ),
    );
}

#[test]
fn delegated_results_with_mixed_families_never_panic() {
    let node = Node::new("mixed");
    let p = pod("mixed");
    let pod_path = p.path().display().to_string();
    let bridge = |ipam: &str| {
        json!({"cniVersion": "1.0.0", "name": "mixnet", "type": "trellis-cni",
        "mode": "bridge", "bridge": "trlmix0", "isGateway": true, "isDefaultGateway": true,
        "ipam": {"type": ipam}})
    };
    // Address and gateway of different families.
    fake_ipam(
        &node,
        "crossgw",
        &json!({"cniVersion": "1.0.0",
        "ips": [{"address": "fd00:82::5/64", "gateway": "10.82.0.1"}]}),
    );
    let out = call(
        &node,
        "ADD",
        "mx-1",
        Some(&pod_path),
        "eth0",
        &bridge("crossgw"),
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(out.err_code(), 102, "{}", out.stdout);
    assert!(msg(&out).contains("ips[0].gateway"), "{}", out.stdout);
    // A route whose gateway is of the other family.
    fake_ipam(
        &node,
        "crossroute",
        &json!({"cniVersion": "1.0.0",
        "ips": [{"address": "10.82.0.5/24", "gateway": "10.82.0.1"}],
        "routes": [{"dst": "10.83.0.0/16", "gw": "fd00::1"}]}),
    );
    let out = call(
        &node,
        "ADD",
        "mx-1",
        Some(&pod_path),
        "eth0",
        &bridge("crossroute"),
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(out.err_code(), 102, "{}", out.stdout);
    assert!(msg(&out).contains("routes[0].gw"), "{}", out.stdout);
    // A loopback address.
    fake_ipam(
        &node,
        "loopy",
        &json!({"cniVersion": "1.0.0", "ips": [{"address": "127.0.0.5/8"}]}),
    );
    let out = call(
        &node,
        "ADD",
        "mx-1",
        Some(&pod_path),
        "eth0",
        &bridge("loopy"),
    );
    assert_eq!(out.err_code(), 102, "{}", out.stdout);
    assert!(msg(&out).contains("loopback"), "{}", out.stdout);
    assert!(!p.exec_ok(&["ip", "link"]).contains("eth0"));
    // A proper dual-stack result works in bridge mode.
    fake_ipam(
        &node,
        "dual",
        &json!({"cniVersion": "1.0.0",
        "ips": [{"address": "10.82.0.5/24", "gateway": "10.82.0.1"},
                {"address": "fd00:82::5/64", "gateway": "fd00:82::1"}]}),
    );
    let r = call(
        &node,
        "ADD",
        "mx-1",
        Some(&pod_path),
        "eth0",
        &bridge("dual"),
    )
    .ok()
    .json();
    assert_eq!(r["ips"].as_array().unwrap().len(), 2, "{r}");
    let addrs = p.exec_ok(&["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains("10.82.0.5/24") && addrs.contains("fd00:82::5/64"),
        "{addrs}"
    );
    call(
        &node,
        "DEL",
        "mx-1",
        Some(&pod_path),
        "eth0",
        &bridge("dual"),
    )
    .ok();
}

/// Writes an executable script `name` into the node's CNI_PATH.
fn script_plugin(node: &Node, name: &str, body: &str) {
    let path = node.dir.path().join("bin").join(name);
    trellis_testutil::write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
}

#[test]
fn misbehaving_delegated_ipam_plugins_never_hold_or_exhaust_the_plugin() {
    let node = Node::new("deleg");
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    // Answers, but leaves a process behind that holds its stdout open.
    script_plugin(
        &node,
        "bg-ipam",
        &format!(
            "cat >/dev/null\nsleep 1000 &\necho $! > {}\necho '{{\"cniVersion\": \"1.1.0\"}}'",
            pidfile.display()
        ),
    );
    // Prints 300 MB (and fails).
    script_plugin(
        &node,
        "flood-ipam",
        "cat >/dev/null\nhead -c 300000000 /dev/zero | tr '\\0' x\nexit 1",
    );
    let conf = |ipam: &str| {
        json!({"cniVersion": "1.1.0", "name": "delegnet", "type": "trellis-cni",
            "ipam": {"type": ipam}})
    };
    let path = node.cni_path();
    let env = node.env("STATUS", "", None, "", &path);
    let env: Vec<_> = env.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    /// Kills the background process the script recorded, however the test ends.
    struct KillRecorded(std::path::PathBuf);
    impl Drop for KillRecorded {
        fn drop(&mut self) {
            if let Some(pid) = std::fs::read_to_string(&self.0)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) of the background process this test's script started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _bg = KillRecorded(pidfile.clone());
    let out = node
        .run_bounded(
            "trellis-cni",
            &env,
            conf("bg-ipam").to_string().as_bytes(),
            DEADLINE,
            None,
        )
        .finished("STATUS with a plugin that leaves a process holding its stdout");
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    let out = node
        .run_bounded(
            "trellis-cni",
            &env,
            conf("flood-ipam").to_string().as_bytes(),
            DEADLINE,
            Some(256 << 20),
        )
        .finished("STATUS with a plugin that prints 300 MB");
    assert_eq!(out.err_code(), 50, "{} {}", out.stdout, out.stderr);
    let m = msg(&out);
    assert!(m.contains("ipam.type") && m.contains("more than"), "{m}");
}

#[test]
fn an_oversized_stdin_is_refused_before_it_is_parsed() {
    let node = Node::new("bigin");
    let path = node.cni_path();
    let env: Vec<_> = node
        .env("STATUS", "", None, "", &path)
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    // A valid document of 40 MB: a prevResult with ten million addresses.
    let mut doc = node.conf("1.1.0", json!({})).to_string();
    doc.pop();
    doc.push_str(",\"prevResult\":{\"ips\":[");
    doc.push_str(&"0,".repeat(20_000_000));
    doc.push_str("0]}}");
    let out = node
        .run_bounded(
            "trellis-cni",
            &env,
            doc.as_bytes(),
            DEADLINE,
            Some(512 << 20),
        )
        .finished("STATUS with 40 MB on stdin");
    assert!(!out.stderr.contains("memory allocation"), "{}", out.stderr);
    assert_eq!(out.err_code(), 6, "{} {}", out.stdout, out.stderr);
    let m = msg(&out);
    assert!(m.contains("stdin") && m.contains("larger than"), "{m}");
}

#[test]
fn a_plugin_name_that_is_not_utf8_does_not_panic() {
    use std::os::unix::ffi::OsStrExt;
    let node = Node::new("argv0");
    let odd = node
        .dir
        .path()
        .join("bin")
        .join(std::ffi::OsStr::from_bytes(b"trellis-\xff"));
    std::os::unix::fs::symlink(common::BIN, &odd).unwrap();
    let out = std::process::Command::new(&odd)
        .env("CNI_COMMAND", "VERSION")
        .env_remove("CNI_NETNS")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["supportedVersions"].is_array(), "{v}");
}

/// The IPAM data directory (`ipam.dataDir`) is input too: a symbolic link planted where the
/// store writes must not make the plugin (root) write through it, and a FIFO where it reads
/// must not hold every ADD.
#[test]
fn planted_entries_in_the_ipam_directory_are_never_followed_or_waited_on() {
    let node = Node::new("plant");
    let p = pod("plant");
    let pod_path = p.path().display().to_string();
    let conf = node.conf("1.1.0", json!({}));
    let net = node.data_dir().join("testnet");
    std::fs::create_dir_all(&net).unwrap();
    let victim = node.dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    for planted in ["last_reserved_ip.0", ".probe", "lock"] {
        std::os::unix::fs::symlink(&victim, net.join(planted)).unwrap();
    }
    let path = node.cni_path();
    let env: Vec<_> = node
        .env("STATUS", "", None, "", &path)
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let out = node
        .run_bounded(
            "trellis-cni",
            &env,
            conf.to_string().as_bytes(),
            DEADLINE,
            None,
        )
        .finished("STATUS with planted symbolic links");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "STATUS wrote through .probe"
    );
    assert_ne!(
        out.code, 0,
        "STATUS used a store whose lock is a symbolic link"
    );
    let out = call(&node, "ADD", "plant-1", Some(&pod_path), "eth0", &conf);
    assert_eq!(out.err_code(), 5, "{}", out.stdout);
    assert!(msg(&out).contains("ipam.dataDir"), "{}", out.stdout);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // With the lock in order, a planted last_reserved_ip.N is still never written through.
    std::fs::remove_file(net.join("lock")).unwrap();
    let out = call(&node, "ADD", "plant-1", Some(&pod_path), "eth0", &conf);
    assert_ne!(
        out.code, 0,
        "ADD wrote through last_reserved_ip.0: {}",
        out.stdout
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        node.allocations("testnet").is_empty(),
        "a failed ADD kept its address"
    );
    // A FIFO named like an allocation: an error, not a hang.
    std::fs::remove_file(net.join("last_reserved_ip.0")).unwrap();
    nix::unistd::mkfifo(&net.join("10.77.0.200"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = call(&node, "ADD", "plant-1", Some(&pod_path), "eth0", &conf);
    assert_eq!(out.err_code(), 5, "{}", out.stdout);
    assert!(msg(&out).contains("FIFO"), "{}", out.stdout);
    std::fs::remove_file(net.join("10.77.0.200")).unwrap();
    let out = call(&node, "ADD", "plant-1", Some(&pod_path), "eth0", &conf).ok();
    assert!(out.json()["ips"].is_array());
    call(&node, "DEL", "plant-1", Some(&pod_path), "eth0", &conf).ok();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

/// An agent on `path` that answers every request line with `reply` (at most 16 connections).
fn fake_agent(path: &std::path::Path, reply: Value) {
    use std::io::{BufRead, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { return };
            let mut line = String::new();
            let mut r = std::io::BufReader::new(&stream);
            if r.read_line(&mut line).is_ok() {
                let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
            }
        }
    });
}

/// The agent's MTU goes onto the pod's interface: one the kernel refuses (or that IPv6 cannot
/// run on) is the agent's error, said as such, and leaves nothing behind.
#[test]
fn an_agent_mtu_no_interface_can_have_is_refused_naming_it() {
    let node = Node::new("agmtu");
    let p = pod("agmtu");
    let pod_path = p.path().display().to_string();
    for (i, (ips, mtu)) in [
        (json!(["10.84.0.5/26"]), 0),
        (json!(["10.84.0.5/26"]), 10_000_000),
        (json!(["fd00:84::5/122"]), 1000),
    ]
    .into_iter()
    .enumerate()
    {
        let sock = node.dir.path().join(format!("agent{i}.sock"));
        fake_agent(&sock, json!({"ok": {"ips": ips, "mtu": mtu}}));
        let conf = json!({"cniVersion": "1.0.0", "name": "agentnet", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "agentSocket": sock}});
        let out = call(&node, "ADD", "am-1", Some(&pod_path), "eth0", &conf);
        assert_eq!(out.err_code(), 6, "mtu {mtu}: {}", out.stdout);
        let m = msg(&out);
        assert!(m.contains("agent") && m.contains("mtu"), "{m}");
        assert!(!p.exec_ok(&["ip", "link"]).contains("eth0"));
    }
}

/// Tens of thousands of ranges (1.6 MB of config) kept every verb busy for most of a minute
/// comparing each range with every other; the number is bounded and the field named.
#[test]
fn a_config_with_very_many_ranges_is_refused_at_once() {
    let node = Node::new("ranges");
    let ranges: Vec<Value> = (0..60_000)
        .map(|i| json!({"subnet": format!("10.{}.{}.0/24", i / 256, i % 256)}))
        .collect();
    let conf = json!({"cniVersion": "1.1.0", "name": "testnet", "type": "trellis-cni",
        "ipam": {"type": "trellis-ipam", "ranges": [ranges], "dataDir": node.data_dir()}});
    let path = node.cni_path();
    let env: Vec<_> = node
        .env("STATUS", "", None, "", &path)
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let out = node
        .run_bounded(
            "trellis-cni",
            &env,
            conf.to_string().as_bytes(),
            DEADLINE,
            None,
        )
        .finished("STATUS with 60 000 ranges");
    assert_eq!(out.err_code(), 7, "{}", out.stdout);
    assert!(msg(&out).contains("`ipam.ranges`"), "{}", out.stdout);
}
