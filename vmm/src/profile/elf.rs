//! Static analysis of the workload's binaries: a small ELF64 (little-endian) reader for the
//! section table, program headers, DT_NEEDED and undefined dynamic symbols, and the mapping
//! from imported libc wrappers to the syscalls they make.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("truncated: {what} at offset {offset} runs past the end of the file")]
    Truncated { what: &'static str, offset: u64 },
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
}

/// What the profile records of one binary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElfSummary {
    /// `elf64` or, for a kernel that is not ELF, `bzImage`/`raw`.
    pub format: String,
    /// Sections with their sizes (empty for non-ELF kernels).
    pub sections: Vec<SectionInfo>,
    /// Bytes of allocated, writable PROGBITS (initialised data).
    pub data_bytes: u64,
    /// Bytes of allocated NOBITS (bss).
    pub bss_bytes: u64,
    /// DT_NEEDED shared libraries.
    pub needed: Vec<String>,
    /// Undefined dynamic symbols (what the binary imports).
    pub imports: Vec<String>,
    /// Syscalls reachable through the imported libc wrappers; `None` where that is not
    /// decidable (a static binary makes its syscalls inline).
    pub syscalls: Option<Vec<String>>,
    /// A loadable segment both writable and executable, or an executable stack.
    pub writable_executable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionInfo {
    pub name: String,
    pub size: u64,
}

const SHT_PROGBITS: u32 = 1;
const SHT_DYNAMIC: u32 = 6;
const SHT_NOBITS: u32 = 8;
const SHT_DYNSYM: u32 = 11;
const SHF_WRITE: u64 = 1;
const SHF_ALLOC: u64 = 2;
const PT_LOAD: u32 = 1;
const PT_GNU_STACK: u32 = 0x6474_e551;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const DT_NEEDED: u64 = 1;

/// libc wrappers whose import means the program can make that syscall (the wrapper name is the
/// syscall's where it is not listed with another).
const WRAPPERS: &[(&str, &str)] = &[
    ("socket", "socket"),
    ("socketpair", "socketpair"),
    ("connect", "connect"),
    ("bind", "bind"),
    ("listen", "listen"),
    ("accept", "accept"),
    ("accept4", "accept4"),
    ("sendto", "sendto"),
    ("recvfrom", "recvfrom"),
    ("ptrace", "ptrace"),
    ("mprotect", "mprotect"),
    ("mmap", "mmap"),
    ("mmap64", "mmap"),
    ("execve", "execve"),
    ("execv", "execve"),
    ("execvp", "execve"),
    ("system", "execve"),
    ("fork", "clone"),
    ("pthread_create", "clone"),
    ("clone", "clone"),
    ("open", "openat"),
    ("open64", "openat"),
    ("openat", "openat"),
    ("fopen", "openat"),
    ("read", "read"),
    ("write", "write"),
    ("ioctl", "ioctl"),
    ("setuid", "setuid"),
    ("setgid", "setgid"),
    ("mount", "mount"),
    ("init_module", "init_module"),
    ("bpf", "bpf"),
    ("unshare", "unshare"),
    ("setns", "setns"),
];

