//! `prescient profile`: static analysis of the workload's files plus a short dry run of the VM
//! in a locked-down probe (this binary re-executed on a derived spec: no network, no vsock,
//! drives copied or read-only, console to a file, the predictor recording a trace with its CPU
//! and I/O allocations pinned at the VM's size so that the probe measures demand, not a
//! throttled version of it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use predictor::sample::Sample;
use predictor::trace::TraceError;

use super::elf::{self, ElfError, SENSITIVE_SYSCALLS};
use super::scrape::DriveScraper;
use super::{
    describe_inputs, fingerprint, input_paths, IoIntensity, MemoryFootprint, Percentiles,
    ProbeInfo, Profile, ProfileError, SecurityFlag, StaticAnalysis, VERSION,
};
use crate::vmm_config::{
    BudgetConfig, PredictorConfig, Range, SerialConfig, SpecFileError, VmConfig,
    DEFAULT_IO_MAX_MIBPS,
};

/// Drives up to this size are copied for the probe (so that it may write); larger ones are
/// attached read-only.
const COPY_LIMIT: u64 = 1 << 30;
/// The probe's window: short, so that a few seconds give enough samples for percentiles.
const PROBE_WINDOW_MS: u64 = 100;
/// How long a SIGTERMed probe gets to end before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// The VM spec of the workload to profile.
    #[arg(long, value_name = "PATH")]
    pub config_file: PathBuf,
    /// Seconds of the dry run (the probe also ends when the guest does).
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    pub duration: f64,
    /// Where to write the profile (JSON).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// The guest executable the workload runs, for static analysis and the fingerprint.
    #[arg(long, value_name = "PATH")]
    pub guest_exec: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Spec(#[from] SpecFileError),
    #[error(
        "drive {0} is a vhost-user drive: the probe works on copies of the disks and cannot copy \
         what a backend serves"
    )]
    VhostUser(String),
    #[error("{0}")]
    Profile(#[from] ProfileError),
    #[error("--duration must be a positive number of seconds, got {0}")]
    Duration(f64),
    #[error("{path}: {source}")]
    Elf { path: PathBuf, source: ElfError },
    #[error("probe workspace {path}: {source}")]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the probe VM: {0}")]
    Spawn(std::io::Error),
    #[error("the probe VM failed (exit code {code:?}): {stderr}")]
    Failed { code: Option<i32>, stderr: String },
    #[error("the probe's trace {path}: {source}")]
    Trace { path: PathBuf, source: TraceError },
    #[error("the probe recorded no window in {0:.1} s: nothing to measure")]
    NoWindows(f64),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ProbeError {
    /// Whether the user's input was wrong (exit code 2) rather than the probe failing.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ProbeError::Spec(_)
                | ProbeError::Duration(_)
                | ProbeError::Elf { .. }
                | ProbeError::Profile(ProfileError::NoKernel | ProfileError::Read { .. })
        )
    }
}

/// A temporary directory removed when dropped.
struct Workspace(PathBuf);

