#!/usr/bin/env bash
# Builds prescient and the test guest, then boots the default microVM: the test guest with
# 2 vCPUs and 256 MiB, which prints its view of the machine, burns CPU and touches memory at
# user level, and resets through the i8042 (prescient then exits 0).
# Extra arguments are passed to prescient (e.g. --log-level info). Run at a terminal, the
# terminal is the guest's console (raw mode; typed keys, Ctrl-C included, go to the guest) and is
# put back as it was when the VM ends. PRESCIENT_CARGO_PROFILE builds another cargo profile than
# release (the tests use dev); CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -w /dev/kvm ] || { echo "boot-default-vm: /dev/kvm is missing or not writable by $(id -un)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "boot-default-vm: cargo is needed (https://rustup.rs)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "boot-default-vm: gcc is needed to build the test guest (apt-get install gcc)" >&2; exit 1; }

profile=${PRESCIENT_CARGO_PROFILE:-release}
case "$profile" in dev) out=debug ;; *) out=$profile ;; esac
bin=${CARGO_TARGET_DIR:-target}/$out
echo "boot-default-vm: building (cargo build --profile $profile)..." >&2
cargo build --profile "$profile" --quiet -p vmm -p integration-tests --bins
guest=$("$bin/test-guest" pvh)
spec=$(mktemp --suffix=.json)
trap 'rm -f "$spec"' EXIT
sed "s|@TEST_GUEST@|$guest|" resources/examples/test-guest.json > "$spec"
echo "boot-default-vm: $bin/prescient --config-file $spec" >&2
"$bin/prescient" --config-file "$spec" "$@"
