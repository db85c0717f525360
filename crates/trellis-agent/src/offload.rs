//! Whether the VTEP keeps transmit checksum offload (pure; the caller reads the kernel release
//! and applies the answer with [`trellis_dataplane::ethtool`]).
//!
//! Why it matters: with tx checksum offload off, the kernel also drops segmentation offload on
//! the VTEP, and VXLAN pod-to-pod throughput falls to about a quarter. Why it was off: on older
//! kernels, NAT of a VXLAN packet's outer UDP header (kube-proxy's `MASQUERADE --random-fully`
//! catching encapsulated node→service traffic by its mark, or a NAT on the path) "updated" the
//! outer checksum — which Linux VXLAN leaves 0, meaning none — because the packet was still
//! `CHECKSUM_PARTIAL` for the *inner* segment; the wire then carried a bad non-zero checksum, the
//! receiver dropped every packet, and TCP connections stalled up to 63 s (SYN retransmits
//! 1+2+4+8+16+32 s). The fix is kernel commit ea64d8d6c675 ("netfilter: nat: never update the
//! UDP checksum when it's 0"), in mainline 5.7 and in the stable releases 5.6.13, 5.4.41,
//! 4.19.123 and 4.14.181 (projectcalico/calico#3145, kubernetes/kubernetes#88986). Calico's felix
//! (`ChecksumOffloadBroken`, `featureDetectOverride`) and Flannel turn the offload off for the
//! older kernels only.
//!
//! The fix covers a zero outer checksum only, so Trellis creates its VTEP without one
//! (`noudpcsum`, as Calico and Flannel do; the kernel's default is an outer checksum): with
//! one, the same NAT leaves it stale and the receiver drops the packet even on 6.18
//! (`crates/trellis-cli/tests/vxlan_offload.rs` shows both).
//!
//! Distribution kernels that carry the fix under an older number (Ubuntu's `5.4.0-NN`, RHEL's
//! `4.18.0-NNN`) are treated as broken, as Calico does: `on` is the override for them. A release
//! string that does not parse counts as broken too (the safe side).

use std::fmt;
use std::str::FromStr;

/// The `--vxlan-checksum-offload` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChecksumOffload {
    /// On when the running kernel has the fix, off otherwise.
    #[default]
    Auto,
    On,
    Off,
}

/// A `--vxlan-checksum-offload` value that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--vxlan-checksum-offload {value:?}: expected auto, on or off")]
pub struct BadSetting {
    pub value: String,
}

impl FromStr for ChecksumOffload {
    type Err = BadSetting;
    fn from_str(s: &str) -> Result<ChecksumOffload, BadSetting> {
        match s {
            "auto" => Ok(ChecksumOffload::Auto),
            "on" => Ok(ChecksumOffload::On),
            "off" => Ok(ChecksumOffload::Off),
            _ => Err(BadSetting { value: s.into() }),
        }
    }
}

impl fmt::Display for ChecksumOffload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChecksumOffload::Auto => "auto",
            ChecksumOffload::On => "on",
            ChecksumOffload::Off => "off",
        })
    }
}

/// What the VTEP gets, and why (for the agent's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether tx checksum offload stays (or is turned back) on.
    pub enabled: bool,
    pub reason: String,
}

/// The first stable release of each series that carries the fix; mainline has it from 5.7.
const FIXED_STABLE: [(u32, u32, u32); 4] = [(5, 6, 13), (5, 4, 41), (4, 19, 123), (4, 14, 181)];

/// `major.minor.patch` at the start of a kernel release string (`uname -r`, e.g.
/// `5.4.41-1-lts`, `6.1`), and whether it is a release candidate (`5.7.0-rc3`).
fn parse_release(release: &str) -> Option<((u32, u32, u32), bool)> {
    let release = release.trim();
    let end = release
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(release.len());
    let mut parts = release[..end].split('.').filter(|p| !p.is_empty());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    let rc = release[end..].starts_with("-rc");
    Some(((major, minor, patch), rc))
}

/// Whether the kernel of `release` has the VXLAN/NAT checksum fix (`Err`: why not known).
fn has_fix(release: &str) -> Result<bool, String> {
    let Some((v, rc)) = parse_release(release) else {
        return Err(format!("kernel release {release:?} does not parse"));
    };
    let (major, minor, _) = v;
    if (major, minor) > (5, 7) || ((major, minor) == (5, 7) && !rc) {
        return Ok(true);
    }
    Ok(FIXED_STABLE
        .iter()
        .any(|&(ma, mi, p)| (major, minor) == (ma, mi) && v.2 >= p))
}

