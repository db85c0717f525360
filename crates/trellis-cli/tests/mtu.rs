//! Pods get the agent's MTU where it matters: in a VXLAN lab a pod's eth0 has the VTEP's MTU
//! (uplink − 50), a 1400-byte datagram with DF set crosses nodes, one byte over the pod MTU is
//! refused in the pod with EMSGSIZE (not sent to be dropped on the way), and the agent's
//! `trellis_pod_mtu` metric is the MTU the pods really have.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::{trellis, LabGuard};
use trellis_lab::State;

fn nsenter(state: &State, member: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{}", state.namespaces[member]));
    c
}

fn run_in(state: &State, member: &str, argv: &[&str]) -> String {
    let out = nsenter(state, member).args(argv).output().unwrap();
    assert!(
        out.status.success(),
        "{member}: {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mtu_of(state: &State, member: &str, dev: &str) -> u32 {
    let line = run_in(state, member, &["ip", "-o", "link", "show", dev]);
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mtu");
    words.next().unwrap().parse().unwrap()
}

/// Answers every datagram on UDP 9999 with its length; ends after 20 s without a first one, or
/// 3 s of silence after one.
const RECEIVER: &str = "import socket
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.bind(('0.0.0.0',9999))
print('listening',flush=True)
s.settimeout(20)
try:
    while True:
        d,a=s.recvfrom(65535)
        print(len(d),flush=True)
        s.sendto(str(len(d)).encode(),a)
        s.settimeout(3)
except socket.timeout:
    pass
";

/// Sends a 1400-byte IPv4 datagram (20 + 8 + 1372) with DF set until it is answered (at most 10
/// tries, 1 s each), then one byte over the pod MTU.
const SENDER: &str = "import socket,sys,errno
dst,mtu=(sys.argv[1],9999),int(sys.argv[2])
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP,10,2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF, never fragment
s.settimeout(1)
got=None
for _ in range(10):
    s.sendto(b'x'*1372,dst)
    try:
        got=s.recv(100).decode()
        break
    except socket.timeout:
        pass
print('answer',got)
try:
    s.sendto(b'x'*(mtu-28+1),dst)
    print('oversized sent')
except OSError as e:
    print('oversized',errno.errorcode.get(e.errno))
";

#[test]
fn pods_get_the_vtep_mtu_and_full_size_packets_cross_nodes() {
    let name = "tmtu";
    let _guard = LabGuard(name.into());
    let path = format!(
        "{}/../../examples/lab/vxlan.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let (ok, out) = trellis(&["lab", "up", "-f", &path, "--name", name]);
    assert!(ok, "lab up: {out}");
    let state = State::load(name).unwrap();
    let (from, to) = ("web-1", "api-1");
    assert_ne!(
        state.pod_nodes[from], state.pod_nodes[to],
        "pods on two nodes"
    );
    let node = state.pod_nodes[from].clone();

    // The VTEP leaves room for VXLAN's 50 bytes; the pod's eth0 is no bigger than the VTEP.
    let uplink = mtu_of(&state, &node, "eth0");
    let vtep = mtu_of(&state, &node, "vxlan.trellis");
    assert_eq!(vtep, uplink - 50);
    let pod_mtu = mtu_of(&state, from, "eth0");
    assert_eq!(pod_mtu, vtep, "{from}'s eth0 MTU");
    assert_eq!(mtu_of(&state, to, "eth0"), vtep, "{to}'s eth0 MTU");

    let mut receiver = nsenter(&state, to)
        .args(["python3", "-c", RECEIVER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );
    let sent = run_in(
        &state,
        from,
        &[
            "python3",
            "-c",
            SENDER,
            &state.pod_ips[to],
            &pod_mtu.to_string(),
        ],
    );
    let received: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = receiver.wait();
    assert!(
        sent.contains("answer 1372"),
        "the 1400-byte datagram did not cross: {sent}"
    );
    assert!(
        sent.contains("oversized EMSGSIZE"),
        "a datagram over the pod MTU must be refused in the pod: {sent}"
    );
    assert!(
        received.iter().all(|l| l == "1372"),
        "only full-size datagrams arrived: {received:?}"
    );

    // The metric reports the MTU the pods have.
    let url = format!("http://{}:9091/metrics", state.node_ips[&node]);
    let fetch = format!(
        "import urllib.request;print(urllib.request.urlopen('{url}',timeout=5).read().decode())"
    );
    let metrics = run_in(&state, &node, &["python3", "-c", &fetch]);
    assert!(
        metrics.contains(&format!("trellis_pod_mtu {pod_mtu}\n")),
        "{metrics}"
    );
}
