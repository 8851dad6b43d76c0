//! vhost-user-block drives (Firecracker's `socket`), end to end: the test guest reads and writes
//! a disk that `qemu-storage-daemon` serves from a host file, and the host checks the file; a
//! drive with no backend, or with fields only a file drive has, is refused by name; a backend that
//! dies leaves the VMM running and says so in its log; a snapshot is refused, as in Firecracker.

use std::path::Path;
use std::time::Duration;

use integration_tests::vhost_user::StorageDaemon as Backend;
use integration_tests::{
    fnv1a, guest_spec_devices, run_spec, start_with_console, wait_for_console_line, ApiClient,
    RunningVmm, Scratch, TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(90);

fn vhost_drive(id: &str, socket: &Path) -> serde_json::Value {
    serde_json::json!({"drive_id": id, "socket": socket, "is_root_device": false})
}

#[test]
fn guest_writes_through_a_vhost_user_backend_reach_its_file() {
    let scratch = Scratch::new("vhost-user-blk-rw");
    let img = scratch.zeroed_file("disk.img", 4 << 20);
    let backend = Backend::start(&img, &scratch.path().join("vu.sock"));
    let out = run_spec(
        &scratch,
        &guest_spec_devices(
            "blk_rw=64 blk_sector=100 blk_read=64 blk_int_report=1",
            serde_json::json!([vhost_drive("vu0", &backend.socket)]),
            None,
        ),
        DEADLINE,
    );
    out.assert_code(0)
        .assert_line("guest: blk0 flush ok")
        .assert_line("guest: blk0 rw sectors=64 ok");
    // The capacity comes from the backend's configuration space (GET_CONFIG).
    assert_eq!(
        out.field("guest: blk0 capacity=", "capacity").as_deref(),
        Some("8192"),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.field("guest: blk0 capacity=", "ro").as_deref(),
        Some("0")
    );
    let file = std::fs::read(&img).unwrap();
    let written = &file[100 * 512..164 * 512];
    assert!(
        written.iter().any(|&b| b != 0),
        "the guest's data is on the backend's file"
    );
    assert!(file[..100 * 512].iter().all(|&b| b == 0));
    assert!(file[164 * 512..].iter().all(|&b| b == 0));
    out.assert_line(&format!(
        "guest: blk0 read sectors=64 ok fnv1a=0x{:016x}",
        fnv1a(written)
    ));
    // The backend's completions (its call eventfd, relayed by the VMM thread) reached the
    // device's InterruptStatus as used-buffer interrupts.
    out.assert_line("guest: blk0 int_status_seen=0x1");
}

/// A second, file-backed drive beside the vhost-user one: both work in one guest.
#[test]
fn a_vhost_user_drive_and_a_file_drive_serve_one_guest() {
    let scratch = Scratch::new("vhost-user-blk-mixed");
    let vu_img = scratch.zeroed_file("vu.img", 2 << 20);
    let file_img = scratch.zeroed_file("file.img", 1 << 20);
    let backend = Backend::start(&vu_img, &scratch.path().join("vu.sock"));
    let drives = serde_json::json!([
        vhost_drive("vu0", &backend.socket),
        integration_tests::drive_json("file1", &file_img, false),
    ]);
    let out = run_spec(
        &scratch,
        &guest_spec_devices("blk_rw=8 blk_sector=4", drives, None),
        DEADLINE,
    );
    out.assert_code(0)
        .assert_line("guest: blk0 rw sectors=8 ok")
        .assert_line("guest: blk1 rw sectors=8 ok");
    for img in [&vu_img, &file_img] {
        let bytes = std::fs::read(img).unwrap();
        assert!(bytes[4 * 512..12 * 512].iter().any(|&b| b != 0), "{img:?}");
    }
}

/// What a drive PUT before boot answers, and its fault message.
fn put_drive(api: &mut ApiClient, body: serde_json::Value) -> (u16, String) {
    let r = api.request("PUT", "/drives/vu", Some(&body.to_string()));
    (r.status, r.body)
}

#[test]
fn vhost_user_drives_without_a_backend_or_with_file_fields_are_refused_by_name() {
    let scratch = Scratch::new("vhost-user-blk-bad");
    let socket = scratch.path().join("api.sock");
    let vmm = RunningVmm::spawn([std::ffi::OsStr::new("--api-sock"), socket.as_os_str()]);
    let mut api = ApiClient::connect(&socket);
    let absent = scratch.path().join("nobody.sock");
    let (status, body) = put_drive(&mut api, vhost_drive("vu", &absent));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("drives[0].socket"), "{body}");
    assert!(body.contains(absent.to_str().unwrap()), "{body}");

    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let backend = Backend::start(&img, &scratch.path().join("vu.sock"));
    let mut both = vhost_drive("vu", &backend.socket);
    both["path_on_host"] = serde_json::json!(img);
    let (status, body) = put_drive(&mut api, both);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("path_on_host"), "{body}");
    let mut limited = vhost_drive("vu", &backend.socket);
    limited["rate_limiter"] = serde_json::json!({"ops": {"size": 10, "refill_time": 100}});
    let (status, body) = put_drive(&mut api, limited);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("rate_limiter"), "{body}");
    let (status, body) = put_drive(
        &mut api,
        serde_json::json!({"drive_id": "vu", "is_root_device": false}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("path_on_host"), "{body}");

    // With a backend listening: accepted, and shown back as given.
    let (status, body) = put_drive(&mut api, vhost_drive("vu", &backend.socket));
    assert_eq!(status, 204, "{body}");
    let config = api.request("GET", "/vm/config", None).json();
    assert_eq!(
        config["drives"][0]["socket"],
        serde_json::json!(backend.socket)
    );
    assert!(
        config["drives"][0].get("path_on_host").is_none(),
        "{config}"
    );
    vmm.terminate(DEADLINE);
}

