#!/usr/bin/env python3
"""Records which functions of a release `prescient` run while it boots a VM and keeps it idle,
and writes them as `order.ld`: a linker script fragment that places those functions together at
the start of the binary's text (vmm/build.rs passes it to the link of `prescient`).

Why: the kernel maps a binary's text in windows of 64 KiB or more around each page a process
first executes (fault-around), so the VMM's resident text is set by how many windows its
start-up and idle code is spread over, not by how much of it runs. Laid out as the compiler
emits it, the few hundred KiB that run touch nearly every window of the 3+ MB text; together,
they touch a fraction of them (docs/memory.md, "Start-up code first in the text").

How: each scenario runs the binary under valgrind's callgrind (every instruction executed, none
sampled away) from a fresh copy; the instruction addresses are mapped to the binary's symbols
(`nm`), and each symbol becomes a section pattern: rustc emits one section per function,
`.text.<symbol>` (`.text.unlikely.<symbol>` for one LLVM knows to be cold). The parts of a
name that change between builds and compilers (the hash of a legacy symbol, the crate
disambiguators of a v0 one, LLVM's `.llvm.N` suffixes) become `*`, except where the hash is
what tells apart the instances of a generic function. A function a later build adds or renames
is then only out of place (resident as before), never an error.

valgrind has no seccomp(2), so the scenarios run with --no-seccomp; the few functions only the
seccomp path runs are added by name (SECCOMP_ONLY). Check the result with
`perf record -e page-faults -d` on a real run: a text fault after `_start` (which the linker
places right after the ordered functions) names a function this list misses.

Usage: resources/startup-text/record.py [--bin target/release/prescient] [--guest test-guest.elf]
(the guest defaults to the one the integration tests built). Needs valgrind, nm, and root for
the TAP of the devices scenario (in a network namespace of its own). `--check` only says how
many of order.ld's patterns still name a function of the binary (it fails when over a tenth of
them name none: record again).
"""
import argparse
import bisect
import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# (name, guest command line, seconds to leave it running (None: until the guest exits), how it
# is started, with devices). In the order their functions are laid out: an idle microVM from a
# config file, past the first of the VMM's minutely timers (what the boot and density
# benchmarks' memory rows run, and what a host full of idle microVMs runs); the boot benchmark's
# timed run, whose reset and exit paths follow; an idle microVM configured and started through
# the API, as Firecracker's users drive it; one with the devices microVMs usually have (a
# drive it writes to, a network interface it sends on, vsock, a balloon polling its statistics,
# an entropy device it reads) that then idles, from a config file and through the API.
SCENARIOS = [
    ("idle", "cpu_ms=1 mem_mib=1 exit=halt", 65, "config", False),
    ("exit", "cpu_ms=50 mem_mib=64", None, "config", False),
    ("api", "cpu_ms=1 mem_mib=1 exit=halt", 12, "api", False),
    ("devices", "cpu_ms=1 mem_mib=1 blk_ops=64 blk_write=1 net_tx=4 rng_bytes=4096 exit=halt",
     15, "config", True),
    ("devices-api", "cpu_ms=1 mem_mib=1 blk_ops=64 blk_write=1 net_tx=4 rng_bytes=4096 exit=halt",
     15, "api", True),
]

# Run only with seccomp on (demangled names; see the module docs).
SECCOMP_ONLY = re.compile(
    r"^vmm::seccomp::(install|install_up_to|apply|catch_up)$|::catch_up_seccomp$")


def text_symbols(binary):
    """(start, size, mangled, demangled) of every function symbol, by address."""
    out = subprocess.run(["nm", "-S", "--defined-only", binary], check=True,
                         capture_output=True, text=True).stdout
    syms = []
    for line in out.splitlines():
        p = line.split()
        if len(p) == 4 and p[2] in "tTwW" and int(p[1], 16) > 0:
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    syms.sort()
    names = subprocess.run(["c++filt"], input="\n".join(s[2] for s in syms), check=True,
                           capture_output=True, text=True).stdout.splitlines()
    return [s + (re.sub(r"::h[0-9a-f]{16}$", "", d),) for s, d in zip(syms, names)]


