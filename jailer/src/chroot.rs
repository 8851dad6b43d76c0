//! The jail's file system: a private mount namespace whose root is `<base>/prescient/<id>/root`,
//! holding only the VMM binary (and the shared libraries it loads), the files its spec names,
//! the device nodes it opens and its cgroup.
//!
//! Every host file appears at its own absolute path inside the chroot, so the VMM's spec and
//! arguments need no rewriting. Files are bind mounts made inside the new mount namespace: they
//! vanish with it when the VMM exits, leaving only empty mount-point files and directories.
//! Files the caller put in the chroot itself (Firecracker's way: paths in the spec are then
//! paths inside the jail) are left as they are.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors of building the chroot and entering it.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is not usable: {source}")]
    Source {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a character device")]
    NotADevice(PathBuf),
    #[error("cannot {op} {path}: {source}")]
    Mount {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create device node {path}: {source}")]
    Mknod {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot give {path} to uid {uid} gid {gid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
    #[error("cannot list the shared libraries of {exec} with {interpreter}: {detail}")]
    Libraries {
        exec: PathBuf,
        interpreter: PathBuf,
        detail: String,
    },
    #[error("cannot enter a new mount namespace: {0}")]
    Unshare(std::io::Error),
    #[error("cannot pivot_root into {path}: {source}")]
    PivotRoot {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ChrootError>;

fn cstring(path: &Path) -> CString {
    // Paths from the OS or validated arguments hold no NUL byte; one that did would fail the
    // syscall as a missing file.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// `Ok` for a zero return code, else `err` of errno.
fn check(rc: libc::c_int, err: impl FnOnce(std::io::Error) -> ChrootError) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(err(std::io::Error::last_os_error()))
    }
}

fn mount(
    op: &'static str,
    source: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
) -> Result<()> {
    let src = source.map(cstring);
    let dst = cstring(target);
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or null where
    // mount(2) accepts null (no source, no file system type, no data).
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            dst.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    check(rc, |source| ChrootError::Mount {
        op,
        path: target.to_path_buf(),
        source,
    })
}

/// The chroot being built: `root` on the host, entered by [`Chroot::enter`].
pub struct Chroot {
    root: PathBuf,
    uid: u32,
    gid: u32,
}

impl Chroot {
    /// Makes `root` (owned by root, searchable by all) in a new mount namespace whose mounts do
    /// not propagate back to the host. Mounts the host makes later under a shared `root` do
    /// reach the jail (slave propagation, as in Firecracker's jailer): Kata Containers
    /// bind-mounts a container's disk over a placeholder file in the chroot while the VM runs,
    /// then points the drive at it.
    pub fn create(root: &Path, uid: u32, gid: u32) -> Result<Self> {
        mkdir(root)?;
        // SAFETY: unshare(2) with a flag constant; it affects only this process.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        check(rc, ChrootError::Unshare)?;
        mount(
            "make slave",
            None,
            Path::new("/"),
            libc::MS_REC | libc::MS_SLAVE,
        )?;
        // pivot_root needs the new root to be a mount point; recursive, so that files the
        // caller mounted in the chroot beforehand (Firecracker's way of jailing them) stay.
        mount("bind", Some(root), root, libc::MS_BIND | libc::MS_REC)?;
        Ok(Self {
            root: root.to_path_buf(),
            uid,
            gid,
        })
    }

    /// Where host path `path` appears on the host side of the chroot.
    pub fn inside(&self, path: &Path) -> PathBuf {
        inside(&self.root, path)
    }

    /// Bind-mounts host file `path` at the same path inside (read-only if asked).
    pub fn bind_file(&self, what: &'static str, path: &Path, read_only: bool) -> Result<()> {
        let meta = fs::metadata(path).map_err(|source| ChrootError::Source {
            what,
            path: path.to_path_buf(),
            source,
        })?;
        let target = self.inside(path);
        if let Some(parent) = target.parent() {
            mkdir(parent)?;
        }
        if meta.is_dir() {
            mkdir(&target)?;
        } else if !target.exists() {
            fs::write(&target, b"").map_err(|source| ChrootError::Create {
                path: target.clone(),
                source,
            })?;
        }
        mount("bind", Some(path), &target, libc::MS_BIND)?;
        if read_only {
            mount(
                "remount read-only",
                None,
                &target,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            )?;
        }
        Ok(())
    }

    /// Bind-mounts the executable read-only, with the dynamic loader and the shared libraries
    /// it needs (none for a static binary).
    pub fn bind_executable(&self, exec: &Path) -> Result<()> {
        self.bind_file("executable", exec, true)?;
        for lib in shared_libraries(exec)? {
            self.bind_file("shared library", &lib, true)?;
        }
        Ok(())
    }

    /// A directory at host path `path` inside, owned by the VMM's user (for the sockets and
    /// files it creates).
    pub fn writable_dir(&self, path: &Path) -> Result<()> {
        let target = self.inside(path);
        mkdir(&target)?;
        self.give(&target)
    }

    /// A node for host character device `device` (e.g. /dev/kvm) at the same path inside,
    /// usable only by the VMM's user.
    pub fn device_node(&self, device: &Path) -> Result<()> {
        let meta = fs::metadata(device).map_err(|source| ChrootError::Source {
            what: "device",
            path: device.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_char_device() {
            return Err(ChrootError::NotADevice(device.to_path_buf()));
        }
        let target = self.inside(device);
        if let Some(parent) = target.parent() {
            mkdir(parent)?;
        }
        let _ = fs::remove_file(&target);
        let path = cstring(&target);
        // SAFETY: a NUL-terminated path alive for the call; mode and device number are plain
        // integers.
        let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) };
        check(rc, |source| ChrootError::Mknod {
            path: target.clone(),
            source,
        })?;
        self.give(&target)
    }

    fn give(&self, path: &Path) -> Result<()> {
        chown(path, Some(self.uid), Some(self.gid)).map_err(|source| ChrootError::Chown {
            path: path.to_path_buf(),
            uid: self.uid,
            gid: self.gid,
            source,
        })
    }

    /// Makes the chroot this process's `/`, with the old root detached so that nothing outside
    /// stays reachable.
    pub fn enter(self) -> Result<()> {
        let pivot = |source| ChrootError::PivotRoot {
            path: self.root.clone(),
            source,
        };
        std::env::set_current_dir(&self.root).map_err(pivot)?;
        let dot = cstring(Path::new("."));
        // SAFETY: pivot_root(".", ".") stacks the old root on top of the new one (see
        // pivot_root(2)); the strings are alive for the call.
        let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
        if rc != 0 {
            return Err(pivot(std::io::Error::last_os_error()));
        }
        // SAFETY: detaches the old root now stacked on ".", with a live string.
        let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
        check(rc, pivot)?;
        std::env::set_current_dir("/").map_err(pivot)
    }
}

/// Where path `path` of a chroot at `root` is on the host.
pub fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| ChrootError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    // Searchable by the VMM's user whatever the umask was.
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
    Ok(())
}

/// The ELF program interpreter of `exec`, if it is dynamically linked.
fn interpreter(exec: &Path) -> Result<Option<PathBuf>> {
    use std::io::Read;
    // The program headers and the interpreter's name follow the ELF header in every linker's
    // layout: the start of the file is enough (the binary itself is tens of MiB).
    const HEAD: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    fs::File::open(exec)
        .and_then(|f| f.take(HEAD).read_to_end(&mut bytes))
        .map_err(|source| ChrootError::Source {
            what: "executable",
            path: exec.to_path_buf(),
            source,
        })?;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return Ok(None);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(None);
    };
    const PT_INTERP: u32 = 3;
    for i in 0..usize::from(phnum) {
        let ph = phoff as usize + i * usize::from(phentsize);
        let p_type = bytes
            .get(ph..ph + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if p_type == Some(PT_INTERP) {
            let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
                return Ok(None);
            };
            let name = bytes
                .get(off as usize..(off + size) as usize)
                .unwrap_or_default();
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
        }
    }
    Ok(None)
}

/// The loader and libraries a dynamically linked `exec` loads, as its own loader resolves them
/// (`ld.so --list`, what ldd runs).
fn shared_libraries(exec: &Path) -> Result<Vec<PathBuf>> {
    let Some(interp) = interpreter(exec)? else {
        return Ok(Vec::new());
    };
    let failed = |detail: String| ChrootError::Libraries {
        exec: exec.to_path_buf(),
        interpreter: interp.clone(),
        detail,
    };
    let out = std::process::Command::new(&interp)
        .arg("--list")
        .arg(exec)
        .env_clear()
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(parse_ld_list(
        &String::from_utf8_lossy(&out.stdout),
        &interp,
    ))
}

/// Paths in `ld.so --list` output: `name => /path (0x..)` lines and the loader's own line.
fn parse_ld_list(text: &str, interp: &Path) -> Vec<PathBuf> {
    let mut libs = vec![interp.to_path_buf()];
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')).map(PathBuf::from) {
            if !libs.contains(&p) {
                libs.push(p);
            }
        }
    }
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_listing_gives_absolute_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ld_list(text, Path::new("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(
            libs,
            [
                "/lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn the_test_binary_has_its_loader_as_interpreter() {
        let exe = std::env::current_exe().unwrap();
        let interp = interpreter(&exe)
            .unwrap()
            .expect("a dynamically linked test binary");
        assert!(interp.exists(), "{interp:?}");
        let libs = shared_libraries(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert_eq!(interpreter(Path::new("/etc/passwd")).unwrap(), None);
    }
}
