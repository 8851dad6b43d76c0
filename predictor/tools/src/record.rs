//! `prescient trace record`: runs a command and samples its whole process tree every window
//! into the trace format, so real programs join the corpus the predictor is judged on.
//!
//! What each resource is, per window:
//! * cpu: CPU time of the tree, from a cgroup the command starts in (cpuacct on cgroup v1,
//!   `cpu.stat` on v2; nanosecond-exact, and it includes processes that ran and exited inside
//!   the window); where no cgroup can be made, the tree's `/proc/<pid>/stat` ticks.
//! * mem: the sum of the tree's proportional set sizes (`smaps_rollup` PSS, so pages shared by
//!   forked workers count once), RSS where PSS is unreadable.
//! * blk: bytes the tree read from or caused to be written to storage (`/proc/<pid>/io`
//!   `read_bytes + write_bytes`; page-cache hits are not block I/O, as in a VM).
//! * net: only where it can be attributed: when the command runs in its own network namespace
//!   (e.g. `unshare -n`), every byte through that namespace's interfaces (a loopback byte once).
//!   Otherwise 0, and the header says so.
//!
//! Counters that processes accumulate (I/O, faults, ticks) are per process and include reaped
//! children; a process that exits leaves its totals to its parent. The recorder is the tree's
//! child subreaper, so orphans come back to it instead of init, and a window's use is the
//! growth of every live process's totals minus the last totals of those that disappeared into
//! a live parent.

use jailer::cgroup::{Cgroup, Mounts, Version};
use predictor::math;
use predictor::resource::Usage;
use predictor::sample::{Sample, Signals};
use predictor::trace::{self, Header, Trace, TraceError};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use thiserror::Error;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("no command to record (pass it after --)")]
    NoCommand,
    #[error("--window-ms must be 10..=10000, got {0}")]
    Window(u64),
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing --pid-file {path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the command: {0}")]
    Wait(#[source] std::io::Error),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("writing the summary: {0}")]
    Output(#[from] std::io::Error),
}

/// Arguments of `prescient trace record`.
#[derive(Clone, Debug, clap::Args)]
pub struct RecordArgs {
    /// The trace file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The trace's name (its header); the command's file name by default.
    #[arg(long)]
    pub name: Option<String>,
    /// Window length in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub window_ms: u64,
    /// The VM size the trace stands for, per resource (cores, MiB, MiB/s, MiB/s): the static
    /// allocation and the budget maximum in evaluations. A resource whose peak use exceeds it
    /// gets the next power of two above the peak. Defaults: this host's CPUs, 4096, 1024, 1024.
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory of the VM the trace stands for, MiB (see --cpu).
    #[arg(long)]
    pub mem: Option<f64>,
    /// Block bandwidth of the VM the trace stands for, MiB/s (see --cpu).
    #[arg(long)]
    pub blk: Option<f64>,
    /// Network bandwidth of the VM the trace stands for, MiB/s (see --cpu).
    #[arg(long)]
    pub net: Option<f64>,
    /// Write the command's pid here once it runs (e.g. to `nsenter` a load generator into
    /// its network namespace).
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Cumulative counters of one process, including its reaped children.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    ticks: u64,
    io_bytes: u64,
    io_ops: u64,
    faults: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.ticks += o.ticks;
        self.io_bytes += o.io_bytes;
        self.io_ops += o.io_ops;
        self.faults += o.faults;
    }
}

/// A window's growth, signed until clamped: a pid reused between windows, or a child reaped by
/// the recorder itself, can make one window's sum slightly negative.
#[derive(Clone, Copy, Debug, Default)]
struct Delta {
    ticks: i64,
    io_bytes: i64,
    io_ops: i64,
    faults: i64,
}

impl Delta {
    fn add(&mut self, now: &Totals, before: &Totals) {
        self.ticks += now.ticks as i64 - before.ticks as i64;
        self.io_bytes += now.io_bytes as i64 - before.io_bytes as i64;
        self.io_ops += now.io_ops as i64 - before.io_ops as i64;
        self.faults += now.faults as i64 - before.faults as i64;
    }
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    parent: u32,
    totals: Totals,
}

/// One process from `/proc/<pid>/stat`.
struct Stat {
    parent: u32,
    zombie: bool,
    totals: Totals,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Fields counted from 3 (state) as in proc(5).
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    let io = read_io(pid);
    Some(Stat {
        parent: n(4)? as u32,
        zombie: f.first() == Some(&"Z"),
        totals: Totals {
            ticks: n(14)? + n(15)? + n(16)? + n(17)?,
            // Faults of the process itself and of its reaped children.
            faults: n(10)? + n(11)? + n(12)? + n(13)?,
            io_bytes: io.map_or(0, |(b, _)| b),
            io_ops: io.map_or(0, |(_, o)| o),
        },
    })
}

/// `(read_bytes + write_bytes, syscr + syscw)` from `/proc/<pid>/io`.
fn read_io(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((
        field("read_bytes:") + field("write_bytes:"),
        field("syscr:") + field("syscw:"),
    ))
}

/// Proportional set size in bytes (RSS where `smaps_rollup` is unreadable).
fn read_memory(pid: u32, page: u64) -> u64 {
    let kib = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_ascii_whitespace().next()?.parse::<u64>().ok())
    };
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        if let Some(k) = kib(&t, "Pss:") {
            return k * 1024;
        }
    }
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_ascii_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Every process's parent, from one pass over `/proc`.
fn parents() -> HashMap<u32, u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = &text[text.rfind(')')? + 2..];
            let ppid = rest.split_ascii_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Bytes through the network namespace of `pid` when it is not the recorder's own (a
