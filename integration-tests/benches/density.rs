//! Density: how many idle microVMs fit in 4 GiB of host memory, for prescient, Firecracker and
//! QEMU `-M microvm`, each in turn.
//!
//! The VMs run in a memory cgroup of their own (v1 `memory.limit_in_bytes` or v2 `memory.max`
//! at `DENSITY_LIMIT_MIB`, default 4096), so the count includes everything the host spends on a
//! VM: the VMM's memory, the guest's pages and the kernel's (KVM's vCPUs and page tables,
//! charged to the cgroup). Each VM boots the test guest (1 vCPU, 128 MiB, Firecracker's default
//! machine) which touches `DENSITY_TOUCH_MIB` (default 1) and halts. VMs are started one after
//! another; near the limit the host is left to settle (`SETTLE`) before the next, and the VMM
//! whose next VM would no longer fit, whose VM fails to boot, or that reaches `DENSITY_MAX_VMS`
//! (default 4000) stops there. The count is the VMs still running after a last settle.
//!
//! `cargo bench -p integration-tests --bench density` (needs root for the cgroup).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bench::{env_or, Footprint, Stat, Table, VmSpec, Vmm};
use integration_tests::Scratch;
use jailer::cgroup::{Cgroup, Mounts, Version};

const SETTLE: Duration = Duration::from_secs(3);
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
const DONE: &str = "prescient-test-guest: done";

/// A memory cgroup for one VMM's VMs, removed (with the VMs killed) when dropped.
struct Pen {
    cgroup: Cgroup,
    vms: Vec<(Child, PathBuf)>,
}

impl Pen {
    fn new(name: &str, limit_bytes: u64) -> Result<Pen, String> {
        let mounts = Mounts::current().map_err(|e| e.to_string())?;
        let relative = Path::new(name);
        let controllers = ["memory".to_string()];
        let cgroup = if mounts.v1_hierarchy("memory").is_ok() {
            Cgroup::create_v1(&mounts, &controllers, relative)
        } else if let Some((mount, _)) = &mounts.v2 {
            Cgroup::create_v2(mount, &controllers, relative)
        } else {
            return Err("no memory cgroup controller on this host".into());
        }
        .map_err(|e| format!("cannot create a memory cgroup (root needed): {e}"))?;
        let pen = Pen {
            cgroup,
            vms: Vec::new(),
        };
        pen.cgroup
            .set(pen.limit_file(), &limit_bytes.to_string())
            .map_err(|e| e.to_string())?;
        Ok(pen)
    }

