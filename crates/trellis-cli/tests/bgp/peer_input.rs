//! Bad input from a scripted peer: the right NOTIFICATION or treat-as-withdraw, while other
//! sessions stay up.

use super::*;

/// A fake peer's helpers (Python): messages, reading, and a listener on argv[1]:179 whose
/// `session` accepts a connection, reads the OPEN and answers with its own.
const PEER_LIB: &str = r#"
import socket, struct, sys
ME = sys.argv[1]
def msg(t, body): return b'\xff' * 16 + struct.pack('!HB', 19 + len(body), t) + body
def cap(code, data): return bytes([code, len(data)]) + data
def open_msg(asn, hold, caps):
    params = b''.join(bytes([2, len(c)]) + c for c in caps)
    return msg(1, struct.pack('!BHH4sB', 4, asn, hold, socket.inet_aton(ME), len(params)) + params)
def recvall(c, n):
    b = b''
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d: raise EOFError
        b += d
    return b
def read(c):
    h = recvall(c, 19)
    l, t = struct.unpack('!HB', h[16:19])
    return t, recvall(c, l - 19)
def until(c, want):
    while True:
        t, b = read(c)
        if t == want: return b
def update(attrs, nlri): return msg(2, struct.pack('!HH', 0, len(attrs)) + attrs + nlri)
GOOD = b'\x40\x01\x01\x00' + b'\x40\x02\x06\x02\x01' + struct.pack('!I', 65099) + b'\x40\x03\x04' + socket.inet_aton(ME)
MP4 = cap(1, b'\x00\x01\x00\x01')
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ME, 179)); s.listen(4); s.settimeout(30)
def session(name, o):
    c, _ = s.accept(); c.settimeout(15)
    until(c, 1)
    c.sendall(o)
    return c
"#;

/// A fake peer that sends what the test asks and prints what comes back.
const FAKE_PEER: &str = r#"
c = session('wrongas', open_msg(65098, 90, [MP4, cap(65, struct.pack('!I', 65098))]))
b = until(c, 3); print('wrongas', b[0], b[1], flush=True); c.close()
c = session('hold1', open_msg(65099, 1, [MP4, cap(65, struct.pack('!I', 65099))]))
b = until(c, 3); print('hold1', b[0], b[1], flush=True); c.close()
c = session('unknowncap', open_msg(65099, 90, [MP4, cap(65, struct.pack('!I', 65099)), cap(200, b'xyz')]))
until(c, 4); c.sendall(msg(4, b'')); print('unknowncap established', flush=True)
c.sendall(update(b'\x40\x01\x01\x07' + GOOD[4:], bytes([24, 203, 0, 113])))
c.sendall(update(GOOD, bytes([24, 198, 51, 100])))
print('updates sent', flush=True)
sys.stdin.readline()
c.sendall(update(GOOD + b'\x40\x63\x00', bytes([24, 192, 0, 2])))
b = until(c, 3); print('badattr', b[0], b[1], flush=True)
"#;

