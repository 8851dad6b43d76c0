//! Hot-added CPUs: Linux registers a CPU that ACPI hot-plugs but leaves it offline until user
//! space writes `1` to its `online` file (distributions do it with a udev rule on the CPU's
//! `add` event; this guest has no udev). The agent plays that rule: a CPU that was not present
//! at its last look and is offline now is brought online, once. CPUs offline at the agent's
//! start (`maxcpus=`) or taken offline later by hand are left alone, and an unplug needs nothing
//! here: the kernel offlines the CPU itself before it answers the eject.

use std::fs;

const SYSFS_CPUS: &str = "/sys/devices/system/cpu";

/// The CPUs a list such as `0-3,6` (/sys/devices/system/cpu/online) names, in order.
pub fn parse_list(list: &str) -> Option<Vec<u32>> {
    let list = list.trim();
    if list.is_empty() {
        return Some(Vec::new());
    }
    let mut cpus = Vec::new();
    for range in list.split(',') {
        match range.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
            None => cpus.push(range.parse().ok()?),
        }
    }
    Some(cpus)
}

/// What the agent knew to be present at its last look.
pub struct HotAdded {
    present: Vec<u32>,
}

impl HotAdded {
    pub fn new() -> Self {
        Self {
            present: present().unwrap_or_default(),
        }
    }

    /// Brings every newly present, offline CPU online; says what it did.
    pub fn online_new(&mut self, say: impl Fn(&str)) {
        let Some(now) = present() else { return };
        for cpu in new_cpus(&self.present, &now) {
            let file = format!("{SYSFS_CPUS}/cpu{cpu}/online");
            if fs::read_to_string(&file).is_ok_and(|s| s.trim() == "0") {
                match fs::write(&file, "1") {
                    Ok(()) => say(&format!("cpu {cpu} hot-added, online")),
                    Err(e) => say(&format!("error cpu {cpu} hot-added, cannot online it: {e}")),
                }
            }
        }
        self.present = now;
    }
}

/// How many CPUs are online now.
pub fn online() -> Option<usize> {
    let list = fs::read_to_string(format!("{SYSFS_CPUS}/online")).ok()?;
    parse_list(&list).map(|cpus| cpus.len())
}

fn present() -> Option<Vec<u32>> {
    parse_list(&fs::read_to_string(format!("{SYSFS_CPUS}/present")).ok()?)
}

/// The CPUs in `now` that `before` lacked.
fn new_cpus<'a>(before: &'a [u32], now: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    now.iter().copied().filter(|c| !before.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(parse_list("0\n"), Some(vec![0]));
        assert_eq!(parse_list("0-3\n"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_list("0-1,4,6-7"), Some(vec![0, 1, 4, 6, 7]));
        assert_eq!(parse_list("\n"), Some(vec![]));
        assert_eq!(parse_list("x"), None);
        assert_eq!(parse_list("0-x"), None);
    }

    #[test]
    fn only_cpus_that_appeared_are_new() {
        let new = |before: &[u32], now: &[u32]| new_cpus(before, now).collect::<Vec<_>>();
        assert_eq!(new(&[0], &[0, 1, 2]), vec![1, 2]);
        assert_eq!(new(&[0, 1, 2], &[0, 1, 2]), Vec::<u32>::new());
        // An unplugged CPU leaves the present set; plugged again it is new again.
        assert_eq!(new(&[0, 2], &[0, 1, 2]), vec![1]);
        assert_eq!(new(&[0, 1], &[0]), Vec::<u32>::new());
    }
}
