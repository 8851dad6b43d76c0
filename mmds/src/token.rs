//! MMDS V2 session tokens.
//!
//! A token is its expiry time and an HMAC-SHA256 tag over that time and the microVM's id, keyed
//! with 32 random bytes drawn when the VMM starts. Nothing is stored per token, so a guest that
//! asks for millions of tokens costs no memory, and a token is only valid in the process (and
//! VM) that issued it, until it expires. (Firecracker encrypts the expiry with AES-GCM for the
//! same properties; the token's format is opaque to guests either way.)

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The TTL bounds Firecracker and EC2 IMDS accept.
pub const MIN_TTL_SECONDS: u32 = 1;
pub const MAX_TTL_SECONDS: u32 = 21_600;
/// Where the guest asks for a token.
pub const TOKEN_PATH: &str = "/latest/api/token";

const EXPIRY_LEN: usize = 8;
const TAG_LEN: usize = 16;
/// Hex digits of a token.
pub const TOKEN_LEN: usize = 2 * (EXPIRY_LEN + TAG_LEN);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("Invalid time to live value provided for token: {0}. Please provide a value between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}.")]
    InvalidTtl(u32),
}

/// Issues and checks tokens.
pub struct TokenAuthority {
    key: [u8; 32],
    aad: String,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("TokenAuthority")
            .field("aad", &self.aad)
            .finish()
    }
}

impl Default for TokenAuthority {
    fn default() -> Self {
        Self::new()
    }
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    let mut filled = 0;
    while filled < key.len() {
        // SAFETY: getrandom(2) writes at most the given length into the buffer it is handed,
        // which is the unfilled tail of `key`.
        let n =
            unsafe { libc::getrandom(key[filled..].as_mut_ptr().cast(), key.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // The kernel's generator is always there on the hosts KVM runs on; without it no
            // token could be trusted, so the service cannot run.
            panic!(
                "getrandom for the MMDS token key: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    key
}

/// Milliseconds of CLOCK_MONOTONIC: tokens expire on time even if the wall clock moves.
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the one we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl TokenAuthority {
    pub fn new() -> Self {
        Self {
            key: random_key(),
            aad: String::new(),
        }
    }

    pub fn set_instance_id(&mut self, id: &str) {
        self.aad = format!("microvmid={id}");
    }

    fn tag(&self, expiry: u64) -> [u8; TAG_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(self.aad.as_bytes());
        mac.update(&expiry.to_le_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// A token valid for `ttl_seconds` from now.
    pub fn issue(&self, ttl_seconds: u32) -> Result<String, TokenError> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        Ok(self.issue_expiring_at(now_ms() + u64::from(ttl_seconds) * 1000))
    }

    fn issue_expiring_at(&self, expiry: u64) -> String {
        let mut bytes = [0u8; EXPIRY_LEN + TAG_LEN];
        bytes[..EXPIRY_LEN].copy_from_slice(&expiry.to_le_bytes());
        bytes[EXPIRY_LEN..].copy_from_slice(&self.tag(expiry));
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `token` was issued here and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        let Some(bytes) = decode_hex::<{ EXPIRY_LEN + TAG_LEN }>(token) else {
            return false;
        };
        let expiry = u64::from_le_bytes(bytes[..EXPIRY_LEN].try_into().expect("8 bytes"));
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(self.aad.as_bytes());
        mac.update(&expiry.to_le_bytes());
        // Constant-time comparison of the truncated tag.
        mac.verify_truncated_left(&bytes[EXPIRY_LEN..]).is_ok() && expiry > now_ms()
    }
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_validate_until_they_expire_and_only_here() {
        let mut a = TokenAuthority::new();
        a.set_instance_id("vm1");
        let t = a.issue(60).unwrap();
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(a.is_valid(&t));
        // Another key, or the same key bound to another VM, rejects it.
        assert!(!TokenAuthority::new().is_valid(&t));
        let mut b = TokenAuthority {
            key: a.key,
            aad: String::new(),
        };
        b.set_instance_id("vm2");
        assert!(!b.is_valid(&t));
        // Expired; tampered expiry; garbage.
        assert!(!a.is_valid(&a.issue_expiring_at(now_ms() - 1)));
        let mut forged = t.clone().into_bytes();
        forged[0] = if forged[0] == b'f' { b'e' } else { b'f' };
        assert!(!a.is_valid(std::str::from_utf8(&forged).unwrap()));
        for bad in [
            "",
            "zz",
            &"0".repeat(TOKEN_LEN),
            &"x".repeat(TOKEN_LEN),
            &t[1..],
        ] {
            assert!(!a.is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn ttl_is_bounded() {
        let a = TokenAuthority::new();
        assert_eq!(a.issue(0), Err(TokenError::InvalidTtl(0)));
        assert_eq!(a.issue(21_601), Err(TokenError::InvalidTtl(21_601)));
        assert!(a.issue(21_600).is_ok());
        assert!(a.issue(1).is_ok());
        assert_eq!(
            TokenError::InvalidTtl(0).to_string(),
            "Invalid time to live value provided for token: 0. Please provide a value between 1 and 21600."
        );
    }
}
