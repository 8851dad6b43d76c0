//! Linux guests: the images resources/guest/build-guest-images.sh makes, what kind of KVM this
//! host has, kernel command lines, and QEMU's microvm as a reference. Shared by the Linux guest
//! tests and benchmarks, here and in L1 (see `nested`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `<root>/integration-tests`).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// What /dev/kvm is on this host, from the loaded KVM modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// kvm_intel or kvm_amd: hardware virtualization; a full Linux boot takes about a second.
    Hardware(&'static str),
    /// kvm_pvm without a hardware module: guest kernel code is emulated instruction by
    /// instruction, so only the early boot is quick (see resources/guest/README.md).
    Software,
    /// No KVM module this code knows.
    Unknown,
}

impl HostKvm {
    pub fn detect() -> HostKvm {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if let Some(m) = ["kvm_intel", "kvm_amd"].into_iter().find(|m| loaded(m)) {
            HostKvm::Hardware(m)
        } else if loaded("kvm_pvm") {
            HostKvm::Software
        } else {
            HostKvm::Unknown
        }
    }

    /// The image variant build-guest-images.sh makes for this host.
    pub fn variant(self) -> &'static str {
        match self {
            HostKvm::Software => "software-kvm",
            HostKvm::Hardware(_) | HostKvm::Unknown => "plain",
        }
    }

    /// Why the full-boot tests do not run here, if they do not.
    pub fn why_no_full_boot(self) -> Option<String> {
        match self {
            HostKvm::Hardware(_) => None,
            HostKvm::Software => Some(
                "this host's /dev/kvm is kvm_pvm (software KVM): guest kernel code is emulated, a \
                 full Linux boot takes many minutes; run on a host with kvm_intel or kvm_amd"
                    .into(),
            ),
            HostKvm::Unknown => Some(
                "no kvm_intel or kvm_amd module loaded: the full-boot tests need hardware \
                 virtualization"
                    .into(),
            ),
        }
    }
}

/// The images build-guest-images.sh produced (its manifest).
#[derive(Debug)]
pub struct Images {
    pub variant: String,
    pub kernel_release: String,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub workloads: PathBuf,
    pub rootfs: PathBuf,
}

/// A first build compiles a kernel: about 8 minutes on 2 idle cores, far more on a busy one.
const IMAGE_BUILD_DEADLINE: Duration = Duration::from_secs(60 * 60);

/// Names a manifest file to use instead of building images (L1 hosts carry theirs, see `nested`).
pub const IMAGES_ENV: &str = "PRESCIENT_GUEST_IMAGES";

/// The guest images for this host: those `PRESCIENT_GUEST_IMAGES` names, else built (once, under
/// the script's lock) if not cached.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| match std::env::var_os(IMAGES_ENV) {
        Some(manifest) => {
            let text = std::fs::read_to_string(&manifest)
                .unwrap_or_else(|e| panic!("{IMAGES_ENV}={}: {e}", Path::new(&manifest).display()));
            parse_manifest(&text)
        }
        None => build_images(HostKvm::detect().variant()),
    })
}

/// Runs build-guest-images.sh for `variant` (instant when cached) and reads its manifest.
fn build_images(variant: &str) -> Images {
    let (status, manifest) = images_manifest(variant);
    assert!(
        status.success(),
        "build-guest-images.sh --variant {variant} failed ({status}); its messages are above"
    );
    parse_manifest(&manifest)
}

/// build-guest-images.sh's status and manifest text for `variant`.
pub fn images_manifest(variant: &str) -> (ExitStatus, String) {
    let script = repo_root().join("resources/guest/build-guest-images.sh");
    eprintln!(
        "guest images: {} --variant {variant} --print-paths (instant when cached)",
        script.display()
    );
    let child = Command::new(&script)
        .args(["--variant", variant, "--print-paths"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Progress goes straight to the test's stderr, so a long first build shows.
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    wait_output(child, IMAGE_BUILD_DEADLINE).unwrap_or_else(|e| panic!("{}: {e}", script.display()))
}

/// Reads a manifest of build-guest-images.sh; every path it names must be a file.
pub fn parse_manifest(text: &str) -> Images {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("manifest has no {key}=:\n{text}"))
            .to_string()
    };
    let path = |key: &str| {
        let p = PathBuf::from(get(key));
        assert!(
            p.is_file(),
            "manifest names {} but it is not a file",
            p.display()
        );
        p
    };
    Images {
        variant: get("variant"),
        kernel_release: get("kernel_release"),
        vmlinux: path("vmlinux"),
        initramfs: path("initramfs"),
        workloads: path("workloads"),
        rootfs: path("rootfs"),
    }
}

/// Waits for `child` (stdout piped) within `deadline`: its status and stdout; kills it after.
pub fn wait_output(mut child: Child, deadline: Duration) -> Result<(ExitStatus, String), String> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok((status, reader.join().unwrap_or_default()));
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {deadline:?}; killed"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kernel command line every test and the benchmark start from.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// What this host's early boot needs on the command line: resources/guest/software-kvm/cmdline
/// on a software-KVM host, nothing elsewhere.
pub fn host_cmdline_additions() -> String {
    if HostKvm::detect() != HostKvm::Software {
        return String::new();
    }
    let path = repo_root().join("resources/guest/software-kvm/cmdline");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `BASE_CMDLINE`, this host's additions, then `extra`.
pub fn cmdline(extra: &str) -> String {
    [BASE_CMDLINE, &host_cmdline_additions(), extra]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A prescient VM spec booting `kernel` with an optional initrd.
pub fn prescient_spec(
    kernel: &Path,
    initrd: Option<&Path>,
    vcpus: u8,
    mem_mib: u64,
    boot_args: &str,
) -> String {
    let mut boot = serde_json::json!({"kernel_image_path": kernel, "boot_args": boot_args});
    if let Some(initrd) = initrd {
        boot["initrd_path"] = serde_json::json!(initrd);
    }
    // The project's kernel is built without ACPI (resources/guest/kernel.config): under the
    // default (ACPI on) it finds its CPUs in the MP table and its devices on the command line,
    // which prescient gives beside the ACPI tables as Firecracker does.
    serde_json::json!({
        "boot-source": boot,
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
    .to_string()
}

/// QEMU's microvm machine with the reset port (`-device i8042`) and the console on stdout.
/// `accel` is `kvm` or `tcg`; with kvm the default CPU model, because `-cpu host` aborts on hosts
/// whose KVM refuses MSR 0x10a; with tcg the richest model (`max`).
pub fn qemu_microvm(
    accel: &str,
    vcpus: u8,
    mem_mib: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off,x-option-roms=off,rtc=off"])
        .args(["-accel", accel])
        .args(["-smp", &vcpus.to_string(), "-m", &mem_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-no-reboot", "-device", "i8042"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", cmdline]);
    if accel == "tcg" {
        c.args(["-cpu", "max"]);
    }
    if let Some(initrd) = initrd {
        c.arg("-initrd").arg(initrd);
    }
    c
}

/// Adds `image` as a virtio-blk disk (/dev/vda) that the guest may write without changing it.
pub fn qemu_disk(c: &mut Command, image: &Path) {
    c.arg("-drive")
        .arg(format!(
            "id=vda,file={},format=raw,if=none,snapshot=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=vda"]);
}

pub fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