def executed_addresses(callgrind_out, obj):
    """Every instruction address callgrind counted in `obj` (--dump-instr=yes format)."""
    names, cur, last, addrs = {}, None, 0, set()
    for line in open(callgrind_out):
        m = re.match(r"^(c?ob)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, ident, name = m.groups()
            if name:
                names[ident] = name
            if kind == "ob":
                cur = names[ident]
            continue
        if not line[:1] or line[0] not in "0123456789+-*":
            continue
        tok = line.split()[0]
        if tok.startswith("0x"):
            last = int(tok, 16)
        elif tok[0] == "+":
            last += int(tok[1:])
        elif tok[0] == "-":
            last -= int(tok[1:])
        elif tok != "*":
            last = int(tok)
        if cur and cur.endswith(obj):
            addrs.add(last)
    return addrs


def api(sock, method, path, body):
    """One request on the API socket; its status code."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock)
    data = json.dumps(body).encode() if body is not None else b""
    conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    reply = conn.recv(65536).decode(errors="replace")
    conn.close()
    return int(reply.split()[1])


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True)


def run_scenario(binary, guest, cmdline, seconds, how, devices, work):
    copy = os.path.join(work, "prescient")
    shutil.copy(binary, copy)
    # The shape the benchmarks write (integration-tests `VmSpec::config_json`).
    spec = {"boot-source": {"kernel_image_path": guest, "boot_args": cmdline},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256}, "drives": []}
    wrap = []
    if devices:
        disk = os.path.join(work, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        spec["drives"].append({"drive_id": "rootfs", "path_on_host": disk,
                               "is_root_device": False, "is_read_only": False})
        # The TAP in a network namespace of its own: the host's interfaces are left alone.
        netns = f"prescient-record-{os.getpid()}"
        ip("netns", "add", netns)
        ip("-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        ip("-n", netns, "link", "set", "tap0", "up")
        wrap = ["ip", "netns", "exec", netns]
        spec["network-interfaces"] = [{"iface_id": "eth0", "host_dev_name": "tap0",
                                       "guest_mac": "06:00:AC:10:00:02"}]
        spec["vsock"] = {"guest_cid": 3, "uds_path": os.path.join(work, "vsock.sock")}
        spec["balloon"] = {"amount_mib": 0, "deflate_on_oom": True,
                           "stats_polling_interval_s": 1}
        spec["entropy"] = {}
    try:
        return run_vmm(copy, spec, seconds, how, wrap, work)
    finally:
        if devices:
            ip("netns", "del", netns)


def run_vmm(copy, spec, seconds, how, wrap, work):
    config = os.path.join(work, "vm.json")
    with open(config, "w") as f:
        json.dump(spec, f)
    sock = os.path.join(work, "api.sock")
    start = ["--config-file", config] if how == "config" else ["--api-sock", sock]
    out = os.path.join(work, "callgrind.out")
    proc = subprocess.Popen(wrap + ["valgrind", "--tool=callgrind", "--dump-instr=yes",
                                    f"--callgrind-out-file={out}", copy, "--no-seccomp"] + start,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if how == "api":
        deadline = time.time() + 60
        while not os.path.exists(sock):
            if time.time() > deadline:
                sys.exit("the API socket never appeared")
            time.sleep(0.1)
        requests = [("GET", "/", None),
                    ("PUT", "/boot-source", spec["boot-source"]),
                    ("PUT", "/machine-config", spec["machine-config"])]
        requests += [("PUT", f"/drives/{d['drive_id']}", d) for d in spec["drives"]]
        requests += [("PUT", f"/network-interfaces/{n['iface_id']}", n)
                     for n in spec.get("network-interfaces", [])]
        requests += [("PUT", f"/{key}", spec[key]) for key in ("vsock", "balloon", "entropy")
                     if key in spec]
        requests += [("PUT", "/actions", {"action_type": "InstanceStart"}),
                     ("GET", "/vm/config", None)]
        for method, path, body in requests:
            status = api(sock, method, path, body)
            if status >= 300:
                sys.exit(f"{method} {path}: HTTP {status}")
    if seconds is None:
        proc.wait(timeout=600)
    else:
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return executed_addresses(out, "prescient")


def pattern(mangled):
    p = re.sub(r"17h[0-9a-f]{16}E", "17h*E", mangled)
    p = re.sub(r"\.llvm\.\d+", ".llvm.*", p)
    if p.startswith("_R"):
        p = re.sub(r"Cs[0-9a-zA-Z]+_", "Cs*_", p)
    return p


def check(binary, order):
    """How many of `order`'s patterns match a function of `binary`. Patterns that match
    nothing are functions renamed or instances rehashed since the recording (a new compiler or
    dependency): time to record again."""
    patterns = re.findall(r"^\s*\*\(\.text\.(\S+) ", open(order).read(), re.M)
    matchers = [re.compile(fnmatch.translate(p)) for p in patterns]
    names = [s[2] for s in text_symbols(binary)]
    stale = [p for p, m in zip(patterns, matchers) if not any(m.match(n) for n in names)]
    print(f"{order}: {len(patterns) - len(stale)} of {len(patterns)} patterns match functions "
          f"of {binary}; {len(stale)} match none", file=sys.stderr)
    for p in stale:
        print(f"  {p}", file=sys.stderr)
    return 1 if len(stale) * 10 > len(patterns) else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/prescient"))
    ap.add_argument("--guest", default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "order.ld"))
    ap.add_argument("--check", action="store_true",
                    help="only say how much of --out the binary still matches (no valgrind)")
    args = ap.parse_args()
    if args.check:
        return check(args.bin, args.out)
    guest = args.guest or next(iter(sorted(glob.glob(os.path.join(
        ROOT, "target/*/build/integration-tests-*/out/test-guest/test-guest.elf")))), None)
    if not guest:
        sys.exit("no test guest: build the integration tests, or pass --guest")
    syms = text_symbols(args.bin)
    starts = [s[0] for s in syms]
    ran = []
    with tempfile.TemporaryDirectory() as work:
        for name, cmdline, seconds, how, devices in SCENARIOS:
            addrs = run_scenario(args.bin, guest, cmdline, seconds, how, devices, work)
            hit = set()
            for a in addrs:
                i = bisect.bisect_right(starts, a) - 1
                if i >= 0 and a < syms[i][0] + syms[i][1]:
                    hit.add(i)
            print(f"{name}: {len(addrs)} instructions in {len(hit)} functions", file=sys.stderr)
            ran.append(hit)
    ran.append({i for i, s in enumerate(syms) if SECCOMP_ONLY.search(s[3])})
    # A legacy symbol's hash is all that tells one instance of a generic function from another
    # (serde's `deserialize` for each config type, say): the instances that ran keep it, the
    # others stay out of the ordered text. Those names change with the compiler or a dependency's
    # version, and then only those instances fall back to where the compiler puts them.
    family = {}
    for s in syms:
        family[pattern(s[2])] = family.get(pattern(s[2]), 0) + 1
    patterns, seen, size = [], set(), 0
    for hit in ran:
        for i in sorted(hit):
            p = pattern(syms[i][2])
            if family[p] > 1 and ".llvm." not in p:
                p = syms[i][2]
            if p not in seen:
                seen.add(p)
                patterns.append(p)
                size += syms[i][1]
    with open(args.out, "w") as f:
        f.write("/* Generated by resources/startup-text/record.py: the functions a release\n"
                f"   prescient ran to boot a VM and keep it idle ({len(patterns)} patterns, "
                f"{size // 1024} KiB\n   of them when recorded), first in its text. See "
                "record.py for why and how. */\n")
        # The output section is `.text` itself (the linker adds every other function after these),
        # so that tools which look for code in `.text` alone, valgrind among them, see it all.
        f.write("SECTIONS {\n  .text : {\n")
        for p in patterns:
            # LLVM puts a function it knows to be cold (`#[cold]`, or only reached from one)
            # in `.text.unlikely.<symbol>`.
            f.write(f"    *(.text.{p} .text.unlikely.{p})\n")
        f.write("  }\n} INSERT BEFORE .init;\n")
    print(f"{args.out}: {len(patterns)} patterns, {size // 1024} KiB", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
