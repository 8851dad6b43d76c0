//! prescient's guest agent: runs inside the Linux guest images (resources/guest), started by
//! busybox init on the console.
//!
//! Console protocol (every line it writes starts with `agent: `):
//! - `agent: ready` once at start;
//! - `agent: report {json}` every `prescient.agent.interval_ms` (default 1000): the guest's own
//!   view of memory (MemTotal/MemAvailable), PSI, CPU time and disk I/O (see `report.rs`);
//! - `agent: workload-start <step>`, `agent: [<workload>] <its output>`,
//!   `agent: workload-done {json}` around each workload;
//! - `agent: error <why>` for a request it cannot parse.
//!
//! Requests: `prescient.workload=<step>[,<step>...]` on the kernel command line, then lines read
//! from the console or the vsock link (`run <steps>` or `<steps>`). Steps run one after another
//! (see `steps.rs`).
//!
//! With `prescient.agent.vsock_port=P` every line also goes to the host over vsock (host CID 2,
//! port P: `<uds_path>_<P>` under prescient and Firecracker), see `vsock.rs`.

mod cpus;
mod mmds;
mod pattern;
mod report;
mod steps;
mod vsock;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use report::{json_string, Snapshot};
use steps::{Step, Workload};

/// What the reporter shows as running; shared with the step runner.
type Current = Arc<Mutex<Option<String>>>;

/// The vsock link to the host, when the command line asks for one.
static LINK: OnceLock<vsock::Link> = OnceLock::new();

fn say(msg: &str) {
    let line = format!("agent: {msg}");
    // One println! is one write of the whole line, so threads never interleave within a line.
    println!("{line}");
    if let Some(link) = LINK.get() {
        link.send_line(&line);
    }
}

/// The reporter's side of the vsock link: re-makes it when it is down and serves the requests
/// the host writes on each new connection.
struct HostLink {
    tx: Sender<Step>,
    last_error: Option<String>,
}

impl HostLink {
    /// Connects the vsock link if it is down; says why once per change of reason.
    fn reconnect(&mut self) {
        let Some(link) = LINK.get() else { return };
        match link.ensure_connected() {
            Ok(None) => {}
            Ok(Some(requests)) => {
                self.last_error = None;
                spawn_request_reader(requests, self.tx.clone());
            }
            Err(e) => {
                let why = e.to_string();
                if self.last_error.as_ref() != Some(&why) {
                    // Console only: the link is what is down.
                    println!("agent: vsock: cannot reach the host: {why}; retrying every report");
                    self.last_error = Some(why);
                }
            }
        }
    }
}

fn interval_from_cmdline(cmdline: &str) -> Duration {
    let ms = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("prescient.agent.interval_ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(1000);
    Duration::from_millis(ms)
}

fn report(current: &Current) {
    let running = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
    say(&format!(
        "report {}",
        Snapshot::read().to_json(running.as_deref())
    ));
}

/// Reports now, before any workload starts (a baseline to compare with), then every `interval`;
/// before each report a vsock link that is down is re-made and hot-added CPUs are brought online
/// (so the report counts them).
fn start_reporting(interval: Duration, current: Current, mut host: HostLink) {
    let mut hot_added = cpus::HotAdded::new();
    report(&current);
    thread::spawn(move || {
        let mut next = Instant::now();
        loop {
            // Fixed-rate ticks: a slow read does not shift every later report.
            next += interval;
            thread::sleep(next.saturating_duration_since(Instant::now()));
            host.reconnect();
            hot_added.online_new(say);
            report(&current);
        }
    });
}

/// Reads requests (`run <steps>` or steps) line by line from `from` (the console, a host
/// connection) into the step queue, until it closes.
fn spawn_request_reader(from: impl Read + Send + 'static, tx: Sender<Step>) {
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            match steps::from_console(&line) {
                Ok(steps) => {
                    for step in steps {
                        if tx.send(step).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => say(&format!("error {e}")),
            }
        }
    });
}

/// Forwards each line `from` produces as `agent: [<label>] <line>`.
fn forward_lines(from: impl Read + Send + 'static, label: String) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            say(&format!("[{label}] {line}"));
        }
    })
}

