//! Scenario 8: a running Linux guest saved and restored. The guest (rootfs on virtio-blk, the
//! agent linked over vsock) holds known data in a running process's memory and in a file on its
//! disk (the agent's `pattern` step, which checks both every second). Three VMMs run it in turn:
//! the first boots it and saves it with a Full snapshot in the middle of that step; a fresh
//! prescient loads that with dirty page tracking and resumes it, the step going on, and saves it
//! as a Diff right after the step read its file from the disk with O_DIRECT (a buffer only the
//! device wrote); the Diff is merged onto the Full memory (`snapshot-editor edit-memory
//! rebase`) and a third prescient resumes it. The same process goes on ticking all along (its
//! timers fire after each restore), its memory, the read-back buffer and the file read from the
//! disk match the pattern, the agent re-makes its vsock link (reset at each snapshot) and runs fio
//! on the restored disk, the guest's console shows no stall, lockup or I/O error, and it powers
//! off cleanly.

use std::time::Duration;

use integration_tests::agent::assert_output;
use integration_tests::nested::on_hardware_kvm;
use integration_tests::{file_data_bytes, run_prescient};
use serde_json::json;

use crate::guest::{Guest, GuestSpec, SnapshotFiles, READY};

const SCENARIO: Duration = Duration::from_secs(420);
/// The pattern step: its ticks (seconds) and size. The Full snapshot comes after tick 1, the
/// Diffs after the reads from the disk at ticks 4 and 8; the third VMM checks ticks 9 to 12.
const PATTERN_SECS: u64 = 12;
const PATTERN: &str = "pattern:12:2M";
const PATTERN_BYTES: u64 = 2 << 20;
/// Every this many ticks the step reads its file from the disk into its read-back buffer.
const DISK_EVERY: u64 = 4;
/// fio on the restored disk (a small file: laying out 16 MiB took ~50 s in L1).
const FIO: &str = "fio-randrw:1:2M";
/// What a healthy guest never prints after its boot, and a restore that got its timers,
/// interrupts or queues wrong makes it print.
const TROUBLE: [&str; 6] = [
    "rcu: INFO",
    "soft lockup",
    "hung_task",
    "blocked for more than",
    "Call Trace",
    "I/O error",
];

/// The ticks of the pattern step on `lines` (a line the snapshot cut in two is not one), each
/// required to have checked out with `sum`: its memory (`tick=<n> ram ok`) and its file
/// (`tick=<n> file(cache|disk) ok`). The ticks' numbers.
fn ticks(lines: &[String], sum: &str) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("agent: [pattern] tick="))
        .filter_map(|rest| {
            let (n, verdict) = rest.split_once(' ').unwrap_or((rest, ""));
            let what = verdict.split(' ').next().unwrap_or_default();
            assert_eq!(
                verdict,
                format!("{what} ok sum={sum}"),
                "the pattern changed: tick={rest}"
            );
            (what == "ram").then(|| n.parse().expect("a tick number"))
        })
        .collect()
}

/// The sum the pattern step printed when it wrote its data.
fn written_sum(vm: &Guest) -> String {
    // An agent that cannot run the step says so at once.
    let line = vm.console.expect("the pattern written", READY, |l| {
        l.starts_with("agent: [pattern] wrote ") || l.starts_with("agent: error")
    });
    assert!(
        line.contains(&format!(
            "wrote {PATTERN_BYTES} bytes to /var/tmp/pattern.bin"
        )),
        "{line}"
    );
    let sum = line
        .split_once("sum=")
        .and_then(|(_, r)| r.split(';').next())
        .expect("the written sum");
    sum.to_string()
}

/// Neither console shows a guest in trouble.
fn assert_healthy(lines: &[String]) {
    for bad in TROUBLE {
        let hits: Vec<&String> = lines.iter().filter(|l| l.contains(bad)).collect();
        assert!(hits.is_empty(), "{bad:?} on the guest's console: {hits:#?}");
    }
}

/// The snapshot's files, as the report shows them: apparent size and data held, in MiB.
fn describe(files: &SnapshotFiles) -> String {
    let len = |p: &std::path::Path| std::fs::metadata(p).expect("a snapshot file").len();
    format!(
        "state {} KiB, memory {} MiB apparent / {} MiB of data",
        len(&files.state) >> 10,
        len(&files.mem) >> 20,
        file_data_bytes(&files.mem) >> 20
    )
}

/// The ticks on `lines` carry on from tick `from`: each next one in turn (the first may have
/// been cut in two by the pause), none repeated, up to `to` when given. The last one.
fn assert_ticks_go_on(lines: &[String], sum: &str, from: u64, to: Option<u64>) -> u64 {
    let got = ticks(lines, sum);
    let first = got.first().copied().unwrap_or(from + 1);
    let last = to.unwrap_or_else(|| got.last().copied().unwrap_or(from));
    assert!(
        (first == from + 1 || first == from + 2)
            && got == (first..=last).collect::<Vec<_>>()
            && last > from,
        "ticks after tick {from} (to {to:?}): {got:?}"
    );
    last
}

