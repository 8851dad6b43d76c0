//! The guest agent of the Linux images (resources/guest-agent) as a test sees it on a console:
//! the steps it is asked for on the kernel command line, their `workload-done` results, its
//! forwarded output and its JSON reports.

use std::path::PathBuf;
use std::time::Duration;

use crate::console::Console;
use crate::linux::images;
use crate::Scratch;

/// Time for one short workload step beyond its own duration (starting stress-ng or fio).
/// Generous: fio lays out its file before its timed run, and under a nested KVM on a loaded
/// host laying out 16 MiB on the ext4 root was seen to take over two minutes.
pub const STEP_SLACK: Duration = Duration::from_secs(300);

/// Panics unless the console shows the ext4 root mounted from the virtio disk.
pub fn assert_root_on_vda(lines: &[String]) {
    assert!(
        lines
            .iter()
            .any(|l| l.contains("EXT4-fs (vda): mounted filesystem")),
        "the rootfs was not mounted from the virtio disk\n{}",
        lines.join("\n")
    );
}

/// How much report field `path` grew while `step` ran (from the last report before it to the
/// last one during it).
pub fn growth_during(reports: &[serde_json::Value], step: &str, path: &[&str]) -> i64 {
    let (before, during) = reports_around(reports, step);
    num(during.last().expect("reports during the step"), path) - num(&before, path)
}

/// The parsed `agent: workload-done` line of `step`, required to have succeeded.
pub fn expect_workload_done(vm: &Console, step: &str, secs: u64) -> serde_json::Value {
    let marker = format!("\"step\":\"{step}\"");
    let line = vm.expect(
        &format!("agent: workload-done for {step}"),
        Duration::from_secs(secs) + STEP_SLACK,
        |l| l.contains("agent: workload-done ") && l.contains(&marker),
    );
    let json = &line[line.find('{').expect("workload-done carries JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        v["exit_code"],
        0,
        "{step} failed: {line}\n{}",
        vm.lines().join("\n")
    );
    v
}

/// Runs `steps` (each `<workload>:<secs>[:size]`, from the kernel command line) to their end
/// and the agent's poweroff; returns the console.
pub fn run_steps_to_poweroff(vm: &Console, ready: Duration, steps: &[(&str, u64)]) -> Vec<String> {
    vm.expect("agent: ready", ready, |l| l.contains("agent: ready"));
    for (step, secs) in steps {
        expect_workload_done(vm, step, *secs);
    }
    vm.expect("agent: poweroff", STEP_SLACK, |l| {
        l.contains("agent: poweroff")
    });
    vm.lines()
}

pub fn workload_arg(steps: &[(&str, u64)]) -> String {
    let list: Vec<&str> = steps.iter().map(|(s, _)| *s).collect();
    format!("prescient.workload={},poweroff", list.join(","))
}

/// Some line of `step`'s forwarded output contains `text`.
pub fn assert_output(lines: &[String], workload: &str, text: &str) {
    let prefix = format!("agent: [{workload}] ");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&prefix) && l.contains(text)),
        "no {workload} output line with {text:?}\n{}",
        lines.join("\n")
    );
}

/// The reports taken while `step` ran, and the last one before it started.
pub fn reports_around(
    reports: &[serde_json::Value],
    step: &str,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let first = reports
        .iter()
        .position(|r| r["workload"] == step)
        .unwrap_or_else(|| panic!("no agent report taken while {step} ran"));
    assert!(first > 0, "no report before {step} started");
    let during = reports[first..]
        .iter()
        .take_while(|r| r["workload"] == step)
        .cloned()
        .collect();
    (reports[first - 1].clone(), during)
}

pub fn num(v: &serde_json::Value, path: &[&str]) -> i64 {
    let mut cur = v;
    for p in path {
        cur = &cur[p];
    }
    cur.as_i64()
        .unwrap_or_else(|| panic!("report field {path:?} is not a number: {v}"))
}