/// Syscalls that make a workload worth a stricter start.
pub const SENSITIVE_SYSCALLS: &[&str] = &[
    "ptrace",
    "mount",
    "init_module",
    "bpf",
    "unshare",
    "setns",
    "setuid",
];

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&self, what: &'static str, offset: u64, len: u64) -> Result<&[u8], ElfError> {
        let end = offset
            .checked_add(len)
            .ok_or(ElfError::Truncated { what, offset })?;
        self.0
            .get(offset as usize..end as usize)
            .filter(|_| end <= self.0.len() as u64)
            .ok_or(ElfError::Truncated { what, offset })
    }
    fn u16(&self, what: &'static str, o: u64) -> Result<u16, ElfError> {
        let b = self.bytes(what, o, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, what: &'static str, o: u64) -> Result<u32, ElfError> {
        let b = self.bytes(what, o, 4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&self, what: &'static str, o: u64) -> Result<u64, ElfError> {
        let b = self.bytes(what, o, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    /// A NUL-terminated string in the string table at `table` (of `size` bytes).
    fn str_at(&self, table: u64, size: u64, index: u64) -> Result<String, ElfError> {
        let tab = self.bytes("string table", table, size)?;
        let start = (index as usize).min(tab.len());
        let end = tab[start..]
            .iter()
            .position(|&c| c == 0)
            .map_or(tab.len(), |p| start + p);
        Ok(String::from_utf8_lossy(&tab[start..end]).into_owned())
    }
}

struct Section {
    name: u32,
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

/// Summarises `bytes`: a kernel that is not ELF gets a summary that says which format it is.
pub fn analyze(bytes: &[u8]) -> Result<ElfSummary, ElfError> {
    if bytes.len() >= 0x206 && &bytes[0x202..0x206] == b"HdrS" {
        return Ok(ElfSummary {
            format: "bzImage".into(),
            ..ElfSummary::default()
        });
    }
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(ElfError::NotElf64);
    }
    let r = Reader(bytes);
    let phoff = r.u64("e_phoff", 0x20)?;
    let shoff = r.u64("e_shoff", 0x28)?;
    let phentsize = u64::from(r.u16("e_phentsize", 0x36)?);
    let phnum = u64::from(r.u16("e_phnum", 0x38)?);
    let shentsize = u64::from(r.u16("e_shentsize", 0x3a)?);
    let shnum = u64::from(r.u16("e_shnum", 0x3c)?);
    let shstrndx = u64::from(r.u16("e_shstrndx", 0x3e)?);

    let mut summary = ElfSummary {
        format: "elf64".into(),
        ..ElfSummary::default()
    };
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let (kind, flags) = (r.u32("program header", o)?, r.u32("program header", o + 4)?);
        let wx = flags & (PF_W | PF_X) == PF_W | PF_X;
        if (kind == PT_LOAD && wx) || (kind == PT_GNU_STACK && flags & PF_X != 0) {
            summary.writable_executable = true;
        }
    }
    let mut sections = Vec::new();
    for i in 0..shnum {
        let o = shoff + i * shentsize;
        sections.push(Section {
            name: r.u32("section header", o)?,
            kind: r.u32("section header", o + 4)?,
            flags: r.u64("section header", o + 8)?,
            offset: r.u64("section header", o + 0x18)?,
            size: r.u64("section header", o + 0x20)?,
            link: r.u32("section header", o + 0x28)?,
            entsize: r.u64("section header", o + 0x38)?,
        });
    }
    let names = sections.get(shstrndx as usize).map(|s| (s.offset, s.size));
    for s in &sections {
        let name = match names {
            Some((off, size)) => r.str_at(off, size, u64::from(s.name))?,
            None => String::new(),
        };
        if s.flags & SHF_ALLOC != 0 {
            match s.kind {
                SHT_NOBITS => summary.bss_bytes += s.size,
                SHT_PROGBITS if s.flags & SHF_WRITE != 0 => summary.data_bytes += s.size,
                _ => {}
            }
        }
        if !name.is_empty() {
            summary.sections.push(SectionInfo { name, size: s.size });
        }
    }
    let strtab_of = |s: &Section| sections.get(s.link as usize).map(|t| (t.offset, t.size));
    let mut dynamic = false;
    for s in &sections {
        let Some((tab, tab_size)) = strtab_of(s) else {
            continue;
        };
        match s.kind {
            SHT_DYNAMIC => {
                dynamic = true;
                for e in 0..s.size / 16 {
                    let o = s.offset + e * 16;
                    if r.u64("dynamic entry", o)? == DT_NEEDED {
                        let index = r.u64("dynamic entry", o + 8)?;
                        summary.needed.push(r.str_at(tab, tab_size, index)?);
                    }
                }
            }
            SHT_DYNSYM => {
                dynamic = true;
                let entsize = if s.entsize == 0 { 24 } else { s.entsize };
                // Entry 0 is the null symbol.
                for e in 1..s.size / entsize {
                    let o = s.offset + e * entsize;
                    let shndx = r.u16("symbol", o + 6)?;
                    let name = r.str_at(tab, tab_size, u64::from(r.u32("symbol", o)?))?;
                    if shndx == 0 && !name.is_empty() {
                        // Versioned names (`socket@GLIBC_2.2.5`) keep the bare name.
                        let bare = name.split('@').next().unwrap_or(&name).to_string();
                        summary.imports.push(bare);
                    }
                }
            }
            _ => {}
        }
    }
    summary.imports.sort();
    summary.imports.dedup();
    if dynamic {
        let mut calls: Vec<String> = WRAPPERS
            .iter()
            .filter(|(w, _)| summary.imports.iter().any(|i| i == w))
            .map(|(_, s)| s.to_string())
            .collect();
        calls.sort();
        calls.dedup();
        summary.syscalls = Some(calls);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's own executable: a dynamically linked ELF64 that imports libc.
    fn me() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn reads_a_real_dynamic_executable() {
        let s = analyze(&me()).unwrap();
        assert_eq!(s.format, "elf64");
        assert!(s.sections.iter().any(|x| x.name == ".text" && x.size > 0));
        assert!(s.bss_bytes > 0, "{s:?}");
        assert!(
            s.needed.iter().any(|n| n.starts_with("libc.so")),
            "{:?}",
            s.needed
        );
        assert!(s.imports.iter().any(|i| i == "mmap" || i == "mmap64"));
        let calls = s.syscalls.expect("dynamic binary: decidable");
        assert!(calls.iter().any(|c| c == "mmap"), "{calls:?}");
        assert!(!s.writable_executable);
    }

    #[test]
    fn rejects_what_is_not_elf64_and_truncation() {
        assert_eq!(analyze(b"hello").unwrap_err(), ElfError::NotElf64);
        let mut bytes = me();
        bytes.truncate(4096);
        assert!(matches!(
            analyze(&bytes).unwrap_err(),
            ElfError::Truncated { .. }
        ));
    }

    #[test]
    fn a_bzimage_is_named_not_parsed() {
        let mut b = vec![0u8; 0x300];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(analyze(&b).unwrap().format, "bzImage");
    }
}
