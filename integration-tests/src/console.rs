//! A running VMM (prescient, Firecracker or QEMU) whose console (stdout) is read as it arrives:
//! when its first byte came, each line with the time it arrived, and the process's exit with its
//! time and peak memory. Shared by the tests that boot Linux guests and every benchmark.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Lines {
    /// When the first byte arrived, from the spawn.
    first_byte: Option<Duration>,
    /// Each whole console line with the time it ended, from the spawn.
    lines: Vec<(Duration, String)>,
    /// The bytes after the last newline.
    partial: Vec<u8>,
    closed: bool,
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
    start: Instant,
    lines: Arc<(Mutex<Lines>, Condvar)>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reaped: bool,
}

impl Console {
    /// Starts `cmd` (stdin closed, stdout and stderr captured); `what` names it in messages.
    pub fn spawn(what: &str, cmd: &mut Command) -> Console {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let lines: Arc<(Mutex<Lines>, Condvar)> = Arc::default();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let shared = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = stdout.read(&mut buf).unwrap_or(0);
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
                        l.lines.push((at, text));
                    } else {
                        l.partial.push(b);
                    }
                }
                cv.notify_all();
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Console {
            child,
            what: what.to_string(),
            start,
            lines,
            stderr: Some(stderr),
            reaped: false,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long ago the VMM was started (line times count from there).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whole console lines so far.
    pub fn line_count(&self) -> usize {
        self.lines.0.lock().unwrap().lines.len()
    }

    /// When the console's first byte arrived, from the spawn (None if nothing came yet).
    pub fn first_byte(&self) -> Option<Duration> {
        self.lines.0.lock().unwrap().first_byte
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
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut l = lock.lock().unwrap();
        loop {
            if let Some((t, line)) = l.lines.iter().skip(skip).find(|(_, line)| pred(line)) {
                return Ok((*t, line.clone()));
            }
            let now = Instant::now();
            if l.closed || now >= deadline {
                let why = if l.closed {
                    "the console closed (the VMM exited)".to_string()
                } else {
                    format!("not within {timeout:?}")
                };
                let tail: Vec<&str> = l.lines.iter().map(|(_, s)| s.as_str()).collect();
                return Err(format!(
                    "{}: waited for {awaited}: {why} ({:.1}s after start)\n--- console ({} lines, last 80) ---\n{}",
                    self.what,
                    self.start.elapsed().as_secs_f64(),
                    tail.len(),
                    tail[tail.len().saturating_sub(80)..].join("\n")
                ));
            }
            l = cv.wait_timeout(l, deadline - now).unwrap().0;
        }
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

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        let l = self.lines.0.lock().unwrap();
        l.lines.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Waits for the VMM to exit by itself within `timeout`: its status and stderr.
    pub fn wait_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let exit = self.wait_exit_measured(timeout);
        (exit.status, exit.stderr)
    }

    /// Waits for the VMM to exit by itself within `timeout` (panics, having killed it, if it
    /// does not): when it exited, to the millisecond, and its peak memory.
    pub fn wait_exit_measured(mut self, timeout: Duration) -> Exit {
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
        let at = self.start.elapsed();
        if ready != 1 {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
            let console = self.lines();
            let stderr = self.take_stderr();
            panic!(
                "{} did not exit within {timeout:?} (killed)\n--- console (last 40) ---\n{}\n--- stderr ---\n{stderr}",
                self.what,
                console[console.len().saturating_sub(40)..].join("\n"),
            );
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: reaps our own child, which has exited (its pidfd is readable); both out-pointers
        // are live locals. wait4 alone reports the child's rusage.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(ret, pid, "wait4: {}", std::io::Error::last_os_error());
        self.reaped = true;
        Exit {
            status: ExitStatus::from_raw(status),
            at,
            max_rss_kib: usage.ru_maxrss as u64,
            stderr: self.take_stderr(),
        }
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

impl Drop for Console {
    fn drop(&mut self) {
        // A failed assertion must not leave a VM running.
        if !self.reaped && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
