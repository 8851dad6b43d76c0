//! What the agent can be asked to do: named workloads with a duration, and powering off.
//!
//! Requests come from the kernel command line (`prescient.workload=stress-cpu:10,poweroff`) and
//! from lines on the console (`run fio-randrw:5`, `poweroff`).

use std::fmt;
use std::net::Ipv4Addr;

/// The named workloads. Each maps to one command of a Debian package in the rootfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `stress-ng --cpu <online CPUs>`: every online CPU busy.
    StressCpu,
    /// `stress-ng --vm 1 --vm-keep --vm-populate`: one worker that maps `size` of memory
    /// (default 50% of what is available when it starts) once, populated at once (so the whole
    /// size is resident however slow the machine), and keeps touching it.
    StressMem,
    /// fio random 4k reads and writes to a `size` file (default 64M) under /var/tmp.
    FioRandrw,
    /// fio writing a `size` file (default 64M) under /var/tmp once, sequentially in 1 MiB
    /// blocks, then fsync; stops early after the step's seconds.
    FioSeqwrite,
    /// busybox `ping`: one echo request a second to `target` for the step's seconds; it fails
    /// when no reply came, and its summary line counts the losses.
    Ping,
    /// The agent itself (`guest-agent mmds <secs>`, see `mmds.rs`): a V2 session token and the
    /// metadata from MMDS at 169.254.169.254 on eth0, with busybox `wget`.
    Mmds,
    /// The agent itself (`guest-agent pattern <secs> <size>`, see `pattern.rs`): `size`
    /// (default 16M) of known data in memory and in a file under /var/tmp, checked every second
    /// and, at the end, read back from the disk; the state a snapshot must carry.
    Pattern,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::StressCpu,
        Kind::StressMem,
        Kind::FioRandrw,
        Kind::FioSeqwrite,
        Kind::Ping,
        Kind::Mmds,
        Kind::Pattern,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::StressCpu => "stress-cpu",
            Kind::StressMem => "stress-mem",
            Kind::FioRandrw => "fio-randrw",
            Kind::FioSeqwrite => "fio-seqwrite",
            Kind::Ping => "ping",
            Kind::Mmds => "mmds",
            Kind::Pattern => "pattern",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: Kind,
    pub secs: u32,
    /// A size in the workload tool's own syntax (`128M`, `50%`); checked to be digits then a unit.
    pub size: Option<String>,
    /// Where `ping` sends to (required for it, refused for the others).
    pub target: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Run(Workload),
    /// Ends the VM: `reboot -f`, which a `reboot=k` kernel turns into an i8042 reset.
    Poweroff,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Poweroff => f.write_str("poweroff"),
            Step::Run(w) => {
                write!(f, "{}:{}", w.kind.name(), w.secs)?;
                if let Some(size) = &w.size {
                    write!(f, ":{size}")?;
                }
                if let Some(target) = &w.target {
                    write!(f, ":{target}")?;
                }
                Ok(())
            }
        }
    }
}

/// Parses one step: `poweroff`, `<workload>:<seconds>[:<size>]` or `ping:<seconds>:<ipv4>`.
pub fn parse_step(s: &str) -> Result<Step, String> {
    let s = s.trim();
    if s == "poweroff" {
        return Ok(Step::Poweroff);
    }
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or_default();
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!(
                "unknown workload {name:?} (known: {}, poweroff)",
                names.join(", ")
            )
        })?;
    let secs = parts
        .next()
        .ok_or_else(|| format!("{name}: missing duration, e.g. {name}:10"))?;
    let secs: u32 = secs.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
        format!("{name}: duration must be a positive number of seconds, got {secs:?}")
    })?;
    let third = parts.next();
    let (size, target) = match (kind, third) {
        (Kind::Ping, Some(addr)) => {
            let target = addr
                .parse::<Ipv4Addr>()
                .map_err(|_| format!("{name}: the target must be an IPv4 address, got {addr:?}"))?;
            (None, Some(target))
        }
        (Kind::Ping, None) => {
            return Err(format!("{name}: missing target, e.g. {name}:3:10.0.0.1"))
        }
        (_, None) => (None, None),
        (Kind::Mmds, Some(extra)) => {
            return Err(format!("{name}: takes only a duration, got {extra:?}"))
        }
        (Kind::Pattern, Some(size)) => {
            crate::pattern::parse_size(size).map_err(|e| format!("{name}: {e}"))?;
            (Some(size.to_string()), None)
        }
        (_, Some(size)) => {
            let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '%');
            let valid_unit = matches!(&size[digits.len()..], "" | "K" | "M" | "G" | "%");
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || !valid_unit {
                return Err(format!(
                    "{name}: size must be digits then K, M, G or %, got {size:?}"
                ));
            }
            (Some(size.to_string()), None)
        }
    };
    if parts.next().is_some() {
        return Err(format!("{name}: too many ':' fields in {s:?}"));
    }
    Ok(Step::Run(Workload {
        kind,
        secs,
        size,
        target,
    }))
}

