#!/usr/bin/env bash
# Builds the Linux guest images: a kernel (Debian's linux-source-6.1, tinyconfig + kernel.config),
# an initramfs (busybox-static + the guest agent), an ext4 rootfs with the workloads (stress-ng,
# fio, curl) and the same workloads as a cpio to append to the initramfs for VMMs without virtio-blk.
#
# Outputs are cached under ${PRESCIENT_CACHE_DIR:-$HOME/.cache/prescient}/guest-images/<hash>/,
# keyed by a hash of every input (this script, the kernel config, the patches, the rootfs files,
# the agent's sources, the Debian package versions, the compilers): a second run is instant.
# Progress goes to stderr; the paths produced go to stdout as KEY=VALUE lines (the manifest).
#
# usage: build-guest-images.sh [--variant auto|plain|software-kvm] [--print-paths] [--jobs N]
#   --variant       plain: the kernel users run on hosts with hardware virtualization.
#                   software-kvm: plus software-kvm/*.patch, for hosts whose /dev/kvm is a
#                   software KVM (kvm_pvm); see README.md. auto (default): detect this host.
#   --print-paths   print only the manifest (progress still goes to stderr while building).
#   --jobs N        parallel kernel build jobs (default 2); the build runs under `nice -n 10`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${PRESCIENT_CACHE_DIR:-$HOME/.cache/prescient}/guest-images
variant=auto
print_paths=false
jobs=2
while [ $# -gt 0 ]; do
    case "$1" in
    --variant) variant=${2:?--variant needs a value}; shift 2 ;;
    --print-paths) print_paths=true; shift ;;
    --jobs) jobs=${2:?--jobs needs a value}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-guest-images: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

start=$SECONDS
say() { echo "build-guest-images [$((SECONDS - start))s]: $*" >&2; }
die() { echo "build-guest-images: error: $*" >&2; exit 1; }

# A host whose /dev/kvm is the shadow-paging kvm_pvm backend and has no hardware KVM module.
software_kvm_host() {
    [ -d /sys/module/kvm_pvm ] && [ ! -d /sys/module/kvm_intel ] && [ ! -d /sys/module/kvm_amd ]
}
case "$variant" in
auto) if software_kvm_host; then variant=software-kvm; else variant=plain; fi ;;
plain | software-kvm) ;;
*) die "--variant must be auto, plain or software-kvm, got '$variant'" ;;
esac

# --- Tools and Debian packages -------------------------------------------------------------
packages=(linux-source-6.1 busybox-static stress-ng fio curl e2fsprogs cpio gzip xz-utils
    bc bison flex libelf-dev libssl-dev make gcc patch util-linux)
# shellcheck source=../debian-packages.sh
. "$here/../debian-packages.sh"
need_debian_packages "${packages[@]}"
command -v cargo >/dev/null || die "cargo not found (the guest agent is Rust)"

# --- Cache keys ------------------------------------------------------------------------------
versions() { dpkg-query -W -f='${Package}=${Version}\n' "$@"; }
patches=()
if [ "$variant" = software-kvm ]; then
    mapfile -t patches < <(find "$here/software-kvm" -name '*.patch' | sort)