    fn limit_file(&self) -> &'static str {
        match self.cgroup.version() {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// Bytes charged to the group now.
    fn usage(&self) -> u64 {
        let file = match self.cgroup.version() {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        self.cgroup
            .get(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Starts `cmd` inside the group (the shell joins it, then becomes the VMM, so every page
    /// the VMM ever takes is charged here), its console into `console`.
    fn start(&mut self, cmd: &Command, console: PathBuf) -> std::io::Result<()> {
        let procs = self.cgroup.dirs()[0].join("cgroup.procs");
        let mut wrapped = Command::new("sh");
        wrapped
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(procs)
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console)?)
            .stderr(Stdio::null());
        self.vms.push((wrapped.spawn()?, console));
        Ok(())
    }

    /// Waits until the newest VM's guest printed its last line; Err if its VMM ended first.
    fn wait_booted(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let (child, console) = self.vms.last_mut().expect("a VM was started");
        loop {
            let text = std::fs::read_to_string(&*console).unwrap_or_default();
            if text.contains(DONE) {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("a VMM ended while booting ({status})"));
            }
            if start.elapsed() > BOOT_DEADLINE {
                return Err(format!("a guest did not boot within {BOOT_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The VMs whose VMM is still running.
    fn alive(&mut self) -> Vec<u32> {
        self.vms
            .iter_mut()
            .filter_map(|(c, _)| matches!(c.try_wait(), Ok(None)).then(|| c.id()))
            .collect()
    }
}

impl Drop for Pen {
    fn drop(&mut self) {
        for (child, _) in &mut self.vms {
            let _ = child.kill();
        }
        for (child, _) in &mut self.vms {
            let _ = child.wait();
        }
        // The group empties a moment after its last task is reaped.
        for _ in 0..100 {
            if self.cgroup.remove().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("cgroup {:?} left behind", self.cgroup.dirs());
    }
}

/// One VMM's result.
struct Fill {
    vms: usize,
    charged_per_vm_kib: f64,
    rss_per_vm_kib: f64,
    stopped: String,
}

fn fill(vmm: &Vmm, spec: &VmSpec, dir: &Path, limit: u64, max_vms: u64) -> Result<Fill, String> {
    let name = format!(
        "prescient-density-{}-{}",
        std::process::id(),
        vmm.name().replace(' ', "-")
    );
    let mut pen = Pen::new(&name, limit)?;
    let cmd = vmm.command(Some(spec), dir, None)?;
    let mut last_step = 0u64;
    let stopped = loop {
        if pen.vms.len() as u64 >= max_vms {
            break format!("reached DENSITY_MAX_VMS={max_vms}");
        }
        let mut usage = pen.usage();
        if usage + 2 * last_step > limit {
            // Near the limit: let the VMs settle before deciding whether one more fits.
            std::thread::sleep(SETTLE);
            usage = pen.usage();
            if usage + last_step > limit {
                break "the next VM would not fit".to_string();
            }
        }
        let console = dir.join(format!("{name}-{}.console", pen.vms.len()));
        pen.start(&cmd, console).map_err(|e| e.to_string())?;
        if let Err(why) = pen.wait_booted() {
            break why;
        }
        last_step = pen.usage().saturating_sub(usage).max(last_step / 2);
    };
    std::thread::sleep(SETTLE);
    let alive = pen.alive();
    let n = alive.len().max(1) as f64;
    let rss: u64 = alive.iter().map(|pid| Footprint::of(*pid).host_kib()).sum();
    Ok(Fill {
        vms: alive.len(),
        charged_per_vm_kib: (pen.usage() >> 10) as f64 / n,
        rss_per_vm_kib: rss as f64 / n,
        stopped,
    })
}

fn main() {
    let limit_mib = env_or("DENSITY_LIMIT_MIB", 4096);
    let touch = env_or("DENSITY_TOUCH_MIB", 1);
    let max_vms = env_or("DENSITY_MAX_VMS", 4000);
    let scratch = Scratch::new("density-bench");
    let vmms = Vmm::all();
    let spec = VmSpec::test_guest(1, 128, &format!("cpu_ms=1 mem_mib={touch} exit=halt"));
    // One boot of each outside the cgroup first, so that the binaries and the guest image are
    // in the page cache, charged elsewhere, for every VMM alike.
    for vmm in &vmms {
        let vm = vmm.spawn(Some(&spec), scratch.path(), None).unwrap();
        vm.expect_prefix(DONE, BOOT_DEADLINE);
    }
    let results: Vec<Result<Fill, String>> = vmms
        .iter()
        .map(|vmm| fill(vmm, &spec, scratch.path(), limit_mib << 20, max_vms))
        .collect();
    let mut t = Table::new(
        format!(
            "density: idle VMs (1 vCPU, 128 MiB, guest touched {touch} MiB then halted) in a memory cgroup \
             of {limit_mib} MiB, one VMM after another"
        ),
        &vmms,
    );
    let cells = |f: &dyn Fn(&Fill) -> f64| -> Vec<Result<Stat, String>> {
        results
            .iter()
            .map(|r| {
                r.as_ref()
                    .map(|fill| Stat::of(&[f(fill)]))
                    .map_err(Clone::clone)
            })
            .collect()
    };
    t.row("VMs that fit", cells(&|f| f.vms as f64));
    t.row(
        "host memory per VM (cgroup, MiB)",
        cells(&|f| f.charged_per_vm_kib / 1024.0),
    );
    t.row(
        "VMM RSS per VM (MiB)",
        cells(&|f| f.rss_per_vm_kib / 1024.0),
    );
    for (vmm, r) in vmms.iter().zip(&results) {
        if let Ok(f) = r {
            t.note(format!("{}: stopped: {}", vmm.name(), f.stopped));
        }
    }
    t.note(format!(
        "counted {} s after the last start; the cgroup charges the VMMs' and guests' pages and \
         the kernel's memory for each VM",
        SETTLE.as_secs()
    ));
    t.print();
}
