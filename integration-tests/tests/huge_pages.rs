//! `machine-config.huge_pages` end to end: what backs guest memory, and the idle trim that gives
//! the host back what transparent huge pages brought in around the pages the guest used.

use std::time::{Duration, Instant};

use integration_tests::bench::{Footprint, VmSpec, Vmm};
use integration_tests::Scratch;

const DEADLINE: Duration = Duration::from_secs(60);
const DONE: &str = "prescient-test-guest: done";
/// The idle trim looks once a second; a guest that just halted is trimmed within a few.
const TRIM_WAIT: Duration = Duration::from_secs(10);

fn idle_guest(huge_pages: Option<&str>, touch_mib: u64) -> VmSpec {
    let mut spec = VmSpec::test_guest(2, 256, &format!("cpu_ms=1 mem_mib={touch_mib} exit=halt"));
    spec.huge_pages = huge_pages.map(str::to_string);
    spec
}

/// Whether this host gives transparent huge pages to a region that asks (THP `madvise` or
/// `always`).
fn host_has_thp() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

#[test]
fn an_idle_guest_keeps_only_the_pages_it_used_and_the_vmm_stays_responsive() {
    let scratch = Scratch::new("huge-pages-trim");
    let prescient = Vmm::prescient();
    let small = scratch.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let four_k = prescient
        .spawn(Some(&idle_guest(Some("None"), 8)), &small, None)
        .unwrap();
    let api = scratch.path().join("api.sock");
    let huge = prescient
        .spawn(Some(&idle_guest(None, 8)), scratch.path(), Some(&api))
        .unwrap();
    huge.expect_prefix(DONE, DEADLINE);
    four_k.expect_prefix(DONE, DEADLINE);
    let at_done = Footprint::of(huge.pid());
    let reference = Footprint::of(four_k.pid()).anon_kib;
    assert_eq!(
        Footprint::of(four_k.pid()).anon_huge_kib,
        0,
        "huge_pages None takes no huge pages on a host whose THP is madvise or never"
    );
    if !host_has_thp() {
        println!("this host's THP is off: no huge pages, so nothing to trim");
        assert_eq!(at_done.anon_huge_kib, 0);
        return;
    }
    assert!(
        at_done.anon_huge_kib >= 4 << 10,
        "the default backs touched memory with huge pages: {at_done:?}"
    );
    let start = Instant::now();
    let settled = loop {
        let now = Footprint::of(huge.pid());
        if now.anon_kib <= reference + 512 || start.elapsed() > TRIM_WAIT {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        settled.anon_kib <= reference + 512,
        "after {:?} idle the VMM holds {} KiB of anonymous memory, 4 KiB pages would hold {reference} KiB \
         (at the guest's last line: {at_done:?})",
        start.elapsed(),
        settled.anon_kib
    );
    // The guest was paused for the trim and let go again: the VMM answers and the guest's
    // memory is still there (the used pages stay resident).
    let mut client = integration_tests::ApiClient::connect(&api);
    assert_eq!(client.request("GET", "/", None).json()["state"], "Running");
    assert!(settled.anon_kib >= 8 << 10, "{settled:?}");
}

#[test]
fn hugetlbfs_pages_come_from_the_host_pool_or_the_spec_is_refused_at_start() {
    let scratch = Scratch::new("huge-pages-2m");
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    let vm = Vmm::prescient()
        .spawn(Some(&idle_guest(Some("2M"), 8)), scratch.path(), None)
        .unwrap();
    if free >= 128 {
        vm.expect_prefix(DONE, DEADLINE);
        let f = Footprint::of(vm.pid());
        assert!(f.hugetlb_kib >= 8 << 10, "{f:?}");
        return;
    }
    let (status, stderr) = vm.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("huge_pages \"2M\"") && stderr.contains("vm.nr_hugepages"),
        "{stderr}"
    );
}

#[test]
fn odd_sizes_boot_with_transparent_pages_and_are_refused_with_hugetlbfs() {
    let scratch = Scratch::new("huge-pages-odd");
    let mut spec = idle_guest(None, 1);
    spec.mem_mib = 129;
    let vm = Vmm::prescient()
        .spawn(Some(&spec), scratch.path(), None)
        .unwrap();
    vm.expect_prefix(DONE, DEADLINE);
    drop(vm);
    spec.huge_pages = Some("2M".into());
    let (status, stderr) = Vmm::prescient()
        .spawn(Some(&spec), scratch.path(), None)
        .unwrap()
        .wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("machine-config.mem_size_mib")
            && stderr.contains("multiple of 2 MiB, got 129"),
        "{stderr}"
    );
}
