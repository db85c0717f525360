#!/usr/bin/env bash
# Installs what Trellis needs to build, test and demo on Debian 12. Idempotent: installs only
# what is missing. Needs root.
set -euo pipefail

PACKAGES=(iproute2 nftables podman runc busybox-static containernetworking-plugins
          iputils-ping util-linux ca-certificates gcc pkg-config
          etcd-server etcd-client protobuf-compiler libprotobuf-dev
          python3 iperf3 ethtool bird2 gobgpd frr conntrack)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The frr package starts its service in the root namespace where systemd runs; the lab runs
  # its own FRR instances inside lab namespaces and needs none there, so one it just installed
  # is stopped and disabled (an frr the machine already had is left alone).
  if [[ " ${missing[*]} " == *" frr "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now frr.service >/dev/null 2>&1 || true
  fi
fi

# Rust: the workspace pins rust-version 1.95 (Debian's cargo is older).
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: installing the Rust toolchain with rustup"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi
echo "setup: ok ($(cargo --version))"
