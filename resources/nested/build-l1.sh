#!/usr/bin/env bash
# Builds the "L1 host" of the nested test harness: a real KVM host (kvm_amd) that QEMU's TCG
# emulator runs on any x86_64 machine, hardware virtualization or not (see README.md here).
#
#   L0  this machine: qemu-system-x86_64 -accel tcg -cpu EPYC (TCG emulates SVM with nested paging)
#   L1  Debian 12's stock kernel, kvm + kvm_amd from its .deb, a busybox initramfs
#   L2  prescient's guests, run by prescient inside L1
#
# The L1 initramfs is the concatenation of three cpio archives (Linux unpacks them in order):
#   base     busybox, the kernel's modules, resources/nested/init          (cached, this script)
#   images   the guest images of build-guest-images.sh under /nested/images (cached, this script)
#   payload  the binaries and the script of one boot                       (per boot, --payload)
#
# Outputs are cached under ${PRESCIENT_CACHE_DIR:-$HOME/.cache/prescient}/nested/, keyed by a
# hash of their inputs: the kernel by its Debian package and version; base by this script, the
# init, the kernel and busybox; images by the guest-image directory (itself an input hash).
# Progress goes to stderr; paths go to stdout as KEY=VALUE lines (the manifest).
#
# usage:
#   build-l1.sh [--images MANIFEST] [--print-paths]
#       MANIFEST: what build-guest-images.sh --print-paths printed (a file)
#   build-l1.sh --payload OUT.cpio SRC=DEST...
#       one boot's archive: each SRC at DEST (executables stripped of debug info), plus the
#       libraries `ldd` lists for the executables and their loader
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${PRESCIENT_CACHE_DIR:-$HOME/.cache/prescient}/nested
start=$SECONDS
say() { echo "build-l1 [$((SECONDS - start))s]: $*" >&2; }
die() { echo "build-l1: error: $*" >&2; exit 1; }

# The newc archive of directory $1 (contents only, owned by root) into file $2.
cpio_of() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$2"; }

# Copies the libraries and loader that ldd lists for executable $1 under root $2.
copy_libraries() {
    local lib
    ldd "$1" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
        [ -e "$2$lib" ] || { mkdir -p "$2$(dirname "$lib")" && cp -L "$lib" "$2$lib"; }
    done
}

payload() {
    local out=${1:?--payload needs OUT.cpio}
    shift
    local root
    root=$(mktemp -d "${TMPDIR:-/tmp}/prescient-l1-payload.XXXXXX")
    trap 'rm -rf "$root"' RETURN
    local spec src dest
    for spec in "$@"; do
        src=${spec%%=*}
        dest=${spec#*=}
        [ "$src" != "$spec" ] && [ "${dest#/}" != "$dest" ] || die "--payload wants SRC=/DEST, got '$spec'"
        [ -f "$src" ] || die "--payload: $src is not a file"
        mkdir -p "$root$(dirname "$dest")"
        if [ -x "$src" ] && head -c 4 "$src" | grep -q ELF; then
            # Debug info is most of a debug build and useless in L1: backtraces keep symbols.
            objcopy --strip-debug "$src" "$root$dest"
            copy_libraries "$src" "$root"
        else
            cp "$src" "$root$dest"
        fi
    done
    cpio_of "$root" "$out"
}

images_manifest=
print_paths=false
while [ $# -gt 0 ]; do
    case "$1" in
    --payload) shift; payload "$@"; exit 0 ;;
    --images) images_manifest=${2:?--images needs a manifest file}; shift 2 ;;
    --print-paths) print_paths=true; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# --- Tools --------------------------------------------------------------------------------------
packages=(qemu-system-x86 busybox-static cpio kmod binutils)
# shellcheck source=../debian-packages.sh
. "$here/../debian-packages.sh"
need_debian_packages "${packages[@]}"

mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    say "another build holds $cache/.lock; waiting for it"
    flock 9
