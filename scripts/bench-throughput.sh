#!/usr/bin/env bash
# Pod-to-pod TCP throughput (iperf3, 5 s) across two nodes in a Trellis lab — direct routing and
# VXLAN — against the same path built by hand with iproute2 in the same run (pod ns — veth —
# node ns — bridge — node ns — veth — pod ns; for VXLAN a hand-made VTEP pair with static FDB
# and neighbour entries, the kernel's default offloads and no outer UDP checksum, as Trellis's
# VTEP). Trellis runs with its defaults (`--vxlan-checksum-offload auto`); the VTEPs' offload
# state is printed beside the figures. Prints Gbit/s and the ratio (target >= 0.95). Run as
# root after `cargo build --release -p trellis -p trellis-cni`. Only private namespaces are
# touched.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}
T=$TARGET/release/trellis
[ -x "$T" ] || { echo "build first: cargo build --release -p trellis -p trellis-cni"; exit 1; }
command -v iperf3 >/dev/null || { echo "install iperf3"; exit 1; }
DUR=${DUR:-5}

gbps() { python3 -c 'import json,sys
d=json.load(sys.stdin)
if "error" in d: sys.exit("iperf3: " + d["error"])
print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }

offload() { # ns dev: the VTEP's checksum and segmentation offload, for the record
  echo "  $2 in $1: $(nsenter --net=/var/run/netns/"$1" ethtool -k "$2" | grep -E '^tx-checksumming|tx-tcp-segmentation:' | tr -d '\t' | paste -sd ' ')"
}

measure() { # server-ns client-ns server-ip
  nsenter --net=/var/run/netns/"$1" iperf3 -s -1 -D
  sleep 1
  nsenter --net=/var/run/netns/"$2" timeout 30 iperf3 -c "$3" -t "$DUR" -J | gbps
}

lab_run() { # mode
  local f=$1 name=bt$1
  local yaml=$(mktemp)
  cat > "$yaml" <<Y
name: $name
pools: [{name: pods, cidr: 10.233.0.0/16, encapsulation: $([ "$f" = direct ] && echo None || echo VXLAN)}]
subnets: [{name: s, cidr: 192.168.77.0/24}]
nodes: [{name: n1, subnet: s}, {name: n2, subnet: s}]
pods: [{name: a, node: n1}, {name: b, node: n2}]
Y
  $T lab up -f "$yaml" >/dev/null 2>&1
  $T lab check "$name" >/dev/null
  local bip=$($T lab exec "$name" b -- ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
  [ "$f" = direct ] || offload "tl-$name-n1" vxlan.trellis >&2
  measure "tl-$name-b" "tl-$name-a" "$bip"
  $T lab down "$name" >/dev/null
  rm -f "$yaml"
}

hand_run() { # mode
  local m=$1 p=hb$$
  local F=$p-f A=$p-a B=$p-b N1=$p-n1 N2=$p-n2
  cleanup() { for n in $F $A $B $N1 $N2; do ip netns del $n 2>/dev/null || true; done; }
  trap cleanup RETURN
  for n in $F $A $B $N1 $N2; do ip netns add $n; ip -n $n link set lo up; done
  ip -n $F link add br0 address 02:00:00:00:99:01 type bridge; ip -n $F link set br0 up
  i=0; for n in $N1 $N2; do i=$((i+1)); ip link add eth0 netns $n type veth peer name p$i netns $F
    ip -n $F link set p$i master br0 up; ip -n $n addr add 192.168.78.1$i/24 dev eth0; ip -n $n link set eth0 up
    ip netns exec $n sysctl -qw net.ipv4.ip_forward=1; done
  ip link add eth0 netns $A type veth peer name pa netns $N1
  ip link add eth0 netns $B type veth peer name pb netns $N2
  ip -n $A addr add 10.234.1.2/32 dev eth0; ip -n $A link set eth0 up; ip -n $A route add 169.254.1.1 dev eth0; ip -n $A route add default via 169.254.1.1
  ip -n $A neigh add 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent
  ip -n $B addr add 10.234.2.2/32 dev eth0; ip -n $B link set eth0 up; ip -n $B route add 169.254.1.1 dev eth0; ip -n $B route add default via 169.254.1.1
  ip -n $B neigh add 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent
  for pair in "$N1 pa 10.234.1.2" "$N2 pb 10.234.2.2"; do set -- $pair
    ip -n $1 link set $2 address ee:ee:ee:ee:ee:ee up; ip netns exec $1 sysctl -qw net.ipv4.conf.$2.proxy_arp=1
    ip -n $1 route add $3 dev $2; done
  if [ "$m" = direct ]; then
    ip -n $N1 route add 10.234.2.0/24 via 192.168.78.12; ip -n $N2 route add 10.234.1.0/24 via 192.168.78.11
  else
    # Trellis's VTEP settings (no outer UDP checksum), the kernel's default offloads.
    ip -n $N1 link add vx0 address 66:00:00:00:00:01 mtu 1450 type vxlan id 4096 dstport 4789 local 192.168.78.11 dev eth0 nolearning noudpcsum
    ip -n $N2 link add vx0 address 66:00:00:00:00:02 mtu 1450 type vxlan id 4096 dstport 4789 local 192.168.78.12 dev eth0 nolearning noudpcsum
    ip -n $N1 link set vx0 up; ip -n $N2 link set vx0 up
    offload $N1 vx0 >&2
    ip -n $N1 addr add 10.234.1.0/32 dev vx0; ip -n $N2 addr add 10.234.2.0/32 dev vx0
    ip -n $N1 neigh add 10.234.2.0 lladdr 66:00:00:00:00:02 dev vx0 nud permanent
    ip -n $N2 neigh add 10.234.1.0 lladdr 66:00:00:00:00:01 dev vx0 nud permanent
    bridge -n $N1 fdb append 66:00:00:00:00:02 dev vx0 dst 192.168.78.12
    bridge -n $N2 fdb append 66:00:00:00:00:01 dev vx0 dst 192.168.78.11
    ip -n $N1 route add 10.234.2.0/24 via 10.234.2.0 dev vx0 onlink
    ip -n $N2 route add 10.234.1.0/24 via 10.234.1.0 dev vx0 onlink
    ip -n $A link set eth0 mtu 1450; ip -n $B link set eth0 mtu 1450
  fi
  measure $B $A 10.234.2.2
}

printf "%-8s %14s %14s %8s\n" mode "trellis Gbit/s" "by hand Gbit/s" ratio
for mode in direct vxlan; do
  t=$(lab_run $mode); h=$(hand_run $mode)
  printf "%-8s %14s %14s %8s\n" $mode "$t" "$h" "$(python3 -c "print('%.2f' % ($t/$h))")"
done
