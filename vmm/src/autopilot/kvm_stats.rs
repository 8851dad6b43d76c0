//! A vCPU's KVM binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+; the vCPU layer opens the
//! file): the header and descriptors are parsed once, then every window is one `pread` of the
//! data block.

use std::fs::File;
use std::os::unix::fs::FileExt;

use predictor::telemetry::KvmVcpuStats;

/// `struct kvm_stats_header`: six u32.
const HEADER_BYTES: usize = 24;
/// `struct kvm_stats_desc` before its name: flags u32, exponent i16, size u16, offset u32,
/// bucket_size u32.
const DESC_FIXED_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    #[error("KVM_GET_STATS_FD failed (this kernel has no binary stats): {0}")]
    Ioctl(std::io::Error),
    #[error("reading the stats fd: {0}")]
    Read(std::io::Error),
    #[error("malformed stats layout: {0}")]
    Layout(&'static str),
}

/// Where each statistic the predictor uses sits in the data block (u64 index), if present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Fields {
    exits: Option<usize>,
    halt_wait_ns: Option<usize>,
    halt_exits: Option<usize>,
    io_exits: Option<usize>,
    mmio_exits: Option<usize>,
    page_faults: Option<usize>,
}

/// The data block's offset and length (u64s) and the fields in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    data_offset: u64,
    data_len: usize,
    fields: Fields,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Layout {
    /// Parses the header and the descriptor block (`num_desc` entries of `16 + name_size`).
    fn parse(header: &[u8], descs: &[u8]) -> Result<Self, KvmStatsError> {
        if header.len() < HEADER_BYTES {
            return Err(KvmStatsError::Layout("short header"));
        }
        let name_size = u32_at(header, 4) as usize;
        let num_desc = u32_at(header, 8) as usize;
        let data_offset = u64::from(u32_at(header, 20));
        let desc_size = DESC_FIXED_BYTES + name_size;
        if descs.len() < num_desc * desc_size {
            return Err(KvmStatsError::Layout(
                "descriptor block shorter than the header says",
            ));
        }
        let mut fields = Fields::default();
        let mut data_len = 0;
        for d in descs.chunks_exact(desc_size).take(num_desc) {
            let size = usize::from(u16::from_le_bytes([d[6], d[7]]));
            let offset = u32_at(d, 8) as usize;
            if !offset.is_multiple_of(8) {
                return Err(KvmStatsError::Layout("stat offset not 8-byte aligned"));
            }
            let index = offset / 8;
            data_len = data_len.max(index + size);
            let name = &d[DESC_FIXED_BYTES..];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            let slot = match name {
                b"exits" => &mut fields.exits,
                b"halt_wait_ns" => &mut fields.halt_wait_ns,
                b"halt_exits" => &mut fields.halt_exits,
                b"io_exits" => &mut fields.io_exits,
                b"mmio_exits" => &mut fields.mmio_exits,
                b"pf_taken" => &mut fields.page_faults,
                _ => continue,
            };
            if size == 1 {
                *slot = Some(index);
            }
        }
        Ok(Layout {
            data_offset,
            data_len,
            fields,
        })
    }

    fn stats(&self, data: &[u64]) -> KvmVcpuStats {
        let get = |i: Option<usize>| i.and_then(|i| data.get(i)).copied().unwrap_or(0);
        KvmVcpuStats {
            exits: get(self.fields.exits),
            halt_wait_ns: get(self.fields.halt_wait_ns),
            halt_exits: self.fields.halt_exits.and_then(|i| data.get(i)).copied(),
            io_exits: get(self.fields.io_exits),
            mmio_exits: get(self.fields.mmio_exits),
            page_faults: get(self.fields.page_faults),
        }
    }
}

/// One vCPU's stats file.
pub struct KvmStatsReader {
    file: File,
    layout: Layout,
    bytes: Vec<u8>,
    data: Vec<u64>,
}

impl KvmStatsReader {
    /// Reads the layout of a vCPU's stats `file`.
    pub fn new(file: File) -> Result<Self, KvmStatsError> {
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut header, 0)
            .map_err(KvmStatsError::Read)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let mut descs = vec![0u8; num_desc * (DESC_FIXED_BYTES + name_size)];
        file.read_exact_at(&mut descs, desc_offset)
            .map_err(KvmStatsError::Read)?;
        let layout = Layout::parse(&header, &descs)?;
        Ok(Self {
            file,
            bytes: vec![0; layout.data_len * 8],
            data: vec![0; layout.data_len],
            layout,
        })
    }

    /// The cumulative counters now.
    pub fn read(&mut self) -> Result<KvmVcpuStats, KvmStatsError> {
        self.file
            .read_exact_at(&mut self.bytes, self.layout.data_offset)
            .map_err(KvmStatsError::Read)?;
        for (v, b) in self.data.iter_mut().zip(self.bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(b.try_into().expect("chunks of 8"));
        }
        Ok(self.layout.stats(&self.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, size: u16, offset: u32, name_size: usize) -> Vec<u8> {
        let mut d = vec![0u8; DESC_FIXED_BYTES + name_size];
        d[6..8].copy_from_slice(&size.to_le_bytes());
        d[8..12].copy_from_slice(&offset.to_le_bytes());
        d[DESC_FIXED_BYTES..DESC_FIXED_BYTES + name.len()].copy_from_slice(name.as_bytes());
        d
    }

    #[test]
    fn parses_descriptors_by_name_and_skips_histograms() {
        let name_size = 16;
        let mut header = vec![0u8; HEADER_BYTES];
        header[4..8].copy_from_slice(&(name_size as u32).to_le_bytes());
        header[8..12].copy_from_slice(&4u32.to_le_bytes());
        header[20..24].copy_from_slice(&4096u32.to_le_bytes());
        let mut descs = desc("halt_wait_hist", 32, 0, name_size);
        descs.extend(desc("exits", 1, 256, name_size));
        descs.extend(desc("io_exits", 1, 264, name_size));
        descs.extend(desc("pf_taken", 1, 272, name_size));
        let l = Layout::parse(&header, &descs).unwrap();
        assert_eq!(l.data_offset, 4096);
        assert_eq!(l.data_len, 35);
        let mut data = vec![0u64; 35];
        data[32] = 7;
        data[33] = 3;
        data[34] = 9;
        let s = l.stats(&data);
        assert_eq!(
            (s.exits, s.io_exits, s.page_faults, s.mmio_exits),
            (7, 3, 9, 0)
        );
        assert_eq!(s.halt_exits, None, "not counted: unknown, not zero");
        assert!(Layout::parse(&header, &descs[..20]).is_err());
    }

    /// This host's KVM (kvm_pvm, 6.x) has binary stats; the test says so if a kernel lacks them.
    #[test]
    fn reads_a_real_vcpus_stats() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = crate::vstate::vcpu::Vcpu::new(&vm, 0).unwrap();
        let file = vcpu
            .stats_file()
            .expect("KVM_GET_STATS_FD on this host's kernel");
        let mut r = KvmStatsReader::new(file).unwrap();
        assert!(r.layout.fields.exits.is_some(), "{:?}", r.layout);
        assert!(r.layout.fields.halt_exits.is_some(), "{:?}", r.layout);
        let s = r.read().unwrap();
        assert_eq!(s.io_exits, 0);
        // A file that is not a stats file has no layout.
        let not_stats = File::open("/dev/null").unwrap();
        assert!(matches!(
            KvmStatsReader::new(not_stats),
            Err(KvmStatsError::Read(_))
        ));
    }
}
