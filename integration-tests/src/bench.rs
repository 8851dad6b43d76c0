//! What the benchmarks share: the VMMs they compare (prescient, and as references Firecracker and
//! QEMU `-M microvm`) booting the same guest from one description, how a VMM's memory is read,
//! runs alternated between the VMMs, medians with their spread, and tables with ratios.
//!
//! Firecracker is the release build at `../shared/anchors/firecracker/firecracker` (see its
//! README) or wherever `FIRECRACKER_BIN` points; QEMU is Debian's `qemu-system-x86_64`. A missing
//! reference drops its column, and the table says why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::console::Console;
use crate::{prescient_bin, TEST_GUEST_PVH};

/// Names the Firecracker binary to compare with, instead of the shared anchor.
pub const FIRECRACKER_ENV: &str = "FIRECRACKER_BIN";

/// A VMM a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prescient,
    Firecracker,
    Qemu,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Prescient => "prescient",
            Kind::Firecracker => "firecracker",
            Kind::Qemu => "qemu microvm",
        }
    }

    /// The short name ratio columns use.
    fn short(self) -> &'static str {
        match self {
            Kind::Prescient => "p",
            Kind::Firecracker => "fc",
            Kind::Qemu => "qemu",
        }
    }
}

/// The Firecracker binary: `$FIRECRACKER_BIN`, else the shared anchor beside the checkout.
pub fn firecracker_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(FIRECRACKER_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{FIRECRACKER_ENV}={} is not a file", p.display()))
        };
    }
    let beside_checkout =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/anchors/firecracker/firecracker");
    [
        beside_checkout,
        PathBuf::from("/work/shared/anchors/firecracker/firecracker"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        format!(
            "no Firecracker binary (set {FIRECRACKER_ENV}, or put a release build at \
             ../shared/anchors/firecracker/firecracker beside the checkout)"
        )
    })
}

/// One VMM binary a benchmark can start.
#[derive(Debug, Clone)]
pub struct Vmm {
    pub kind: Kind,
    bin: PathBuf,
}

impl Vmm {
    pub fn prescient() -> Vmm {
        Vmm {
            kind: Kind::Prescient,
            bin: prescient_bin().to_path_buf(),
        }
    }

    pub fn firecracker() -> Result<Vmm, String> {
        Ok(Vmm {
            kind: Kind::Firecracker,
            bin: firecracker_path()?,
        })
    }