/// loopback byte is sent and received once each: counted once); None where not attributable.
fn netns_bytes(pid: u32) -> Option<u64> {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    let theirs = ns(&pid.to_string())?;
    if Some(&theirs) == ns("self").as_ref() {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let mut total = 0;
    for line in text.lines().skip(2) {
        let Some((iface, counters)) = line.split_once(':') else {
            continue;
        };
        let c: Vec<u64> = counters
            .split_ascii_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let (rx, tx) = (c.first().copied()?, c.get(8).copied()?);
        total += if iface.trim() == "lo" { tx } else { rx + tx };
    }
    Some(total)
}

/// The command's cgroup: exact CPU time for everything it runs.
struct CpuGroup(Cgroup);

impl CpuGroup {
    fn create(name: &str) -> Option<CpuGroup> {
        let mounts = Mounts::current().ok()?;
        let group = if mounts.v1_hierarchy("cpuacct").is_ok() {
            Cgroup::create_v1(&mounts, &["cpuacct".to_string()], Path::new(name)).ok()?
        } else {
            let here = Cgroup::current().ok()?;
            if here.version() != Version::V2 {
                return None;
            }
            let dir = here.dirs()[0].join(name);
            std::fs::create_dir(&dir).ok()?;
            Cgroup::open(vec![dir]).ok()?
        };
        Some(CpuGroup(group))
    }

    fn procs_files(&self) -> Vec<CString> {
        self.0
            .dirs()
            .iter()
            .filter_map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()
            })
            .collect()
    }

    fn usage_ns(&self) -> Option<u64> {
        self.0.cpu_usage().ok().map(|d| d.as_nanos() as u64)
    }
}