#[test]
fn a_backend_that_dies_leaves_the_vmm_running_and_is_logged() {
    let scratch = Scratch::new("vhost-user-blk-dies");
    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let mut backend = Backend::start(&img, &scratch.path().join("vu.sock"));
    let spec = serde_json::json!({
        "boot-source": {
            "kernel_image_path": TEST_GUEST_PVH,
            "boot_args": "cpu_ms=1 mem_mib=1 blk_rw=8 exit=halt",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [vhost_drive("vu0", &backend.socket)],
    });
    let (vmm, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: blk0 rw sectors=8 ok", DEADLINE);

    // Snapshots: refused by name, as Firecracker refuses them, before anything is written.
    let r = api.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    let snap = serde_json::json!({
        "snapshot_path": scratch.path().join("vm.state"),
        "mem_file_path": scratch.path().join("vm.mem"),
    });
    let r = api.request("PUT", "/snapshot/create", Some(&snap.to_string()));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("vhost-user") && r.body.contains("vu0"),
        "{}",
        r.body
    );
    assert!(!scratch.path().join("vm.mem").exists());
    let r = api.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(r.status, 204, "{}", r.body);

    // A PATCH of the drive reads the backend's configuration again (Firecracker's update).
    let r = api.request("PATCH", "/drives/vu0", Some(r#"{"drive_id": "vu0"}"#));
    assert_eq!(r.status, 204, "{}", r.body);

    backend.kill();
    std::thread::sleep(Duration::from_millis(500));
    let r = api.request("GET", "/", None);
    assert_eq!(r.status, 200, "the VMM still answers: {}", r.body);
    let r = api.request("PATCH", "/drives/vu0", Some(r#"{"drive_id": "vu0"}"#));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("vu.sock"), "{}", r.body);
    let out = vmm.terminate(DEADLINE);
    assert_eq!(out.code(), Some(143), "{}", out.stderr);
    assert!(
        out.stderr.contains("vhost-user drive vu0") && out.stderr.contains("closed the connection"),
        "the backend's end is logged:\n{}",
        out.stderr
    );
}

/// A hostile guest's descriptors go to the backend, not to prescient: whatever the backend makes
/// of them, the VMM keeps running and answering. (Not `oob_addr`: qemu-storage-daemon drops the
/// connection on a buffer outside guest memory, as on any bad address, and the test guest then
/// treats its unanswered request as fatal and triple-faults: exit 3, the guest's own end.)
#[test]
fn hostile_descriptors_on_a_vhost_user_drive_leave_the_vmm_running() {
    for mode in ["desc_loop", "bad_queue"] {
        let scratch = Scratch::new(&format!("vhost-user-blk-hostile-{mode}"));
        let img = scratch.zeroed_file("disk.img", 1 << 20);
        let backend = Backend::start(&img, &scratch.path().join("vu.sock"));
        let spec = serde_json::json!({
            "boot-source": {
                "kernel_image_path": TEST_GUEST_PVH,
                "boot_args": format!("cpu_ms=1 mem_mib=1 exit=halt virtio_timeout_ms=1000 hostile={mode}"),
            },
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "drives": [vhost_drive("vu0", &backend.socket)],
        });
        let (vmm, mut api, console) = start_with_console(&scratch, spec);
        wait_for_console_line(&console, &format!("guest: hostile {mode} done"), DEADLINE);
        let r = api.request("GET", "/", None);
        assert_eq!(r.status, 200, "{mode}: the VMM still answers: {}", r.body);
        let out = vmm.terminate(DEADLINE);
        assert_eq!(out.code(), Some(143), "{mode}: {}", out.stderr);
        drop(backend);
    }
}

/// Bytes the host holds for the VM's guest memory file (the memfd shared with the backend).
fn guest_memfd_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:guest_mem"))
        })
        .map(|e| std::fs::metadata(e.path()).unwrap().blocks() * 512)
        .expect("the VMM holds its guest memory memfd")
}

/// With a vhost-user drive guest memory is a shared memfd; pages the guest puts in the balloon
/// must leave the file (MADV_REMOVE), not only the VMM's page tables.
#[test]
fn balloon_pages_leave_the_shared_guest_memory_file() {
    const MIB: u64 = 1 << 20;
    let scratch = Scratch::new("vhost-user-blk-balloon");
    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let backend = Backend::start(&img, &scratch.path().join("vu.sock"));
    let spec = serde_json::json!({
        "boot-source": {
            "kernel_image_path": TEST_GUEST_PVH,
            "boot_args": "cpu_ms=1 mem_mib=160 blk_rw=8 balloon_steps=1 exit=halt",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [vhost_drive("vu0", &backend.socket)],
        "balloon": {"amount_mib": 0, "deflate_on_oom": false},
    });
    let (vmm, mut api, console) = start_with_console(&scratch, spec);
    wait_for_console_line(&console, "guest: blk0 rw sectors=8 ok", DEADLINE);
    let before = guest_memfd_bytes(vmm.id());
    assert!(
        before >= 150 * MIB,
        "the guest wrote 160 MiB: {} MiB",
        before / MIB
    );
    let r = api.request("PATCH", "/balloon", Some(r#"{"amount_mib": 128}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for_console_line(&console, "guest: balloon0 step=1 ", DEADLINE);
    let after = guest_memfd_bytes(vmm.id());
    assert!(
        after + 110 * MIB <= before,
        "inflating 128 MiB: the memory file went {} -> {} MiB",
        before / MIB,
        after / MIB
    );
    vmm.terminate(DEADLINE);
}