    pub fn qemu() -> Result<Vmm, String> {
        let ok = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err("qemu-system-x86_64 not found (Debian's qemu-system-x86)".into());
        }
        Ok(Vmm {
            kind: Kind::Qemu,
            bin: PathBuf::from("qemu-system-x86_64"),
        })
    }

    /// prescient and every reference this host has (in that order), printing one line for each
    /// reference that is missing and why.
    pub fn all() -> Vec<Vmm> {
        Self::with(&[Kind::Firecracker, Kind::Qemu])
    }

    /// prescient and the `references` this host has, printing why any is missing.
    pub fn with(references: &[Kind]) -> Vec<Vmm> {
        let mut vmms = vec![Vmm::prescient()];
        for kind in references {
            let found = match kind {
                Kind::Prescient => continue,
                Kind::Firecracker => Vmm::firecracker(),
                Kind::Qemu => Vmm::qemu(),
            };
            match found {
                Ok(v) => vmms.push(v),
                Err(why) => println!("{}: not run: {why}", kind.name()),
            }
        }
        vmms
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// This VMM run from a fresh copy of its binary in `dir`, all of whose pages are in the
    /// page cache (QEMU, a system binary whose shared libraries dominate, runs as it is).
    ///
    /// A process's resident pages of its binary depend on which of the file's pages the page
    /// cache holds: the kernel maps the cached neighbours of each page it faults in (fault
    /// around, 64 KiB). A binary just linked is all there; one installed long ago only where
    /// it was read, so its VMM looks ~0.3 MiB smaller. Memory benchmarks compare the VMMs from
    /// copies made alike.
    pub fn fresh_copy(&self, dir: &Path) -> Result<Vmm, String> {
        if self.kind == Kind::Qemu {
            return Ok(self.clone());
        }
        let copy = dir.join(format!("{}-bin", self.kind.short()));
        let _ = std::fs::remove_file(&copy);
        std::fs::copy(&self.bin, &copy)
            .map_err(|e| format!("copy {} to {}: {e}", self.bin.display(), copy.display()))?;
        Ok(Vmm {
            kind: self.kind,
            bin: copy,
        })
    }

    /// The command that starts this VMM: booting `spec` at once if given (its config is written
    /// into `dir`), serving its API on `api` if given (QEMU: QMP).
    pub fn command(
        &self,
        spec: Option<&VmSpec>,
        dir: &Path,
        api: Option<&Path>,
    ) -> Result<Command, String> {
        let mut c = Command::new(&self.bin);
        match self.kind {
            Kind::Prescient | Kind::Firecracker => {
                if let Some(spec) = spec {
                    let file = dir.join(format!("{}.json", self.kind.short()));
                    let mut json = spec.config_json();
                    if let (Kind::Prescient, Some(acpi)) = (self.kind, spec.acpi) {
                        json["machine-config"]["acpi"] = acpi.into();
                    }
                    std::fs::write(&file, json.to_string())
                        .map_err(|e| format!("write {}: {e}", file.display()))?;
                    c.arg("--config-file").arg(file);
                }
                match (self.kind, api) {
                    (_, Some(sock)) => {
                        let _ = std::fs::remove_file(sock);
                        c.arg("--api-sock").arg(sock);
                    }
                    (Kind::Firecracker, None) => {
                        c.arg("--no-api");
                    }
                    _ => {}
                }
                if self.kind == Kind::Firecracker {
                    c.args(["--level", "Error"]);
                }
            }
            Kind::Qemu => {
                let spec = spec.ok_or("QEMU needs a VM to boot")?;
                c.args(spec.qemu_args()?);
                if let Some(sock) = api {
                    let _ = std::fs::remove_file(sock);
                    c.arg("-qmp")
                        .arg(format!("unix:{},server=on,wait=off", sock.display()));
                }
            }
        }
        Ok(c)
    }

    /// Starts this VMM (see [`Vmm::command`]) with its console read as it arrives.
    pub fn spawn(
        &self,
        spec: Option<&VmSpec>,
        dir: &Path,
        api: Option<&Path>,
    ) -> Result<Console, String> {
        let mut cmd = self.command(spec, dir, api)?;
        Ok(Console::spawn(self.name(), &mut cmd))
    }
}

/// A benchmark setting from the environment (`name`), or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The host's TSC rate in kHz, measured once against the monotonic clock over 200 ms.
///
/// The test guest times its work with the TSC at a rate it calibrates against the PIT, and
/// under Firecracker on a loaded host that calibration is off by up to 2.4x (the guest's
/// README, *TSC*): every guest-timed result would be off by as much. The guests' TSC is the
/// host's, so the benchmarks tell every guest this rate instead ([`guest_clock_arg`]).
pub fn host_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(|| {
        // A (time, TSC) pair read as close together as a few tries allow, so that no
        // preemption falls between the two reads.
        let pair = || {
            (0..64)
                .map(|_| {
                    let before = Instant::now();
                    // SAFETY: RDTSC has no side effects; every x86_64 CPU has it.
                    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
                    let after = Instant::now();
                    (after - before, before + (after - before) / 2, tsc)
                })
                .min_by_key(|p| p.0)
                .expect("64 tries")
        };
        let (_, t0, c0) = pair();
        std::thread::sleep(Duration::from_millis(200));
        let (_, t1, c1) = pair();
        ((c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1000.0).round() as u64
    })
}

/// The test guest's `tsc_khz=` parameter with the host's TSC rate ([`host_tsc_khz`]).
pub fn guest_clock_arg() -> String {
    format!("tsc_khz={}", host_tsc_khz())
}

