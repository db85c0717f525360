//! BGP daemons on lab externals: the configuration files the lab writes for BIRD 2, gobgpd and
//! FRR (bgpd + zebra) from the topology (pure), and the commands that start them.

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

/// FRR's bgpd configuration (FRR 8.4) with the same sessions. Graceful restart stays at FRR's
/// default (helper mode); learned routes reach the kernel through zebra, which runs beside it.
/// Like BIRD above, only BGP routes are advertised, with the ToR as next hop towards eBGP peers.
pub fn frr_bgpd_conf(c: &DaemonConfig) -> String {
    let mut s = format!(
        "frr defaults traditional\nhostname {addr}\nlog stdout informational\n!\nrouter bgp {asn}\n bgp router-id {addr}\n no bgp ebgp-requires-policy\n no bgp network import-check\n",
        asn = c.asn,
        addr = c.address
    );
    if c.route_reflector {
        let _ = writeln!(s, " bgp cluster-id {}", c.address);
    }
    for p in &c.peers {
        let n = p.address;
        let _ = writeln!(
            s,
            " neighbor {n} remote-as {}\n neighbor {n} update-source {}\n neighbor {n} timers connect 2",
            p.asn, p.local
        );
        if let Some(pw) = &c.password {
            let _ = writeln!(s, " neighbor {n} password {pw}");
        }
        match (c.ttl_security, p.multihop) {
            (Some(h), _) => {
                let _ = writeln!(s, " neighbor {n} ttl-security hops {h}");
            }
            (None, true) => {
                let _ = writeln!(s, " neighbor {n} ebgp-multihop 255");
            }
            (None, false) => {}
        }
    }
    s.push_str(" !\n address-family ipv4 unicast\n");
    for p in &c.peers {
        let n = p.address;
        let _ = writeln!(s, "  neighbor {n} activate");
        if c.route_reflector && p.asn == c.asn {
            let _ = writeln!(s, "  neighbor {n} route-reflector-client");
        }
        if c.route_server && p.asn != c.asn {
            let _ = writeln!(s, "  neighbor {n} route-server-client");
        } else if p.asn != c.asn {
            let _ = writeln!(s, "  neighbor {n} next-hop-self");
        }
    }
    s.push_str(" exit-address-family\nexit\n!\n");
    s
}

/// zebra's configuration: nothing but its name (it takes interfaces and addresses from the
/// namespace's kernel and installs bgpd's routes there).
pub fn frr_zebra_conf(c: &DaemonConfig) -> String {
    format!("hostname {}\nlog stdout informational\n!\n", c.address)
}

/// The user FRR's daemons drop to (Debian's package; it is in the `frrvty` group FRR requires),
/// which owns an FRR instance's directory.
pub const FRR_USER: &str = "frr";

/// The scratch directories an FRR daemon with this pid makes (FRR puts its log buffers under
/// the fixed `/var/tmp/frr/DAEMON.PID`); `lab down` removes them with the processes it killed.
pub fn frr_scratch_dirs(pid: i32) -> [std::path::PathBuf; 2] {
    ["zebra", "bgpd"].map(|d| Path::new("/var/tmp/frr").join(format!("{d}.{pid}")))
}

