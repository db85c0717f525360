#!/usr/bin/env bash
# Pod-to-pod TCP throughput (iperf3) across two lab nodes (direct routing) with no policy, against
# the same with 1 000 GlobalNetworkPolicies that all apply to both pods — 999 whose rules never
# match (a Deny from an address no pod has, on both directions) and a last one that allows — so
# the first packet of a connection walks all of them on egress and on ingress. Two labs side by
# side, measured in alternation (RUNS rounds, medians), so load on a shared machine hits both
# alike; prints Gbit/s and the ratio (target >= 0.9), and how long each node took from `apply`
# returning to holding a chain for every policy and direction. Run as root after
# `cargo build --release --workspace`. Only the labs' private namespaces are touched.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-./target}/release/trellis
[ -x "$T" ] || { echo "build first: cargo build --release --workspace"; exit 1; }
command -v iperf3 >/dev/null || { echo "install iperf3"; exit 1; }
DUR=${DUR:-5}
RUNS=${RUNS:-5}
work=$(mktemp -d)
trap '$T lab down btpol0 >/dev/null 2>&1 || true; $T lab down btpol1 >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

gbps() { python3 -c 'import json,sys
d=json.load(sys.stdin)
if "error" in d: sys.exit("iperf3: " + d["error"])
print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }

once() { # lab: one iperf3 run from a to b
  local lab=$1 bip
  bip=$($T lab exec "$lab" b -- ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
  nsenter --net=/var/run/netns/tl-$lab-b iperf3 -s -1 -D
  for _ in $(seq 50); do nsenter --net=/var/run/netns/tl-$lab-b ss -ltn | grep -q ':5201' && break; sleep 0.1; done
  nsenter --net=/var/run/netns/tl-$lab-a timeout 30 iperf3 -c "$bip" -t "$DUR" -J | gbps
}

median() { sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"; }

for k in 0 1; do
  cat > "$work/lab$k.yaml" <<Y
name: btpol$k
pools: [{name: pods, cidr: 10.23$((5 + k)).0.0/16, encapsulation: None}]
subnets: [{name: s, cidr: 192.168.$((79 + k)).0/24}]
nodes: [{name: n1, subnet: s}, {name: n2, subnet: s}]
namespaces: [{name: x, labels: {ns: x}}]
pods: [{name: a, namespace: x, node: n1, labels: {app: client}}, {name: b, namespace: x, node: n2, labels: {app: server}}]
Y
  $T lab up -f "$work/lab$k.yaml" >/dev/null
  $T lab check "btpol$k" >/dev/null
done

python3 - "$work/policies.yaml" <<'P'
import sys
docs = []
for i in range(999):
    net = f"198.18.{i // 250}.{i % 250 + 1}/32"
    docs.append(f"""apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: never-{i:04d}}}
spec:
  order: {i}
  selector: all()
  types: [Ingress, Egress]
  ingress: [{{action: Deny, protocol: TCP, source: {{nets: [{net}]}}}}]
  egress: [{{action: Deny, protocol: TCP, destination: {{nets: [{net}]}}}}]
""")
docs.append("""apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-all}
spec:
  order: 5000
  selector: all()
  types: [Ingress, Egress]
  ingress: [{action: Allow}]
  egress: [{action: Allow}]
""")
open(sys.argv[1], "w").write("---\n".join(docs))
P
start=$(date +%s.%N)
$T --lab btpol1 apply -f "$work/policies.yaml" >/dev/null
applied=$(date +%s.%N)
# Until both nodes have a chain for every policy and direction (2 000), at most 120 s.
declare -A took
for node in n1 n2; do
  for i in $(seq 1200); do
    n=$(nsenter --net=/var/run/netns/tl-btpol1-$node nft list table inet trellis_policy 2>/dev/null | grep -c 'chain pol_' || true)
    if [ "$n" -ge 2000 ]; then
      took[$node]=$(python3 -c "import time; print('%.2f' % (time.time() - $applied))")
      break
    fi
    [ "$i" = 1200 ] && { echo "$node programmed only $n policy chains"; exit 1; }
    sleep 0.1
  done
done

: > "$work/none"; : > "$work/with"
for _ in $(seq "$RUNS"); do
  once btpol0 >> "$work/none"
  once btpol1 >> "$work/with"
done
none=$(median < "$work/none"); with=$(median < "$work/with")
printf "%-28s %8s   %s\n" "policies" "Gbit/s" "(median of $RUNS alternating runs: each)"
printf "%-28s %8s   %s\n" "none" "$none" "$(tr '\n' ' ' < "$work/none")"
printf "%-28s %8s   %s\n" "1000 applying to both pods" "$with" "$(tr '\n' ' ' < "$work/with")"
python3 -c "print('ratio %.2f (target >= 0.9)' % ($with / $none))"
python3 -c "print('apply of 1000 policies: %.2f s; every policy chain in the kernel %s s (n1) / %s s (n2) after apply returned' % ($applied - $start, '${took[n1]}', '${took[n2]}'))"
