//! A running VMM (prescient, Firecracker or QEMU) whose console (stdout) is read as it arrives:
//! when its first byte came, each line with the time it arrived, and the process's exit with its
//! time and peak memory. Shared by the tests that boot Linux guests, every benchmark and the
//! nested KVM host (whose L1 is such a process too). [`LineStream`] is the reading part, for any
//! byte stream (a guest agent's vsock connection as well).

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Lines {
    /// When the first byte arrived, from the start.
    first_byte: Option<Duration>,
    /// Each whole line with the time it ended, from the start.
    lines: Vec<(Duration, String)>,
    /// The bytes after the last newline.
    partial: Vec<u8>,
    closed: bool,
}

/// Lines read from a byte stream (a VMM's stdout, a socket) as they arrive, by a thread of their
/// own, with the time each arrived; a test waits on them with a timeout.
#[derive(Clone)]
pub struct LineStream {
    start: Instant,
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

/// Why a wait for a line ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The stream closed (the process exited, the peer hung up).
    Closed,
    TimedOut,
}

impl LineStream {
    /// Reads `from` until it closes, times counting from `start`; with `tee`, each line also goes
    /// to stderr after that prefix as it arrives.
    pub fn read(mut from: impl Read + Send + 'static, start: Instant, tee: Option<String>) -> Self {
        let stream = Self {
            start,
            lines: Arc::default(),
        };
        let shared = stream.lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = from.read(&mut buf).unwrap_or(0);
                let at = start.elapsed();
                let (lock, cv) = &*shared;
                let mut l = lock.lock().unwrap();
                if n == 0 {
                    l.closed = true;
                    cv.notify_all();
                    return;
                }
                l.first_byte.get_or_insert(at);
                for &b in &buf[..n] {
                    if b == b'\n' {
                        let text = String::from_utf8_lossy(&l.partial)
                            .trim_end_matches('\r')
                            .to_string();
                        l.partial.clear();
                        if let Some(prefix) = &tee {
                            eprintln!("{prefix}{text}");
                        }
                        l.lines.push((at, text));
                    } else {
                        l.partial.push(b);
                    }
                }
                cv.notify_all();
            }
        });
        stream
    }

    /// When the first byte arrived, from the start (None if nothing came yet).
    pub fn first_byte(&self) -> Option<Duration> {
        self.lines.0.lock().unwrap().first_byte
    }

    /// Waits until a line satisfies `pred`, at most `timeout` from now: the first such line and
    /// when it arrived (from the start), or why none came.
    pub fn wait_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), WaitEnd> {
        self.wait_line_from(0, timeout, pred)
            .map(|(_, t, line)| (t, line))
    }

    /// Like `wait_line`, looking only at lines from index `from` on: the line's index too.
    pub fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Duration, String), WaitEnd> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut l = lock.lock().unwrap();
        loop {
            let found = l
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, (_, line))| pred(line));
            if let Some((i, (t, line))) = found {
                return Ok((i, *t, line.clone()));
            }
            let now = Instant::now();
            if l.closed {
                return Err(WaitEnd::Closed);
            }
            if now >= deadline {
                return Err(WaitEnd::TimedOut);
            }
            l = cv.wait_timeout(l, deadline - now).unwrap().0;
        }
    }

    /// How many whole lines so far.
    pub fn line_count(&self) -> usize {
        self.lines.0.lock().unwrap().lines.len()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        let l = self.lines.0.lock().unwrap();
        l.lines.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Every line so far with the time it arrived (from the start).
    pub fn timed_lines(&self) -> Vec<(Duration, String)> {
        self.lines.0.lock().unwrap().lines.clone()
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// How a VMM ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    /// From the spawn to the exit.
    pub at: Duration,
    /// The process's peak resident memory (ru_maxrss), KiB.
    pub max_rss_kib: u64,
    pub stderr: String,
}

/// A running VMM whose console (stdout) is read as it arrives; killed when dropped, so a failed
/// assertion never leaves a VM running.
pub struct Console {
    child: Child,
    what: String,
    out: LineStream,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// What the VMM wrote to stderr so far (the whole of it comes from `stderr` at the end).
    stderr_so_far: Arc<Mutex<String>>,
    reaped: bool,
}

impl Console {
    /// Starts `cmd` (stdin closed, stdout and stderr captured); `what` names it in messages.
    /// Inside an L1 host every line is also copied to stderr after [`crate::nested::L2_PREFIX`],
    /// so that the harness outside sees the guests' consoles (see `nested`).
    pub fn spawn(what: &str, cmd: &mut Command) -> Console {
        let tee = crate::nested::in_l1().then(|| crate::nested::L2_PREFIX.to_string());
        Self::spawn_with_tee(what, cmd, tee)
    }

    /// Like `spawn`; with `tee`, each line also goes to stderr after that prefix as it arrives.
    pub fn spawn_with_tee(what: &str, cmd: &mut Command, tee: Option<String>) -> Console {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let out = LineStream::read(child.stdout.take().expect("piped stdout"), start, tee);
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_so_far: Arc<Mutex<String>> = Arc::default();
        let so_far = stderr_so_far.clone();
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                bytes.extend_from_slice(&buf[..n]);
                *so_far.lock().unwrap() = String::from_utf8_lossy(&bytes).into_owned();
            }
            String::from_utf8_lossy(&bytes).into_owned()
        });
        Console {
            child,
            what: what.to_string(),
            out,
            stderr: Some(stderr),
            stderr_so_far,
            reaped: false,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console's lines as they arrive.
    pub fn stream(&self) -> &LineStream {
        &self.out
    }

    /// How long ago the VMM was started (line times count from there).
    pub fn elapsed(&self) -> Duration {
        self.out.elapsed()
    }

    /// Whole console lines so far.
    pub fn line_count(&self) -> usize {
        self.out.line_count()
    }

    /// When the console's first byte arrived, from the spawn (None if nothing came yet).
    pub fn first_byte(&self) -> Option<Duration> {
        self.out.first_byte()
    }

    /// See [`LineStream::wait_line`].
    pub fn wait_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), WaitEnd> {
        self.out.wait_line(timeout, pred)
    }

    /// Waits until a console line satisfies `pred`, at most `timeout` from now: the line and
    /// when it arrived (from the start). Fails with the console so far and what was awaited.
    pub fn wait_for(
        &self,
        awaited: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), String> {
        self.wait_for_after(0, awaited, timeout, pred)
    }

    /// Like `wait_for`, among the lines after the first `skip` ([`Console::line_count`] before
    /// an action: the lines the action brought).
    pub fn wait_for_after(
        &self,
        skip: usize,
        awaited: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), String> {
        let signs = ENDS_WAITS.get().copied().unwrap_or_default();
        let ends = |l: &str| signs.iter().any(|s| l.contains(s));
        let found = self
            .out
            .wait_line_from(skip, timeout, |l| pred(l) || ends(l));
        let (why, threads) = match found {
            Ok((_, t, line)) if pred(&line) => return Ok((t, line)),
            Ok((_, _, line)) => (format!("the guest printed `{line}`"), String::new()),
            Err(WaitEnd::Closed) => {
                // The VMM says why it ended on stderr (a triple fault, say), maybe a moment
                // after its console closed.
                std::thread::sleep(Duration::from_millis(200));
                let stderr = self.stderr_so_far.lock().unwrap().clone();
                let last: Vec<&str> = stderr.lines().rev().take(5).collect();
                let why = format!(
                    "the console closed (the VMM exited); its stderr ends:\n{}",
                    last.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
                (why, String::new())
            }
            // Last in the message, where a report that shows its end sees it.
            Err(WaitEnd::TimedOut) => {
                let last = self.out.timed_lines().last().map(|(t, _)| *t);
                let silent = self.out.elapsed() - last.unwrap_or_default();
                (
                    format!("not within {timeout:?}"),
                    format!(
                        "\n--- its threads (a stalled guest: is a vCPU running, or waiting in \
                         the VMM?; {SILENT_FOR}{}s) ---\n{}",
                        silent.as_secs(),
                        thread_states(self.pid())
                    ),
                )
            }
        };
        let tail = self.lines();
        Err(format!(
            "{}: waited for {awaited}: {why} ({:.1}s after start)\n--- console ({} lines, last 80) ---\n{}{threads}",
            self.what,
            self.out.elapsed().as_secs_f64(),
            tail.len(),
            tail[tail.len().saturating_sub(80)..].join("\n")
        ))
    }

    /// Like `wait_for`, panicking with its message.
    pub fn expect(&self, awaited: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for(awaited, timeout, pred)
            .unwrap_or_else(|e| panic!("{e}"))
            .1
    }

    /// Waits for a line starting with `prefix`; panics (with the console) if none comes in time.
    pub fn expect_prefix(&self, prefix: &str, timeout: Duration) -> (Duration, String) {
        self.wait_for(prefix, timeout, |l| l.starts_with(prefix))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The process's threads: state, CPU time and where each sleeps.
    pub fn threads(&self) -> String {
        thread_states(self.pid())
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.lines()
    }

    /// Every console line so far with the time it arrived (from the start).
    pub fn timed_lines(&self) -> Vec<(Duration, String)> {
        self.out.timed_lines()
    }

    /// Waits for the VMM to exit by itself within `timeout`: its status and stderr.
    pub fn wait_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let exit = self.wait_exit_measured(timeout);
        (exit.status, exit.stderr)
    }

    /// Waits for the VMM to exit by itself within `timeout` (panics, having killed it, if it
    /// does not): when it exited, to the millisecond, and its peak memory.
    pub fn wait_exit_measured(self, timeout: Duration) -> Exit {
        let what = self.what.clone();
        let out = self.out.clone();
        self.exit_within(timeout).unwrap_or_else(|stderr| {
            let console = out.lines();
            panic!(
                "{what} did not exit within {timeout:?} (killed)\n--- console (last 40) ---\n{}\n--- stderr ---\n{stderr}",
                console[console.len().saturating_sub(40)..].join("\n"),
            )
        })
    }

    /// Waits up to `timeout` for the VMM to exit by itself: how it ended; else kills it and
    /// gives its stderr.
    pub fn exit_within(mut self, timeout: Duration) -> Result<Exit, String> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: pidfd_open of our own child, which has not been reaped (we own the Child).
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(raw >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: polls one live fd described by a live pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        let at = self.out.elapsed();
        if ready != 1 {
            return Err(self.kill());
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: reaps our own child, which has exited (its pidfd is readable); both out-pointers
        // are live locals. wait4 alone reports the child's rusage.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(ret, pid, "wait4: {}", std::io::Error::last_os_error());
        self.reaped = true;
        Ok(Exit {
            status: ExitStatus::from_raw(status),
            at,
            max_rss_kib: usage.ru_maxrss as u64,
            stderr: self.take_stderr(),
        })
    }

    /// Kills the VMM now: its stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
        self.take_stderr()
    }

    /// Stops the VMM with SIGTERM (as an orchestrator would) and waits for it.
    pub fn terminate(self, timeout: Duration) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet (we own the Child).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM: {}", std::io::Error::last_os_error());
        self.wait_exit(timeout)
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// In a timed-out wait's message: for how many whole seconds the console had printed nothing.
pub const SILENT_FOR: &str = "its console silent for the last ";

/// Console lines that end a [`Console::wait_for`] at once, set by a harness that knows a guest
/// printing one will never print what a test waits for (the nested KVM host's emulator).
static ENDS_WAITS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();

/// From now on in this process, a console line containing any of `signs` ends the wait it
/// arrives in, as a failure that quotes it (the first call wins).
pub fn end_waits_on(signs: &'static [&'static str]) {
    let _ = ENDS_WAITS.set(signs);
}