fi

# --- L1 kernel and modules: Debian 12's newest linux-image-6.1.0-N-amd64, from its .deb ------
newest_kernel_package() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -1
}
pkg=$(newest_kernel_package)
if [ -z "$pkg" ]; then
    say "no linux-image-6.1.0-*-amd64 in apt's lists; apt-get update"
    apt-get update -qq >&2
    pkg=$(newest_kernel_package)
fi
[ -n "$pkg" ] || die "no linux-image-6.1.0-*-amd64 package in apt's lists (is Debian 12's main archive in sources.list?)"
version=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
kernel=$cache/kernel/${pkg}_$version
# What L1 loads: kvm_amd (with what it needs: kvm, irqbypass, ccp) and tun for the guests' TAPs.
wanted_modules=(kvm-amd tun)
# What an L2 guest booting this same kernel needs for prescient's devices (Debian builds its
# virtio drivers as modules, and virtio_mmio without command-line devices: ACPI's DSDT is the
# only way it finds them).
guest_modules=(virtio_mmio virtio_blk virtio_net vmw_vsock_virtio_transport virtio-rng virtio_balloon virtio_mem)

# Copies module $3 and its dependencies (modules.dep in $1) from $1 into directory $2 and appends
# their names to $2/load, dependencies first; each module once.
copy_module() {
    local line f name
    line=$(grep -E "/$3\.ko(\.xz|\.zst)?:" "$1/modules.dep") || die "$pkg has no module $3"
    # modules.dep lists every dependency of a module, the deepest last: load in reverse.
    for f in $(echo "${line#*:}" | tr ' ' '\n' | tac) "${line%%:*}"; do
        name=$(basename "$f")
        case "$name" in *.ko) ;; *) die "$name: compressed modules are not handled" ;; esac
        if [ ! -e "$2/$name" ]; then
            cp "$1/$f" "$2/"
            echo "${name%.ko}" >>"$2/load"
        fi
    done
}

if [ -f "$kernel/modules.load" ] && [ -f "$kernel/guest-modules.cpio.gz" ]; then
    say "kernel: cached $kernel"
