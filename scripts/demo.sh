#!/usr/bin/env bash
# Demo: a 3-node Trellis cluster made of network namespaces on this machine (VXLAN, 2 pods per
# node, real agents, the real CNI plugin), its ping matrix, and its routes. Removed at the end
# unless KEEP=1. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root"; exit 1; }
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q --workspace
T=./target/release/trellis
[ "${KEEP:-0}" = 1 ] || trap '$T lab down demo >/dev/null 2>&1 || true' EXIT
$T lab down demo >/dev/null 2>&1 || true
$T lab up
$T lab check
$T lab status
[ "${KEEP:-0}" = 1 ] && echo "the lab stays up: trellis lab exec demo web-1 -- ping 10.244.0.65; trellis lab down"
