//! Crash consistency: the guest writes sectors of known content and FLUSHes each, printing an ack
//! once the FLUSH completed (`blk_crash=`, see guest/README.md); the VMM is SIGKILLed at a random
//! point, and every acknowledged write must be on the disk file afterwards, whole.
//!
//! The kill points come from a seeded PRNG; the seed is printed, and `PRESCIENT_CRASH_SEED`
//! replays a run. `PRESCIENT_CRASH_ITERATIONS` changes the number of kills (default 50).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::{drive_json, guest_spec_devices, prescient_bin, Scratch};
use predictor::rng::Rng;

/// First sector the guest writes; it cycles over 64 sectors from there.
const FIRST_SECTOR: u64 = 8;
const SECTORS: u64 = 64;
/// Longest wait for the first ack of a run.
const BOOT_DEADLINE: Duration = Duration::from_secs(30);
/// Kills land within this long after the first ack.
const KILL_WINDOW_US: u64 = 150_000;

/// The guest's word for round `k` on `sector` (virtio_blk.c, CRASH_WORD).
fn crash_word(k: u64, sector: u64) -> u64 {
    0x5052_0000_0000_0000 | (k << 20) | sector
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
    )
}

/// Parses `guest: blk0 crash ack k=<k> sector=<s>`.
fn parse_ack(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim_end().strip_prefix("guest: blk0 crash ack k=")?;
    let (k, s) = rest.split_once(" sector=")?;
    Some((k.parse().ok()?, s.parse().ok()?))
}

/// One boot killed `kill_after` past its first ack. Returns the acks seen (in order).
fn killed_run(scratch: &Scratch, iteration: u32, kill_after: Duration) -> Vec<(u64, u64)> {
    let img = scratch.zeroed_file(&format!("disk{iteration}.img"), 256 << 10);
    let spec = guest_spec_devices(
        &format!("blk_sector={FIRST_SECTOR} blk_crash=1000000"),
        serde_json::json!([drive_json("disk0", &img, false)]),
        None,
    );
    let spec_path = scratch.write(&format!("vm{iteration}.json"), &spec);
    let mut child = Command::new(prescient_bin())
        .args(["--config-file", spec_path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn prescient");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            // A line the kill cut short has no newline: it is not an ack (its number may be
            // cut too).
            match stdout.read_line(&mut line) {
                Ok(_) if line.ends_with('\n') => {}
                _ => break,
            }
            if let Some(ack) = parse_ack(&line) {
                if tx.send(ack).is_err() {
                    break;
                }
            }
        }
    });
    let first = rx.recv_timeout(BOOT_DEADLINE);
    if first.is_ok() {
        std::thread::sleep(kill_after);
    }
    child.kill().expect("SIGKILL prescient");
    child.wait().expect("reap prescient");
    reader.join().expect("console reader");
    let first = first.unwrap_or_else(|e| panic!("run {iteration}: no ack ({e})"));
    let mut acks = vec![first];
    acks.extend(rx.try_iter());
    check_disk(&std::fs::read(&img).unwrap(), &acks, iteration);
    std::fs::remove_file(&img).unwrap();
    acks
}

/// Every sector's newest ack is on disk, whole; nothing on disk is newer than the one write that
/// may have been in flight after the last ack.
fn check_disk(disk: &[u8], acks: &[(u64, u64)], iteration: u32) {
    let last_k = acks.last().map_or(0, |a| a.0);
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for &(k, sector) in acks {
        assert_eq!(
            sector,
            FIRST_SECTOR + k % SECTORS,
            "ack k={k} names the wrong sector"
        );
        newest.insert(sector, k);
    }
    for (&sector, &k) in &newest {
        let at = (sector * 512) as usize;
        let words: Vec<u64> = disk[at..at + 512]
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect();
        let found = words[0];
        assert!(
            words.iter().all(|&w| w == found),
            "run {iteration}: sector {sector} is torn (acked k={k})"
        );
        let found_k = (found >> 20) & 0xfff_ffff;
        assert_eq!(
            found,
            crash_word(found_k, sector),
            "run {iteration}: sector {sector} holds {found:#x}, not a round of the guest's (acked k={k})"
        );
        assert!(
            found_k >= k,
            "run {iteration}: acked round k={k} of sector {sector} is lost (disk has k={found_k})"
        );
        assert!(
            found_k <= last_k + 1,
            "run {iteration}: sector {sector} has round {found_k}, after the last ack {last_k} + 1"
        );
    }
}

#[test]
fn every_acknowledged_flush_survives_sigkill() {
    let seed = env_u64("PRESCIENT_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let iterations = env_u64("PRESCIENT_CRASH_ITERATIONS").unwrap_or(50) as u32;
    eprintln!(
        "crash consistency: seed {seed} (PRESCIENT_CRASH_SEED to replay), {iterations} kills"
    );
    let mut prng = Rng::new(seed);
    let scratch = Scratch::new("crash-consistency");
    let start = Instant::now();
    let mut acked = 0usize;
    for i in 0..iterations {
        let kill_after = Duration::from_micros(prng.next_u64() % KILL_WINDOW_US);
        acked += killed_run(&scratch, i, kill_after).len();
    }
    eprintln!(
        "crash consistency: {iterations} kills, {acked} acked flushes checked, {:?}",
        start.elapsed()
    );
    assert!(
        acked >= iterations as usize,
        "each run checks at least one ack"
    );
}