fi
kernel_key=$({
    echo "variant=$variant"
    # The kernel recipe, not the whole script: editing the image steps must not rebuild it.
    sed -n '/^# --- Kernel/,/^# --- Guest agent/p' "$0"
    cat "$here/kernel.config"
    [ ${#patches[@]} -eq 0 ] || cat "${patches[@]}"
    versions linux-source-6.1 gcc make
} | sha256sum | cut -c1-16)
image_key=$({
    echo "kernel=$kernel_key"
    cat "$0"
    (cd "$here" && find rootfs -type f | sort | xargs sha256sum)
    (cd "$repo/resources/guest-agent" && find Cargo.toml src -type f | sort | xargs sha256sum)
    versions busybox-static stress-ng fio curl e2fsprogs libc6
    rustc --version
} | sha256sum | cut -c1-16)
out=$cache/$image_key
kernel_dir=$cache/kernels/$kernel_key

print_manifest() {
    if $print_paths; then cat "$out/manifest"; else
        say "done ($variant); images in $out:"
        sed 's/^/  /' "$out/manifest" >&2
    fi
}
if [ -f "$out/manifest" ]; then
    print_manifest
    exit 0
fi

mkdir -p "$cache/kernels"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    say "another build holds $cache/.lock; waiting for it"
    flock 9
fi
# The other build may have produced exactly these images.
if [ -f "$out/manifest" ]; then
    print_manifest
    exit 0
fi

# --- Kernel ----------------------------------------------------------------------------------
# Every option of the fragment must survive olddefconfig: a dropped dependency would otherwise
# silently give a kernel without, say, virtio-mem.
check_config() {
    local line opt val bad=0
    while IFS= read -r line; do
        case "$line" in CONFIG_*=*) ;; *) continue ;; esac
        opt=${line%%=*}
        val=${line#*=}
        if [ "$val" = n ]; then
            if grep -q "^$opt=" .config; then echo "  $opt: wanted n, got $(grep "^$opt=" .config)" >&2; bad=1; fi
        elif ! grep -qx "$opt=$val" .config; then
            echo "  $opt: wanted $val, got $(grep -E "^(# )?$opt[= ]" .config || echo 'absent')" >&2
            bad=1
        fi
    done <"$here/kernel.config"
    [ $bad = 0 ] || die "kernel.config options lost in olddefconfig (missing dependencies?)"
}

if [ -f "$kernel_dir/vmlinux" ]; then
    say "kernel: cached $kernel_dir/vmlinux"
else
    build=$cache/kernels/build-$kernel_key
    rm -rf "$build"
    mkdir -p "$build"
    say "kernel: unpacking /usr/src/linux-source-6.1.tar.xz ($(versions linux-source-6.1))"
    tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$build" --strip-components=1
    for p in "${patches[@]}"; do
        say "kernel: applying ${p#"$repo"/}"
        patch -s -p1 -d "$build" <"$p"
    done
    say "kernel: tinyconfig + kernel.config"
    (
        cd "$build"
        make -s tinyconfig >/dev/null
        KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$here/kernel.config" >/dev/null
        make -s olddefconfig >/dev/null
        check_config
    )
    say "kernel: make -j$jobs vmlinux under nice -n 10 (about 8 min on 2 idle cores); log: $build/build.log"
    # One progress line per 250 build steps (a full build is about 1900).
    if ! (cd "$build" && nice -n 10 make -j"$jobs" vmlinux 2>&1) |
        tee "$build/build.log" |
        awk '/^  [A-Z]/ { n++; if (n % 250 == 0) { printf "build-guest-images: kernel: %d build steps done\n", n > "/dev/stderr"; fflush("/dev/stderr") } }'; then
        tail -n 30 "$build/build.log" >&2
        die "kernel build failed; full log: $build/build.log"
    fi
    mkdir -p "$kernel_dir.tmp"
    cp "$build/vmlinux" "$build/.config" "$kernel_dir.tmp/"
    make -s -C "$build" kernelrelease >"$kernel_dir.tmp/release"
    rm -rf "$kernel_dir"
    mv "$kernel_dir.tmp" "$kernel_dir"
    rm -rf "$build"
    say "kernel: built $kernel_dir/vmlinux ($(cat "$kernel_dir/release"))"
fi

# --- Guest agent -----------------------------------------------------------------------------
say "agent: cargo build --release (static)"
# One target directory per checkout: cargo keys a path package's build by its path relative to
# the workspace, so two checkouts (git worktrees) sharing one directory each took the other's
# fresh build for their own, and an image could hold another checkout's agent.
agent_target=$cache/agent-target/$(printf %s "$repo" | sha256sum | cut -c1-16)
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
    --manifest-path "$repo/resources/guest-agent/Cargo.toml" \
    --target x86_64-unknown-linux-gnu --target-dir "$agent_target" >&2
agent=$agent_target/x86_64-unknown-linux-gnu/release/guest-agent
# The initramfs has no dynamic loader: the agent must not ask for one.
if readelf -l "$agent" | grep -q 'program interpreter'; then die "$agent is not statically linked"; fi

# --- Root trees --------------------------------------------------------------------------------
stage=$cache/stage-$image_key
rm -rf "$stage" "$out.tmp"
mkdir -p "$stage/base" "$stage/workloads" "$out.tmp"

say "initramfs: busybox $(versions busybox-static | cut -d= -f2) + guest agent"
base=$stage/base
mkdir -p "$base"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,var/tmp,mnt/root,root}
cp /bin/busybox "$base/bin/busybox"
busybox --list-full | while read -r applet; do
    [ -e "$base/$applet" ] || ln -s /bin/busybox "$base/$applet"
done
cp -r "$here/rootfs/." "$base/"
install -m 0755 "$agent" "$base/sbin/guest-agent"
chmod 1777 "$base/tmp" "$base/var/tmp"

say "workloads: stress-ng $(versions stress-ng | cut -d= -f2), fio $(versions fio | cut -d= -f2), curl $(versions curl | cut -d= -f2) and the libraries ldd lists"
wl=$stage/workloads
for bin in /usr/bin/stress-ng /usr/bin/fio /usr/bin/curl; do
    cp --parents "$bin" "$wl/"
    ldd "$bin" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
        [ -e "$wl/$lib" ] || cp -L --parents "$lib" "$wl/"
    done
done
# The tree's /lib, /lib64 and /bin are real directories; Debian 12 links /lib -> usr/lib, so
# keep the dynamic loader where binaries look for it.
mkdir -p "$wl/lib64"
[ -e "$wl/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$wl/lib64/"

cpio_gz() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -n) >"$2"; }
cpio_gz "$base" "$out.tmp/initramfs.cpio.gz"
cpio_gz "$wl" "$out.tmp/workloads.cpio.gz"

say "rootfs: ext4 with busybox, the agent and the workloads"
rootfs_tree=$stage/rootfs
cp -a "$base" "$rootfs_tree"
cp -a "$wl/." "$rootfs_tree/"
rm "$rootfs_tree/init"
# Room for fio's files and the workloads' scratch data beyond what the tree needs.
size_mib=$(($(du -sm "$rootfs_tree" | cut -f1) + 256))
truncate -s "${size_mib}M" "$out.tmp/rootfs.ext4"
mkfs.ext4 -q -F -L prescient-root -E root_owner=0:0 -d "$rootfs_tree" "$out.tmp/rootfs.ext4"

ln "$kernel_dir/vmlinux" "$out.tmp/vmlinux" 2>/dev/null || cp "$kernel_dir/vmlinux" "$out.tmp/vmlinux"
{
    echo "variant=$variant"
    echo "kernel_release=$(cat "$kernel_dir/release")"
    echo "vmlinux=$out/vmlinux"
    echo "initramfs=$out/initramfs.cpio.gz"
    echo "workloads=$out/workloads.cpio.gz"
    echo "rootfs=$out/rootfs.ext4"
} >"$out.tmp/manifest"
rm -rf "$out" "$stage"
mv "$out.tmp" "$out"
say "sizes: $(cd "$out" && du -sh vmlinux initramfs.cpio.gz workloads.cpio.gz rootfs.ext4 | tr '\t\n' ' ')"
print_manifest
