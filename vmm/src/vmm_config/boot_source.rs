//! `boot-source`: the guest kernel, its command line and initrd.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_file, ConfigError, JsonPath};
use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// Used when the spec gives no `boot_args`: a console on the serial port, reset via the i8042
/// (the VMM turns that into a clean exit), and no probing of hardware a microVM does not have.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Firecracker's boot source: kernel, optional command line, optional initrd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// The kernel image formats prescient boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A 64-bit ELF (vmlinux), PVH or Linux 64-bit entry.
    Elf64,
    /// A bzImage, Linux 64-bit entry.
    BzImage,
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";

impl KernelFormat {
    /// Tells the format from the image's magic numbers.
    pub fn detect<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<Self>> {
        let mut head = [0u8; 5];
        image.seek(SeekFrom::Start(0))?;
        if image.read_exact(&mut head).is_ok() && head[..4] == ELF_MAGIC {
            return Ok((head[4] == ELFCLASS64).then_some(KernelFormat::Elf64));
        }
        let mut magic = [0u8; 4];
        image.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
        let is_bzimage = image.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_MAGIC;
        Ok(is_bzimage.then_some(KernelFormat::BzImage))
    }
}

impl BootSourceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let kernel_field = || JsonPath::keys(&["boot-source", "kernel_image_path"]);
        let mut kernel = check_file(kernel_field(), &self.kernel_image_path)?;
        let format = KernelFormat::detect(&mut kernel).map_err(|e| {
            ConfigError::new(
                kernel_field(),
                format!("cannot read {}: {e}", self.kernel_image_path.display()),
            )
        })?;
        if format.is_none() {
            return Err(ConfigError::new(
                kernel_field(),
                format!(
                    "{} is neither a 64-bit ELF (vmlinux) nor a bzImage",
                    self.kernel_image_path.display()
                ),
            ));
        }
        if let Some(initrd) = &self.initrd_path {
            check_file(JsonPath::keys(&["boot-source", "initrd_path"]), initrd)?;
        }
        let args = self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS);
        // The NUL terminator shares the kernel's buffer.
        if args.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::new(
                JsonPath::keys(&["boot-source", "boot_args"]),
                format!(
                    "{} bytes is longer than the kernel's {} byte command line",
                    args.len(),
                    CMDLINE_MAX_SIZE - 1
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn detects_formats_by_magic() {
        let mut elf = vec![0x7f, b'E', b'L', b'F', 2];
        elf.resize(0x300, 0);
        assert_eq!(
            KernelFormat::detect(&mut Cursor::new(&elf)).unwrap(),
            Some(KernelFormat::Elf64)
        );
        elf[4] = 1; // ELFCLASS32
        assert_eq!(KernelFormat::detect(&mut Cursor::new(&elf)).unwrap(), None);

        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            KernelFormat::detect(&mut Cursor::new(&bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            KernelFormat::detect(&mut Cursor::new(b"#!/bin/sh\n")).unwrap(),
            None
        );
        assert_eq!(KernelFormat::detect(&mut Cursor::new(b"")).unwrap(), None);
    }

    #[test]
    fn each_bad_boot_source_has_its_own_message() {
        let src = |k: &str| BootSourceConfig {
            kernel_image_path: PathBuf::from(k),
            boot_args: None,
            initrd_path: None,
        };
        let e = src("/nonexistent/vmlinux").validate().unwrap_err();
        assert_eq!(e.path.to_string(), "boot-source.kernel_image_path");
        assert!(e.message.contains("No such file"), "{e}");

        let e = src("/tmp").validate().unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");

        let text =
            std::env::temp_dir().join(format!("prescient-not-a-kernel-{}", std::process::id()));
        std::fs::write(&text, "just text").unwrap();
        let e = src(text.to_str().unwrap()).validate().unwrap_err();
        assert!(
            e.message
                .contains("neither a 64-bit ELF (vmlinux) nor a bzImage"),
            "{e}"
        );

        let me = std::env::current_exe().unwrap();
        let mut ok = src(me.to_str().unwrap());
        assert!(ok.validate().is_ok(), "the test binary is a 64-bit ELF");
        ok.initrd_path = Some(PathBuf::from("/nonexistent/initrd"));
        assert_eq!(
            ok.validate().unwrap_err().path.to_string(),
            "boot-source.initrd_path"
        );
        ok.initrd_path = None;
        ok.boot_args = Some("x".repeat(CMDLINE_MAX_SIZE));
        assert!(ok.validate().unwrap_err().message.contains("command line"));
    }
}
