#!/usr/bin/env bash
# Demo: two podman containers on a Trellis network ping each other. Everything lives in a
# private "node" network namespace and temp dirs; all of it is removed at the end.
# Usage: sudo ./scripts/demo-podman.sh [routed|bridge]
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-routed}
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root"; exit 1; }
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q -p trellis-cni

NODE=trellis-demo-$$
WORK=$(mktemp -d /tmp/trellis-demo.XXXXXX)
cleanup() {
  pm rm -af -t 0 >/dev/null 2>&1 || true
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK"/{bin,conf,root,runroot,rootfs/bin,ipam}
ln -s "$PWD/target/release/trellis-cni" "$WORK/bin/trellis-cni"
ln -s "$PWD/target/release/trellis-cni" "$WORK/bin/trellis-ipam"
cp "$(command -v busybox)" "$WORK/rootfs/bin/busybox"
for a in sh ping sleep ip; do ln -s busybox "$WORK/rootfs/bin/$a"; done
if [ "$MODE" = bridge ]; then
  PLUGIN='"mode": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true, "ipMasq": true,'
else
  PLUGIN='"mode": "routed", "mtu": 1450,'
fi
cat > "$WORK/conf/trellis-demo.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "trellis-demo", "plugins": [{"type": "trellis-cni", $PLUGIN
  "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.244.1.0/24"}]], "dataDir": "$WORK/ipam"}}]}
JSON
cat > "$WORK/containers.conf" <<CONF
[network]
network_backend = "cni"
cni_plugin_dirs = ["$WORK/bin"]
network_config_dir = "$WORK/conf"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
ip netns add "$NODE"
ip -n "$NODE" link set lo up
pm() { CONTAINERS_CONF="$WORK/containers.conf" nsenter --net="/var/run/netns/$NODE" \
         podman --root "$WORK/root" --runroot "$WORK/runroot" --storage-driver vfs "$@"; }
run() { pm run -d --name "$1" --network trellis-demo --ulimit nofile=1024:1024 \
          --ulimit nproc=1024:1024 --rootfs "$WORK/rootfs" sleep 300 >/dev/null; }

echo "== $MODE mode: starting two busybox containers with podman + runc"
run web; run db
for c in web db; do echo "-- $c:"; pm exec "$c" ip -4 addr show eth0 | grep inet; pm exec "$c" ip -4 route; done
DB=$(pm exec db ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
echo "== web -> db ($DB)"
pm exec web ping -c 3 -W 2 "$DB"
echo "== node view (namespace $NODE)"
ip -n "$NODE" -4 route
echo "== removing the containers releases their addresses"
pm rm -f -t 0 web db >/dev/null
echo "allocations left: $(find "$WORK/ipam/trellis-demo" -maxdepth 1 -name '10.*' | wc -l)"
