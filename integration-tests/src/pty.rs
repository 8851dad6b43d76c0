//! A pseudo-terminal, to run a VMM as a user at a terminal does: stdin and stdout on the
//! terminal, which is the controlling terminal of the VMM's own session (so it is in the
//! foreground, and closing the terminal hangs it up); stderr is captured apart.

use std::ffi::CStr;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Outcome;

/// A terminal's mode (`struct termios`), compared field by field.
#[derive(Clone, Copy)]
pub struct Mode(pub libc::termios);

impl Mode {
    /// No line editing, no echo, no signal keys: what a VMM forwarding keystrokes sets.
    pub fn is_raw(&self) -> bool {
        self.0.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG) == 0
    }

    fn fields(&self) -> (u32, u32, u32, u32, u8, [u8; libc::NCCS], u32, u32) {
        let t = &self.0;
        (
            t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_line, t.c_cc, t.c_ispeed, t.c_ospeed,
        )
    }
}

impl PartialEq for Mode {
    fn eq(&self, other: &Self) -> bool {
        self.fields() == other.fields()
    }
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (i, o, c, l, line, cc, ispeed, ospeed) = self.fields();
        write!(
            f,
            "iflag={i:#x} oflag={o:#x} cflag={c:#x} lflag={l:#x} line={line} cc={cc:?} speed={ispeed}/{ospeed}"
        )
    }
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Both ends of a pseudo-terminal, close-on-exec from their creation (tests run in threads of
/// one process, and another test's child must not inherit them).
pub struct Pty {
    /// None once hung up.
    master: Mutex<Option<OwnedFd>>,
    slave: OwnedFd,
}

impl Pty {
    pub fn open() -> Self {
        // SAFETY: posix_openpt(3) with flags; the fd is owned right away.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        check(master, "posix_openpt");
        // SAFETY: a fresh fd this function owns from here.
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        // SAFETY: grantpt/unlockpt on a pty master fd.
        check(unsafe { libc::grantpt(master.as_raw_fd()) }, "grantpt");
        // SAFETY: as above.
        check(unsafe { libc::unlockpt(master.as_raw_fd()) }, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name of at most name.len() bytes.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        assert_eq!(
            rc,
            0,
            "ptsname_r: {}",
            std::io::Error::from_raw_os_error(rc)
        );
        // SAFETY: ptsname_r succeeded, so `name` is NUL-terminated.
        let path = unsafe { CStr::from_ptr(name.as_ptr()) };
        // SAFETY: a valid path; the fd is owned right away.
        let slave = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        check(slave, "open the pty slave");
        // SAFETY: non-blocking reads let the session poll the master with a deadline.
        check(
            unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) },
            "O_NONBLOCK",
        );
        Self {
            master: Mutex::new(Some(master)),
            // SAFETY: a fresh fd this function owns from here.
            slave: unsafe { OwnedFd::from_raw_fd(slave) },
        }
    }

    /// The terminal's current mode.
    pub fn mode(&self) -> Mode {
        // SAFETY: termios is plain integers; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a live termios and an open terminal fd.
        check(
            unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) },
            "tcgetattr",
        );
        Mode(t)
    }

    pub fn set_mode(&self, mode: &Mode) {
        // SAFETY: a live termios and an open terminal fd.
        check(
            unsafe { libc::tcsetattr(self.slave.as_raw_fd(), libc::TCSANOW, &mode.0) },
            "tcsetattr",
        );
    }

    /// A mode a user may well have that differs from the default in what a VMM that only
    /// toggles canonical mode, echo and signal keys back on would get wrong: echo off (as
    /// after `stty -echo`), and ^H as the erase key.
    pub fn set_unusual_mode(&self) -> Mode {
        let mut mode = self.mode();
        mode.0.c_lflag &= !libc::ECHO;
        mode.0.c_cc[libc::VERASE] = 0x08;
        self.set_mode(&mode);
        let set = self.mode();
        assert_eq!(set, mode, "the terminal did not take the mode");
        set
    }

    /// Starts `cmd` with this terminal as stdin, stdout and controlling terminal, in a session
    /// of its own; stderr is captured.
    pub fn spawn(&self, cmd: &mut Command) -> PtySession<'_> {
        let stdin = self.slave.try_clone().expect("dup the pty slave");
        let stdout = self.slave.try_clone().expect("dup the pty slave");
        // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the slave by then.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn under the pty");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        PtySession {
            pty: self,
            child: Some(child),
            shown: Vec::new(),
            stderr,
        }
    }

    /// Closes the terminal's master side, as closing a terminal window does: the session is
    /// hung up (SIGHUP to its leader).
    pub fn hang_up(&self) {
        self.master.lock().unwrap().take();
    }

    /// The master's fd, while the terminal is not hung up.
    fn master_fd(&self) -> Option<libc::c_int> {
        self.master.lock().unwrap().as_ref().map(AsRawFd::as_raw_fd)
    }
}