/// Runs `measure` on each VMM in turn, `rounds` times, so that host noise falls on all of them
/// alike; returns each VMM's results in `vmms` order.
pub fn alternate<T>(
    vmms: &[Vmm],
    rounds: usize,
    mut measure: impl FnMut(&Vmm) -> T,
) -> Vec<Vec<T>> {
    let mut results: Vec<Vec<T>> = vmms.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (vmm, out) in vmms.iter().zip(&mut results) {
            out.push(measure(vmm));
        }
    }
    results
}

/// A guest every VMM boots alike: the same kernel, command line, memory and devices.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub args: String,
    /// Writable virtio-blk disks (not the root device).
    pub drives: Vec<PathBuf>,
    /// vhost-user-block disks after `drives`: the sockets their backends listen on.
    pub vhost_user_drives: Vec<PathBuf>,
    /// A vsock device (guest CID 3) with Firecracker's Unix-socket host side here.
    pub vsock_uds: Option<PathBuf>,
    /// A balloon starting empty (deflate on OOM, statistics every second).
    pub balloon: bool,
    /// A virtio-mem region of this many MiB.
    pub hotplug_mib: Option<u64>,
    /// `machine-config.huge_pages` for prescient and Firecracker; None leaves each VMM's default.
    pub huge_pages: Option<String>,
    /// The drives' `io_engine` for prescient and Firecracker (`Sync`, `Async`); None leaves the
    /// default (Sync). QEMU's drives keep their own engine.
    pub io_engine: Option<String>,
    /// prescient's `machine-config.acpi` (None: its default, ACPI tables). Firecracker always
    /// gives ACPI tables and has no such field; QEMU runs with `acpi=off` as the test guest and
    /// the project's Linux kernel (built without ACPI) need.
    pub acpi: Option<bool>,
}

impl VmSpec {
    /// The test guest (PVH) with `args`, told the host's TSC rate ([`guest_clock_arg`]).
    pub fn test_guest(vcpus: u8, mem_mib: u64, args: &str) -> VmSpec {
        VmSpec {
            kernel: PathBuf::from(TEST_GUEST_PVH),
            initrd: None,
            vcpus,
            mem_mib,
            args: format!("{args} {}", guest_clock_arg()),
            drives: Vec::new(),
            vhost_user_drives: Vec::new(),
            vsock_uds: None,
            balloon: false,
            hotplug_mib: None,
            huge_pages: None,
            io_engine: None,
            acpi: None,
        }
    }

