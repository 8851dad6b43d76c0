#!/usr/bin/env bash
# Runs every fuzz target for a while and prints targets x executions x crashes.
#
#   fuzz/run.sh --smoke            a few seconds per target (CI); the repo's corpus is read only
#   fuzz/run.sh [SECONDS] [T...]   SECONDS per target (default 60), all targets or those named;
#                                  new coverage is merged into fuzz/corpus/<target> and minimized
#
# Crash inputs go to $FUZZ_ARTIFACTS (default /tmp/prescient-fuzz/artifacts/<target>), outside
# the repo: each one found becomes a regression unit test next to the code it broke.
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. Exits 1 if a target crashed.
set -euo pipefail
cd "$(dirname "$0")"

# A new target: a [[bin]] in fuzz/Cargo.toml, its file in fuzz_targets/, and its name here.
TARGETS=(
  spec_parser
  http_api
  virtio_mmio
  virtio_blk
  virtio_net
  virtio_vsock
  virtio_rng
  virtio_balloon
  virtio_mem
  predictor_policy
  snapshot_state
  mmds_frames
  api_bodies
  vhost_user_replies
)

secs=60
smoke=0
case "${1:-}" in
  --smoke) secs=${FUZZ_SMOKE_SECONDS:-5}; smoke=1; shift ;;
  ''|*[!0-9]*) ;;
  *) secs=$1; shift ;;
esac
if [ $# -gt 0 ]; then TARGETS=("$@"); fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi

work=${FUZZ_WORK:-/tmp/prescient-fuzz}
artifacts=${FUZZ_ARTIFACTS:-$work/artifacts}
target_dir=${FUZZ_TARGET_DIR:-$PWD/target}
jobs=${FUZZ_BUILD_JOBS:-2}
mkdir -p "$work" "$artifacts"

# Release builds with debug assertions and overflow checks (cargo-fuzz's default): an overflow
# is a crash worth finding.
CARGO_BUILD_JOBS=$jobs cargo +nightly fuzz build --target-dir "$target_dir"

failed=0
rows=()
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "$artifacts/$t"
  fresh="$work/new-corpus/$t"
  rm -rf "$fresh"
  mkdir -p "$fresh"
  before=$(find "$artifacts/$t" -type f | wc -l)
  log="$work/$t.log"
  # New inputs land in the first directory: the scratch one, not the repo's.
  status=0
  cargo +nightly fuzz run --target-dir "$target_dir" "$t" "$fresh" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/$t/" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(( $(find "$artifacts/$t" -type f | wc -l) - before ))
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "fuzz: $t exited $status (log: $log)" >&2
    tail -n 30 "$log" >&2
  fi
  if [ "$smoke" -eq 0 ] && [ "$status" -eq 0 ]; then
    cp -n "$fresh"/* "corpus/$t"/ 2>/dev/null || true
    # Smallest set that keeps every edge (hit counts ignored): the corpus stays small in the repo.
    cargo +nightly fuzz cmin --target-dir "$target_dir" "$t" "corpus/$t" -- \
      -set_cover_merge=1 -use_counters=0 >"$work/$t.cmin.log" 2>&1
  fi
  rows+=("$(printf '| %-16s | %6s | %12s | %7s |' "$t" "$secs" "${execs:-?}" "$crashes")")
done

printf '| %-16s | %6s | %12s | %7s |\n' target seconds executions crashes
printf '|%s|%s|%s|%s|\n' ------------------ -------- -------------- ---------
printf '%s\n' "${rows[@]}"
exit "$failed"
