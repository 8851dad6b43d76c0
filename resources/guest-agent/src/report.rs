//! The guest's own view of its resources, read from /proc and /sys, as one JSON line.
//!
//! Parsing works on text so that it can be tested off the guest; `Snapshot::read` does the I/O.

use std::fmt::Write as _;
use std::fs;

/// Linux reports /proc/stat in USER_HZ, which is 100 on x86 whatever the kernel's HZ.
const MS_PER_USER_HZ_TICK: u64 = 10;
const SECTOR_BYTES: u64 = 512;

/// `avg10` of one /proc/pressure file: the share of the last 10 s (in %) in which some, or all
/// non-idle, tasks were stalled on the resource.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pressure {
    pub some_avg10: f64,
    pub full_avg10: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub user_ms: u64,
    pub system_ms: u64,
    pub idle_ms: u64,
    pub iowait_ms: u64,
    pub steal_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskTotals {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_kib: u64,
    pub write_kib: u64,
}

/// One report. Fields the guest does not provide (no PSI, no /sys) are `None` and print as null.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub uptime_ms: Option<u64>,
    pub mem_total_kib: Option<u64>,
    pub mem_available_kib: Option<u64>,
    pub mem_free_kib: Option<u64>,
    pub psi_cpu: Option<Pressure>,
    pub psi_memory: Option<Pressure>,
    pub psi_io: Option<Pressure>,
    pub cpus_online: Option<u32>,
    pub cpu: Option<CpuTimes>,
    pub disk: Option<DiskTotals>,
}

/// The value in kB of `key` in /proc/meminfo.
pub fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A /proc/pressure/{cpu,memory,io} file. `full` is absent on kernels before 5.13 for cpu.
pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let avg10 = |kind: &str| {
        text.lines()
            .find(|l| l.starts_with(kind))?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse::<f64>()
            .ok()
    };
    Some(Pressure {
        some_avg10: avg10("some ")?,
        full_avg10: avg10("full ").unwrap_or(0.0),
    })
}

/// The aggregate `cpu` line of /proc/stat.
pub fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0) * MS_PER_USER_HZ_TICK;
    // user nice system idle iowait irq softirq steal ...
    Some(CpuTimes {
        user_ms: at(0) + at(1),
        system_ms: at(2) + at(5) + at(6),
        idle_ms: at(3),
        iowait_ms: at(4),
        steal_ms: at(7),
    })
}

/// Sums /proc/diskstats over the devices `is_disk` accepts (whole disks: partitions would count
/// the same I/O twice).
pub fn parse_diskstats(text: &str, is_disk: impl Fn(&str) -> bool) -> DiskTotals {
    let mut t = DiskTotals::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || !is_disk(f[2]) {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        t.read_ops += n(3);
        t.read_kib += n(5) * SECTOR_BYTES / 1024;
        t.write_ops += n(7);
        t.write_kib += n(9) * SECTOR_BYTES / 1024;
    }
    t
}

impl Snapshot {
    pub fn read() -> Snapshot {
        let file = |p: &str| fs::read_to_string(p).ok();
        let meminfo = file("/proc/meminfo").unwrap_or_default();
        // Only block devices in /sys/block are whole disks; loop and ram disks are not I/O.
        let is_disk = |name: &str| {
            !name.starts_with("loop")
                && !name.starts_with("ram")
                && fs::metadata(format!("/sys/block/{name}")).is_ok()
        };
        Snapshot {
            uptime_ms: file("/proc/uptime").and_then(|u| {
                let secs: f64 = u.split_whitespace().next()?.parse().ok()?;
                Some((secs * 1000.0) as u64)
            }),
            mem_total_kib: meminfo_kib(&meminfo, "MemTotal"),
            mem_available_kib: meminfo_kib(&meminfo, "MemAvailable"),
            mem_free_kib: meminfo_kib(&meminfo, "MemFree"),
            psi_cpu: file("/proc/pressure/cpu").and_then(|t| parse_pressure(&t)),
            psi_memory: file("/proc/pressure/memory").and_then(|t| parse_pressure(&t)),
            psi_io: file("/proc/pressure/io").and_then(|t| parse_pressure(&t)),
            cpus_online: crate::cpus::online().map(|n| n as u32),
            cpu: file("/proc/stat").and_then(|t| parse_cpu_times(&t)),
            disk: file("/proc/diskstats").map(|t| parse_diskstats(&t, is_disk)),
        }
    }

    /// The report as one JSON object; `workload` names what the agent is running, if anything.
    pub fn to_json(&self, workload: Option<&str>) -> String {
        fn num(v: Option<u64>) -> String {
            v.map_or("null".into(), |n| n.to_string())
        }
        fn psi(p: Option<Pressure>) -> String {
            p.map_or("null".into(), |p| {
                format!(
                    "{{\"some_avg10\":{:.2},\"full_avg10\":{:.2}}}",
                    p.some_avg10, p.full_avg10
                )
            })
        }
        let mut s = String::with_capacity(512);
        let _ = write!(
            s,
            "{{\"uptime_ms\":{},\"mem_total_kib\":{},\"mem_available_kib\":{},\"mem_free_kib\":{},\
             \"psi\":{{\"cpu\":{},\"memory\":{},\"io\":{}}},\"cpus_online\":{},",
            num(self.uptime_ms),
            num(self.mem_total_kib),
            num(self.mem_available_kib),
            num(self.mem_free_kib),
            psi(self.psi_cpu),
            psi(self.psi_memory),
            psi(self.psi_io),
            num(self.cpus_online.map(u64::from)),
        );
        match self.cpu {
            Some(c) => {
                let _ = write!(
                    s,
                    "\"cpu\":{{\"user_ms\":{},\"system_ms\":{},\"idle_ms\":{},\"iowait_ms\":{},\"steal_ms\":{}}},",
                    c.user_ms, c.system_ms, c.idle_ms, c.iowait_ms, c.steal_ms
                );
            }
            None => s.push_str("\"cpu\":null,"),
        }
        match self.disk {
            Some(d) => {
                let _ = write!(
                    s,
                    "\"io\":{{\"read_ops\":{},\"write_ops\":{},\"read_kib\":{},\"write_kib\":{}}},",
                    d.read_ops, d.write_ops, d.read_kib, d.write_kib
                );
            }
            None => s.push_str("\"io\":null,"),
        }
        match workload {
            Some(w) => {
                let _ = write!(s, "\"workload\":{}}}", json_string(w));
            }
            None => s.push_str("\"workload\":null}"),
        }
        s
    }
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:         496812 kB\nMemFree:          470000 kB\n\
                           MemAvailable:     480123 kB\nBuffers:               0 kB\n";