    /// The VM as a Firecracker config file, which prescient reads too.
    pub fn config_json(&self) -> serde_json::Value {
        let mut boot = serde_json::json!({
            "kernel_image_path": self.kernel,
            "boot_args": self.args,
        });
        if let Some(initrd) = &self.initrd {
            boot["initrd_path"] = serde_json::json!(initrd);
        }
        let mut machine =
            serde_json::json!({"vcpu_count": self.vcpus, "mem_size_mib": self.mem_mib});
        if let Some(pages) = &self.huge_pages {
            machine["huge_pages"] = serde_json::json!(pages);
        }
        let drives: Vec<_> = self
            .drives
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let mut drive = serde_json::json!({
                    "drive_id": format!("disk{i}"),
                    "path_on_host": path,
                    "is_root_device": false,
                    "is_read_only": false,
                });
                if let Some(engine) = &self.io_engine {
                    drive["io_engine"] = serde_json::json!(engine);
                }
                drive
            })
            .chain(
                self.vhost_user_drives
                    .iter()
                    .enumerate()
                    .map(|(i, socket)| {
                        serde_json::json!({
                            "drive_id": format!("vu{i}"),
                            "socket": socket,
                            "is_root_device": false,
                        })
                    }),
            )
            .collect();
        let mut spec = serde_json::json!({
            "boot-source": boot,
            "machine-config": machine,
            "drives": drives,
        });
        if let Some(uds) = &self.vsock_uds {
            spec["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": uds});
        }
        if self.balloon {
            spec["balloon"] = serde_json::json!({
                "amount_mib": 0,
                "deflate_on_oom": true,
                "stats_polling_interval_s": 1,
            });
        }
        if let Some(mib) = self.hotplug_mib {
            spec["memory-hotplug"] = serde_json::json!({"total_size_mib": mib});
        }
        spec
    }

    /// The same VM as QEMU `-M microvm` arguments (console on stdout, the i8042 the guests reset
    /// through, modern virtio-mmio devices announced on the command line), or why QEMU cannot
    /// run it.
    pub fn qemu_args(&self) -> Result<Vec<String>, String> {
        if self.vsock_uds.is_some() {
            return Err(format!(
                "QEMU's vsock is vhost-vsock: its host side is AF_VSOCK in the host kernel, not \
                 Firecracker's Unix-socket protocol (and /dev/vhost-vsock is {} here)",
                if Path::new("/dev/vhost-vsock").exists() {
                    "present"
                } else {
                    "absent"
                }
            ));
        }
        if !self.vhost_user_drives.is_empty() {
            return Err("vhost-user drives are not set up for QEMU here (it needs \
                        shared memory backends and chardevs of its own)"
                .into());
        }
        if self.hotplug_mib.is_some() {
            return Err(
                "QEMU 7.2's virtio-mem on -M microvm gets no device-memory region \
                        (the guest reads addr=0x0); virtio-mem-pci needs a PCI guest"
                    .into(),
            );
        }
        // The default CPU model: `-cpu host` aborts on hosts whose KVM refuses MSR 0x10a.
        let mut a: Vec<String> = [
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-accel",
            "kvm",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-device",
            "i8042",
            "-global",
            "virtio-mmio.force-legacy=false",
        ]
        .map(String::from)
        .into();
        a.extend([
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            self.mem_mib.to_string(),
        ]);
        for (i, path) in self.drives.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "if=none,id=d{i},format=raw,file={}",
                path.display()
            ));
            a.push("-device".into());
            a.push(format!("virtio-blk-device,drive=d{i}"));
        }
        if self.balloon {
            a.push("-device".into());
            a.push("virtio-balloon-device,deflate-on-oom=on".into());
        }
        a.push("-kernel".into());
        a.push(self.kernel.display().to_string());
        if let Some(initrd) = &self.initrd {
            a.push("-initrd".into());
            a.push(initrd.display().to_string());
        }
        a.push("-append".into());
        a.push(self.args.clone());
        Ok(a)
    }
}

/// A process's memory as the host sees it, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Resident pages (VmRSS): anonymous and file-backed, without hugetlbfs pages.
    pub rss_kib: u64,
    /// Proportional set size: each resident page divided by the processes that map it (the
    /// binary's text shared by every VMM counts once over all of them).
    pub pss_kib: u64,
    /// Of those, anonymous (private) pages: what this process alone costs.
    pub anon_kib: u64,
    /// Of the anonymous pages, the ones in transparent huge pages.
    pub anon_huge_kib: u64,
    /// hugetlbfs pages mapped, which VmRSS leaves out.
    pub hugetlb_kib: u64,
}

impl Footprint {
    /// Reads `/proc/<pid>/smaps_rollup` and `/proc/<pid>/status`.
    pub fn of(pid: u32) -> Footprint {
        Self::try_of(pid).unwrap_or_else(|e| panic!("/proc/{pid}: {e}"))
    }

    /// As [`Footprint::of`], for a process that may have ended.
    pub fn try_of(pid: u32) -> std::io::Result<Footprint> {
        let field = |text: &str, name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(Footprint {
            rss_kib: field(&rollup, "Rss"),
            pss_kib: field(&rollup, "Pss"),
            anon_kib: field(&rollup, "Anonymous"),
            anon_huge_kib: field(&rollup, "AnonHugePages"),
            hugetlb_kib: field(&status, "HugetlbPages"),
        })
    }

    /// Resident memory including hugetlbfs pages: what the host gives this process.
    pub fn host_kib(&self) -> u64 {
        self.rss_kib + self.hugetlb_kib
    }
}