fn run_workload(w: &Workload, step: &str) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let direct_io = steps::fs_type_of("/var/tmp", &mounts) == Some("ext4");
    let (program, args) = w.command(direct_io, cpus::online());
    say(&format!("workload-start {step}"));
    let start = Instant::now();
    let child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let why = format!("cannot start {program}: {e} (the workloads live in the rootfs image or workloads.cpio.gz)");
            say(&format!(
                "workload-done {{\"step\":{},\"exit_code\":null,\"elapsed_ms\":0,\"error\":{}}}",
                json_string(step),
                json_string(&why)
            ));
            return;
        }
    };
    let name = w.kind.name().to_string();
    let readers = [
        forward_lines(child.stdout.take().expect("piped"), name.clone()),
        forward_lines(child.stderr.take().expect("piped"), name),
    ];
    let status = child.wait();
    for r in readers {
        let _ = r.join();
    }
    let elapsed_ms = start.elapsed().as_millis();
    let (code, error) = match status {
        Ok(s) => (
            s.code().map_or("null".into(), |c| c.to_string()),
            if s.success() {
                "null".into()
            } else {
                json_string(&format!("{program} ended with {s}"))
            },
        ),
        Err(e) => (
            "null".into(),
            json_string(&format!("wait for {program}: {e}")),
        ),
    };
    say(&format!(
        "workload-done {{\"step\":{},\"exit_code\":{code},\"elapsed_ms\":{elapsed_ms},\"error\":{error}}}",
        json_string(step)
    ));
}

fn poweroff() {
    say("poweroff");
    let _ = Command::new("sync").status();
    // reboot -f reboots at once; the kernel's reboot=k makes that an i8042 reset, which the
    // VMM treats as the guest ending the VM (poweroff -f only halts without ACPI).
    match Command::new("reboot").arg("-f").status() {
        Ok(s) => say(&format!("error reboot -f returned {s}")),
        Err(e) => say(&format!("error cannot run reboot -f: {e}")),
    }
}

fn run_steps(rx: Receiver<Step>, current: Current) {
    for step in rx {
        match &step {
            Step::Poweroff => poweroff(),
            Step::Run(w) => {
                let label = step.to_string();
                *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(label.clone());
                run_workload(w, &label);
                *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

fn main() {
    // The `mmds` and `pattern` steps run the agent's own binary (steps.rs).
    let args: Vec<String> = std::env::args().collect();
    let secs = || args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    match args.get(1).map(String::as_str) {
        Some("mmds") => std::process::exit(mmds::run(secs())),
        Some("pattern") => std::process::exit(pattern::run(
            secs(),
            args.get(3).map_or("16M", String::as_str),
        )),
        _ => {}
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let current: Current = Arc::default();
    let (tx, rx) = mpsc::channel();
    let mut host = HostLink {
        tx: tx.clone(),
        last_error: None,
    };
    match vsock::port_from_cmdline(&cmdline) {
        Ok(Some(port)) => {
            let _ = LINK.set(vsock::Link::new(port));
            host.reconnect();
        }
        Ok(None) => {}
        Err(e) => say(&format!("error {e}")),
    }
    say("ready");
    match steps::from_cmdline(&cmdline) {
        Ok(steps) => {
            for step in steps {
                tx.send(step).expect("the receiver lives in main");
            }
        }
        Err(e) => say(&format!("error prescient.workload: {e}")),
    }
    start_reporting(interval_from_cmdline(&cmdline), current.clone(), host);
    spawn_request_reader(std::io::stdin(), tx);
    run_steps(rx, current);
    // The console closed: keep reporting (the reporter thread ends with the process).
    loop {
        thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_interval_comes_from_the_command_line() {
        assert_eq!(interval_from_cmdline("a b"), Duration::from_secs(1));
        assert_eq!(
            interval_from_cmdline("prescient.agent.interval_ms=250 x"),
            Duration::from_millis(250)
        );
        assert_eq!(
            interval_from_cmdline("prescient.agent.interval_ms=0"),
            Duration::from_secs(1)
        );
    }
}