/// One line per thread of process `pid`: its name, scheduler state, and the kernel function it
/// sleeps in (`wchan`), from /proc.
fn thread_states(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task: the process is gone)");
    };
    let mut lines: Vec<String> = tasks
        .flatten()
        .map(|task| {
            let p = task.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            // stat: "tid (comm) S ..."; comm may hold spaces, the state follows its ')'.
            let stat = read("stat");
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let state = fields.first().copied().unwrap_or("?");
            // utime and stime (fields 14 and 15, the 12th and 13th after the comm): which
            // thread the process's CPU went to (a guest that makes no progress while its VMM
            // burns CPU, say).
            let ticks: u64 = fields
                .get(11..13)
                .map(|t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
                .unwrap_or(0);
            // SAFETY: sysconf reads a constant of the system.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            thread_line(
                &task.file_name().to_string_lossy(),
                read("comm").trim(),
                state,
                ticks as f64 / hz,
                read("wchan").trim(),
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// One line of [`thread_states`]: `<tid> <name> <state> cpu=<s>s wchan=<function>`.
fn thread_line(tid: &str, name: &str, state: &str, cpu_secs: f64, wchan: &str) -> String {
    format!("{tid} {name} {state} cpu={cpu_secs:.1}s wchan={wchan}")
}

/// Whether `line` of [`thread_states`] is a vCPU thread (named `fc_vcpu N`, as Firecracker's)
/// inside the guest: runnable with no wait channel, where a vCPU waiting for an interrupt
/// sleeps in KVM (`kvm_vcpu_block`).
pub fn is_vcpu_in_guest(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let state = words
        .iter()
        .position(|w| w.starts_with("cpu="))
        .and_then(|i| i.checked_sub(1))
        .map(|i| words[i]);
    line.contains(" fc_vcpu ") && state == Some("R") && line.ends_with(" wchan=0")
}

impl Drop for Console {
    fn drop(&mut self) {
        // A failed assertion must not leave a VM running.
        if !self.reaped && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // ... and says what the VMM itself said (its console is the test's to show), unless
        // something it started still holds the pipe.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::thread::panicking()
            && self.stderr.as_ref().is_some_and(|h| !h.is_finished())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() && self.stderr.as_ref().is_some_and(|h| h.is_finished()) {
            let stderr = self.take_stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            eprintln!(
                "--- {}'s stderr (last 40 of {} lines) ---\n{}",
                self.what,
                lines.len(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_states_name_each_thread_and_where_it_sleeps() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::Builder::new()
            .name("sleeper".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let states = loop {
            let states = thread_states(std::process::id());
            if states.lines().any(|l| l.contains(" sleeper S cpu=")) {
                break states;
            }
            assert!(
                Instant::now() < deadline,
                "no sleeping 'sleeper':\n{states}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // This thread is running while it reads its own state.
        assert!(states.lines().any(|l| l.contains(" R cpu=")), "{states}");
        drop(tx);
        sleeper.join().unwrap();
        assert!(thread_states(u32::MAX).contains("the process is gone"));
    }

    #[test]
    fn a_vcpu_in_guest_mode_is_told_from_a_halted_one_and_from_other_threads() {
        assert!(is_vcpu_in_guest(&thread_line(
            "133",
            "fc_vcpu 0",
            "R",
            243.5,
            "0"
        )));
        assert!(!is_vcpu_in_guest(&thread_line(
            "134",
            "fc_vcpu 1",
            "S",
            0.4,
            "kvm_vcpu_block"
        )));
        assert!(!is_vcpu_in_guest(&thread_line(
            "126",
            "prescient",
            "R",
            10.8,
            "0"
        )));
    }

    #[test]
    fn a_line_that_ends_waits_fails_the_wait_it_arrives_in_and_names_it() {
        end_waits_on(&["guest broke:"]);
        let console = Console::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo up; echo 'guest broke: x'; exec sleep 60"]),
        );
        let err = console
            .wait_for("never", Duration::from_secs(50), |l| l == "done")
            .unwrap_err();
        assert!(
            err.contains("waited for never: the guest printed `guest broke: x`"),
            "{err}"
        );
        // A line the test waits for still ends the wait as found, even one with the sign.
        let (_, line) = console
            .wait_for("the sign", Duration::from_secs(5), |l| l.contains("broke"))
            .unwrap();
        assert_eq!(line, "guest broke: x");
        console.kill();
    }
}
