//! A vhost-user-block backend for tests and benchmarks: `qemu-storage-daemon` (installed with
//! Debian's qemu-system-x86) serving a raw file as a writable vhost-user-blk export.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `qemu-storage-daemon`; killed when dropped.
pub struct StorageDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl StorageDaemon {
    /// Serves `image` on a new Unix socket at `socket`, and waits until it listens.
    pub fn start(image: &Path, socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (Debian's qemu-system-x86 dependencies) is installed");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-storage-daemon did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            socket: socket.to_path_buf(),
        }
    }

    /// Ends the backend now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
