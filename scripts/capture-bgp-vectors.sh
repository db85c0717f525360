#!/usr/bin/env bash
# Records the BGP messages BIRD 2 and gobgpd send to a peer, as hex, one message per line, into
# crates/trellis-bgp/tests/vectors/{bird,gobgp}.hex. The codec tests decode and re-encode each
# byte for byte. Run as root; uses two throwaway namespaces. Re-run to refresh the vectors.
set -euo pipefail
cd "$(dirname "$0")/.."
out=crates/trellis-bgp/tests/vectors
work=$(mktemp -d)
A=trlt-cap-a B=trlt-cap-b
cleanup() {
  for ns in $A $B; do ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del $ns 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add $A; ip netns add $B
ip link add cap0 netns $A type veth peer name cap1 netns $B
ip -n $A addr add 192.0.2.1/24 dev cap0; ip -n $A addr add 2001:db8::1/64 dev cap0 nodad
ip -n $B addr add 192.0.2.2/24 dev cap1; ip -n $B addr add 2001:db8::2/64 dev cap1 nodad
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set cap0 up; ip -n $B link set cap1 up

# The recorder: answers as AS 65002 (IPv4+IPv6 unicast, 4-octet AS, route refresh, graceful
# restart), keeps the session up, and writes every message it receives until End-of-RIB for both
# families has arrived (or a timeout), then ends the session with a Cease.
cat > "$work/rec.py" <<'PY'
import socket, struct, sys, time
out = open(sys.argv[1], 'w')
def msg(t, body): return b'\xff' * 16 + struct.pack('!HB', 19 + len(body), t) + body
caps = b''.join(bytes([c, len(d)]) + d for c, d in [
    (1, b'\x00\x01\x00\x01'), (1, b'\x00\x02\x00\x01'), (2, b''), (65, struct.pack('!I', 65002)),
    (64, b'\x00\x78\x00\x01\x01\x80\x00\x02\x01\x80')])
opn = msg(1, struct.pack('!BHH4sB', 4, 65002, 90, socket.inet_aton('192.0.2.2'), len(caps) + 2) + bytes([2, len(caps)]) + caps)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('192.0.2.2', 179)); s.listen(1); s.settimeout(30)
c, _ = s.accept(); c.settimeout(20)
buf = b''; eors = 0; deadline = time.time() + 20
c.sendall(opn)
while eors < 2 and time.time() < deadline:
    d = c.recv(65536)
    if not d: break
    buf += d
    while len(buf) >= 19:
        l, t = struct.unpack('!HB', buf[16:19])
        if len(buf) < l: break
        m, buf = buf[:l], buf[l:]
        out.write(m.hex() + '\n')
        if t == 1: c.sendall(msg(4, b''))
        if t == 2 and (l == 23 or m[19:] == b'\x00\x00\x00\x06\x80\x0f\x03\x00\x02\x01'): eors += 1
c.sendall(msg(3, b'\x06\x02'))
time.sleep(0.5)
PY

capture() { # daemon-name, command in namespace A...
  local name=$1; shift
  ip netns exec $B python3 "$work/rec.py" "$work/$name.hex" & rec=$!
  sleep 0.5
  ip netns exec $A "$@" > "$work/$name.log" 2>&1 & d=$!
  wait $rec || true
  kill -9 $d 2>/dev/null || true; wait $d 2>/dev/null || true
  cp "$work/$name.hex" "$out/$name.hex"
  echo "$name: $(wc -l < "$out/$name.hex") messages"
}

cat > "$work/bird.conf" <<'CONF'
router id 192.0.2.1;
protocol device {}
protocol static s4 { ipv4; route 10.10.0.0/26 blackhole; route 10.10.0.64/26 blackhole {
  bgp_community.add((65000, 100)); bgp_med = 20; bgp_path.prepend(65010); }; route 198.51.100.0/24 blackhole; }
protocol static s6 { ipv6; route 2001:db8:100::/48 blackhole; route 2001:db8:200::/56 blackhole { bgp_community.add((65000, 6)); }; }
protocol bgp rec {
  local 192.0.2.1 as 65001; neighbor 192.0.2.2 as 65002; graceful restart on;
  ipv4 { import none; export all; next hop self; };
  ipv6 { import none; export all; next hop address 2001:db8::1; };
}
CONF
capture bird bird -f -c "$work/bird.conf" -s "$work/bird.ctl" -P "$work/bird.pid"

cat > "$work/gobgp.toml" <<'CONF'
[global.config]
  as = 65001
  router-id = "192.0.2.1"
  local-address-list = ["192.0.2.1"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "192.0.2.2"
    peer-as = 65002
  [neighbors.graceful-restart.config]
    enabled = true
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
CONF
# gobgpd takes routes through its API only once running: add them as soon as it listens, before
# the recorder's session completes (the recorder waits for End-of-RIB).
ip netns exec $B python3 "$work/rec.py" "$work/gobgp.hex" & rec=$!
sleep 0.3
ip netns exec $A gobgpd -f "$work/gobgp.toml" -p --pprof-disable --api-hosts=127.0.0.1:50051 > "$work/gobgp.log" 2>&1 & d=$!
for _ in $(seq 50); do ip netns exec $A gobgp global rib add 10.20.0.0/26 origin igp 2>/dev/null && break; sleep 0.1; done
ip netns exec $A gobgp global rib add 10.20.0.64/26 community 65000:100,65000:200 med 30 aspath 65010,65011
ip netns exec $A gobgp global rib -a ipv6 add 2001:db8:300::/48 nexthop 2001:db8::1 community 65000:6
wait $rec || true
kill -9 $d 2>/dev/null || true; wait $d 2>/dev/null || true
cp "$work/gobgp.hex" "$out/gobgp.hex"
echo "gobgp: $(wc -l < "$out/gobgp.hex") messages"
