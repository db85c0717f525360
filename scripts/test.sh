#!/usr/bin/env bash
# The whole test suite: unit tests of the pure crates and the root-only integration tests
# (network namespaces, the real kernel, nftables, podman + runc). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the tests create network namespaces)"; exit 1; }
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

# Namespaces left by an earlier run that was killed (tests name theirs trlt-*, and their labs
# tl-t*), with the processes in them and the labs' state.
for ns in $(ip netns list | awk '{print $1}' | grep -E '^(trlt-|tl-t)' || true); do
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" || true
done
rm -rf /run/trellis/lab/t*

cargo build --workspace --all-targets
# Under `set -e` a failing command would end the script here, before the leftover check below.
status=0
# Every test binary runs, so one failure does not hide the others.
cargo test --workspace --no-fail-fast -- --test-threads=2 || status=$?

left=$(ip netns list | awk '{print $1}' | grep -E '^(trlt-|tl-t)' || true)
if [ -n "$left" ]; then
  echo "test.sh: namespaces left behind by the tests: $left"
  exit 1
fi
exit $status
