//! vCPU hot-plug and what ACPI costs at boot, with the references alternated in one process.
//!
//! - Plug: `PATCH /machine-config {"vcpu_count": 2}` on a running test guest (1 of at most 2
//!   vCPUs, following the CPU hot-plug controller) -> the new vCPU runs guest code: its own
//!   console line (`guest: cpu 1 apic=1 up`, written by that vCPU, ~24 bytes through the serial
//!   port at a PIO exit each). Also the API's answer alone (the thread started, the guest told).
//! - Unplug: `PATCH ... {"vcpu_count": 1}` -> the vCPU's host thread is gone
//!   (`/proc/<pid>/task/<tid>`): the guest takes the interrupt, parks the CPU, ejects it, and the
//!   VMM ends the thread.
//! - Start -> the guest's first console byte with ACPI tables (the default) and without (an MP
//!   table and `virtio_mmio.device=` entries), beside Firecracker (ACPI always) and QEMU
//!   `-M microvm,acpi=off` (as the other benches run it).
//!
//! Firecracker has no vCPU hot-plug (the bench asks its API and prints the answer); QEMU 7.2's
//! `-M microvm` has none either (the bench asks QMP `query-hotpluggable-cpus`).
//!
//! `cargo bench -p integration-tests --bench cpu_hotplug` (`HOTPLUG_BENCH_ROUNDS` plug/unplug
//! rounds, default 20; `HOTPLUG_BENCH_BOOTS` boots per VMM and ACPI setting, default 15).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bench::{alternate, env_or, Kind, Stat, Table, VmSpec, Vmm};
use integration_tests::console::Console;
use integration_tests::{prescient_bin, ApiClient, Scratch};