else
    say "kernel: apt-get download $pkg=$version"
    work=$(mktemp -d "${TMPDIR:-/tmp}/prescient-l1-kernel.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # apt's download sandbox user may not write to the caller's temporary directory.
    download() { (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2); }
    if ! download; then
        # Lists older than the mirror name a version it no longer has: refresh and take the
        # newest again.
        say "kernel: download failed; apt-get update and again"
        apt-get update -qq >&2
        pkg=$(newest_kernel_package)
        version=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
        kernel=$cache/kernel/${pkg}_$version
        download || die "cannot download $pkg=$version"
    fi
    dpkg-deb -x "$work"/*.deb "$work/root"
    kver=${pkg#linux-image-}
    moddir=$work/root/lib/modules/$kver
    depmod -b "$work/root" "$kver"
    rm -rf "$kernel.tmp" && mkdir -p "$kernel.tmp/modules"
    cp "$work/root/boot/vmlinuz-$kver" "$kernel.tmp/vmlinuz"
    echo "$kver" >"$kernel.tmp/release"
    for m in "${wanted_modules[@]}"; do copy_module "$moddir" "$kernel.tmp/modules" "$m"; done
    mv "$kernel.tmp/modules/load" "$kernel.tmp/modules.load"
    # The guests' archive: /lib/modules/<release>/, the guest's rcS loads what `load` lists.
    # Compressed like the archives it follows: Linux finds an uncompressed one that starts at an
    # offset not a multiple of 4 "invalid" and stops unpacking there.
    guest=$work/guest/lib/modules/$kver
    mkdir -p "$guest"
    for m in "${guest_modules[@]}"; do copy_module "$moddir" "$guest" "$m"; done
    cpio_of "$work/guest" "$work/guest-modules.cpio"
    gzip -9n <"$work/guest-modules.cpio" >"$kernel.tmp/guest-modules.cpio.gz"
    rm -rf "$kernel"
    mv "$kernel.tmp" "$kernel"
    rm -rf "$work"
    trap - EXIT
    say "kernel: $kernel ($(cat "$kernel/release"); modules: $(tr '\n' ' ' <"$kernel/modules.load"); guest modules: $(gzip -dc "$kernel/guest-modules.cpio.gz" | cpio -t --quiet | grep -c '\.ko$'))"
fi

# --- Base archive: busybox, the modules, the init ------------------------------------------
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
base_key=$({
    cat "$0" "$here/init"
    echo "kernel=$kernel busybox=$busybox_version"
} | sha256sum | cut -c1-16)
base=$cache/base/$base_key.cpio
if [ -f "$base" ]; then
    say "base: cached $base"
else
    say "base: busybox $busybox_version, $(wc -l <"$kernel/modules.load") modules, init"
    root=$(mktemp -d "${TMPDIR:-/tmp}/prescient-l1-base.XXXXXX")
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,root,etc,nested/modules,nested/l1}
    cp /bin/busybox "$root/bin/busybox"
    install -m 0755 "$here/init" "$root/init"
    cp "$kernel"/modules/*.ko "$root/nested/modules/"
    cp "$kernel/modules.load" "$root/nested/modules/load"
    # L1's own kernel, for guests that boot Debian's bzImage, and its virtio modules for them.
    cp "$kernel/vmlinuz" "$kernel/release" "$kernel/guest-modules.cpio.gz" "$root/nested/l1/"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    mkdir -p "$cache/base"
    cpio_of "$root" "$base.tmp"
    mv "$base.tmp" "$base"
    rm -rf "$root"
fi

# --- Images archive: the guest images under /nested/images, with a manifest of L1 paths -----
images=
if [ -n "$images_manifest" ]; then
    [ -f "$images_manifest" ] || die "--images: $images_manifest is not a file"
    get() { sed -n "s/^$1=//p" "$images_manifest"; }
    dir=$(dirname "$(get vmlinux)")
    [ -d "$dir" ] || die "--images: the manifest names no vmlinux=<dir>/vmlinux"
    images_key=$({ cat "$0"; echo "images=$dir"; } | sha256sum | cut -c1-16)
    images=$cache/images/$images_key.cpio
    if [ -f "$images" ]; then
        say "images: cached $images"
    else
        say "images: $dir"
        root=$(mktemp -d "${TMPDIR:-/tmp}/prescient-l1-images.XXXXXX")
        mkdir -p "$root/nested/images"
        {
            echo "variant=$(get variant)"
            echo "kernel_release=$(get kernel_release)"
        } >"$root/nested/images/manifest"
        for key in vmlinux initramfs workloads rootfs; do
            src=$(get $key)
            cp "$src" "$root/nested/images/"
            echo "$key=/nested/images/$(basename "$src")" >>"$root/nested/images/manifest"
        done
        mkdir -p "$cache/images"
        cpio_of "$root" "$images.tmp"
        mv "$images.tmp" "$images"
        rm -rf "$root"
    fi
    # Older image archives are dead weight (a few hundred MB each): keep the newest three.
    ls -t "$cache"/images/*.cpio 2>/dev/null | tail -n +4 | xargs -r rm -f
fi
ls -t "$cache"/base/*.cpio 2>/dev/null | tail -n +4 | xargs -r rm -f

{
    echo "kernel_package=$pkg=$version"
    echo "kernel_release=$(cat "$kernel/release")"
    echo "kernel=$kernel/vmlinuz"
    echo "base=$base"
    [ -z "$images" ] || echo "images=$images"
} >"$cache/manifest.$$"
if $print_paths; then cat "$cache/manifest.$$"; else sed 's/^/  /' "$cache/manifest.$$" >&2; fi
rm -f "$cache/manifest.$$"
say "done"