/// Resident KiB of `pid` outside its guest RAM: the VMM's own memory. Guest RAM is the run of
/// adjacent anonymous mappings that adds up to `guest_mib` exactly (prescient's idle trim splits
/// it into several), else to at most 4 MiB more (QEMU pads its RAM block for alignment).
pub fn resident_outside_guest_ram(pid: u32, guest_mib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    // (start, end, anonymous, resident KiB) per mapping.
    let mut maps: Vec<(u64, u64, bool, u64)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                // Anonymous: no name, or hugetlbfs's name for anonymous huge pages.
                let name = words.nth(4);
                let anon = name.is_none_or(|n| n == "/anon_hugepage");
                maps.push((start, end, anon, 0));
                continue;
            }
        }
        if let (Some("Rss:"), Some(kib), Some(last)) = (Some(first), words.next(), maps.last_mut())
        {
            last.3 = kib.parse().unwrap_or(0);
        }
    }
    let total: u64 = maps.iter().map(|m| m.3).sum();
    let want = guest_mib << 20;
    let find = |slack: u64| {
        (0..maps.len()).find_map(|i| {
            let mut size = 0;
            let mut rss = 0;
            for j in i..maps.len() {
                let (start, end, anon, kib) = maps[j];
                if !anon || (j > i && maps[j - 1].1 != start) {
                    return None;
                }
                size += end - start;
                rss += kib;
                if (want..=want + slack).contains(&size) {
                    return Some(rss);
                }
                if size > want + slack {
                    return None;
                }
            }
            None
        })
    };
    let guest = find(0)
        .or_else(|| find(4 << 20))
        .unwrap_or_else(|| panic!("no guest RAM of {guest_mib} MiB found in /proc/{pid}/smaps"));
    total - guest
}