    #[test]
    fn reads_meminfo_fields_exactly() {
        assert_eq!(meminfo_kib(MEMINFO, "MemTotal"), Some(496_812));
        assert_eq!(meminfo_kib(MEMINFO, "MemAvailable"), Some(480_123));
        assert_eq!(meminfo_kib(MEMINFO, "Mem"), None);
        assert_eq!(meminfo_kib(MEMINFO, "Cached"), None);
    }

    #[test]
    fn reads_pressure_files() {
        let mem = "some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\n\
                   full avg10=0.75 avg60=0.10 avg300=0.00 total=567\n";
        assert_eq!(
            parse_pressure(mem),
            Some(Pressure {
                some_avg10: 1.5,
                full_avg10: 0.75
            })
        );
        let old_cpu = "some avg10=12.00 avg60=3.00 avg300=1.00 total=99\n";
        assert_eq!(
            parse_pressure(old_cpu),
            Some(Pressure {
                some_avg10: 12.0,
                full_avg10: 0.0
            })
        );
        assert_eq!(parse_pressure(""), None);
    }

    #[test]
    fn reads_cpu_times_in_milliseconds() {
        let stat = "cpu  100 5 30 1000 7 1 2 3 0 0\ncpu0 50 0 15 500 3 0 1 1 0 0\n";
        assert_eq!(
            parse_cpu_times(stat),
            Some(CpuTimes {
                user_ms: 1050,
                system_ms: 330,
                idle_ms: 10_000,
                iowait_ms: 70,
                steal_ms: 30
            })
        );
        assert_eq!(parse_cpu_times("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn sums_whole_disks_only() {
        let stats = " 254       0 vda 10 0 2048 5 20 0 4096 9 0 10 14 0 0 0 0\n\
                     254       1 vda1 10 0 2048 5 20 0 4096 9 0 10 14 0 0 0 0\n\
                     254      16 vdb 1 0 8 1 2 0 16 1 0 2 2 0 0 0 0\n";
        let t = parse_diskstats(stats, |n| n == "vda" || n == "vdb");
        assert_eq!(
            t,
            DiskTotals {
                read_ops: 11,
                write_ops: 22,
                read_kib: 1028,
                write_kib: 2056
            }
        );
    }

    #[test]
    fn formats_a_full_report_as_one_json_line() {
        let s = Snapshot {
            uptime_ms: Some(1500),
            mem_total_kib: Some(496_812),
            mem_available_kib: Some(480_123),
            mem_free_kib: Some(470_000),
            psi_cpu: Some(Pressure {
                some_avg10: 12.0,
                full_avg10: 0.0,
            }),
            psi_memory: Some(Pressure {
                some_avg10: 1.5,
                full_avg10: 0.75,
            }),
            psi_io: None,
            cpus_online: Some(2),
            cpu: Some(CpuTimes {
                user_ms: 1,
                system_ms: 2,
                idle_ms: 3,
                iowait_ms: 4,
                steal_ms: 5,
            }),
            disk: Some(DiskTotals {
                read_ops: 6,
                write_ops: 7,
                read_kib: 8,
                write_kib: 9,
            }),
        };
        assert_eq!(
            s.to_json(Some("stress-cpu:2")),
            "{\"uptime_ms\":1500,\"mem_total_kib\":496812,\"mem_available_kib\":480123,\
             \"mem_free_kib\":470000,\"psi\":{\"cpu\":{\"some_avg10\":12.00,\"full_avg10\":0.00},\
             \"memory\":{\"some_avg10\":1.50,\"full_avg10\":0.75},\"io\":null},\"cpus_online\":2,\
             \"cpu\":{\"user_ms\":1,\"system_ms\":2,\"idle_ms\":3,\"iowait_ms\":4,\"steal_ms\":5},\
             \"io\":{\"read_ops\":6,\"write_ops\":7,\"read_kib\":8,\"write_kib\":9},\
             \"workload\":\"stress-cpu:2\"}"
        );
        let v: serde_json::Value = serde_json::from_str(&s.to_json(None)).expect("valid JSON");
        assert_eq!(v["psi"]["memory"]["full_avg10"], 0.75);
    }

    #[test]
    fn an_empty_snapshot_is_still_valid_json_with_nulls() {
        let j = Snapshot::default().to_json(None);
        assert!(
            j.starts_with("{\"uptime_ms\":null,\"mem_total_kib\":null"),
            "{j}"
        );
        assert!(j.ends_with("\"io\":null,\"workload\":null}"), "{j}");
        assert!(!j.contains('\n'));
        serde_json::from_str::<serde_json::Value>(&j).expect("valid JSON");
    }

    #[test]
    fn escapes_json_strings() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