/// Parses a comma-separated list of steps.
pub fn parse_steps(s: &str) -> Result<Vec<Step>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_step)
        .collect()
}

/// The steps requested on the kernel command line with `prescient.workload=`.
pub fn from_cmdline(cmdline: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for arg in cmdline.split_whitespace() {
        if let Some(list) = arg.strip_prefix("prescient.workload=") {
            steps.extend(parse_steps(list)?);
        }
    }
    Ok(steps)
}

/// A line typed on the console: `run <steps>`, or the steps themselves.
pub fn from_console(line: &str) -> Result<Vec<Step>, String> {
    let line = line.trim();
    parse_steps(line.strip_prefix("run ").unwrap_or(line))
}

impl Workload {
    /// The program and arguments that run this workload. `direct_io` says whether fio may use
    /// O_DIRECT (not on tmpfs, which the initramfs root is); `online_cpus` is how many CPUs are
    /// online now. stress-ng's own `--cpu 0` counts the configured CPUs, which on a VM that can
    /// hot-plug vCPUs are all it may ever have, online or not.
    pub fn command(
        &self,
        direct_io: bool,
        online_cpus: Option<usize>,
    ) -> (&'static str, Vec<String>) {
        let timeout = format!("{}s", self.secs);
        match self.kind {
            Kind::StressCpu => {
                let workers = online_cpus.map_or("0".to_string(), |n| n.to_string());
                (
                    "stress-ng",
                    vec!["--cpu", &workers, "--timeout", &timeout, "--metrics-brief"]
                        .into_iter()
                        .map(String::from)
                        .collect(),
                )
            }
            Kind::StressMem => {
                let bytes = self.size.as_deref().unwrap_or("50%");
                (
                    "stress-ng",
                    [
                        "--vm",
                        "1",
                        "--vm-bytes",
                        bytes,
                        "--vm-keep",
                        "--vm-populate",
                        "--timeout",
                        &timeout,
                        "--metrics-brief",
                    ]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                )
            }
            Kind::FioRandrw => {
                let size = self.size.as_deref().unwrap_or("64M");
                (
                    "fio",
                    vec![
                        "--name=randrw".to_string(),
                        "--directory=/var/tmp".to_string(),
                        "--rw=randrw".to_string(),
                        "--bs=4k".to_string(),
                        format!("--size={size}"),
                        format!("--runtime={}", self.secs),
                        "--time_based".to_string(),
                        "--ioengine=psync".to_string(),
                        format!("--direct={}", u8::from(direct_io)),
                        "--unlink=1".to_string(),
                    ],
                )
            }
            Kind::FioSeqwrite => {
                let size = self.size.as_deref().unwrap_or("64M");
                (
                    "fio",
                    vec![
                        "--name=seqwrite".to_string(),
                        "--directory=/var/tmp".to_string(),
                        "--rw=write".to_string(),
                        "--bs=1M".to_string(),
                        format!("--size={size}"),
                        format!("--runtime={}", self.secs),
                        "--ioengine=psync".to_string(),
                        format!("--direct={}", u8::from(direct_io)),
                        "--end_fsync=1".to_string(),
                        "--unlink=1".to_string(),
                    ],
                )
            }
            Kind::Ping => {
                let target = self.target.map(|t| t.to_string()).unwrap_or_default();
                // -w: the whole run ends after `secs` + 2 s even when replies stop coming.
                let count = self.secs.to_string();
                let deadline = (self.secs + 2).to_string();
                (
                    "ping",
                    ["-c", &count, "-w", &deadline, &target]
                        .into_iter()
                        .map(String::from)
                        .collect(),
                )
            }
            // The kernel resolves /proc/self/exe in the forked child, still the agent.
            Kind::Mmds => ("/proc/self/exe", vec!["mmds".into(), self.secs.to_string()]),
            Kind::Pattern => (
                "/proc/self/exe",
                vec![
                    "pattern".into(),
                    self.secs.to_string(),
                    self.size.as_deref().unwrap_or("16M").into(),
                ],
            ),
        }
    }
}

