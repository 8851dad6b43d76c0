//! Snapshots end to end: the test guest is paused in the middle of its work, saved through
//! `PUT /snapshot/create`, and finishes in a new prescient process after `PUT /snapshot/load`,
//! every check of the guest passing (its memory pattern, monotonic TSC, its devices' data).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{
    drive_json, file_data_bytes, guest_spec, line_field, prescient_bin, start_with_console,
    wait_for_console_line, ApiClient, RunningVmm, Scratch, TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(120);

/// A snapshot's two files.
struct Snap {
    state: PathBuf,
    mem: PathBuf,
}

fn ok(r: integration_tests::ApiResponse, what: &str) {
    assert_eq!(r.status, 204, "{what}: {}", r.body);
}

/// Pauses the VM and writes a snapshot of `kind` named `name` into the scratch directory.
fn snapshot(api: &mut ApiClient, scratch: &Scratch, name: &str, kind: &str) -> Snap {
    ok(
        api.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        "pause",
    );
    let snap = Snap {
        state: scratch.path().join(format!("{name}.state")),
        mem: scratch.path().join(format!("{name}.mem")),
    };
    let body = serde_json::json!({
        "snapshot_type": kind,
        "snapshot_path": snap.state,
        "mem_file_path": snap.mem,
    });
    ok(
        api.request("PUT", "/snapshot/create", Some(&body.to_string())),
        "create",
    );
    snap
}

/// A fresh prescient with only an API socket.
fn fresh_vmm(scratch: &Scratch, name: &str) -> (RunningVmm, ApiClient) {
    let socket = scratch.path().join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let vmm = RunningVmm::spawn([std::ffi::OsStr::new("--api-sock"), socket.as_os_str()]);
    let api = ApiClient::connect(&socket);
    (vmm, api)
}

fn load_body(snap: &Snap, resume: bool) -> String {
    serde_json::json!({
        "snapshot_path": snap.state,
        "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
        "resume_vm": resume,
    })
    .to_string()
}

/// Restores `snap` in a new process, running.
fn restore(scratch: &Scratch, name: &str, snap: &Snap) -> (RunningVmm, ApiClient) {
    let (vmm, mut api) = fresh_vmm(scratch, name);
    ok(
        api.request("PUT", "/snapshot/load", Some(&load_body(snap, true))),
        "load",
    );
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");
    (vmm, api)
}

fn console_text(console: &Path) -> String {
    std::fs::read_to_string(console).unwrap_or_default()
}

/// The guest's final line came and nothing failed on the way.
fn assert_clean_finish(console: &Path) {
    wait_for_console_line(console, "prescient-test-guest: done", DEADLINE);
    let text = console_text(console);
    for bad in ["FAILED", "failed", "PANIC", "tsc went backwards"] {
        assert!(!text.contains(bad), "{bad:?} on the console:\n{text}");
    }
}

/// For a guest started with `exit=kbd`: its last line, then Ctrl-Alt-Del ends it cleanly.
fn finish_on_ctrl_alt_del(console: &Path, api: &mut ApiClient, vmm: RunningVmm) {
    assert_clean_finish(console);
    ok(
        api.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        ),
        "ctrl-alt-del",
    );
    vmm.wait(DEADLINE).assert_code(0);
}

/// The test guest's spec, as JSON to add sections to.
fn spec(vcpus: u8, mem_mib: u64, args: &str) -> serde_json::Value {
    serde_json::from_str(&guest_spec(TEST_GUEST_PVH, vcpus, mem_mib, args)).unwrap()
}

