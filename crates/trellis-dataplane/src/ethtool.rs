//! Device offload settings through the `SIOCETHTOOL` ioctl (what `ethtool -k/-K DEV tx` reads
//! and writes), in the calling thread's network namespace. I/O.
//!
//! Only transmit checksum offload is handled: the VTEP's (see `trellis_agent::offload` for when
//! it is on). Turning it off makes the kernel drop the segmentation offloads that depend on it
//! (TSO, GSO of the tunnel); turning it back on restores them, as they stay wanted.

use crate::{DataplaneError, Result};

/// `struct ethtool_value` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with `ifr_data` (16-byte name, then a 24-byte union).
#[repr(C)]
struct Ifreq {
    name: [u8; 16],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// One `ethtool_value` command on device `name`; returns the value the kernel wrote back.
/// `what` names the operation in errors (`ethtool -K DEV tx off`).
fn ethtool_value(name: &str, cmd: u32, data: u32, what: &str) -> Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    let mut req = Ifreq {
        name: [0; 16],
        data: &mut value,
        _pad: [0; 16],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= 16 {
        return Err(DataplaneError::Decode {
            op: "ethtool".into(),
            reason: format!("interface name {name:?} too long"),
        });
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a plain ioctl on a fresh socket with properly laid out, live buffers; errno is
    // read before close() can change it.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut Ifreq);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc < 0 {
                Err(err)
            } else {
                Ok(())
            }
        }
    };
    rc.map_err(|source| DataplaneError::Netlink {
        op: what.to_string(),
        source,
    })?;
    Ok(value.data)
}

/// Whether transmit checksum offload is on (`ethtool -k DEV`: `tx-checksumming`).
pub fn tx_checksum(name: &str) -> Result<bool> {
    ethtool_value(name, ETHTOOL_GTXCSUM, 0, &format!("ethtool -k {name}")).map(|v| v != 0)
}

/// Turns transmit checksum offload on or off (`ethtool -K DEV tx on|off`).
pub fn set_tx_checksum(name: &str, on: bool) -> Result<()> {
    let what = format!("ethtool -K {name} tx {}", if on { "on" } else { "off" });
    ethtool_value(name, ETHTOOL_STXCSUM, u32::from(on), &what).map(|_| ())
}
