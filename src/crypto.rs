//! Secrets at rest: client-key generation, lookup hashes and the AES-256-GCM keyring.
//!
//! Invariants:
//! - A generated client key carries at least 256 bits of randomness after its prefix.
//! - Every ciphertext is `enc:v1:` + base64(nonce ‖ ciphertext ‖ tag) with a fresh 96-bit
//!   random nonce, so encrypting the same value twice never yields the same text.
//! - Nothing in this module formats a key or a plaintext into a `Debug`, `Display` or
//!   error string.

use std::io::Write;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every value encrypted by [`Keyring::encrypt`].
pub const ENC_PREFIX: &str = "enc:v1:";

/// 43 characters drawn uniformly from 62 give 43·log2(62) ≈ 256.03 bits.
const RANDOM_CHARS: usize = 43;

/// How many characters of the random part are shown in a key's display prefix.
/// 6 characters (~36 bits) identify a key to a person and leave ~220 bits secret.
const DISPLAY_CHARS: usize = 6;

const NONCE_LEN: usize = 12;

/// Why a value could not be decrypted. Deliberately carries no data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("value is not in the enc:v1: format")]
    Malformed,
    #[error("no configured encryption key can decrypt the value")]
    NoMatchingKey,
}

/// The current encryption key plus older ones that can still decrypt, and the lease
/// signing keys derived from each.
pub struct Keyring {
    current: Aes256Gcm,
    previous: Vec<Aes256Gcm>,
    /// HMAC-SHA256 keys for lease ids, current first: derived from each encryption key
    /// (never the key itself), so every replica that can decrypt can verify, and a lease
    /// signed before a rotation verifies while its key is among the previous ones.
    lease_macs: Vec<Hmac<Sha256>>,
}

/// Bytes of a lease's MAC (HMAC-SHA256 truncated to 128 bits).
pub const LEASE_MAC_LEN: usize = 16;

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring {{ previous: {} key(s) }}", self.previous.len())
    }
}

impl Keyring {
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> Self {
        let lease_mac = |key: &[u8; 32]| {
            let derived = <Hmac<Sha256> as Mac>::new_from_slice(key)
                .expect("HMAC takes a key of any length")
                .chain_update(b"keyward lease signing v1")
                .finalize()
                .into_bytes();
            <Hmac<Sha256> as Mac>::new_from_slice(&derived).expect("HMAC takes a key of any length")
        };
        Self {
            current: Aes256Gcm::new(current.into()),
            previous: previous.iter().map(|k| Aes256Gcm::new(k.into())).collect(),
            lease_macs: std::iter::once(current)
                .chain(previous)
                .map(lease_mac)
                .collect(),
        }
    }

    /// The MAC of a lease's text, with the current key.
    pub fn sign_lease(&self, text: &str) -> [u8; LEASE_MAC_LEN] {
        Self::lease_mac(&self.lease_macs[0], text)
    }

    /// Whether `mac` is the MAC of `text` under the current or a previous key; compared
    /// in constant time.
    pub fn verify_lease(&self, text: &str, mac: &[u8]) -> bool {
        self.lease_macs
            .iter()
            .any(|key| bool::from(Self::lease_mac(key, text).as_slice().ct_eq(mac)))
    }

    fn lease_mac(key: &Hmac<Sha256>, text: &str) -> [u8; LEASE_MAC_LEN] {
        let full = key
            .clone()
            .chain_update(text.as_bytes())
            .finalize()
            .into_bytes();
        let mut out = [0u8; LEASE_MAC_LEN];
        out.copy_from_slice(&full[..LEASE_MAC_LEN]);
        out
    }

    /// Encrypts with the current key and a fresh random nonce.
    pub fn encrypt(&self, plaintext: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encryption with a valid key and an in-memory buffer cannot fail (the only error
        // is a plaintext longer than 64 GiB).
        let ciphertext = self
            .current
            .encrypt(&nonce, plaintext.as_bytes())
            .unwrap_or_default();
        let mut raw = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&ciphertext);
        format!("{ENC_PREFIX}{}", B64.encode(raw))
    }

