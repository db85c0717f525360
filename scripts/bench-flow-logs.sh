#!/usr/bin/env bash
# Flow logs on against off: two identical two-node labs (direct routing, a NetworkPolicy
# allowing pod a to reach pod b, so every connection is decided by a policy rule), one with
# `flowLogs: true`. Measured in alternation (RUNS rounds, medians), so load on a shared machine
# hits both alike:
#   - pod-to-pod TCP throughput (iperf3, DUR seconds), target ratio >= 0.95;
#   - new TCP connections per second (a bounded loop of connect/close for DUR seconds), target
#     ratio >= 0.9;
#   - the flow-logging agent's memory after 10 000 distinct flows in under a minute (UDP to
#     10 000 ports), against the other lab's agent doing the same (target <= 20 MB more).
# Run as root after `cargo build --release --workspace`. Only the labs' namespaces are touched.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-./target}/release/trellis
[ -x "$T" ] || { echo "build first: cargo build --release --workspace"; exit 1; }
command -v iperf3 >/dev/null || { echo "install iperf3"; exit 1; }
DUR=${DUR:-5}
RUNS=${RUNS:-5}
work=$(mktemp -d)
cleanup() {
  for k in 0 1; do
    ip netns pids "tl-bflow$k-b" 2>/dev/null | xargs -r kill 2>/dev/null || true
    $T lab down "bflow$k" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

in_pod() { local lab=$1 pod=$2; shift 2; nsenter --net=/var/run/netns/tl-$lab-$pod "$@"; }
pod_ip() { $T lab exec "$1" "$2" -- ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1; }
median() { sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"; }

gbps() { python3 -c 'import json,sys
d=json.load(sys.stdin)
if "error" in d: sys.exit("iperf3: " + d["error"])
print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }

throughput() { # lab
  local lab=$1 bip
  bip=$(pod_ip "$lab" b)
  in_pod "$lab" b iperf3 -s -1 -D
  for _ in $(seq 50); do in_pod "$lab" b ss -ltn | grep -q ':5201' && break; sleep 0.1; done
  in_pod "$lab" a timeout 30 iperf3 -c "$bip" -t "$DUR" -J | gbps
}

# Short connections: a server in b (started once per lab) accepting and closing on port 7000,
# and a client in a that connects and closes in a loop for DUR seconds (bounded: at most
# 1 000 000 connections).
start_accept_server() { # lab
  local lab=$1
  in_pod "$lab" b python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(1024)
while True:
    c, _ = s.accept(); c.close()' </dev/null >/dev/null 2>&1 &
  for _ in $(seq 50); do in_pod "$lab" b ss -ltn | grep -q ':7000' && return; sleep 0.1; done
  echo "the accept server in $lab did not start"; exit 1
}

connections() { # lab
  local lab=$1 bip
  bip=$(pod_ip "$lab" b)
  in_pod "$lab" a python3 -c '
import socket, sys, time
ip, dur = sys.argv[1], float(sys.argv[2])
n, end = 0, time.time() + dur
while time.time() < end and n < 1000000:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.connect((ip, 7000)); c.close(); n += 1
print("%.0f" % (n / dur))' "$bip" "$DUR"
}

agent_rss_mb() { # lab node
  python3 - "$1" "$2" <<'P'
import json, sys
lab, node = sys.argv[1], sys.argv[2]
st = json.load(open(f"/run/trellis/lab/{lab}/state.json"))
pid = next(p["pid"] for p in st["pids"] if p.get("member") == node and p.get("what") == "agent")
kb = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
print("%.1f" % (kb / 1024))
P
}

# 10 000 distinct flows (UDP to 10 000 ports of b), sent within a minute.
distinct_flows() { # lab
  local lab=$1 bip
  bip=$(pod_ip "$lab" b)
  in_pod "$lab" a python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for p in range(20000, 30000):
    s.sendto(b"x", (sys.argv[1], p))' "$bip"
}

for k in 0 1; do
  logs=$([ "$k" = 1 ] && echo true || echo false)
  cat > "$work/lab$k.yaml" <<Y
name: bflow$k
flowLogs: $logs
pools: [{name: pods, cidr: 10.23$((7 + k)).0.0/16, encapsulation: None}]
subnets: [{name: s, cidr: 192.168.$((81 + k)).0/24}]
nodes: [{name: n1, subnet: s}, {name: n2, subnet: s}]
namespaces: [{name: x, labels: {ns: x}}]
pods: [{name: a, namespace: x, node: n1, labels: {app: client}}, {name: b, namespace: x, node: n2, labels: {app: server}}]
policies: |
  apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: b-from-a, namespace: x}
  spec:
    podSelector: {matchLabels: {app: server}}
    ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
Y
  $T lab up -f "$work/lab$k.yaml" >/dev/null
  $T lab check "bflow$k" >/dev/null
  start_accept_server "bflow$k"
done

: > "$work/tp0"; : > "$work/tp1"; : > "$work/cps0"; : > "$work/cps1"
for _ in $(seq "$RUNS"); do
  for k in 0 1; do throughput "bflow$k" >> "$work/tp$k"; done
  for k in 0 1; do connections "bflow$k" >> "$work/cps$k"; done
done
tp0=$(median < "$work/tp0"); tp1=$(median < "$work/tp1")
cps0=$(median < "$work/cps0"); cps1=$(median < "$work/cps1")

before0=$(agent_rss_mb bflow0 n2); before1=$(agent_rss_mb bflow1 n2)
start=$(date +%s.%N)
for k in 0 1; do distinct_flows "bflow$k"; done
sent=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $start))")
# The flow log has seen them all once its records hold 10 000 flows to b (at most 60 s).
for i in $(seq 120); do
  n=$($T flows --lab bflow1 --node n2 -o json | grep -c '"protocol":17' || true)
  [ "$n" -ge 10000 ] && break
  [ "$i" = 120 ] && { echo "the flow log holds only $n of 10000 UDP flows"; exit 1; }
  sleep 0.5
done
after0=$(agent_rss_mb bflow0 n2); after1=$(agent_rss_mb bflow1 n2)

printf "%-34s %10s %10s %6s   %s\n" "" "off" "on" "ratio" "(median of $RUNS alternating runs; each: off | on)"
printf "%-34s %10s %10s %6s   %s | %s\n" "pod-to-pod TCP, Gbit/s" "$tp0" "$tp1" \
  "$(python3 -c "print('%.2f' % ($tp1 / $tp0))")" "$(tr '\n' ' ' < "$work/tp0")" "$(tr '\n' ' ' < "$work/tp1")"
printf "%-34s %10s %10s %6s   %s | %s\n" "new TCP connections per second" "$cps0" "$cps1" \
  "$(python3 -c "print('%.2f' % ($cps1 / $cps0))")" "$(tr '\n' ' ' < "$work/cps0")" "$(tr '\n' ' ' < "$work/cps1")"
echo "targets: throughput >= 0.95, connections per second >= 0.9"
echo "agent RSS on the receiving node, MB, before -> after 10000 distinct flows (sent in ${sent}s for both labs):"
echo "  flow logs off: $before0 -> $after0"
echo "  flow logs on:  $before1 -> $after1"
python3 -c "print('  the flow-logging agent holds %.1f MB more (target <= 20 MB)' % ($after1 - $after0))"