const DEADLINE: Duration = Duration::from_secs(60);
const DONE: &str = "prescient-test-guest: done";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// prescient booting `spec` with `max_vcpus` (a machine-config field only prescient has), its
/// API on `api`.
fn spawn_hotplug_vm(spec: &VmSpec, max_vcpus: u8, dir: &Path, api: &Path) -> Console {
    let mut json = spec.config_json();
    json["machine-config"]["max_vcpus"] = max_vcpus.into();
    let file = dir.join("p.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let _ = std::fs::remove_file(api);
    let mut cmd = Command::new(prescient_bin());
    cmd.arg("--config-file")
        .arg(&file)
        .arg("--api-sock")
        .arg(api);
    Console::spawn("prescient", &mut cmd)
}

fn patch_count(api: &mut ApiClient, n: u8) {
    let body = format!(r#"{{"vcpu_count": {n}}}"#);
    let r = api.request("PATCH", "/machine-config", Some(&body));
    assert_eq!(r.status, 204, "vcpu_count {n}: {}", r.body);
}

/// Waits (polling every 50 us) until `gone` holds; how long that took from `since`.
fn until(since: Instant, what: &str, mut gone: impl FnMut() -> bool) -> Duration {
    while !gone() {
        assert!(since.elapsed() < DEADLINE, "{what}");
        std::thread::sleep(Duration::from_micros(50));
    }
    since.elapsed()
}

/// Per round: (plug -> API answer, plug -> guest code on the new vCPU, unplug -> guest ejected,
/// unplug -> thread gone), ms.
fn plug_rounds(scratch: &Scratch, rounds: usize) -> Vec<[f64; 4]> {
    let spec = VmSpec::test_guest(1, 128, "cpu_ms=1 mem_mib=1 cpuhp_ms=3600000");
    let sock = scratch.path().join("hp.sock");
    let vm = spawn_hotplug_vm(&spec, 2, scratch.path(), &sock);
    vm.expect_prefix("guest: cpuhp following", DEADLINE);
    let mut api = ApiClient::connect(&sock);
    let task = |tid: u64| Path::new(&format!("/proc/{}/task/{tid}", vm.pid())).exists();
    let mut out = Vec::new();
    for _ in 0..rounds {
        let skip = vm.line_count();
        let t0 = vm.elapsed();
        let start = Instant::now();
        patch_count(&mut api, 2);
        let answered = start.elapsed();
        let (at, _) = vm
            .wait_for_after(skip, "vCPU 1 runs guest code", DEADLINE, |l| {
                l.starts_with("guest: cpu 1 apic=")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let vcpus = api.request("GET", "/hotplug/vcpus", None).json();
        let tid = vcpus["vcpus"][1]["tid"].as_u64().expect("vCPU 1 runs");

        let skip = vm.line_count();
        let t1 = vm.elapsed();
        let start = Instant::now();
        patch_count(&mut api, 1);
        let gone = until(start, "vCPU 1's thread ends", || !task(tid));
        let (ejected, _) = vm
            .wait_for_after(skip, "the guest ejects vCPU 1", DEADLINE, |l| {
                l.starts_with("guest: cpuhp cpu 1 ejected")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        // The next plug needs the removal done on the VMM's side too.
        until(Instant::now(), "vCPU 1 unplugged", || {
            let v = api.request("GET", "/hotplug/vcpus", None).json();
            v["online"] == 1 && v["vcpus"][1]["state"] == "unplugged"
        });
        out.push([
            ms(answered),
            ms(at.saturating_sub(t0)),
            ms(ejected.saturating_sub(t1)),
            ms(gone),
        ]);
    }
    drop(api);
    let (status, _) = vm.terminate(DEADLINE);
    assert_eq!(status.code(), Some(143), "{status:?}");
    out
}

/// What Firecracker answers to a vCPU count change on a running VM.
fn firecracker_answer(fc: &Vmm, scratch: &Scratch) -> String {
    let spec = VmSpec::test_guest(1, 128, "cpu_ms=5000 mem_mib=1");
    let sock = scratch.path().join("fc.sock");
    let vm = fc.spawn(Some(&spec), scratch.path(), Some(&sock)).unwrap();
    vm.expect_prefix("prescient-test-guest:", DEADLINE);
    let mut api = ApiClient::connect(&sock);
    let r = api.request("PATCH", "/machine-config", Some(r#"{"vcpu_count": 2}"#));
    let answer = format!("{} {}", r.status, r.json()["fault_message"]);
    drop(api);
    let _ = vm.terminate(DEADLINE);
    answer
}

/// What QEMU's QMP says about hot-pluggable CPUs on `-M microvm`.
fn qemu_answer() -> String {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "kvm",
            "-smp",
            "1,maxcpus=2",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return "qemu-system-x86_64 not found".into();
    };
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(
        b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-hotpluggable-cpus\"}\n{\"execute\":\"quit\"}\n",
    );
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("query-hotpluggable-cpus") || l.contains("\"error\""))
        .unwrap_or("no answer")
        .to_string()
}

/// Start -> first console byte, ms, of one boot (waits for the guest's end).
fn first_byte(vm: Console) -> f64 {
    vm.expect_prefix(DONE, DEADLINE);
    let first = vm.first_byte().expect("the guest printed");
    let exit = vm.wait_exit_measured(DEADLINE);
    assert!(exit.status.success(), "{exit:?}");
    ms(first)
}

fn main() {
    let rounds: usize = env_or("HOTPLUG_BENCH_ROUNDS", 20);
    let boots: usize = env_or("HOTPLUG_BENCH_BOOTS", 15);
    let scratch = Scratch::new("bench-cpu-hotplug");
    let vmms = Vmm::all();
    println!(
        "cpu_hotplug bench: {rounds} plug/unplug rounds, {boots} boots per VMM and setting; \
         host shared with other builds and tests ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Boots alternated: prescient with ACPI, prescient without, then each reference.
    let spec = VmSpec::test_guest(2, 128, "cpu_ms=1 mem_mib=1");
    let mut with_acpi = Vec::new();
    let mut without_acpi = Vec::new();
    let references = alternate(&vmms, boots, |vmm| {
        let dir = scratch.path().join("boot");
        std::fs::create_dir_all(&dir).unwrap();
        if vmm.kind != Kind::Prescient {
            return first_byte(vmm.spawn(Some(&spec), &dir, None).unwrap());
        }
        with_acpi.push(first_byte(vmm.spawn(Some(&spec), &dir, None).unwrap()));
        let off = VmSpec {
            acpi: Some(false),
            ..spec.clone()
        };
        without_acpi.push(first_byte(vmm.spawn(Some(&off), &dir, None).unwrap()));
        0.0
    });

    let hotplug = plug_rounds(&scratch, rounds);
    let col = |i: usize| -> Vec<f64> { hotplug.iter().map(|r| r[i]).collect() };
    let fc_answer = vmms
        .iter()
        .find(|v| v.kind == Kind::Firecracker)
        .map(|fc| firecracker_answer(fc, &scratch));
    let qemu = qemu_answer();

    let no_hotplug = |kind: Kind| match kind {
        Kind::Prescient => unreachable!(),
        Kind::Firecracker => Err("no vCPU hot-plug".to_string()),
        Kind::Qemu => Err("-M microvm: no CPU hot-plug".to_string()),
    };
    let mut table = Table::new("vCPU hot-plug (ms)", &vmms);
    let rows = [
        ("plug: request -> API answer", 0),
        ("plug: request -> guest code on the new vCPU", 1),
        ("unplug: request -> guest's \"ejected\" line", 2),
        ("unplug: request -> host thread gone", 3),
    ];
    for (name, i) in rows {
        let mut cells = vec![Ok(Stat::of(&col(i)))];
        cells.extend(vmms[1..].iter().map(|v| no_hotplug(v.kind)));
        table.row(name, cells);
    }
    if let Some(a) = fc_answer {
        table.note(format!(
            "Firecracker, PATCH /machine-config {{\"vcpu_count\": 2}} on a running VM: {a}"
        ));
    }
    table.note(format!(
        "QEMU -M microvm, QMP query-hotpluggable-cpus: {qemu}"
    ));
    table.print();

    let mut boot = Table::new("start -> first console byte (ms)", &vmms);
    let reference = |acpi: bool| -> Vec<Result<Stat, String>> {
        vmms[1..]
            .iter()
            .zip(&references[1..])
            .map(|(v, times)| match (v.kind, acpi) {
                (Kind::Firecracker, true) | (Kind::Qemu, false) => Ok(Stat::of(times)),
                (Kind::Firecracker, false) => Err("always ACPI".into()),
                _ => Err("run with acpi=off".into()),
            })
            .collect()
    };
    let mut on = vec![Ok(Stat::of(&with_acpi))];
    on.extend(reference(true));
    boot.row("ACPI tables (default)", on);
    let mut off = vec![Ok(Stat::of(&without_acpi))];
    off.extend(reference(false));
    boot.row("MP table + virtio_mmio.device=", off);
    let (a, b) = (Stat::of(&with_acpi).median, Stat::of(&without_acpi).median);
    let pairs: Vec<f64> = with_acpi
        .iter()
        .zip(&without_acpi)
        .map(|(on, off)| on / off)
        .collect();
    let p = Stat::of(&pairs);
    boot.note(format!(
        "prescient ACPI on / off: {:.3} (medians), {:.3} (median of {} back-to-back pairs, \
         {:.2}-{:.2}); target: within 5 %",
        a / b,
        p.median,
        pairs.len(),
        p.min,
        p.max
    ));
    boot.print();
}