/// The configuration files a daemon needs, named relative to the lab directory.
pub fn files(daemon: &str, name: &str, c: &DaemonConfig) -> Vec<(String, String)> {
    match daemon {
        "bird" => vec![(format!("{name}.bird.conf"), bird_conf(c))],
        "frr" => vec![
            (format!("{name}.frr/zebra.conf"), frr_zebra_conf(c)),
            (format!("{name}.frr/bgpd.conf"), frr_bgpd_conf(c)),
        ],
        _ => vec![(format!("{name}.gobgpd.toml"), gobgp_conf(c))],
    }
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

/// The command lines that run `daemon` in the foreground with its files under `dir`, in the
/// order they start. FRR's daemons keep everything under `dir/NAME.frr/` — configuration, pid
/// files, vty sockets (`--vty_socket`, so `vtysh --vty_socket DIR` reaches them) and the
/// zebra API socket (`-z`) — so several instances run side by side and none reads `/etc/frr`
/// or `/run/frr`; they run as FRR's user (the lab hands it that directory, [`FRR_USER`]) with no vty TCP
/// port (`-P 0`).
pub fn commands(daemon: &str, name: &str, dir: &Path) -> Vec<Vec<String>> {
    let f = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
    match daemon {
        "bird" => vec![vec![
            "bird".into(),
            "-f".into(),
            "-c".into(),
            f("bird.conf"),
            "-s".into(),
            f("bird.ctl"),
            "-P".into(),
            f("bird.pid"),
        ]],
        "frr" => {
            let d = dir.join(format!("{name}.frr"));
            let at = |file: &str| d.join(file).display().to_string();
            ["zebra", "bgpd"]
                .into_iter()
                .map(|daemon| {
                    vec![
                        format!("/usr/lib/frr/{daemon}"),
                        "-f".into(),
                        at(&format!("{daemon}.conf")),
                        "-i".into(),
                        at(&format!("{daemon}.pid")),
                        "-z".into(),
                        at("zserv.api"),
                        "--vty_socket".into(),
                        d.display().to_string(),
                        "-P".into(),
                        "0".into(),
                    ]
                })
                .collect()
        }
        _ => vec![vec![
            "gobgpd".into(),
            "-f".into(),
            f("gobgpd.toml"),
            "-p".into(),
            "--pprof-disable".into(),
            "--api-hosts=127.0.0.1:50051".into(),
        ]],
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
        assert!(
            commands("gobgp", "x", Path::new("/d"))[0].contains(&"/d/x.gobgpd.toml".to_string())
        );
    }

    #[test]
    fn frr_configuration() {
        let s = frr_bgpd_conf(&cfg(true));
        assert!(s.contains(
            "router bgp 65001\n bgp router-id 192.168.60.100\n no bgp ebgp-requires-policy"
        ));
        assert!(s.contains(" bgp cluster-id 192.168.60.100\n"));
        assert!(s.contains(" neighbor 192.168.60.10 remote-as 65101\n neighbor 192.168.60.10 update-source 192.168.60.100\n"));
        assert_eq!(s.matches(" password pw\n").count(), 3);
        assert_eq!(s.matches("ebgp-multihop 255").count(), 1);
        assert_eq!(
            s.matches("route-reflector-client").count(),
            1,
            "only the iBGP peer"
        );
        assert_eq!(s.matches("next-hop-self").count(), 2, "the eBGP peers");
        assert_eq!(s.matches("activate").count(), 3);
        assert!(
            !s.contains("graceful-restart"),
            "FRR's default: helper mode"
        );
        let gtsm = frr_bgpd_conf(&DaemonConfig {
            ttl_security: Some(2),
            ..cfg(false)
        });
        assert_eq!(gtsm.matches("ttl-security hops 2").count(), 3);
        assert!(
            !gtsm.contains("ebgp-multihop"),
            "FRR refuses both on one neighbor"
        );
        let rs = frr_bgpd_conf(&DaemonConfig {
            route_server: true,
            ..cfg(false)
        });
        assert_eq!(rs.matches("route-server-client").count(), 2);
        assert!(!rs.contains("next-hop-self"));
        // Everything of an instance under its own directory, both daemons on one zserv socket.
        let argv = commands("frr", "tor", Path::new("/run/trellis/lab/l"));
        assert_eq!(argv.len(), 2);
        assert_eq!(argv[0][0], "/usr/lib/frr/zebra");
        for a in &argv {
            assert!(a.contains(&"/run/trellis/lab/l/tor.frr/zserv.api".to_string()));
            assert!(
                a.contains(&"/run/trellis/lab/l/tor.frr".to_string()),
                "vty sockets"
            );
            assert!(!a.iter().any(|x| x.contains("/etc/frr")));
        }
        let f = files("frr", "tor", &cfg(false));
        assert_eq!(f[1].0, "tor.frr/bgpd.conf");
    }
}
