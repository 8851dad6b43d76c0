//! The snapshot state file's framing: a header naming the format and its version, the state
//! (postcard), and a CRC-64 over everything before it. A file that is short, foreign, of another
//! version, corrupted or undecodable is refused with an error that says which.
//!
//! ```text
//! 0   magic "PRESNAPS"
//! 8   format version, u16 LE
//! 10  reserved, 6 bytes of 0
//! 16  state length N, u64 LE
//! 24  state, N bytes (postcard)
//! 24+N CRC-64/XZ of bytes 0..24+N, u64 LE
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first bytes of every prescient snapshot state file.
pub const MAGIC: [u8; 8] = *b"PRESNAPS";
/// The format this build writes and reads. Bump it whenever the state's shape changes.
pub const FORMAT_VERSION: u16 = 1;
pub(crate) const HEADER_LEN: usize = 24;
const CRC_LEN: usize = 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Why a state file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("the snapshot state file is truncated: {len} bytes, {need} expected")]
    Truncated { len: u64, need: u64 },
    #[error("not a prescient snapshot state file (it starts with {found:02x?}, not \"PRESNAPS\")")]
    NotASnapshot { found: Vec<u8> },
    #[error(
        "the snapshot state file has format version {found}; this prescient reads version \
         {supported}"
    )]
    Version { found: u16, supported: u16 },
    #[error(
        "the snapshot state file is corrupted: its CRC-64 is {computed:#018x}, the file says \
         {stored:#018x}"
    )]
    Checksum { stored: u64, computed: u64 },
    #[error("the snapshot state file has {extra} bytes after its checksum")]
    TrailingBytes { extra: u64 },
    #[error("the snapshot state does not decode: {0}")]
    Decode(String),
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// The whole file for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FileError> {
    let body = postcard::to_stdvec(state).map_err(|e| FileError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// How a format version is shown (`--snapshot-version`, `--describe-snapshot`): as a semantic
/// version, the shape Firecracker prints for its own.
pub fn version_name(version: u16) -> String {
    format!("v{version}.0.0")
}

/// The format version a file's header names, whichever it is: enough to describe a file this
/// build cannot read.
pub fn header_version(bytes: &[u8]) -> Result<u16, FileError> {
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        if MAGIC.starts_with(bytes) {
            return Err(FileError::Truncated {
                len,
                need: HEADER_LEN as u64,
            });
        }
        return Err(FileError::NotASnapshot {
            found: bytes[..bytes.len().min(MAGIC.len())].to_vec(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(FileError::Truncated {
            len,
            need: HEADER_LEN as u64,
        });
    }
    Ok(u16::from_le_bytes([bytes[8], bytes[9]]))
}

/// The state in `bytes`, checked in the order that names the most specific fault: foreign
/// files first, then the version (a newer format may frame differently), then length, checksum
/// and content.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FileError> {
    let len = bytes.len() as u64;
    let version = header_version(bytes)?;
    if version != FORMAT_VERSION {
        return Err(FileError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_len = u64_at(bytes, 16);
    let need = (HEADER_LEN as u64 + CRC_LEN as u64).saturating_add(body_len);
    if len < need {
        return Err(FileError::Truncated { len, need });
    }
    if len > need {
        return Err(FileError::TrailingBytes { extra: len - need });
    }
    let crc_at = HEADER_LEN + body_len as usize;
    let stored = u64_at(bytes, crc_at);
    let computed = CRC.checksum(&bytes[..crc_at]);
    if stored != computed {
        return Err(FileError::Checksum { stored, computed });
    }
    postcard::from_bytes(&bytes[HEADER_LEN..crc_at]).map_err(|e| FileError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        ratio: f64,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            regs: (0..40).collect(),
            ratio: f64::NAN.copysign(1.0).min(0.5),
        }
    }

    #[test]
    fn a_state_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"PRESNAPS");
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_cut_of_the_file_is_a_truncation() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            match decode::<Sample>(&bytes[..cut]) {
                Err(FileError::Truncated { len, need }) => {
                    assert_eq!(len, cut as u64);
                    assert!(need > len);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_flipped_bit_of_the_state_or_checksum_is_corruption() {
        let bytes = encode(&sample()).unwrap();
        for at in HEADER_LEN..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                matches!(decode::<Sample>(&bad), Err(FileError::Checksum { .. })),
                "byte {at}"
            );
        }
    }

    #[test]
    fn foreign_files_other_versions_and_extra_bytes_each_have_their_error() {
        let bytes = encode(&sample()).unwrap();
        let e = decode::<Sample>(b"{\"vm_state\": 1}...........").unwrap_err();
        assert!(matches!(e, FileError::NotASnapshot { .. }), "{e}");
        assert!(e.to_string().contains("not a prescient snapshot"), "{e}");

        let mut newer = bytes.clone();
        newer[8..10].copy_from_slice(&2u16.to_le_bytes());
        let e = decode::<Sample>(&newer).unwrap_err();
        assert_eq!(
            e,
            FileError::Version {
                found: 2,
                supported: 1
            }
        );
        assert!(e.to_string().contains("format version 2"), "{e}");
        assert_eq!(header_version(&newer[..HEADER_LEN]), Ok(2));
        assert_eq!(version_name(header_version(&bytes).unwrap()), "v1.0.0");

        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 3]);
        assert_eq!(
            decode::<Sample>(&longer).unwrap_err(),
            FileError::TrailingBytes { extra: 3 }
        );

        // A state of another shape with a valid frame: the checksum passes, decoding does not.
        let other = encode(&(1u8, 2u8)).unwrap();
        assert!(matches!(
            decode::<Sample>(&other),
            Err(FileError::Decode(_))
        ));
    }

    #[test]
    fn a_huge_announced_length_is_a_truncation_not_an_allocation() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(FileError::Truncated { .. })
        ));
    }
}
