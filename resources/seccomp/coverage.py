#!/usr/bin/env python3
"""Which integration test reaches each syscall the seccomp allow-lists admit.

Runs the integration tests one at a time, every `prescient` they start under `strace -f -ff -D`
(through PRESCIENT_BIN; -D keeps the VMM the test's own child, which its signals reach), then reads each thread's trace from its first filter on (an API client
thread inherits its parent's filters: all of it) and matches its calls against the rules of its
kind's boot filter in x86_64.json, argument checks included. Prints a Markdown table per thread
kind: every allowed rule with the tests that reached it, then the calls a filtered thread made
that no rule allows (the tests that expect SIGSYS make one on purpose).

    resources/seccomp/coverage.py [--skip linux_guest] [--only BINARY ...] [--keep DIR]

Needs strace. Slow (strace stops at every syscall: ~30 min for the suite on 2 cores); a
maintainer's tool, not part of CI. Tests keep their own pass/fail; a failure under strace (a
timing-sensitive test) is reported and its trace still counted.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FILTERS = os.path.join(REPO, "resources", "seccomp", "x86_64.json")
KINDS = ("vmm", "api", "vcpu")


def test_binaries(only):
    """(name, path) of every integration test binary, built first."""
    subprocess.run(["cargo", "build", "-q", "-p", "vmm", "--bin", "prescient"], cwd=REPO, check=True)
    out = subprocess.run(
        ["cargo", "test", "-q", "-p", "integration-tests", "--no-run", "--message-format=json"],
        cwd=REPO, check=True, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        msg = json.loads(line)
        target = msg.get("target", {})
        if msg.get("executable") and target.get("kind") == ["test"]:
            if not only or target["name"] in only:
                found.append((target["name"], msg["executable"]))
    return sorted(found)


def run_traced(binaries, skip, trace_root, prescient):
    """Runs each test alone with its VMMs traced into trace_root/<binary>/<test>/."""
    wrapper = os.path.join(trace_root, "prescient-traced")
    with open(wrapper, "w") as f:
        f.write('#!/bin/sh\nd="$TRACE_DIR/$$"; mkdir -p "$d"\n'
                f'exec strace -D -f -ff -qq -X raw -s 32 -o "$d/t" {prescient} "$@"\n')
    os.chmod(wrapper, 0o755)
    failed = []
    for name, exe in binaries:
        if name in skip:
            continue
        listing = subprocess.run([exe, "--list", "--format", "terse"], capture_output=True,
                                 text=True, check=True).stdout
        for test in [l[:-len(": test")] for l in listing.splitlines() if l.endswith(": test")]:
            out_dir = os.path.join(trace_root, name, test)
            os.makedirs(out_dir)
            env = dict(os.environ, PRESCIENT_BIN=wrapper, TRACE_DIR=out_dir)
            print(f"coverage: {name}::{test}", file=sys.stderr, flush=True)
            r = subprocess.run([exe, "--exact", test, "--test-threads", "1"], env=env,
                               cwd=os.path.join(REPO, "integration-tests"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode != 0:
                failed.append(f"{name}::{test}")
    return failed


CALL = re.compile(r"^([a-z0-9_]+)\((.*)\)\s+= ")


def split_args(text):
    """Top-level comma-separated arguments of one strace line."""
    args, depth, cur, quoted = [], 0, "", False
    for i, c in enumerate(text):
        if quoted:
            cur += c
            if c == '"' and text[i - 1] != "\\":
                quoted = False
            continue
        if c == '"':
            quoted = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += c
    if cur.strip():
        args.append(cur.strip())
    return args


def number(arg):
    try:
        return int(arg, 0) & 0xFFFF_FFFF_FFFF_FFFF
    except ValueError:
        return None


def parse_thread(path):
    """A thread's trace: its name, calls, the index of its first filter, and its children."""
    name, calls, filtered_at, children = None, [], None, []
    with open(path, errors="replace") as f:
        for line in f:
            m = CALL.match(line)
            if not m:
                continue
            # A call the process's end cut short (SIGKILL) still shows its arguments.
            syscall, args = m.group(1), split_args(m.group(2).replace(" <unfinished ...>", ""))
            if syscall == "execve":
                name, calls, filtered_at, children = None, [], None, []
                continue
            if syscall == "prctl" and args and number(args[0]) == 15:
                name = args[1].strip('"')
            if syscall in ("clone", "clone3"):
                child = number(line.rsplit("=", 1)[1].split()[0])
                if child:
                    children.append((len(calls), child))
            calls.append((syscall, args))
            if syscall == "seccomp" and filtered_at is None and line.rstrip().endswith("= 0"):
                filtered_at = len(calls)
    return {"name": name, "calls": calls, "filtered_at": filtered_at, "children": children}