#[test]
fn cpu_and_memory_phases_finish_in_new_processes() {
    let scratch = Scratch::new("snapshot-phases");
    // Enough memory rounds that the phase outlasts the pause below on a fast host (2500 rounds
    // took 0.6 s on one).
    let spec = spec(2, 256, "cpu_ms=1500 mem_mib=64 mem_rounds=10000");
    let (first, mut api, console) = start_with_console(&scratch, spec);

    // In the middle of both vCPUs' CPU phase.
    wait_for_console_line(&console, "guest: cpus online=2", DEADLINE);
    std::thread::sleep(Duration::from_millis(500));
    let in_cpu = snapshot(&mut api, &scratch, "cpu", "Full");
    let text = console_text(&console);
    assert!(!text.contains("cpu_phase done"), "{text}");
    // Firecracker's flags name the format: the file just written is in the one this build
    // writes.
    let answer = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(prescient_bin())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let supported = answer(&["--snapshot-version".as_ref()]);
    assert!(supported.starts_with('v'), "{supported}");
    let described = answer(&["--describe-snapshot".as_ref(), in_cpu.state.as_os_str()]);
    assert_eq!(described, supported);
    // The first VMM is killed (and reaped) before the restore.
    drop(first);

    // In the middle of the memory phase, in the second process.
    let (second, mut api) = restore(&scratch, "second", &in_cpu);
    wait_for_console_line(&console, "guest: cpu 0 cpu_phase done", DEADLINE);
    wait_for_console_line(&console, "guest: cpu 1 cpu_phase done", DEADLINE);
    std::thread::sleep(Duration::from_millis(800));
    let in_mem = snapshot(&mut api, &scratch, "mem", "Full");
    let text = console_text(&console);
    assert!(
        !text.contains("mem_phase rounds"),
        "still in the memory phase:\n{text}"
    );
    drop(second);

    let (third, _api) = restore(&scratch, "third", &in_mem);
    assert_clean_finish(&console);
    let rounds = wait_for_console_line(&console, "guest: mem_phase rounds=", DEADLINE);
    assert_eq!(line_field(&rounds, "rounds").as_deref(), Some("10000"));
    wait_for_console_line(&console, "guest: mem_phase touched_mib=64 ok", DEADLINE);
    third.wait(DEADLINE).assert_code(0);
}

#[test]
fn block_data_written_before_the_snapshot_reads_back_after() {
    let scratch = Scratch::new("snapshot-block");
    let disk = scratch.zeroed_file("disk.img", 4 << 20);
    let mut spec = spec(
        1,
        128,
        "cpu_ms=1 mem_mib=1 blk_rw=64 blk_sector=16 hold_ms=3000",
    );
    spec["drives"] = serde_json::json!([drive_json("data", &disk, false)]);
    let (first, mut api, console) = start_with_console(&scratch, spec);
    // Written and flushed; the read-back comes after the hold.
    wait_for_console_line(&console, "guest: blk0 flush ok", DEADLINE);
    wait_for_console_line(&console, "guest: blk0 hold", DEADLINE);
    let snap = snapshot(&mut api, &scratch, "blk", "Full");
    drop(first);
    let (second, _api) = restore(&scratch, "second", &snap);
    wait_for_console_line(&console, "guest: blk0 rw sectors=64 ok", DEADLINE);
    assert_clean_finish(&console);
    second.wait(DEADLINE).assert_code(0);
}