/// The filesystem type of the mount that holds `path`, from /proc/mounts text.
pub fn fs_type_of<'a>(path: &str, mounts: &'a str) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            let inside = path == dir
                || dir == "/"
                || path
                    .strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/'));
            inside.then_some((dir.len(), fstype))
        })
        // The deepest mount wins; among equal ones the last mounted (it hides the others).
        .fold(None, |best: Option<(usize, &str)>, m| match best {
            Some(b) if b.0 > m.0 => Some(b),
            _ => Some(m),
        })
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: Kind, secs: u32, size: Option<&str>) -> Step {
        Step::Run(Workload {
            kind,
            secs,
            size: size.map(String::from),
            target: None,
        })
    }

    #[test]
    fn parses_workloads_with_and_without_a_size() {
        assert_eq!(
            parse_step("stress-cpu:10"),
            Ok(run(Kind::StressCpu, 10, None))
        );
        assert_eq!(
            parse_step(" stress-mem:3:128M "),
            Ok(run(Kind::StressMem, 3, Some("128M")))
        );
        assert_eq!(
            parse_step("fio-randrw:5:50%"),
            Ok(run(Kind::FioRandrw, 5, Some("50%")))
        );
        assert_eq!(parse_step("poweroff"), Ok(Step::Poweroff));
        assert_eq!(
            parse_step("ping:3:172.16.0.1"),
            Ok(Step::Run(Workload {
                kind: Kind::Ping,
                secs: 3,
                size: None,
                target: Some(Ipv4Addr::new(172, 16, 0, 1)),
            }))
        );
    }

    #[test]
    fn rejects_bad_steps_with_a_reason() {
        assert!(parse_step("stress-gpu:1")
            .unwrap_err()
            .contains("unknown workload"));
        assert!(parse_step("stress-cpu")
            .unwrap_err()
            .contains("missing duration"));
        assert!(parse_step("stress-cpu:0").unwrap_err().contains("positive"));
        assert!(parse_step("stress-cpu:x").unwrap_err().contains("positive"));
        assert!(parse_step("stress-mem:1:lots")
            .unwrap_err()
            .contains("size"));
        assert!(parse_step("stress-mem:1:12Q").unwrap_err().contains("size"));
        assert!(parse_step("stress-mem:1:1M:2")
            .unwrap_err()
            .contains("too many"));
        assert!(parse_step("ping:3").unwrap_err().contains("missing target"));
        assert!(parse_step("ping:3:10.0.0").unwrap_err().contains("IPv4"));
        assert!(parse_step("ping:3:10.0.0.1:2")
            .unwrap_err()
            .contains("too many"));
    }

    #[test]
    fn steps_display_as_they_parse() {
        for s in [
            "stress-cpu:10",
            "stress-mem:3:128M",
            "ping:2:10.0.0.1",
            "poweroff",
        ] {
            assert_eq!(parse_step(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn reads_steps_from_the_kernel_command_line() {
        let cmdline = "console=ttyS0 prescient.workload=stress-cpu:2,fio-randrw:1 reboot=k \
                       prescient.workload=poweroff\n";
        assert_eq!(
            from_cmdline(cmdline),
            Ok(vec![
                run(Kind::StressCpu, 2, None),
                run(Kind::FioRandrw, 1, None),
                Step::Poweroff
            ])
        );
        assert_eq!(from_cmdline("console=ttyS0"), Ok(vec![]));
        assert!(from_cmdline("prescient.workload=nope:1").is_err());
    }

    #[test]
    fn reads_steps_from_console_lines() {
        assert_eq!(
            from_console("run stress-cpu:1\r"),
            Ok(vec![run(Kind::StressCpu, 1, None)])
        );
        assert_eq!(from_console("poweroff"), Ok(vec![Step::Poweroff]));
        assert_eq!(from_console("  "), Ok(vec![]));
    }

    #[test]
    fn builds_the_workload_commands() {
        let w = |k, size: Option<&str>| Workload {
            kind: k,
            secs: 7,
            size: size.map(String::from),
            target: None,
        };
        let (prog, args) = w(Kind::StressCpu, None).command(true, Some(3));
        assert_eq!(prog, "stress-ng");
        assert_eq!(args.join(" "), "--cpu 3 --timeout 7s --metrics-brief");
        let (_, args) = w(Kind::StressCpu, None).command(true, None);
        assert_eq!(args.join(" "), "--cpu 0 --timeout 7s --metrics-brief");
        let (_, args) = w(Kind::StressMem, Some("64M")).command(true, None);
        assert_eq!(
            args.join(" "),
            "--vm 1 --vm-bytes 64M --vm-keep --vm-populate --timeout 7s --metrics-brief"
        );
        let (prog, args) = w(Kind::FioRandrw, None).command(false, None);
        assert_eq!(prog, "fio");
        assert!(args.contains(&"--size=64M".to_string()));
        assert!(args.contains(&"--runtime=7".to_string()));
        assert!(args.contains(&"--direct=0".to_string()));
        let (_, args) = w(Kind::FioRandrw, Some("8M")).command(true, None);
        assert!(args.contains(&"--size=8M".to_string()));
        assert!(args.contains(&"--direct=1".to_string()));
        let (prog, args) = w(Kind::FioSeqwrite, None).command(true, None);
        assert_eq!(prog, "fio");
        for a in [
            "--rw=write",
            "--bs=1M",
            "--size=64M",
            "--end_fsync=1",
            "--direct=1",
        ] {
            assert!(args.contains(&a.to_string()), "{a} in {args:?}");
        }
        let (prog, args) = w(Kind::Mmds, None).command(true, None);
        assert_eq!(
            (prog, args.join(" ").as_str()),
            ("/proc/self/exe", "mmds 7")
        );
        assert!(parse_step("mmds:7:64M")
            .unwrap_err()
            .contains("only a duration"));
        let (prog, args) = w(Kind::Pattern, None).command(true, None);
        assert_eq!(
            (prog, args.join(" ").as_str()),
            ("/proc/self/exe", "pattern 7 16M")
        );
        assert_eq!(
            parse_step("pattern:7:8M"),
            Ok(run(Kind::Pattern, 7, Some("8M")))
        );
        assert!(parse_step("pattern:7:50%").unwrap_err().contains("size"));
        let ping = Workload {
            target: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..w(Kind::Ping, None)
        };
        let (prog, args) = ping.command(true, None);
        assert_eq!(prog, "ping");
        assert_eq!(args.join(" "), "-c 7 -w 9 10.0.0.1");
    }

    #[test]
    fn finds_the_filesystem_holding_a_path() {
        let mounts = "/dev/root / ext4 rw 0 0\nproc /proc proc rw 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\ntmpfs /var/tmpfoo tmpfs rw 0 0\n";
        assert_eq!(fs_type_of("/var/tmp", mounts), Some("ext4"));
        assert_eq!(fs_type_of("/tmp/x", mounts), Some("tmpfs"));
        assert_eq!(fs_type_of("/tmp", mounts), Some("tmpfs"));
        let initramfs = "rootfs / rootfs rw 0 0\nnone / tmpfs rw 0 0\n";
        assert_eq!(fs_type_of("/var/tmp", initramfs), Some("tmpfs"));
        assert_eq!(fs_type_of("/x", ""), None);
    }
}