/// Every report sees the VM's memory and CPUs as the VMM configured them.
pub fn assert_reports_match_the_vm(reports: &[serde_json::Value], vcpus: i64, mem_mib: i64) {
    assert!(reports.len() >= 2, "too few agent reports: {reports:?}");
    for r in reports {
        let total = num(r, &["mem_total_kib"]);
        // The kernel keeps its image and reserved ranges out of MemTotal.
        assert!(
            total <= mem_mib * 1024 && total > mem_mib * 1024 * 3 / 4,
            "MemTotal {total} KiB for a {mem_mib} MiB VM: {r}"
        );
        assert!(num(r, &["mem_available_kib"]) <= total, "{r}");
        assert_eq!(num(r, &["cpus_online"]), vcpus, "{r}");
        for res in ["cpu", "memory", "io"] {
            assert!(
                r["psi"][res]["some_avg10"].is_f64(),
                "no PSI for {res} (CONFIG_PSI): {r}"
            );
        }
    }
}

/// The initramfs followed by the workloads archive: one initrd with stress-ng and fio, for VMMs
/// without a virtio-blk disk (Linux unpacks concatenated cpio archives in order).
pub fn initrd_with_workloads(scratch: &Scratch) -> PathBuf {
    let img = images();
    let mut bytes = std::fs::read(&img.initramfs).expect("read initramfs");
    bytes.extend(std::fs::read(&img.workloads).expect("read workloads archive"));
    let path = scratch.path().join("initrd-with-workloads.cpio.gz");
    std::fs::write(&path, bytes).expect("write initrd");
    path
}

/// stress-ng's memory worker, seen from inside: MemAvailable drops by about what it touches.
pub fn assert_stress_mem_seen(lines: &[String], step: &str, touch_mib: i64) {
    assert_output(lines, "stress-mem", "successful run completed");
    let reports = reports(lines);
    let (before, during) = reports_around(&reports, step);
    let lowest = during
        .iter()
        .map(|r| num(r, &["mem_available_kib"]))
        .min()
        .expect("a report during stress-mem");
    let drop_kib = num(&before, &["mem_available_kib"]) - lowest;
    assert!(
        drop_kib >= touch_mib * 1024 / 2,
        "MemAvailable fell by only {drop_kib} KiB while stress-ng touched {touch_mib} MiB\n{reports:?}"
    );
}

/// The JSON of the agent's report lines (`agent: report {...}`), in order.
pub fn reports(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| {
            let json = &l[l.find("agent: report ")? + "agent: report ".len()..];
            serde_json::from_str(json).ok()
        })
        .collect()
}

/// The `workload`'s fio figure after `key` (e.g. `read: IOPS=`, `WRITE: bw=`) in its output,
/// scaled by its unit suffix (k, KiB/s, MiB/s, GiB/s) to ones or MiB/s.
pub fn fio_figure(lines: &[String], workload: &str, key: &str) -> f64 {
    let label = format!("agent: [{workload}]");
    lines
        .iter()
        .filter(|l| l.contains(&label))
        .find_map(|l| {
            let v = l[l.find(key)? + key.len()..].split([',', ' ']).next()?;
            let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
            let (n, unit) = v.split_at(split);
            let scale = match unit {
                "" | "MiB/s" => 1.0,
                "k" => 1000.0,
                "KiB/s" => 1.0 / 1024.0,
                "GiB/s" => 1024.0,
                _ => return None,
            };
            Some(n.parse::<f64>().ok()? * scale)
        })
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_figures_are_read_with_their_units() {
        let lines: Vec<String> = [
            "agent: [fio-randrw]   read: IOPS=1.2k, BW=4800KiB/s",
            "agent: [fio-seqwrite]   WRITE: bw=50.3MiB/s (52.7MB/s), 50.3MiB/s-50.3MiB/s",
            "agent: [fio-randrw]   WRITE: bw=512KiB/s (524kB/s)",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(fio_figure(&lines, "fio-randrw", "read: IOPS="), 1200.0);
        assert_eq!(fio_figure(&lines, "fio-seqwrite", "WRITE: bw="), 50.3);
        assert_eq!(fio_figure(&lines, "fio-randrw", "WRITE: bw="), 0.5);
        assert!(fio_figure(&lines, "fio-seqwrite", "read: IOPS=").is_nan());
    }
}