/// The median of a benchmark's runs with their range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// Panics on an empty list (a benchmark that measured nothing is a bug).
    pub fn of(values: &[f64]) -> Stat {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).expect("measurements are numbers"));
        Stat {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// Formats `x` with about three significant digits.
fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// One measurement of one VMM in a table: a value, or why it has none.
pub type Cell = Result<Stat, String>;

/// A benchmark's table: one column per VMM (median and range), then prescient's ratio to each
/// reference (of the medians).
pub struct Table {
    title: String,
    kinds: Vec<Kind>,
    rows: Vec<(String, Vec<Cell>)>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, vmms: &[Vmm]) -> Table {
        Table {
            title: title.into(),
            kinds: vmms.iter().map(|v| v.kind).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A row: one cell per VMM, in the order the table was made with.
    pub fn row(&mut self, metric: impl Into<String>, cells: Vec<Cell>) {
        assert_eq!(cells.len(), self.kinds.len(), "one cell per VMM");
        self.rows.push((metric.into(), cells));
    }

    /// A row from each VMM's raw measurements (`per_vmm[i]` for the i-th VMM).
    pub fn row_of(&mut self, metric: impl Into<String>, per_vmm: &[Vec<f64>]) {
        let cells = per_vmm
            .iter()
            .map(|v| {
                if v.is_empty() {
                    Err("not measured".to_string())
                } else {
                    Ok(Stat::of(v))
                }
            })
            .collect();
        self.row(metric, cells);
    }

    /// A line printed under the table.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let refs: Vec<Kind> = self.kinds[1..].to_vec();
        let mut header = vec!["".to_string()];
        header.extend(self.kinds.iter().map(|k| k.name().to_string()));
        header.extend(refs.iter().map(|k| format!("p/{}", k.short())));
        let mut lines = vec![header];
        let mut reasons: Vec<String> = Vec::new();
        for (metric, cells) in &self.rows {
            let mut line = vec![metric.clone()];
            for cell in cells {
                line.push(match cell {
                    Ok(s) if s.min == s.max => num(s.median),
                    Ok(s) => format!("{} ({}-{})", num(s.median), num(s.min), num(s.max)),
                    Err(why) => {
                        let i = match reasons.iter().position(|r| r == why) {
                            Some(i) => i,
                            None => {
                                reasons.push(why.clone());
                                reasons.len() - 1
                            }
                        };
                        format!("n/a ({})", i + 1)
                    }
                });
            }
            for i in 1..self.kinds.len() {
                line.push(match (&cells[0], &cells[i]) {
                    (Ok(p), Ok(r)) if r.median != 0.0 => format!("{:.2}", p.median / r.median),
                    _ => "-".into(),
                });
            }
            lines.push(line);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = format!("{}\n", self.title);
        for l in &lines {
            let cols: Vec<String> = l
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if c == 0 {
                        format!("{s:<w$}", w = widths[c])
                    } else {
                        format!("{s:>w$}", w = widths[c])
                    }
                })
                .collect();
            out.push_str(cols.join("  ").trim_end());
            out.push('\n');
        }
        for (i, r) in reasons.iter().enumerate() {
            out.push_str(&format!("({}) {r}\n", i + 1));
        }
        for n in &self.notes {
            out.push_str(n);
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        println!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_tsc_rate_is_measured_and_told_to_every_test_guest() {
        let khz = host_tsc_khz();
        assert!((100_000..=10_000_000).contains(&khz), "{khz} kHz");
        let spec = VmSpec::test_guest(1, 128, "cpu_ms=1");
        assert_eq!(spec.args, format!("cpu_ms=1 tsc_khz={khz}"));
        assert!(spec.config_json()["boot-source"]["boot_args"]
            .as_str()
            .unwrap()
            .ends_with(&format!("tsc_khz={khz}")));
    }

    #[test]
    fn stats_take_the_middle_and_the_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0, 4.0]);
        assert_eq!(
            s,
            Stat {
                median: 3.0,
                min: 1.0,
                max: 10.0
            }
        );
    }

    #[test]
    fn tables_show_ratios_to_each_reference_and_explain_what_is_missing() {
        let mut t = Table {
            title: "t".into(),
            kinds: vec![Kind::Prescient, Kind::Firecracker, Kind::Qemu],
            rows: Vec::new(),
            notes: Vec::new(),
        };
        t.row_of("ms", &[vec![10.0, 12.0, 11.0], vec![20.0], vec![5.0, 5.0]]);
        t.row(
            "MiB/s",
            vec![
                Ok(Stat::of(&[4.0])),
                Ok(Stat::of(&[2.0])),
                Err("QEMU cannot".into()),
            ],
        );
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("p/fc") && lines[1].contains("p/qemu"),
            "{text}"
        );
        assert!(lines[2].starts_with("ms"), "{text}");
        assert!(lines[2].contains("11.0 (10.0-12.0)"), "{text}");
        let tail: Vec<&str> = lines[2].split_whitespace().rev().take(2).collect();
        assert_eq!(tail, ["2.20", "0.55"], "{text}");
        assert!(lines[3].contains("n/a (1)"), "{text}");
        let tail: Vec<&str> = lines[3].split_whitespace().rev().take(2).collect();
        assert_eq!(tail, ["-", "2.00"], "{text}");
        assert_eq!(lines[4], "(1) QEMU cannot");
    }

    #[test]
    fn the_same_spec_is_a_firecracker_config_and_qemu_arguments() {
        let mut spec = VmSpec::test_guest(2, 256, "cpu_ms=1");
        spec.drives.push(PathBuf::from("/tmp/d.img"));
        spec.balloon = true;
        let json = spec.config_json();
        assert_eq!(json["machine-config"]["vcpu_count"], 2);
        assert_eq!(json["drives"][0]["path_on_host"], "/tmp/d.img");
        assert_eq!(json["balloon"]["amount_mib"], 0);
        assert!(json.get("vsock").is_none());
        let args = spec.qemu_args().unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("-smp 2 -m 256"), "{joined}");
        assert!(
            joined.contains("file=/tmp/d.img") && joined.contains("virtio-balloon-device"),
            "{joined}"
        );
        spec.vsock_uds = Some(PathBuf::from("/tmp/v.sock"));
        assert!(spec.qemu_args().unwrap_err().contains("vhost-vsock"));
    }
}