def kind_of(name):
    if name is None:
        return "vmm"
    if name.startswith("vcpu"):
        return "vcpu"
    if name.startswith("api"):
        return "api"
    return None


def filtered_threads(files):
    """(kind, calls made under a filter) of every filtered thread of one process tree's traces.
    A thread started by a filtered thread runs under its filters from its first instruction."""
    threads = {}
    for f in files:
        tid = number(f.rsplit(".", 1)[1])
        if tid is not None:
            threads[tid] = parse_thread(f)
    inherits = {}
    for t in threads.values():
        for at, child in t["children"]:
            if t["filtered_at"] is not None and at >= t["filtered_at"] and child in threads:
                inherits[child] = kind_of(t["name"])
    for tid, t in threads.items():
        if tid in inherits:
            yield inherits[tid], t["calls"]
        elif t["filtered_at"] is not None and kind_of(t["name"]):
            yield kind_of(t["name"]), t["calls"][t["filtered_at"]:]


def rule_matches(rule, syscall, args):
    if rule["syscall"] != syscall:
        return False
    for cond in rule.get("args", []):
        value = number(args[cond["index"]]) if cond["index"] < len(args) else None
        if value is None:
            return False
        if cond["type"] == "dword":
            value &= 0xFFFF_FFFF
        op = cond["op"]
        if op == "eq" and value != cond["val"]:
            return False
        if op == "ne" and value == cond["val"]:
            return False
        if isinstance(op, dict) and "masked_eq" in op and value & op["masked_eq"] != cond["val"]:
            return False
    return True


def describe(rule):
    checks = [c.get("comment") or f"arg{c['index']}" for c in rule.get("args", [])]
    return rule["syscall"] + (f" ({'; '.join(checks)})" if checks else "")


def report(trace_root, failed):
    filters = json.load(open(FILTERS))
    reached = {k: collections.defaultdict(set) for k in KINDS}
    unlisted = {k: collections.defaultdict(set) for k in KINDS}
    tests = set()
    for binary in sorted(os.listdir(trace_root)):
        bdir = os.path.join(trace_root, binary)
        if not os.path.isdir(bdir):
            continue
        for test in sorted(os.listdir(bdir)):
            label = f"{binary}::{test}"
            for root, _, files in os.walk(os.path.join(bdir, test)):
                paths = [os.path.join(root, f) for f in files if f.startswith("t.")]
                for kind, calls in filtered_threads(paths):
                    tests.add(label)
                    rules = filters[f"{kind}_boot"]["filter"]
                    for syscall, args in calls:
                        hits = [i for i, r in enumerate(rules) if rule_matches(r, syscall, args)]
                        for i in hits:
                            reached[kind][i].add(label)
                        if not hits:
                            unlisted[kind][syscall].add(label)
    print(f"{len(tests)} tests started a filtered prescient thread.")
    if failed:
        print(f"Failed under strace (traces counted): {', '.join(failed)}")
    for kind in KINDS:
        print(f"\n### `{kind}_boot`\n\n| rule | tests that reach it |\n|---|---|")
        for i, rule in enumerate(filters[f"{kind}_boot"]["filter"]):
            hit = sorted(reached[kind][i])
            shown = ", ".join(f"`{t}`" for t in hit[:2]) + (f" (+{len(hit) - 2})" if len(hit) > 2 else "")
            print(f"| `{describe(rule)}` | {shown or '**none**'} |")
        for syscall, hit in sorted(unlisted[kind].items()):
            print(f"| not allowed: `{syscall}` | {', '.join(f'`{t}`' for t in sorted(hit))} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=[], help="test binaries to run (default: all)")
    p.add_argument("--skip", nargs="*", default=["linux_guest"], help="test binaries to skip")
    p.add_argument("--keep", help="keep the traces in this directory (tests already in it: error)")
    p.add_argument("--prescient", help="the binary to trace (default: the debug build), e.g. a "
                   "release build, whose panics abort")
    p.add_argument("--report-only", help="report on the traces kept in this directory")
    a = p.parse_args()
    if a.report_only:
        report(a.report_only, [])
        return
    if not shutil.which("strace"):
        sys.exit("coverage: strace is needed (apt-get install strace)")
    root = a.keep or tempfile.mkdtemp(prefix="prescient-seccomp-coverage-")
    os.makedirs(root, exist_ok=True)
    try:
        binaries = test_binaries(set(a.only))
        target = json.loads(subprocess.run(["cargo", "metadata", "--format-version=1", "--no-deps"],
                                           cwd=REPO, check=True, capture_output=True,
                                           text=True).stdout)["target_directory"]
        prescient = a.prescient or os.path.join(target, "debug", "prescient")
        failed = run_traced(binaries, set(a.skip), root, os.path.abspath(prescient))
        report(root, failed)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
