#!/usr/bin/env bash
# Builds prescient and the test guest, then boots the default microVM: the test guest with
# 2 vCPUs and 256 MiB, which prints its view of the machine, burns CPU and touches memory at
# user level, and resets through the i8042 (prescient then exits 0).
# Extra arguments are passed to prescient (e.g. --log-level info).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -w /dev/kvm ] || { echo "boot-default-vm: /dev/kvm is missing or not writable by $(id -un)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "boot-default-vm: cargo is needed (https://rustup.rs)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "boot-default-vm: gcc is needed to build the test guest (apt-get install gcc)" >&2; exit 1; }

echo "boot-default-vm: building (cargo build --release)..." >&2
cargo build --release --quiet -p vmm -p integration-tests --bins
guest=$(target/release/test-guest pvh)
spec=$(mktemp --suffix=.json)
trap 'rm -f "$spec"' EXIT
sed "s|@TEST_GUEST@|$guest|" resources/examples/test-guest.json > "$spec"
echo "boot-default-vm: target/release/prescient --config-file $spec" >&2
target/release/prescient --config-file "$spec" "$@"