/// The defaults a trace's capacity starts from (see `RecordArgs`).
fn default_capacity() -> Usage {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Usage {
        cpu: cpus as f64,
        mem: 4096.0,
        blk: 1024.0,
        net: 1024.0,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_ascii_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Samples the tree rooted at the command until it exits.
struct Sampler {
    root: u32,
    me: u32,
    page: u64,
    tick_ns: f64,
    cgroup: Option<CpuGroup>,
    seen: HashMap<u32, Seen>,
    /// Totals of the recorder's own reaped children (the command and orphans), which
    /// `/proc/self/stat` separates from its own.
    own_children: Totals,
    cpu_ns: Option<u64>,
    /// When `cpu_ns` was read, and when recording started.
    last: Instant,
    start: Instant,
    /// The trace format needs `t_ms` to increase.
    next_t_ms: u64,
    net: Option<u64>,
    net_attributed: bool,
}

impl Sampler {
    fn own_children() -> Totals {
        let Ok(text) = std::fs::read_to_string("/proc/self/stat") else {
            return Totals::default();
        };
        let Some(at) = text.rfind(')') else {
            return Totals::default();
        };
        let f: Vec<u64> = text[at + 2..]
            .split_ascii_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let n = |i: usize| f.get(i - 3).copied().unwrap_or(0);
        Totals {
            ticks: n(16) + n(17),
            faults: n(11) + n(13),
            ..Totals::default()
        }
    }

    /// The tree now: every process descending from the root (including the root).
    fn tree(&self) -> Vec<(u32, Stat)> {
        let parents = parents();
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&pid, &ppid) in &parents {
            children.entry(ppid).or_default().push(pid);
        }
        // Orphans the recorder adopted (as subreaper) hang off the recorder itself.
        let mut stack = vec![self.root];
        stack.extend(
            children
                .get(&self.me)
                .into_iter()
                .flatten()
                .filter(|&&p| p != self.root),
        );
        let mut out = Vec::new();
        while let Some(pid) = stack.pop() {
            if let Some(s) = read_stat(pid) {
                out.push((pid, s));
            }
            stack.extend(children.get(&pid).into_iter().flatten());
        }
        out
    }

    /// One window's sample. The CPU counter is read first, with the clock, so the window's
    /// length is measured between the same two instants as its CPU time.
    fn sample(&mut self) -> Sample {
        let cpu_now = self.cgroup.as_ref().and_then(CpuGroup::usage_ns);
        let now = Instant::now();
        let secs = (now - self.last).as_secs_f64().max(1e-3);
        // The window's measured start: on a loaded machine the recorder itself runs late, and
        // a window can be longer than asked.
        let t_ms = ((self.last - self.start).as_millis() as u64).max(self.next_t_ms);
        self.next_t_ms = t_ms + 1;
        self.last = now;
        let tree = self.tree();
        let mut delta = Delta::default();
        let mut live = HashMap::with_capacity(tree.len());
        let mut mem = 0u64;
        for (pid, s) in &tree {
            let before = self.seen.get(pid).map_or(Totals::default(), |x| x.totals);
            delta.add(&s.totals, &before);
            if !s.zombie {
                mem += read_memory(*pid, self.page);
            }
            live.insert(
                *pid,
                Seen {
                    parent: s.parent,
                    totals: s.totals,
                },
            );
        }
        // Processes gone since the last window left their totals to their parent (counted
        // above in its growth) or, for the recorder's own children, to the recorder, whose
        // children's ticks and faults it reads separately; their I/O is lost for one window.
        let own = Self::own_children();
        let mut gone_to_me = Totals::default();
        for (pid, s) in &self.seen {
            if live.contains_key(pid) {
                continue;
            }
            if s.parent == self.me {
                gone_to_me.add(&s.totals);
            } else {
                delta.add(&Totals::default(), &s.totals);
            }
        }
        let own_growth = Totals {
            ticks: own.ticks.saturating_sub(self.own_children.ticks),
            faults: own.faults.saturating_sub(self.own_children.faults),
            ..Totals::default()
        };
        delta.ticks += own_growth.ticks as i64 - gone_to_me.ticks as i64;
        delta.faults += own_growth.faults as i64 - gone_to_me.faults as i64;
        self.own_children = own;
        self.seen = live;

        let cpu_s = match (cpu_now, self.cpu_ns) {
            (Some(now), Some(prev)) => {
                self.cpu_ns = Some(now);
                now.saturating_sub(prev) as f64 / 1e9
            }
            _ => delta.ticks.max(0) as f64 * self.tick_ns / 1e9,
        };
        let net = match (netns_bytes(self.root), self.net) {
            (Some(now), Some(prev)) => {
                self.net = Some(now);
                self.net_attributed = true;
                now.saturating_sub(prev)
            }
            (Some(now), None) => {
                self.net = Some(now);
                self.net_attributed = true;
                0
            }
            (None, _) => 0,
        };
        Sample {
            t_ms,
            // Four decimals are far below what a window can measure and keep the corpus small.
            usage: Usage {
                cpu: cpu_s / secs,
                mem: mem as f64 / MIB,
                blk: delta.io_bytes.max(0) as f64 / MIB / secs,
                net: net as f64 / MIB / secs,
            }
            .map(|_, v| (v * 1e4).round() / 1e4),
            signals: Signals {
                io_ops: delta.io_ops.max(0) as u64,
                faults: delta.faults.max(0) as u64,
                ..Signals::default()
            },
        }
    }
}

/// Whether the command has exited, without reaping it (its /proc entry stays for a last look).
fn exited(pid: u32) -> Result<bool, std::io::Error> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid only writes into `info`; WNOWAIT leaves the child waitable.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (si_pid stays 0 when nothing has exited).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Reaps `pid` and returns its exit status.
fn reap(pid: u32) -> Result<i32, std::io::Error> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local.
    if unsafe { libc::waitpid(pid as i32, &mut status, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(status)
}

/// Reaps orphans the recorder adopted that have exited (never the command itself).
fn reap_orphans(root: u32) {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid only writes into `info`.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: filled by waitid.
        let pid = unsafe { info.si_pid() };
        if rc < 0 || pid == 0 || pid as u32 == root {
            return;
        }
        let _ = reap(pid as u32);
    }
}

/// Rounds a capacity up so the recorded peak fits under it.
fn fit_capacity(default: f64, peak: f64) -> f64 {
    if peak <= default {
        default
    } else {
        2f64.powi(math::log2(peak).ceil() as i32)
    }
}

/// Entry point of `prescient trace record`.
pub fn run(args: &RecordArgs, out: &mut dyn Write) -> Result<Trace, RecordError> {
    let (program, rest) = args.command.split_first().ok_or(RecordError::NoCommand)?;
    if !(10..=10_000).contains(&args.window_ms) {
        return Err(RecordError::Window(args.window_ms));
    }
    let name = args.name.clone().unwrap_or_else(|| {
        Path::new(program)
            .file_name()
            .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned())
    });
    let me = std::process::id();
    let cgroup = CpuGroup::create(&format!("prescient-record-{me}"));
    let procs = cgroup
        .as_ref()
        .map(CpuGroup::procs_files)
        .unwrap_or_default();
    let load_before = loadavg();

    // SAFETY: PR_SET_CHILD_SUBREAPER takes an int flag and changes only this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    // Ctrl-C reaches the whole foreground group: the command stops, the recorder writes.
    // SAFETY: installing SIG_IGN has no handler code to be unsafe.
    let old_int = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let mut cmd = Command::new(program);
    cmd.args(rest);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (open, write, close, signal) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            for path in &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| RecordError::Spawn {
        command: program.clone(),
        source,
    });
    // SAFETY: restores the disposition saved above.
    unsafe { libc::signal(libc::SIGINT, old_int) };
    let child = child?;
    let root = child.id();
    if let Some(path) = &args.pid_file {
        std::fs::write(path, format!("{root}\n")).map_err(|source| RecordError::PidFile {
            path: path.clone(),
            source,
        })?;
    }
    // SAFETY: sysconf has no memory effects.
    let (page, hz) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
        )
    };
    let start = Instant::now();
    let mut sampler = Sampler {
        root,
        me,
        page,
        tick_ns: 1e9 / hz,
        cpu_ns: cgroup.as_ref().and_then(CpuGroup::usage_ns),
        cgroup,
        seen: HashMap::new(),
        own_children: Sampler::own_children(),
        last: start,
        start,
        next_t_ms: 0,
        net: None,
        net_attributed: false,
    };
    let window = Duration::from_millis(args.window_ms);
    let mut samples = Vec::new();
    loop {
        let done = exited(root).map_err(RecordError::Wait)?;
        if !done {
            // A window from the last sample, not from a fixed schedule: after the recorder ran
            // late (a loaded machine), catching up would make the next windows short and noisy.
            let due = sampler.last + window;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        samples.push(sampler.sample());
        reap_orphans(root);
        if done {
            break;
        }
    }
    let status = reap(root).map_err(RecordError::Wait)?;
    if let Some(g) = &sampler.cgroup {
        // The kernel refuses (EBUSY) while an exiting child is still being torn down in it.
        for _ in 0..50 {
            if g.0.remove().is_ok() {
                break;
            }
            reap_orphans(root);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    let defaults = default_capacity();
    let given = Usage {
        cpu: args.cpu.unwrap_or(defaults.cpu),
        mem: args.mem.unwrap_or(defaults.mem),
        blk: args.blk.unwrap_or(defaults.blk),
        net: args.net.unwrap_or(defaults.net),
    };
    let peak = Usage::from_fn(|r| samples.iter().map(|s| s.usage[r]).fold(0.0, f64::max));
    let capacity = Usage::from_fn(|r| fit_capacity(given[r], peak[r]));
    let mut header = Header::new(name, args.window_ms, capacity);
    header.source = Some(format!(
        "recorded from /proc: {:?} at nice {}; cpu from {}; net {}; host {} CPUs, load {} -> {}",
        args.command.join(" "),
        // SAFETY: getpriority reads this process's nice value; no memory is involved.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) },
        if sampler.cgroup.is_some() {
            "a cgroup"
        } else {
            "/proc ticks"
        },
        if sampler.net_attributed {
            "from its network namespace"
        } else {
            "not attributable (shared network namespace): 0"
        },
        defaults.cpu,
        load_before,
        loadavg()
    ));
    let trace = Trace { header, samples };
    trace::write(&args.out, &trace)?;
    let exit = if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    };
    writeln!(
        out,
        "{}: {} windows of {} ms ({}), peak cpu {:.2} cores, mem {:.0} MiB, blk {:.1} MiB/s, net {:.1} MiB/s",
        args.out.display(),
        trace.samples.len(),
        args.window_ms,
        exit,
        peak.cpu,
        peak.mem,
        peak.blk,
        peak.net
    )?;
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: PathBuf, command: &[&str]) -> RecordArgs {
        RecordArgs {
            out,
            name: Some("t".into()),
            window_ms: 50,
            cpu: Some(2.0),
            mem: Some(1024.0),
            blk: Some(64.0),
            net: Some(64.0),
            pid_file: None,
            command: command.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Sums the `XmY.Zs` times the shell's `times` builtin printed.
    fn shell_times(text: &str) -> f64 {
        text.split_ascii_whitespace()
            .filter_map(|t| {
                let (m, s) = t.strip_suffix('s')?.split_once('m')?;
                Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
            })
            .sum()
    }

    #[test]
    fn records_a_busy_tree_with_children_that_exit() {
        let dir = std::env::temp_dir().join(format!("predictor-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("t.jsonl");
        let times = dir.join("times");
        // Six short-lived children that each count for a while (a fixed amount of work, so the
        // test does not depend on how loaded the machine is), then dd copying 3 GiB through a
        // 64 MiB buffer (long enough for a window to see it even on an idle machine); the
        // shell reports its own and its children's CPU time at the end.
        let script = format!(
            "i=0; while [ $i -lt 6 ]; do sh -c 'j=0; while [ $j -lt 20000 ]; do j=$((j+1)); done'; \
             i=$((i+1)); done; dd if=/dev/zero of=/dev/null bs=64M count=48 2>/dev/null; times > {}",
            times.display()
        );
        let trace = run(&args(out.clone(), &["sh", "-c", &script]), &mut Vec::new()).unwrap();
        assert_eq!(trace, trace::read(&out).unwrap());
        // Windows are as long as they were: the next window's start, and the nominal 50 ms for
        // the last one.
        let starts: Vec<f64> = trace.samples.iter().map(|s| s.t_ms as f64 / 1e3).collect();
        let recorded: f64 = trace
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| s.usage.cpu * starts.get(i + 1).map_or(0.05, |n| n - starts[i]))
            .sum();
        let measured = shell_times(&std::fs::read_to_string(&times).unwrap());
        // Every child was gone by the next window, yet all its CPU time reached the trace
        // (windows are measured, not nominal, so the sum is close, not exact).
        assert!(measured > 0.05, "the children did work: {measured}");
        assert!(
            (recorded - measured).abs() < 0.15 * measured + 0.05,
            "recorded {recorded} s, the shell measured {measured} s"
        );
        assert!(
            trace.samples.iter().any(|s| s.usage.mem > 60.0),
            "dd's 64 MiB buffer"
        );
        // Windows are at least as long as asked, but the one the command exited in.
        let starts: Vec<u64> = trace.samples.iter().map(|s| s.t_ms).collect();
        assert!(
            starts[..starts.len() - 1]
                .windows(2)
                .all(|w| w[1] >= w[0] + 45),
            "{starts:?}"
        );
        assert!(trace
            .header
            .source
            .as_ref()
            .unwrap()
            .contains("not attributable"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error() {
        let out = std::env::temp_dir().join("predictor-record-never.jsonl");
        let e = run(&args(out, &["/nonexistent/binary"]), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/binary"), "{e}");
    }

    #[test]
    fn capacity_fits_the_peak() {
        assert_eq!(fit_capacity(4096.0, 100.0), 4096.0);
        assert_eq!(fit_capacity(1024.0, 1500.0), 2048.0);
    }
}