#[test]
fn entropy_and_balloon_go_on_after_a_restore() {
    let scratch = Scratch::new("snapshot-balloon");
    let mut spec = spec(
        1,
        256,
        "cpu_ms=1 mem_mib=160 rng_bytes=65536 balloon_steps=2 exit=kbd",
    );
    spec["entropy"] = serde_json::json!({});
    spec["balloon"] = serde_json::json!({
        "amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_ms": 100,
    });
    let (first, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: rng0", DEADLINE);
    let r = api.request("PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#));
    ok(r, "inflate");
    let step = wait_for_console_line(&console, "guest: balloon0 step=1 ", DEADLINE);
    assert_eq!(line_field(&step, "actual_pages").as_deref(), Some("16384"));
    let snap = snapshot(&mut api, &scratch, "balloon", "Full");
    drop(first);

    let (second, mut api) = restore(&scratch, "second", &snap);
    let b = api.request("GET", "/balloon", None).json();
    assert_eq!(b["amount_mib"], 64, "{b}");
    // The statistics buffer the guest lent before the snapshot comes back on the restored
    // timer, and the guest answers with a fresh report.
    let start = std::time::Instant::now();
    loop {
        let s = api.request("GET", "/balloon/statistics", None).json();
        if s.get("free_memory").is_some() {
            assert_eq!(s["actual_mib"], 64, "{s}");
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no guest report after the restore: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(
        api.request("PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#)),
        "deflate",
    );
    let step = wait_for_console_line(&console, "guest: balloon0 step=2 ", DEADLINE);
    assert_eq!(line_field(&step, "actual_pages").as_deref(), Some("0"));
    finish_on_ctrl_alt_del(&console, &mut api, second);
}

#[test]
fn plugged_memory_stays_plugged_after_a_restore() {
    let scratch = Scratch::new("snapshot-vmem");
    let mut spec = spec(1, 128, "cpu_ms=1 mem_mib=1 vmem_steps=2 exit=kbd");
    spec["memory-hotplug"] =
        serde_json::json!({"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128});
    let (first, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(
        &console,
        "guest: vmem0 unplugged memory inaccessible",
        DEADLINE,
    );
    ok(
        api.request(
            "PATCH",
            "/hotplug/memory",
            Some(r#"{"requested_size_mib": 384}"#),
        ),
        "plug",
    );
    let step = wait_for_console_line(&console, "guest: vmem0 step=1 ", DEADLINE);
    assert_eq!(line_field(&step, "plugged_mib").as_deref(), Some("384"));
    let snap = snapshot(&mut api, &scratch, "vmem", "Full");
    drop(first);

    let (second, mut api) = restore(&scratch, "second", &snap);
    let s = api.request("GET", "/hotplug/memory", None).json();
    assert_eq!(
        (
            s["plugged_size_mib"].clone(),
            s["requested_size_mib"].clone()
        ),
        (384.into(), 384.into()),
        "{s}"
    );
    // The guest unplugs down to 128 MiB and checks every block's state and the pattern on
    // what stays plugged: the restored KVM slots must map it.
    ok(
        api.request(
            "PATCH",
            "/hotplug/memory",
            Some(r#"{"requested_size_mib": 128}"#),
        ),
        "unplug",
    );
    let step = wait_for_console_line(&console, "guest: vmem0 step=2 ", DEADLINE);
    assert_eq!(
        line_field(&step, "plugged_mib").as_deref(),
        Some("128"),
        "{step}"
    );
    assert_eq!(
        line_field(&step, "device_plugged_mib").as_deref(),
        Some("128"),
        "{step}"
    );
    assert!(step.contains("state=ok"), "{step}");
    finish_on_ctrl_alt_del(&console, &mut api, second);
}

#[test]
fn the_predictor_keeps_what_it_learned_across_a_restore() {
    let scratch = Scratch::new("snapshot-predictor");
    let mut spec = spec(1, 256, "cpu_ms=60000 mem_mib=1");
    spec["predictor"] = serde_json::json!({"window_ms": 50});
    let (first, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: cpus online=", DEADLINE);
    // Warm, and memory shrunk below the budget maximum a cold predictor holds.
    let start = std::time::Instant::now();
    let learned = loop {
        let s = api.request("GET", "/predictor", None).json();
        if s["allocation"]["mem"].as_f64().is_some_and(|m| m < 256.0) {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the predictor never shrank memory: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let snap = snapshot(&mut api, &scratch, "predictor", "Full");
    drop(first);

    let (second, mut api) = fresh_vmm(&scratch, "second");
    ok(
        api.request("PUT", "/snapshot/load", Some(&load_body(&snap, false))),
        "load",
    );
    let s = api.request("GET", "/predictor", None).json();
    let windows = s["windows"].as_u64().unwrap();
    assert!(
        windows >= learned["windows"].as_u64().unwrap(),
        "restored {s}\nlearned {learned}"
    );
    let model = s["actuators"]["model"].as_str().unwrap();
    assert!(
        model.starts_with("restored from a snapshot after "),
        "{model}"
    );
    // A cold predictor would hold the budget's maximum for its first 20 windows.
    assert!(s["allocation"]["mem"].as_f64().unwrap() < 256.0, "{s}");
    // The window clock goes on from the snapshot's, taken after `learned`.
    let t_saved = learned["last"]["t_ms"].as_u64().unwrap();
    ok(
        api.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)),
        "resume",
    );
    std::thread::sleep(Duration::from_millis(300));
    let s = api.request("GET", "/predictor", None).json();
    let t = s["last"]["t_ms"].as_u64().unwrap();
    assert!(
        t > t_saved && t < t_saved + 60_000,
        "t_ms {t} after a snapshot at {t_saved}"
    );
    second.terminate(DEADLINE);
}

#[test]
fn a_diff_snapshot_on_top_of_a_full_one_restores_the_latest_state() {
    let scratch = Scratch::new("snapshot-diff");
    let mut spec = spec(
        1,
        256,
        "cpu_ms=800 mem_mib=96 mem_rounds=3 mem_hold_ms=3000",
    );
    spec["machine-config"]["track_dirty_pages"] = true.into();
    let (first, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: cpus online=", DEADLINE);
    // The base: before the memory phase has touched its 96 MiB.
    let base = snapshot(&mut api, &scratch, "base", "Full");
    ok(
        api.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)),
        "resume",
    );
    // The memory phase's first round has written its 96 MiB; two rounds are still to come.
    wait_for_console_line(&console, "guest: mem hold", DEADLINE);
    let diff = snapshot(&mut api, &scratch, "diff", "Diff");
    assert!(!console_text(&console).contains("mem_phase rounds"));
    drop(first);
    // The base holds the guest's image and little else; the diff what the memory phase
    // wrote since, not the whole of RAM. The guest's own check of every page after the
    // restore is what proves the diff complete.
    let (base_bytes, diff_bytes) = (file_data_bytes(&base.mem), file_data_bytes(&diff.mem));
    assert!(
        base_bytes < 16 << 20 && (96 << 20..200 << 20).contains(&diff_bytes),
        "base memory file holds {} MiB, diff {} MiB",
        base_bytes >> 20,
        diff_bytes >> 20
    );

    let out = std::process::Command::new(prescient_bin())
        .args(["snapshot-editor", "edit-memory", "rebase", "--memory-path"])
        .arg(&base.mem)
        .arg("--diff-path")
        .arg(&diff.mem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The guest's check must catch one lost page: a copy of the merged memory with a page the
    // memory phase wrote (one the diff holds, above the guest's image) zeroed again.
    let lost = {
        let file = std::fs::File::open(&diff.mem).unwrap();
        let len = file.metadata().unwrap().len();
        let extents = vmm::snapshot::memory::data_extents(&file, 4 << 20, len).unwrap();
        extents
            .first()
            .expect("the diff holds the memory phase's pages")
            .0
            & !4095
    };
    let holed = scratch.path().join("holed.mem");
    std::fs::copy(&base.mem, &holed).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&holed)
        .unwrap()
        .write_all_at(&[0; 4096], lost)
        .unwrap();
    let holed = Snap {
        state: diff.state.clone(),
        mem: holed,
    };
    let (caught, _api) = restore(&scratch, "holed", &holed);
    let failed =
        wait_for_console_line(&console, "guest: mem_phase touched_mib=96 FAILED", DEADLINE);
    assert!(failed.ends_with(&format!("at {lost:#x}")), "{failed}");
    drop(caught);
    std::fs::remove_file(&console).unwrap();

    let merged = Snap {
        state: diff.state.clone(),
        mem: base.mem.clone(),
    };
    let (second, _api) = restore(&scratch, "second", &merged);
    assert_clean_finish(&console);
    wait_for_console_line(&console, "guest: mem_phase touched_mib=96 ok", DEADLINE);
    second.wait(DEADLINE).assert_code(0);
}

#[test]
fn every_kind_of_bad_snapshot_file_is_refused_with_its_own_error_and_the_vmm_stays_up() {
    let scratch = Scratch::new("snapshot-bad");
    let spec = spec(1, 128, "cpu_ms=60000 mem_mib=1");
    let (first, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: cpus online=", DEADLINE);
    let good = snapshot(&mut api, &scratch, "good", "Full");
    // Existing files are replaced only by a complete snapshot: a create that fails (its memory
    // file cannot be written) leaves the earlier state file as it was.
    let before = std::fs::read(&good.state).unwrap();
    let body = serde_json::json!({
        "snapshot_path": good.state,
        "mem_file_path": scratch.path().join("no-such-dir/m"),
    });
    let r = api.request("PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("Create snapshot error"), "{}", r.body);
    assert_eq!(std::fs::read(&good.state).unwrap(), before);
    // Past the boot stage the VMM may create no file: the create says why, before trying.
    ok(
        api.request("PUT", "/seccomp", Some(r#"{"stage": "steady"}"#)),
        "steady",
    );
    let body = serde_json::json!({
        "snapshot_path": scratch.path().join("late.state"),
        "mem_file_path": scratch.path().join("late.mem"),
    });
    let r = api.request("PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("the seccomp stage is steady"), "{}", r.body);
    assert!(!scratch.path().join("late.mem").exists());
    drop(first);

    let bytes = std::fs::read(&good.state).unwrap();
    let variant = |name: &str, data: &[u8]| {
        let path = scratch.path().join(name);
        std::fs::write(&path, data).unwrap();
        Snap {
            state: path,
            mem: good.mem.clone(),
        }
    };
    let truncated = variant("truncated.state", &bytes[..bytes.len() / 2]);
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let corrupted = variant("corrupted.state", &flipped);
    let mut newer = bytes.clone();
    newer[8..10].copy_from_slice(&99u16.to_le_bytes());
    let version = variant("version.state", &newer);
    let mut state: vmm::snapshot::SnapshotState = vmm::snapshot::file::decode(&bytes).unwrap();
    // The MSRs are read on the vCPU thread under its filter, from a list asked of KVM before.
    let msrs: Vec<u32> = state.vcpus[0].msrs.iter().map(|m| m.index).collect();
    for (msr, name) in [
        (0x10, "IA32_TSC"),
        (0xc000_0082, "LSTAR"),
        (0x6e0, "TSC_DEADLINE"),
    ] {
        assert!(msrs.contains(&msr), "{name} not saved: {msrs:x?}");
    }
    state.host_cpu.vendor = "SomeOtherCPU".into();
    let cpu = variant("cpu.state", &vmm::snapshot::file::encode(&state).unwrap());
    let foreign = variant("foreign.state", br#"{"this": "is not a snapshot"}"#);
    let short_mem = scratch.path().join("short.mem");
    std::fs::copy(&good.mem, &short_mem).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&short_mem)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let short = Snap {
        state: good.state.clone(),
        mem: short_mem,
    };

    // One VMM refuses them all in turn, answering its API after each, then loads the good one.
    let (vmm, mut api) = fresh_vmm(&scratch, "loader");
    for (snap, expect) in [
        (&truncated, "is truncated"),
        (&corrupted, "is corrupted: its CRC-64"),
        (&version, "format version 99"),
        (&cpu, "taken on a SomeOtherCPU CPU"),
        (&foreign, "not a prescient snapshot state file"),
        (&short, "the memory file"),
    ] {
        let r = api.request("PUT", "/snapshot/load", Some(&load_body(snap, true)));
        assert_eq!(r.status, 400, "{expect}: {}", r.body);
        assert!(r.body.contains("Load snapshot error"), "{}", r.body);
        assert!(r.body.contains(expect), "expected {expect:?}: {}", r.body);
        assert_eq!(api.request("GET", "/", None).json()["state"], "Not started");
    }
    ok(
        api.request("PUT", "/snapshot/load", Some(&load_body(&good, false))),
        "good load",
    );
    assert_eq!(api.request("GET", "/", None).json()["state"], "Paused");
    // A second load into a VMM that has a VM is refused.
    let r = api.request("PUT", "/snapshot/load", Some(&load_body(&good, true)));
    assert_eq!(r.status, 400, "{}", r.body);
    vmm.terminate(DEADLINE);
}

#[test]
fn load_is_refused_after_configuration_and_create_before_boot() {
    let scratch = Scratch::new("snapshot-order");
    let (vmm, mut api) = fresh_vmm(&scratch, "order");
    let body = serde_json::json!({"snapshot_path": "/x", "mem_file_path": "/y"}).to_string();
    let r = api.request("PUT", "/snapshot/create", Some(&body));
    assert_eq!(r.status, 400, "{}", r.body);
    ok(
        api.request(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        ),
        "machine-config",
    );
    let r = api.request("PUT", "/snapshot/load", Some(&body));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("not allowed after configuring"),
        "{}",
        r.body
    );
    vmm.terminate(DEADLINE);
}

#[test]
fn a_vm_that_can_plug_vcpus_is_refused_by_name_and_keeps_running() {
    let scratch = Scratch::new("snapshot-hotplug");
    let mut spec = spec(1, 64, "cpu_ms=300 mem_mib=2 exit=kbd");
    spec["machine-config"]["max_vcpus"] = 2.into();
    let (vmm, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: cpus online=", DEADLINE);
    ok(
        api.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        "pause",
    );
    let (state, mem) = (scratch.path().join("h.state"), scratch.path().join("h.mem"));
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string();
    let r = api.request("PUT", "/snapshot/create", Some(&body));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("max_vcpus 2 is above vcpu_count 1") && r.body.contains("hot-plug"),
        "{}",
        r.body
    );
    assert!(!state.exists() && !mem.exists(), "nothing written");
    ok(
        api.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)),
        "resume",
    );
    finish_on_ctrl_alt_del(&console, &mut api, vmm);
}