/// The decision for `setting` on a kernel whose release string (`/proc/sys/kernel/osrelease`)
/// is `release`.
pub fn decide(setting: ChecksumOffload, release: &str) -> Decision {
    let release = release.trim();
    match setting {
        ChecksumOffload::On => Decision {
            enabled: true,
            reason: "vxlanChecksumOffload is on (forced)".into(),
        },
        ChecksumOffload::Off => Decision {
            enabled: false,
            reason: "vxlanChecksumOffload is off (forced)".into(),
        },
        ChecksumOffload::Auto => match has_fix(release) {
            Ok(true) => Decision {
                enabled: true,
                reason: format!(
                    "kernel {release} has the VXLAN/NAT checksum fix (5.7+, or 5.6.13/5.4.41/4.19.123/4.14.181+)"
                ),
            },
            Ok(false) => Decision {
                enabled: false,
                reason: format!(
                    "kernel {release} may lack the VXLAN/NAT checksum fix (5.7+, or 5.6.13/5.4.41/4.19.123/4.14.181+); \
                     set vxlanChecksumOffload on if it carries the fix"
                ),
            },
            Err(why) => Decision {
                enabled: false,
                reason: format!("{why}: assuming the VXLAN/NAT checksum bug"),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(release: &str) -> bool {
        decide(ChecksumOffload::Auto, release).enabled
    }

    #[test]
    fn auto_follows_the_kernel_that_has_the_fix() {
        for fixed in [
            "6.18.44-fc-v857",
            "5.7.0",
            "5.7",
            "5.8.0-63-generic",
            "5.10.0-28-amd64",
            "5.15.0-134-generic",
            "6.1",
            "10.0.0",
            "5.6.13",
            "5.4.41-1-lts",
            "5.4.200",
            "4.19.123",
            "4.14.181-x",
        ] {
            assert!(auto(fixed), "{fixed} has the fix");
        }
        for broken in [
            "5.7.0-rc3",
            "5.6.12",
            "5.5.19",
            "5.4.0-52-generic",
            "5.4.40",
            "4.19.122",
            "4.18.0-305.el8.x86_64",
            "4.14.180",
            "3.10.0-1127.8.2.el7.x86_64",
            "4.9.300",
        ] {
            assert!(!auto(broken), "{broken} may lack the fix");
        }
    }

    #[test]
    fn an_unreadable_release_counts_as_broken_and_says_so() {
        for bad in ["", "garbage", "5", "x.7.1", "5.x"] {
            let d = decide(ChecksumOffload::Auto, bad);
            assert!(!d.enabled, "{bad:?}");
            assert!(d.reason.contains("does not parse"), "{d:?}");
        }
    }

    #[test]
    fn a_forced_setting_wins_over_the_kernel() {
        assert!(decide(ChecksumOffload::On, "4.18.0-305.el8.x86_64").enabled);
        assert!(decide(ChecksumOffload::On, "garbage").enabled);
        let off = decide(ChecksumOffload::Off, "6.18.44");
        assert!(!off.enabled && off.reason.contains("forced"), "{off:?}");
    }

    #[test]
    fn the_reason_names_the_kernel() {
        let d = decide(ChecksumOffload::Auto, "6.18.44-fc-v857\n");
        assert!(d.enabled);
        assert!(d.reason.contains("kernel 6.18.44-fc-v857 has"), "{d:?}");
        let d = decide(ChecksumOffload::Auto, "5.4.0-52-generic");
        assert!(d.reason.contains("5.4.0-52-generic may lack"), "{d:?}");
    }

    #[test]
    fn settings_parse_and_print() {
        for s in ["auto", "on", "off"] {
            assert_eq!(s.parse::<ChecksumOffload>().unwrap().to_string(), s);
        }
        assert_eq!(ChecksumOffload::default(), ChecksumOffload::Auto);
        let e = "yes".parse::<ChecksumOffload>().unwrap_err();
        assert!(
            e.to_string().contains("--vxlan-checksum-offload \"yes\""),
            "{e}"
        );
    }
}
