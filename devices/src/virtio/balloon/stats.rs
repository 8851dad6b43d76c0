//! The guest's memory statistics as the balloon's stats queue carries them: 10-byte
//! `{le16 tag, le64 value}` entries, newest report kept with the time it arrived.

use std::time::Instant;

use serde::Serialize;

/// Size of one statistics entry.
pub const ENTRY_SIZE: usize = 10;
/// The largest report read: many times the tags any driver knows, and a bound on what a guest can
/// make the VMM allocate (a chain of descriptors each spanning guest RAM would be gigabytes).
pub const MAX_REPORT_SIZE: usize = 256 * ENTRY_SIZE;

/// The latest statistics the guest reported. Fields stay `None` until the guest reports them;
/// sizes are in bytes, as the guest sends them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GuestStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl GuestStats {
    /// The field for a virtio tag (VIRTIO_BALLOON_S_*), if the tag is known.
    fn field(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kill,
            11 => &mut self.alloc_stall,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return None,
        })
    }

    /// Parses a whole report. Unknown tags are skipped (newer guests send more); a trailing
    /// partial entry makes the report malformed, and it is then not used at all.
    pub fn parse(bytes: &[u8]) -> Option<(GuestStats, usize)> {
        if !bytes.len().is_multiple_of(ENTRY_SIZE) {
            return None;
        }
        let mut stats = GuestStats::default();
        let mut unknown = 0;
        for entry in bytes.chunks_exact(ENTRY_SIZE) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..]);
            match stats.field(tag) {
                Some(f) => *f = Some(u64::from_le_bytes(value)),
                None => unknown += 1,
            }
        }
        Some((stats, unknown))
    }
}

/// A report and when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct StatsReport {
    pub stats: GuestStats,
    pub at: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn known_tags_fill_fields_unknown_are_counted_partial_entries_refused() {
        let mut bytes = entry(4, 1 << 20);
        bytes.extend(entry(5, 64 << 20));
        bytes.extend(entry(99, 7));
        bytes.extend(entry(10, 2));
        let (s, unknown) = GuestStats::parse(&bytes).unwrap();
        assert_eq!(s.free_memory, Some(1 << 20));
        assert_eq!(s.total_memory, Some(64 << 20));
        assert_eq!(s.oom_kill, Some(2));
        assert_eq!(s.swap_in, None);
        assert_eq!(unknown, 1);
        bytes.push(0);
        assert!(GuestStats::parse(&bytes).is_none());
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["free_memory"], 1 << 20);
        assert!(json.get("swap_in").is_none());
    }
}
