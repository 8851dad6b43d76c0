//! The `pattern` step: state a snapshot must carry, in RAM and on the disk, that the guest checks
//! itself; run as `guest-agent pattern <seconds> <size>` so that its lines arrive like any
//! workload's output (`agent: [pattern] ...`).
//!
//! It fills `size` bytes of memory with a pattern computed from each word's index, writes the
//! same bytes to `/var/tmp/pattern.bin` (the ext4 root on `/dev/vda` when there is one) and
//! fsyncs it, then once a second for `seconds` checks the memory against the pattern
//! (`tick=<n> ram ok`). Every [`DISK_EVERY`]th tick it reads the file back from the disk into a
//! second buffer (`tick=<n> file(disk) ok`), with O_DIRECT where the filesystem allows it, so
//! that only the device writes that buffer (its pages were touched at the start), and the ticks
//! after check that buffer as it stands (`tick=<n> file(buf) ok`): what a device wrote into guest
//! memory before a snapshot must be there after the restore. The process and its memory live on
//! across a snapshot taken meanwhile, and the ticks show its timers firing after a restore. At the
//! end it reads the file from the disk once more (`file ok`). Every check compares with the
//! pattern itself, not with a sum remembered in memory that could be wrong the same way; the
//! `sum=` printed is for the host to compare the lines before and after.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

const PATH: &str = "/var/tmp/pattern.bin";
/// Every this many ticks the file is read from the disk rather than the page cache.
const DISK_EVERY: u64 = 4;

/// The word at `index` (splitmix64 of the index: every word differs, nothing repeats by page).
fn word(index: u64) -> u64 {
    let mut z = index.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `size` in bytes: digits then K, M or G (binary units), a multiple of 8.
pub fn parse_size(size: &str) -> Result<usize, String> {
    let digits = size.trim_end_matches(['K', 'M', 'G']);
    let shift = match &size[digits.len()..] {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("size must be digits then K, M or G, got {size:?}")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("size must be digits then K, M or G, got {size:?}"))?;
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(|| format!("size {size:?} is too large"))?;
    if bytes == 0 || bytes % 8 != 0 {
        return Err(format!(
            "size must be a positive multiple of 8 bytes, got {size:?}"
        ));
    }
    Ok(bytes)
}

/// How `words` differ from the pattern: the count of wrong words and the first wrong index.
fn check(words: impl Iterator<Item = u64>) -> (usize, Option<usize>) {
    let mut wrong = 0;
    let mut first = None;
    for (i, w) in words.enumerate() {
        if w != word(i as u64) {
            wrong += 1;
            first.get_or_insert(i);
        }
    }
    (wrong, first)
}

/// A sum of the words (FNV-1a over them), the same for the same contents.
fn sum(words: impl Iterator<Item = u64>) -> u64 {
    words.fold(0xcbf2_9ce4_8422_2325, |h, w| {
        (h ^ w).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The words of `bytes`, as the file holds them.
fn words_of(bytes: &[u8]) -> impl Iterator<Item = u64> + Clone + '_ {
    bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

fn write_file(words: &[u64]) -> std::io::Result<()> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut f = File::create(PATH)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

/// Where the file is read back: page aligned for O_DIRECT, its pages written once when it is
/// made (by this CPU) and afterwards only by the reads (by the device, with O_DIRECT).
struct ReadBuffer {
    raw: Vec<u8>,
    offset: usize,
    len: usize,
    direct: bool,
}

impl ReadBuffer {
    fn new(len: usize, direct: bool) -> Self {
        // Not the pattern: a read that did not land shows.
        let raw = vec![0xa5; len + 4096];
        let offset = raw.as_ptr().align_offset(4096);
        Self {
            raw,
            offset,
            len,
            direct,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + self.len]
    }

    /// Reads the file from the disk: with O_DIRECT, else after dropping the clean page cache.
    fn read(&mut self) -> std::io::Result<()> {
        let mut open = OpenOptions::new();
        open.read(true);
        if self.direct {
            open.custom_flags(libc::O_DIRECT);
        } else {
            std::fs::write("/proc/sys/vm/drop_caches", "1")?;
        }
        let (offset, len) = (self.offset, self.len);
        open.open(PATH)?
            .read_exact(&mut self.raw[offset..offset + len])
    }

    /// Reads the file (with `read`) and checks what the buffer holds, as `what`.
    fn check(&mut self, what: &str, read: bool) -> bool {
        if read {
            if let Err(e) = self.read() {
                println!("{what} error: cannot read {PATH}: {e}");
                return false;
            }
        }
        verdict(what, words_of(self.bytes()))
    }
}

fn verdict(what: &str, words: impl Iterator<Item = u64> + Clone) -> bool {
    match check(words.clone()) {
        (0, _) => {
            println!("{what} ok sum={:016x}", sum(words));
            true
        }
        (wrong, first) => {
            println!(
                "{what} MISMATCH words={wrong} first={} sum={:016x}",
                first.unwrap_or_default(),
                sum(words)
            );
            false
        }
    }
}

/// Runs the step; the process's exit status (0 when every check matched).
pub fn run(secs: u64, size: &str) -> i32 {
    let bytes = match parse_size(size) {
        Ok(b) => b,
        Err(e) => {
            println!("error {e}");
            return 2;
        }
    };
    let words: Vec<u64> = (0..(bytes / 8) as u64).map(word).collect();
    if let Err(e) = write_file(&words) {
        println!("error cannot write {PATH}: {e}");
        return 1;
    }
    println!(
        "wrote {bytes} bytes to {PATH} sum={:016x}; {secs} ticks follow",
        sum(words.iter().copied())
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let direct = crate::steps::fs_type_of(PATH, &mounts) == Some("ext4");
    let mut buffer = ReadBuffer::new(bytes, direct);
    let mut ok = true;
    let start = Instant::now();
    for tick in 1..=secs {
        std::thread::sleep(
            (start + Duration::from_secs(tick)).saturating_duration_since(Instant::now()),
        );
        ok &= verdict(&format!("tick={tick} ram"), words.iter().copied());
        if tick % DISK_EVERY == 0 {
            ok &= buffer.check(&format!("tick={tick} file(disk)"), true);
        } else if tick > DISK_EVERY {
            ok &= buffer.check(&format!("tick={tick} file(buf)"), false);
        }
    }
    ok &= buffer.check("file", true);
    i32::from(!ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "M", "12Q", "0M", "7", "99999999999999999999G", "1%"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_changed_word_is_found() {
        let mut words: Vec<u64> = (0..4096).map(word).collect();
        let it = |w: &Vec<u64>| w.clone().into_iter();
        assert_eq!(check(it(&words)), (0, None));
        let before = sum(it(&words));
        words[1000] ^= 1;
        assert_eq!(check(it(&words)), (1, Some(1000)));
        assert_ne!(sum(it(&words)), before);
        // A page of zeroes (what a lost page reads as) is wrong everywhere.
        words[512..1024].fill(0);
        assert_eq!(check(it(&words)).0, 512);
        // The file's bytes are the words, little-endian.
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert!(words_of(&bytes).eq(words.iter().copied()));
    }

    #[test]
    fn no_two_pages_hold_the_same_words() {
        let page = |p: u64| (p * 512..(p + 1) * 512).map(word).collect::<Vec<_>>();
        assert_ne!(page(0), page(1));
        assert_ne!(page(1), page(2));
    }
}
