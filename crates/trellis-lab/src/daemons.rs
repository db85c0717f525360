//! BGP daemons on lab externals: the configuration files the lab writes for BIRD 2 and gobgpd
//! from the topology (pure), and the commands that start them.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

/// One session a daemon should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPeer {
    pub name: String,
    pub address: IpAddr,
    /// The daemon's own address towards this peer.
    pub local: IpAddr,
    pub asn: u32,
    /// Not on a subnet the daemon is on: eBGP multihop.
    pub multihop: bool,
}

/// Everything a daemon's configuration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Router ID (the daemon's first address).
    pub address: IpAddr,
    pub asn: u32,
    pub route_reflector: bool,
    pub route_server: bool,
    pub password: Option<String>,
    /// GTSM (RFC 5082) with peers at most this many hops away.
    pub ttl_security: Option<u8>,
    pub peers: Vec<DaemonPeer>,
}

fn ident(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A BIRD 2 configuration: BGP sessions importing and exporting everything, graceful restart
/// on, learned routes exported to the kernel so the host forwards.
pub fn bird_conf(c: &DaemonConfig) -> String {
    let mut s = format!(
        "router id {addr};\n\
         protocol device {{ scan time 5; }}\n\
         protocol kernel {{\n  ipv4 {{ import all; export all; }};\n  learn;\n  scan time 5;\n}}\n",
        addr = c.address
    );
    for p in &c.peers {
        let _ = write!(
            s,
            "protocol bgp {name} {{\n  local {addr} as {asn};\n  neighbor {peer} as {peer_asn};\n  connect retry time 2;\n  error wait time 1, 5;\n  graceful restart on;\n",
            name = ident(&format!("peer_{}", p.name)),
            addr = p.local,
            asn = c.asn,
            peer = p.address,
            peer_asn = p.asn,
        );
        if let Some(pw) = &c.password {
            let _ = writeln!(s, "  password {pw:?};");
        }
        match (c.ttl_security, p.multihop) {
            // BIRD sends TTL 255 and accepts 256 − hops (1 hop for a direct peer).
            (Some(h), true) => {
                let _ = writeln!(s, "  ttl security on;\n  multihop {h};");
            }
            (Some(_), false) => s.push_str("  ttl security on;\n"),
            (None, true) => s.push_str("  multihop;\n"),
            (None, false) => {}
        }
        if c.route_reflector && p.asn == c.asn {
            let _ = writeln!(s, "  rr client;\n  rr cluster id {};", c.address);
        }
        if c.route_server && p.asn != c.asn {
            s.push_str("  rs client;\n");
        }
        // Only BGP routes are passed on (not what the kernel protocol learned, such as the
        // default route); towards external peers the ToR puts itself as next hop.
        let nh = if p.asn == c.asn || c.route_server {
            ""
        } else {
            " next hop self;"
        };
        let _ = writeln!(
            s,
            "  ipv4 {{ import all; export where source = RTS_BGP;{nh} }};\n}}"
        );
    }
    s
}

/// A gobgpd configuration (TOML) with the same sessions. Like BIRD's `error wait time 1, 5`
/// above, a reset session retries after a second (gobgpd's default idle hold is 30 s).
pub fn gobgp_conf(c: &DaemonConfig) -> String {
    let mut s = format!(
        "[global.config]\n  as = {asn}\n  router-id = \"{addr}\"\n  port = 179\n",
        asn = c.asn,
        addr = c.address
    );
    for p in &c.peers {
        let _ = write!(
            s,
            "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}\n{}  [neighbors.transport.config]\n    local-address = \"{}\"\n  [neighbors.timers.config]\n    connect-retry = 2\n    idle-hold-time-after-reset = 1\n  [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = 120\n",
            p.address,
            p.asn,
            c.password.as_ref().map(|pw| format!("    auth-password = {pw:?}\n")).unwrap_or_default(),
            p.local
        );
        if let Some(h) = c.ttl_security {
            let _ = write!(
                s,
                "  [neighbors.ttl-security.config]\n    enabled = true\n    ttl-min = {}\n",
                256 - u16::from(h)
            );
        } else if p.multihop {
            s.push_str(
                "  [neighbors.ebgp-multihop.config]\n    enabled = true\n    multihop-ttl = 255\n",
            );
        }
        if c.route_reflector && p.asn == c.asn {
            let _ = write!(
                s,
                "  [neighbors.route-reflector.config]\n    route-reflector-client = true\n    route-reflector-cluster-id = \"{}\"\n",
                c.address
            );
        }
        if c.route_server && p.asn != c.asn {
            s.push_str("  [neighbors.route-server.config]\n    route-server-client = true\n");
        }
        s.push_str("  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n    [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n");
    }
    s
}

/// gobgpd does not program the kernel (deployments pair it with FRR's zebra), so a lab host
/// running it also runs this loop: every half second it puts gobgpd's best IPv4 paths into the
/// kernel (`proto bgp`) and removes the ones gone, so the host forwards like a BIRD one.
pub const GOBGP_FIB_SYNC: &str = r#"
import json, subprocess, time
while True:
    try:
        out = subprocess.run(["gobgp", "-j", "global", "rib"], capture_output=True, text=True, timeout=5).stdout
        rib = json.loads(out) if out.strip() else {}
    except Exception:
        time.sleep(0.5)
        continue
    want = {}
    for prefix, paths in rib.items():
        for p in paths:
            nh = [a["nexthop"] for a in p.get("attrs", []) if a.get("type") == 3]
            if p.get("best") and nh:
                want[prefix] = nh[0]
    have = {}
    listing = subprocess.run(["ip", "-4", "route", "show", "proto", "bgp"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        f = line.split()
        if "via" in f:
            have[f[0] if "/" in f[0] else f[0] + "/32"] = f[f.index("via") + 1]
    for prefix, nh in want.items():
        if have.get(prefix) != nh:
            subprocess.run(["ip", "route", "replace", prefix, "via", nh, "proto", "bgp"])
    for prefix in have:
        if prefix not in want:
            subprocess.run(["ip", "route", "del", prefix, "proto", "bgp"])
    time.sleep(0.5)
"#;

/// The command line that runs `daemon` in the foreground with its files under `dir`.
pub fn command(daemon: &str, name: &str, dir: &Path) -> Vec<String> {
    let f = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
    match daemon {
        "bird" => vec![
            "bird".into(),
            "-f".into(),
            "-c".into(),
            f("bird.conf"),
            "-s".into(),
            f("bird.ctl"),
            "-P".into(),
            f("bird.pid"),
        ],
        _ => vec![
            "gobgpd".into(),
            "-f".into(),
            f("gobgpd.toml"),
            "-p".into(),
            "--pprof-disable".into(),
            "--api-hosts=127.0.0.1:50051".into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, address: &str, asn: u32, multihop: bool) -> DaemonPeer {
        DaemonPeer {
            name: name.into(),
            address: address.parse().unwrap(),
            local: "192.168.60.100".parse().unwrap(),
            asn,
            multihop,
        }
    }

    fn cfg(rr: bool) -> DaemonConfig {
        DaemonConfig {
            address: "192.168.60.100".parse().unwrap(),
            asn: 65001,
            route_reflector: rr,
            route_server: false,
            password: Some("pw".into()),
            ttl_security: None,
            peers: vec![
                peer("n1", "192.168.60.10", 65101, false),
                peer("tor-2", "192.168.61.100", 65002, true),
                peer("n3", "192.168.60.12", 65001, false),
            ],
        }
    }

    #[test]
    fn bird_configuration() {
        let s = bird_conf(&cfg(true));
        assert!(s.starts_with("router id 192.168.60.100;"));
        assert!(s.contains("protocol bgp peer_n1 {\n  local 192.168.60.100 as 65001;\n  neighbor 192.168.60.10 as 65101;"));
        assert!(s.contains("protocol bgp peer_tor_2 {"));
        assert_eq!(s.matches("multihop;").count(), 1);
        assert_eq!(
            s.matches("rr client;").count(),
            1,
            "only the iBGP peer is a client"
        );
        assert_eq!(s.matches("graceful restart on;").count(), 3);
        assert_eq!(s.matches("password \"pw\";").count(), 3);
        let gtsm = bird_conf(&DaemonConfig {
            ttl_security: Some(2),
            ..cfg(false)
        });
        assert_eq!(gtsm.matches("ttl security on;").count(), 3);
        assert_eq!(gtsm.matches("multihop 2;").count(), 1);
    }

    #[test]
    fn gobgp_configuration() {
        let s = gobgp_conf(&cfg(true));
        assert!(s.contains("as = 65001\n  router-id = \"192.168.60.100\""));
        assert_eq!(s.matches("[[neighbors]]").count(), 3);
        assert_eq!(s.matches("route-reflector-client = true").count(), 1);
        assert_eq!(s.matches("multihop-ttl = 255").count(), 1);
        assert_eq!(s.matches("auth-password = \"pw\"").count(), 3);
        let gtsm = gobgp_conf(&DaemonConfig {
            ttl_security: Some(1),
            ..cfg(false)
        });
        assert_eq!(gtsm.matches("ttl-min = 255").count(), 3);
        assert!(command("gobgp", "x", Path::new("/d")).contains(&"/d/x.gobgpd.toml".to_string()));
    }
}
