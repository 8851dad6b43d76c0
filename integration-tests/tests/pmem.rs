//! virtio-pmem from the test guest: the file is the guest's memory region (what the guest reads
//! is the file, what it stores reaches the file), FLUSH is answered, a read-only file stays as
//! it was, and a root pmem device is announced as the root.

use std::time::Duration;

use integration_tests::{fnv1a, run_spec, Scratch, TEST_GUEST_PVH};

fn run(
    name: &str,
    read_only: bool,
    args: &str,
) -> (Scratch, std::path::PathBuf, integration_tests::Outcome) {
    let scratch = Scratch::new(name);
    let content: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let file = scratch.path().join("pmem.img");
    std::fs::write(&file, &content).unwrap();
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH,
                        "boot_args": format!("cpu_ms=1 mem_mib=1 pmem_check=8192 {args}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "pmem": [{"id": "pmem0", "path_on_host": file, "root_device": true, "read_only": read_only}],
    });
    let out = run_spec(&scratch, &spec.to_string(), Duration::from_secs(90));
    (scratch, file, out)
}

#[test]
fn the_guest_reads_the_file_and_its_stores_reach_it() {
    let (_scratch, file, out) = run("pmem-rw", false, "pmem_write=1");
    let before: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    out.assert_code(0)
        .assert_line(&format!(
            "guest: pmem0 start=0x100000000 size=4194304 fnv1a=0x{:016x}",
            fnv1a(&before)
        ))
        .assert_line("guest: pmem0 flush ret=0");
    assert!(out.stdout.contains("root=/dev/pmem0 rw"), "{}", out.stdout);
    let after = std::fs::read(&file).unwrap();
    assert_eq!(&after[4096..4096 + 14], b"prescient-pmem");
    assert_eq!(after.len(), 3 << 20, "the padding is not part of the file");
}

#[test]
fn a_read_only_file_is_read_but_never_written() {
    let (_scratch, file, out) = run("pmem-ro", true, "");
    out.assert_code(0);
    assert!(out.stdout.contains("root=/dev/pmem0 ro"), "{}", out.stdout);
    assert!(
        out.stdout.contains("guest: pmem0 start=0x100000000"),
        "{}",
        out.stdout
    );
    let content: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    assert!(std::fs::read(&file).unwrap() == content);
}