    /// Decrypts with the current key, then each previous key in order.
    pub fn decrypt(&self, value: &str) -> Result<String, CryptoError> {
        let encoded = value
            .strip_prefix(ENC_PREFIX)
            .ok_or(CryptoError::Malformed)?;
        let raw = B64.decode(encoded).map_err(|_| CryptoError::Malformed)?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::from_slice(nonce);
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find_map(|cipher| cipher.decrypt(nonce, ciphertext).ok())
            .and_then(|plain| String::from_utf8(plain).ok())
            .ok_or(CryptoError::NoMatchingKey)
    }
}

/// Parses a base64 (standard alphabet) 32-byte key. The error never contains the input.
pub fn parse_key(text: &str) -> Result<[u8; 32], &'static str> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|_| "not valid base64 (standard alphabet, padded)")?;
    bytes
        .try_into()
        .map_err(|_| "must decode to exactly 32 bytes")
}

/// A fresh random 32-byte key.
pub fn random_key() -> [u8; 32] {
    Aes256Gcm::generate_key(&mut OsRng).into()
}

/// Reads the key kept in `path`, or creates it (mode 0600) when the file does not exist
/// and `may_create` is true.
///
/// Used by the embedded shape when `KEYWARD_ENCRYPTION_KEY` is unset, so that the
/// ciphertexts in the SQLite file stay readable across restarts. The caller passes
/// `may_create = false` when the database already holds ciphertexts: a fresh key could
/// decrypt none of them, so a lost file must stop start-up rather than be replaced. A
/// file that group or other users can read or write is refused: it is the only thing
/// between them and every stored secret.
pub fn load_or_create_key_file(path: &Path, may_create: bool) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let shown = path.display();
    if may_create {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut file) => {
                let key = random_key();
                writeln!(file, "{}", B64.encode(key))
                    .and_then(|_| file.sync_all())
                    .with_context(|| format!("writing encryption key file {shown}"))?;
                tracing::info!(path = %shown, "generated a new encryption key file (mode 0600)");
                return Ok(key);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating encryption key file {shown}"))
            }
        }
    }
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "encryption key file {shown} is missing and the database holds secrets encrypted with it: \
             restore the file, or set KEYWARD_ENCRYPTION_KEY to its key (no new key is generated)"
        ),
        Err(e) => return Err(e).with_context(|| format!("reading encryption key file {shown}")),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "encryption key file {shown} can be read or written by group or other users (mode {mode:03o}): run `chmod 600 {shown}`"
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading encryption key file {shown}"))?;
    parse_key(&text).map_err(|why| anyhow::anyhow!("encryption key file {shown} is invalid: {why}"))
}

/// A new client API key: `prefix` followed by 43 random alphanumeric characters.
pub fn generate_client_key(prefix: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + RANDOM_CHARS);
    key.push_str(prefix);
    Alphanumeric.append_string(&mut OsRng, &mut key, RANDOM_CHARS);
    key
}

/// The part of a key shown to people: its prefix and a few random characters.
pub fn display_prefix(key: &str, prefix: &str) -> String {
    key.chars()
        .take(prefix.chars().count() + DISPLAY_CHARS)
        .collect()
}

/// Lowercase hex SHA-256, the lookup hash under which a client key is stored.
pub fn lookup_hash(secret: &str) -> String {
    hex_string(&Sha256::digest(secret.as_bytes()))
}

/// Appends the lowercase hex of `bytes` to `out`, as `hex::encode` spells it. Written
/// through a stack buffer: `hex::encode` collects its text a character at a time into a
/// string that grows several times, and an admission hex-encodes its secret's digest,
/// its lease token and its lease's names.
pub fn hex_push(out: &mut String, bytes: &[u8]) {
    let mut buf = [0u8; 128];
    out.reserve(2 * bytes.len());
    for chunk in bytes.chunks(buf.len() / 2) {
        let hex = &mut buf[..2 * chunk.len()];
        if hex::encode_to_slice(chunk, hex).is_ok() {
            out.push_str(std::str::from_utf8(hex).unwrap_or_default());
        }
    }
}