/// `prescient snapshot-editor edit-memory rebase`: `diff`'s pages written into `base`.
fn rebase(base: &std::path::Path, diff: &std::path::Path) -> Duration {
    let start = std::time::Instant::now();
    let (base, diff) = (base.to_str().unwrap(), diff.to_str().unwrap());
    let args = [
        "snapshot-editor",
        "edit-memory",
        "rebase",
        "--memory-path",
        base,
        "--diff-path",
        diff,
    ];
    run_prescient(&args, READY).assert_code(0);
    start.elapsed()
}

/// Waits for the agent's vsock link and for the pattern step's first read from the disk on this
/// VMM's console (an O_DIRECT read into a buffer only the device writes), then saves a Diff: the
/// ticks after a restore check that buffer as it stands. The Diff's files and the last tick
/// before it (ticks from `from` on were seen on this console).
fn diff_after_a_disk_read(
    vm: &mut Guest,
    sum: &str,
    from: u64,
    name: &str,
) -> (SnapshotFiles, u64) {
    // The agent's link is made again (a snapshot reset it) before this one resets it.
    vm.link.as_ref().unwrap().stream(READY);
    // The first VMM's console shows none before tick 4 (its Full snapshot came earlier).
    vm.console.expect("a tick reading the disk", READY, |l| {
        l.starts_with("agent: [pattern] tick=") && l.contains(" file(disk) ")
    });
    let (diff, create) = vm.snapshot("Diff", name);
    let lines = vm.console.lines();
    let last = assert_ticks_go_on(&lines, sum, from, None);
    assert!(
        last < PATTERN_SECS,
        "the step ended before the Diff: {last}"
    );
    println!(
        "snapshot: {name} (Diff) create {:.2} s at tick {last}; {}",
        create.as_secs_f64(),
        describe(&diff)
    );
    (diff, last)
}

/// Three VMMs in turn run one guest. The first boots it with dirty page tracking, saves it Full
/// in the middle of the pattern step, resumes it and saves a Diff after the step read its file
/// from the disk; the Diff is merged onto the Full memory and loaded, with tracking, in the
/// second, which saves another Diff after the next read from the disk; that one merged too, the
/// third finishes the step with every check passing, runs fio on the disk and powers off.
#[test]
fn a_running_guest_goes_on_after_full_and_merged_diff_snapshots() {
    on_hardware_kvm(SCENARIO, || {
        let started = std::time::Instant::now();
        let mut vm = GuestSpec::new("linux-snapshot", 2, 256)
            .section(
                "machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true}),
            )
            .with_rootfs()
            .with_agent_link()
            .arg("prescient.agent.interval_ms=500")
            .steps(&[PATTERN])
            .start();
        vm.ready();
        let sum = written_sum(&vm);
        vm.console.expect("the pattern's first tick", READY, |l| {
            l.starts_with("agent: [pattern] tick=1 ")
        });
        vm.link.as_ref().unwrap().stream(READY);
        let (full, create) = vm.snapshot("Full", "full");
        let last = assert_ticks_go_on(&vm.console.lines(), &sum, 0, None);
        // The read-back buffer must be filled after the Full snapshot, by the device.
        assert!(
            last < DISK_EVERY,
            "the Full snapshot came after the first read from the disk (tick {DISK_EVERY}): {last}"
        );
        println!(
            "snapshot: Full create {:.2} s at tick {last}; {}",
            create.as_secs_f64(),
            describe(&full)
        );
        vm.resume();
        let (diff, last) = diff_after_a_disk_read(&mut vm, &sum, 0, "diff1");
        let first = vm.console.lines();
        let stopped = vm.stop();
        println!(
            "snapshot: rebase {:.2} s",
            rebase(&full.mem, &diff.mem).as_secs_f64()
        );

        // The second VMM: the merged memory, pages logged again.
        let (mut vm, load) = stopped.restore(&diff.state, &full.mem, true);
        println!("snapshot: load to resumed {:.3} s", load.as_secs_f64());
        let (diff, last) = diff_after_a_disk_read(&mut vm, &sum, last, "diff2");
        let second = vm.console.lines();
        let stopped = vm.stop();
        println!(
            "snapshot: rebase {:.2} s",
            rebase(&full.mem, &diff.mem).as_secs_f64()
        );

        // The third VMM finishes the step.
        let (vm, load) = stopped.restore(&diff.state, &full.mem, false);
        println!("snapshot: load to resumed {:.3} s", load.as_secs_f64());
        let done = vm.done(PATTERN, PATTERN_SECS);
        assert_eq!(done["exit_code"], 0, "{done}");
        let third = vm.console.lines();
        assert_ticks_go_on(&third, &sum, last, Some(PATTERN_SECS));
        // Read back from the disk once more at the end.
        assert_output(&third, "pattern", &format!("file ok sum={sum}"));

        // The agent's vsock link, reset at each snapshot, is made again to this VMM; fio runs
        // on the restored disk, the step sent over that link.
        vm.link.as_ref().unwrap().stream(READY);
        vm.run(FIO);
        vm.done(FIO, 1);
        let third = vm.console.lines();
        assert_output(&third, "fio-randrw", "WRITE: bw=");
        let ready = first
            .iter()
            .position(|l| l.contains("agent: ready"))
            .unwrap();
        for lines in [&first[ready..], &second[..], &third[..]] {
            assert_healthy(lines);
        }
        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
        println!(
            "snapshot: scenario {:.1} s in L1",
            started.elapsed().as_secs_f64()
        );
    });
}