/// Runs `script` after [`PEER_LIB`] in the lab's `peer` namespace as the peer at `peer_ip`.
fn fake_peer(lab: &str, script: &str, peer_ip: &str) -> std::process::Child {
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/tl-{lab}-peer"))
        .args(["timeout", "90", "python3", "-c"])
        .arg(format!("{PEER_LIB}{script}"))
        .arg(peer_ip)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn bad_input_from_a_peer_gets_the_right_answer_and_other_sessions_stay_up() {
    let lab = "tbgpbad";
    let _g = up(lab, PAIR);
    let peer_ip = "192.168.76.100";
    apply(lab, &format!("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {{name: fake}}\nspec: {{node: n1, peerIP: {peer_ip}, asNumber: 65099}}\n"));
    let mut fake = fake_peer(lab, FAKE_PEER, peer_ip);
    let mut lines = BufReader::new(fake.stdout.take().unwrap()).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next(), "wrongas 2 2", "OPEN with the wrong AS: bad peer AS");
    assert_eq!(next(), "hold1 2 6", "hold time 1: unacceptable hold time");
    assert_eq!(
        next(),
        "unknowncap established",
        "unknown capabilities are ignored"
    );
    assert_eq!(next(), "updates sent");
    wait_for("the good route on n1", 20, || {
        routes(lab, "n1").contains("198.51.100.0/24 via 192.168.76.100")
    });
    assert!(
        !routes(lab, "n1").contains("203.0.113.0/24"),
        "bad ORIGIN: treat-as-withdraw"
    );
    let mut stdin = fake.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    assert_eq!(
        next(),
        "badattr 3 2",
        "unrecognized well-known attribute: session reset"
    );
    let _ = fake.wait();
    wait_for("the fake peer's route withdrawn", 20, || {
        !routes(lab, "n1").contains("198.51.100.0/24")
    });
    // The mesh session never went down.
    let mesh = peers(lab, "n1")
        .into_iter()
        .find(|p| p["address"] == "192.168.76.11")
        .unwrap();
    assert_eq!(mesh["state"], "Established");
    assert!(mesh["lastError"].is_null(), "{mesh}");
    wait_for("the fake peer's last error in the status", 20, || {
        peers(lab, "n1").iter().any(|p| {
            p["address"] == peer_ip
                && p["lastError"]
                    .as_str()
                    .unwrap_or("")
                    .contains("unrecognized well-known attribute")
        })
    });
    check(lab);
}

/// A peer whose first session n1 ended (its hold timer expired) but which keeps that
/// connection open, then comes back on a second one: what it still sends on the first — an
/// UPDATE, then closing it — must not reach the second session.
const STALE_PEER: &str = r#"
CAPS = [MP4, cap(65, struct.pack('!I', 65099))]
c1 = session('first', open_msg(65099, 3, CAPS))
until(c1, 4); c1.sendall(msg(4, b''))
b = until(c1, 3); print('hold', b[0], b[1], flush=True)
c2 = session('second', open_msg(65099, 90, CAPS))
until(c2, 4); c2.sendall(msg(4, b'')); print('second established', flush=True)
try:
    c1.sendall(update(GOOD, bytes([24, 203, 0, 113])))
    c1.close()
except OSError:
    pass  # n1 already closed it: what this test wants
c2.sendall(update(GOOD, bytes([24, 198, 51, 100])))
print('updates sent', flush=True)
sys.stdin.readline()
"#;

#[test]
fn a_connection_n1_closed_cannot_reach_the_peers_next_session() {
    let lab = "tbgpstale";
    let _g = up(lab, PAIR);
    let peer_ip = "192.168.76.100";
    apply(lab, &format!("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {{name: fake}}\nspec: {{node: n1, peerIP: {peer_ip}, asNumber: 65099}}\n"));
    let mut fake = fake_peer(lab, STALE_PEER, peer_ip);
    let mut lines = BufReader::new(fake.stdout.take().unwrap()).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(
        next(),
        "hold 4 0",
        "n1's hold timer expired on the first connection"
    );
    assert_eq!(next(), "second established");
    assert_eq!(next(), "updates sent");
    wait_for("the second session's route on n1", 20, || {
        routes(lab, "n1").contains("198.51.100.0/24 via 192.168.76.100")
    });
    assert!(
        !routes(lab, "n1").contains("203.0.113.0/24"),
        "a route sent on the closed connection was taken:\n{}",
        routes(lab, "n1")
    );
    let log = std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log")).unwrap();
    let downs = log
        .lines()
        .filter(|l| l.contains("BGP session down") && l.contains(peer_ip))
        .count();
    assert_eq!(downs, 1, "only the first session went down:\n{log}");
    writeln!(fake.stdin.take().unwrap(), "go").unwrap();
    assert!(fake.wait().unwrap().success());
}