/// The lowercase hex of `bytes` ([`hex_push`]).
pub fn hex_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    hex_push(&mut out, bytes);
    out
}

/// SHA-256 digest, for constant-time comparison of equal-length values.
pub fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(&[7u8; 32], &[])
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let ring = ring();
        let a = ring.encrypt("sk-secret");
        let b = ring.encrypt("sk-secret");
        assert!(a.starts_with(ENC_PREFIX));
        assert_ne!(a, b, "same plaintext must not give the same ciphertext");
        assert!(!a.contains("sk-secret"));
        assert_eq!(ring.decrypt(&a).as_deref(), Ok("sk-secret"));
        assert_eq!(ring.decrypt(&b).as_deref(), Ok("sk-secret"));
    }

    #[test]
    fn previous_keys_still_decrypt_but_unknown_keys_do_not() {
        let old = Keyring::new(&[1u8; 32], &[]);
        let text = old.encrypt("v");
        let rotated = Keyring::new(&[2u8; 32], &[[9u8; 32], [1u8; 32]]);
        assert_eq!(rotated.decrypt(&text).as_deref(), Ok("v"));
        let stranger = Keyring::new(&[3u8; 32], &[]);
        assert_eq!(stranger.decrypt(&text), Err(CryptoError::NoMatchingKey));
    }

    #[test]
    fn tampering_and_garbage_are_rejected() {
        let ring = ring();
        let text = ring.encrypt("value");
        let mut raw = B64.decode(&text[ENC_PREFIX.len()..]).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = format!("{ENC_PREFIX}{}", B64.encode(raw));
        assert_eq!(ring.decrypt(&tampered), Err(CryptoError::NoMatchingKey));
        assert_eq!(ring.decrypt("plain"), Err(CryptoError::Malformed));
        assert_eq!(ring.decrypt("enc:v1:!!"), Err(CryptoError::Malformed));
        assert_eq!(ring.decrypt("enc:v1:AAAA"), Err(CryptoError::Malformed));
    }

    #[test]
    fn generated_keys_are_long_random_and_prefixed() {
        let a = generate_client_key("sk-kw-");
        let b = generate_client_key("sk-kw-");
        assert_ne!(a, b);
        assert!(a.starts_with("sk-kw-"));
        assert_eq!(a.len(), 6 + RANDOM_CHARS);
        assert!(a[6..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(display_prefix(&a, "sk-kw-"), a[..12]);
    }

    #[test]
    fn hex_is_the_hex_crates() {
        for n in [0, 1, 63, 64, 65, 200] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            assert_eq!(hex_string(&bytes), hex::encode(&bytes));
        }
    }

    #[test]
    fn lookup_hash_is_sha256_hex() {
        assert_eq!(
            lookup_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parse_key_checks_length_and_alphabet() {
        assert!(parse_key(&B64.encode([0u8; 32])).is_ok());
        assert!(parse_key(&B64.encode([0u8; 31])).is_err());
        assert!(parse_key("not base64 !").is_err());
    }

    #[test]
    fn key_file_is_created_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let first = load_or_create_key_file(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_key_file(&path, true).unwrap(), first);
        assert_eq!(load_or_create_key_file(&path, false).unwrap(), first);
    }

    #[test]
    fn a_missing_key_file_is_not_replaced_when_creating_is_not_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let e = load_or_create_key_file(&path, false).unwrap_err();
        let line = format!("{e:#}");
        assert!(
            line.contains(path.to_str().unwrap()) && line.contains("missing"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(!path.exists(), "a key file was generated");
    }

    #[test]
    fn a_key_file_open_to_group_or_other_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        load_or_create_key_file(&path, true).unwrap();
        for mode in [0o640, 0o604, 0o620, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let line = format!("{:#}", load_or_create_key_file(&path, true).unwrap_err());
            assert!(
                line.contains("chmod 600") && line.contains(path.to_str().unwrap()),
                "{line}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_or_create_key_file(&path, true).is_ok());
    }
}