/// A process on a [`Pty`]; killed when dropped, so a failing test leaves nothing running.
pub struct PtySession<'a> {
    pty: &'a Pty,
    child: Option<Child>,
    /// What the terminal showed so far.
    shown: Vec<u8>,
    stderr: Arc<Mutex<String>>,
}

impl PtySession<'_> {
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Reads what the terminal shows, waiting up to `wait` for something.
    fn pump(&mut self, wait: Duration) {
        let Some(master) = self.pty.master_fd() else {
            std::thread::sleep(wait);
            return;
        };
        let mut poll = libc::pollfd {
            fd: master,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut poll, 1, wait.as_millis() as libc::c_int) };
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a live buffer of its length from an open fd.
            let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            self.shown.extend_from_slice(&buf[..n as usize]);
        }
    }

    /// The terminal's text so far, with the terminal's CR LF line ends made LF.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.shown).replace("\r\n", "\n")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn context(&self) -> String {
        format!(
            "--- terminal ---\n{}\n--- stderr ---\n{}",
            self.shown(),
            self.stderr()
        )
    }

    /// Reads the terminal until `done`; fails after `deadline`, or at once if the process
    /// ended first.
    fn wait_until(&mut self, what: &str, deadline: Duration, done: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            let ended = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = ended {
                // Its last words may still be on the way.
                self.pump(Duration::from_millis(100));
                if done(self) {
                    return;
                }
                panic!("ended ({status}) before {what}\n{}", self.context());
            }
            assert!(
                start.elapsed() < deadline,
                "no {what} within {deadline:?}\n{}",
                self.context()
            );
            self.pump(Duration::from_millis(20));
        }
    }

    /// Waits until the terminal shows `line` as a whole line.
    pub fn wait_for_line(&mut self, line: &str, deadline: Duration) {
        self.wait_until(&format!("line {line:?}"), deadline, |s| {
            s.shown().lines().any(|l| l == line)
        });
    }

    /// Waits until stderr holds `text`.
    pub fn wait_for_stderr(&mut self, text: &str, deadline: Duration) {
        self.wait_until(&format!("{text:?} on stderr"), deadline, |s| {
            s.stderr().contains(text)
        });
    }

    /// Types `bytes` at the terminal.
    pub fn type_bytes(&self, bytes: &[u8]) {
        let fd = self.pty.master_fd().expect("the terminal was hung up");
        let mut rest = bytes;
        while !rest.is_empty() {
            // SAFETY: writing from a live buffer of its length to an open fd.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "typing: {e}");
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            rest = &rest[n as usize..];
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) of our own child, not yet reaped (we still own it).
        unsafe { libc::kill(self.id() as libc::pid_t, signal) };
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not yet waited for");
        child.try_wait().expect("wait for the child").is_none()
    }

    /// Waits for the process to end, reading the terminal meanwhile; the outcome's stdout is
    /// what the terminal showed.
    pub fn wait(mut self, deadline: Duration) -> Outcome {
        let start = Instant::now();
        let status = loop {
            self.pump(Duration::from_millis(10));
            let child = self.child.as_mut().expect("not yet waited for");
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break status;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "still running after {deadline:?} (killed: {status:?})\n{}",
                    self.context()
                );
            }
        };
        let elapsed = start.elapsed();
        self.child = None;
        // What it wrote just before exiting, and the rest of stderr.
        self.pump(Duration::from_millis(50));
        let stderr_done = Instant::now();
        while stderr_done.elapsed() < Duration::from_millis(200) && !self.stderr_closed() {
            std::thread::sleep(Duration::from_millis(10));
        }
        Outcome {
            status,
            stdout: self.shown(),
            stderr: self.stderr(),
            elapsed,
        }
    }

    /// Whether the stderr reader saw its end (no other holder of the pipe is left).
    fn stderr_closed(&self) -> bool {
        Arc::strong_count(&self.stderr) == 1
    }
}

impl Drop for PtySession<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