impl Workspace {
    fn new() -> Result<Self, ProbeError> {
        let path = std::env::temp_dir().join(format!("prescient-probe-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| ProbeError::Workspace {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The probe's spec: the workload's, locked down and recording.
fn derive_spec(config: &VmConfig, dir: &Path) -> Result<VmConfig, ProbeError> {
    let mut probe = config.clone();
    probe.network_interfaces.clear();
    probe.vsock = None;
    probe.serial = Some(SerialConfig {
        serial_out_path: Some(dir.join("console.log")),
        rate_limiter: None,
    });
    for d in &mut probe.drives {
        if d.socket.is_some() {
            return Err(ProbeError::VhostUser(d.drive_id.clone()));
        }
        let size = std::fs::metadata(&d.path_on_host).map_or(u64::MAX, |m| m.len());
        if size <= COPY_LIMIT {
            let copy = dir.join(format!("drive-{}", d.drive_id));
            std::fs::copy(&d.path_on_host, &copy).map_err(|source| ProbeError::Workspace {
                path: copy.clone(),
                source,
            })?;
            d.path_on_host = copy;
        } else {
            d.is_read_only = true;
        }
    }
    let vcpus = f64::from(config.machine_config.vcpu_count);
    let io = Range {
        min: DEFAULT_IO_MAX_MIBPS,
        max: DEFAULT_IO_MAX_MIBPS,
    };
    probe.predictor = Some(PredictorConfig {
        window_ms: PROBE_WINDOW_MS,
        budget: BudgetConfig {
            cpu_cores: Some(Range {
                min: vcpus,
                max: vcpus,
            }),
            blk_mibps: Some(io),
            net_mibps: Some(io),
            memory_mib: None,
        },
        anomaly: crate::vmm_config::AnomalyResponse {
            action: predictor::policy::Action::Log,
            ..Default::default()
        },
        trace_path: Some(dir.join("trace.jsonl")),
        ..PredictorConfig::default()
    });
    Ok(probe)
}

/// Runs the probe VM until it ends or `duration` passes (then SIGTERM), and says how it ended.
fn run_probe(
    spec: &Path,
    dir: &Path,
    duration: Duration,
    drives: Vec<String>,
) -> Result<(String, Vec<f64>, DriveScraper), ProbeError> {
    let exe = std::env::current_exe().map_err(ProbeError::Spawn)?;
    let stderr_path = dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).map_err(|source| ProbeError::Workspace {
        path: stderr_path.clone(),
        source,
    })?;
    let socket = dir.join("api.sock");
    let mut child = Command::new(exe)
        .arg("--config-file")
        .arg(spec)
        .arg("--api-sock")
        .arg(&socket)
        .args(["--id", &format!("probe-{}", std::process::id())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(ProbeError::Spawn)?;
    let start = Instant::now();
    let mut demand = DemandSampler::new(child.id());
    let mut scraper = DriveScraper::new(socket, drives);
    let status = loop {
        if demand.tick() {
            scraper.tick();
        }
        if let Some(s) = child.try_wait().map_err(ProbeError::Spawn)? {
            break (s, false);
        }
        if start.elapsed() >= duration {
            break (stop(&mut child)?, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let code = status.0.code();
    let ended = match (code, status.1) {
        (Some(0), _) => Ok(format!(
            "guest exited (code 0) after {:.1} s",
            start.elapsed().as_secs_f64()
        )),
        (Some(c), true) if c == 128 + libc::SIGTERM => {
            Ok(format!("stopped after {:.1} s", duration.as_secs_f64()))
        }
        _ => Err(ProbeError::Failed {
            code,
            stderr: std::fs::read_to_string(&stderr_path)
                .unwrap_or_default()
                .trim()
                .to_string(),
        }),
    }?;
    Ok((ended, demand.values, scraper))
}

/// SIGTERM, then SIGKILL after the grace period.
fn stop(child: &mut Child) -> Result<std::process::ExitStatus, ProbeError> {
    // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let asked = Instant::now();
    loop {
        if let Some(s) = child.try_wait().map_err(ProbeError::Spawn)? {
            return Ok(s);
        }
        if asked.elapsed() > STOP_GRACE {
            let _ = child.kill();
            return child.wait().map_err(ProbeError::Spawn);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU demand of the probe's vCPU threads, from the scheduler's own accounting: time on a CPU
/// plus time runnable on a run queue (`/proc/<pid>/task/<tid>/schedstat`). On a busy host a
/// vCPU that spins gets only part of a core, yet it wants all of it: that is its demand.
struct DemandSampler {
    pid: u32,
    last: std::collections::HashMap<String, u64>,
    at: Instant,
    /// vCPU-seconds wanted per second, one value per period.
    values: Vec<f64>,
}

/// Sampling period of [`DemandSampler`].
const DEMAND_PERIOD: Duration = Duration::from_millis(100);

/// Running plus run-queue time, ns, from a schedstat line (`run_ns wait_ns timeslices`).
fn wanted_ns(schedstat: &str) -> Option<u64> {
    let mut f = schedstat.split_whitespace().map(str::parse::<u64>);
    Some(f.next()?.ok()? + f.next()?.ok()?)
}

impl DemandSampler {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            last: Default::default(),
            at: Instant::now(),
            values: Vec::new(),
        }
    }

    /// Records a period's demand once one has passed; says whether a period passed.
    fn tick(&mut self) -> bool {
        let elapsed = self.at.elapsed();
        if elapsed < DEMAND_PERIOD {
            return false;
        }
        self.at = Instant::now();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return true;
        };
        let mut wanted = 0;
        let mut now = std::collections::HashMap::new();
        for task in tasks.flatten() {
            let dir = task.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !comm.starts_with(crate::vstate::vcpu::THREAD_NAME_PREFIX) {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
            let Some(ns) = wanted_ns(&stat) else { continue };
            let key = task.file_name().to_string_lossy().into_owned();
            // A vCPU seen for the first time only sets its baseline.
            if let Some(before) = self.last.get(&key) {
                wanted += ns.saturating_sub(*before);
            }
            now.insert(key, ns);
        }
        if !self.last.is_empty() {
            self.values
                .push(wanted as f64 / elapsed.as_nanos().max(1) as f64);
        }
        self.last = now;
        true
    }
}

/// The behaviour the probe's windows show.
pub struct Measured {
    pub cpu_used: Percentiles,
    pub memory: MemoryFootprint,
    pub blk: Percentiles,
    pub ops_per_s: Percentiles,
    pub unknown_exits: u64,
}

pub fn measure(samples: &[Sample], window_ms: u64) -> Measured {
    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let mem = col(|s| s.usage.mem);
    let peak = mem.iter().copied().fold(0.0, f64::max);
    // The boot's few MiB are not the workload's working set.
    let first_touch = mem.iter().position(|&m| m >= peak * 0.1).unwrap_or(0);
    let window_s = window_ms as f64 / 1000.0;
    Measured {
        cpu_used: Percentiles::of(&col(|s| s.usage.cpu)),
        memory: MemoryFootprint {
            peak_mib: peak,
            working_set_mib: Percentiles::of(&mem[first_touch..]).p50,
        },
        // While the device is busy: a workload that writes for a second of ten is a 20 MiB/s
        // writer, not a 2 MiB/s one.
        blk: Percentiles::of(
            &col(|s| s.usage.blk)
                .into_iter()
                .filter(|&b| b > 0.0)
                .collect::<Vec<_>>(),
        ),
        ops_per_s: Percentiles::of(
            &samples
                .iter()
                .map(|s| s.signals.io_ops as f64 / window_s)
                .collect::<Vec<_>>(),
        ),
        unknown_exits: samples.iter().map(|s| s.signals.unknown_exits).sum(),
    }
}

fn analyze_file(path: &Path) -> Result<elf::ElfSummary, ProbeError> {
    let bytes = std::fs::read(path).map_err(|source| ProfileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    elf::analyze(&bytes).map_err(|source| ProbeError::Elf {
        path: path.to_path_buf(),
        source,
    })
}

/// Flags from the static analysis and the probe.
fn security_flags(analysis: &StaticAnalysis, unknown_exits: u64) -> Vec<SecurityFlag> {
    let mut flags = Vec::new();
    if unknown_exits > 0 {
        flags.push(SecurityFlag {
            flag: "unknown_port_or_mmio".into(),
            detail: format!(
                "{unknown_exits} port/MMIO exits to addresses no device owns during the probe"
            ),
        });
    }
    let binaries = [
        ("kernel", Some(&analysis.kernel)),
        ("exec", analysis.exec.as_ref()),
    ];
    for (role, summary) in binaries {
        let Some(s) = summary else { continue };
        if s.writable_executable && role == "exec" {
            flags.push(SecurityFlag {
                flag: "writable_executable".into(),
                detail: "a loadable segment (or the stack) is both writable and executable".into(),
            });
        }
        for call in s.syscalls.iter().flatten() {
            if SENSITIVE_SYSCALLS.contains(&call.as_str()) {
                flags.push(SecurityFlag {
                    flag: if call == "ptrace" {
                        "ptrace".into()
                    } else {
                        "sensitive_syscall".into()
                    },
                    detail: format!("{role} imports the {call} wrapper"),
                });
            }
        }
    }
    flags
}

/// Profiles the workload `args` names and writes the profile to `args.out`.
pub fn run(args: &ProfileArgs) -> Result<Profile, ProbeError> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err(ProbeError::Duration(args.duration));
    }
    let config = VmConfig::from_file(&args.config_file)?;
    let paths = input_paths(&config, args.guest_exec.as_deref())?;
    let inputs = describe_inputs(&paths)?;
    let analysis = StaticAnalysis {
        kernel: analyze_file(&paths[0].1)?,
        exec: args.guest_exec.as_deref().map(analyze_file).transpose()?,
    };

    let workspace = Workspace::new()?;
    let probe = derive_spec(&config, &workspace.0)?;
    let spec_path = workspace.0.join("vm.json");
    let json = serde_json::to_string_pretty(&probe).expect("a VmConfig serialises");
    std::fs::write(&spec_path, json).map_err(|source| ProbeError::Workspace {
        path: spec_path.clone(),
        source,
    })?;
    let started = Instant::now();
    let drive_ids: Vec<String> = config.drives.iter().map(|d| d.drive_id.clone()).collect();
    let (ended, demand, scraper) = run_probe(
        &spec_path,
        &workspace.0,
        Duration::from_secs_f64(args.duration),
        drive_ids,
    )?;
    let trace_path = workspace.0.join("trace.jsonl");
    let trace = predictor::trace::read(&trace_path).map_err(|source| ProbeError::Trace {
        path: trace_path.clone(),
        source,
    })?;
    if trace.samples.is_empty() {
        return Err(ProbeError::NoWindows(started.elapsed().as_secs_f64()));
    }
    let window_ms = trace.header.window_ms;
    let m = measure(&trace.samples, window_ms);

    let share = config.drives.len().max(1) as f64;
    let io_intensity = config
        .drives
        .iter()
        .map(|d| {
            let (source, mib_per_s, ops_per_s) = match scraper.rates(&d.drive_id) {
                Some(r) => ("metrics", r.mib_per_s, r.ops_per_s),
                None => (
                    "trace",
                    Percentiles {
                        p50: m.blk.p50 / share,
                        p95: m.blk.p95 / share,
                    },
                    m.ops_per_s,
                ),
            };
            IoIntensity {
                kind: "block".into(),
                device: d.drive_id.clone(),
                source: source.into(),
                mib_per_s,
                ops_per_s,
            }
        })
        .collect();
    let mut dependency_list: Vec<String> = analysis
        .exec
        .iter()
        .chain([&analysis.kernel])
        .flat_map(|s| s.needed.iter().cloned())
        .collect();
    dependency_list.extend(
        config
            .drives
            .iter()
            .map(|d| format!("drive {}: {}", d.drive_id, d.path_on_host.display())),
    );
    let kernel_sha256 = inputs[0].sha256.clone();
    let profile = Profile {
        version: VERSION,
        fingerprint: fingerprint(&inputs),
        kernel_sha256,
        inputs,
        probe: ProbeInfo {
            duration_s: args.duration,
            windows: trace.samples.len() as u64,
            window_ms,
            vcpu_count: config.machine_config.vcpu_count,
            mem_size_mib: config.machine_config.mem_size_mib,
            ended,
        },
        cpu_demand: Percentiles::of(&demand),
        cpu_used: m.cpu_used,
        memory_footprint: m.memory,
        io_intensity,
        security_flags: security_flags(&analysis, m.unknown_exits),
        dependency_list,
        static_analysis: analysis,
    };
    let json = serde_json::to_string_pretty(&profile).expect("a Profile serialises");
    std::fs::write(&args.out, json + "\n").map_err(|source| ProbeError::Write {
        path: args.out.clone(),
        source,
    })?;
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;
    use predictor::resource::Usage;
    use predictor::sample::Signals;

    fn sample(t: u64, cpu: f64, mem: f64, blk: f64, unknown: u64) -> Sample {
        Sample {
            t_ms: t,
            usage: Usage {
                cpu,
                mem,
                blk,
                net: 0.0,
            },
            signals: Signals {
                io_ops: 10,
                unknown_exits: unknown,
                ..Signals::default()
            },
        }
    }

    #[test]
    fn measures_percentiles_peak_and_working_set() {
        // Boot at 2 MiB, then 300 MiB for most of the run, 2 busy vCPUs.
        let mut s = vec![sample(0, 0.1, 2.0, 0.0, 0)];
        s.extend((1..20).map(|i| sample(i * 100, 2.0, 300.0, 20.0, 0)));
        let m = measure(&s, 100);
        assert_eq!(m.cpu_used.p95, 2.0);
        assert_eq!(m.memory.peak_mib, 300.0);
        assert_eq!(m.memory.working_set_mib, 300.0);
        assert_eq!(m.blk.p50, 20.0);
        assert_eq!(m.ops_per_s.p50, 100.0);
        assert_eq!(m.unknown_exits, 0);
    }

    #[test]
    fn demand_is_run_plus_run_queue_time() {
        assert_eq!(wanted_ns("586129 5418682 4\n"), Some(6004811));
        assert_eq!(wanted_ns("garbage"), None);
        // This process has no vCPU threads: no demand is recorded.
        let mut d = DemandSampler::new(std::process::id());
        for _ in 0..3 {
            std::thread::sleep(DEMAND_PERIOD);
            d.tick();
        }
        assert!(d.values.is_empty(), "{:?}", d.values);
    }

    #[test]
    fn unknown_exits_and_imports_become_flags() {
        let exec = elf::ElfSummary {
            syscalls: Some(vec!["ptrace".into(), "read".into()]),
            writable_executable: true,
            ..Default::default()
        };
        let a = StaticAnalysis {
            kernel: elf::ElfSummary::default(),
            exec: Some(exec),
        };
        let flags: Vec<String> = security_flags(&a, 3).into_iter().map(|f| f.flag).collect();
        assert_eq!(
            flags,
            ["unknown_port_or_mmio", "writable_executable", "ptrace"]
        );
        let clean = StaticAnalysis {
            kernel: elf::ElfSummary::default(),
            exec: None,
        };
        assert!(security_flags(&clean, 0).is_empty());
    }

    #[test]
    fn the_probe_spec_is_locked_down_and_records() {
        let mut config: VmConfig = VmConfig::parse(
            r#"{"boot-source":{"kernel_image_path":"/k"},
                "machine-config":{"vcpu_count":2,"mem_size_mib":256},
                "network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}],
                "vsock":{"guest_cid":3,"uds_path":"/tmp/v.sock"}}"#,
        )
        .unwrap();
        config.predictor = None;
        let dir = Path::new("/tmp/x");
        let p = derive_spec(&config, dir).unwrap();
        assert!(p.network_interfaces.is_empty() && p.vsock.is_none());
        let pred = p.predictor.unwrap();
        assert_eq!(
            pred.trace_path.as_deref(),
            Some(dir.join("trace.jsonl").as_path())
        );
        assert_eq!(pred.budget.cpu_cores.unwrap().min, 2.0);
    }
}
