//! Secrets at rest: sealed with XChaCha20-Poly1305 under a key kept in the
//! data dir (`secrets.key`, 0600), so the database never holds them in
//! plaintext. Each sealed value is bound to what it belongs to (`context`,
//! e.g. the runner's id): moved to another row, it no longer opens.

use std::path::Path;

use base64::Engine;
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use rand::RngCore;

use crate::error::{Error, Result};

const NONCE: usize = 24;

#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// The key in `path`, made (0600) at first use: the embedded default.
    pub fn load_or_create(path: &Path) -> Result<Sealer> {
        Sealer::new(&crate::auth::load_or_create_secret(
            path,
            "the secrets key",
        )?)
    }

    /// The key in `path`, which must exist (`--secrets-key-file`): a key
    /// that vanished must not be replaced by a new one, which would leave
    /// every sealed secret unreadable.
    pub fn load(path: &Path) -> Result<Sealer> {
        let key = std::fs::read(path).map_err(|e| {
            Error::FailedPrecondition(format!(
                "--secrets-key-file {}: {e}; make a key with \
                 `head -c 32 /dev/urandom > {0} && chmod 600 {0}`",
                path.display()
            ))
        })?;
        if key.len() < 32 {
            return Err(Error::FailedPrecondition(format!(
                "--secrets-key-file {}: the key must be at least 32 bytes, not {}",
                path.display(),
                key.len()
            )));
        }
        Sealer::new(&key)
    }

    fn new(key: &[u8]) -> Result<Sealer> {
        let cipher = XChaCha20Poly1305::new_from_slice(&key[..32])
            .map_err(|_| Error::FailedPrecondition("the secrets key is unusable".into()))?;
        Ok(Sealer { cipher })
    }

    /// `plaintext` sealed for `context`, as base64 (nonce, then ciphertext).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<String> {
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| Error::FailedPrecondition("sealing a secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// What [`Sealer::seal`] sealed for the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>> {
        let broken = || {
            Error::FailedPrecondition(format!(
                "a sealed secret of {context} does not open: it was altered or sealed with another secrets.key"
            ))
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| broken())?;
        if bytes.len() < NONCE {
            return Err(broken());
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE);
        let nonce: [u8; NONCE] = nonce.try_into().map_err(|_| broken())?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| broken())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_context_and_hides_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::load_or_create(&dir.path().join("secrets.key")).unwrap();
        let sealed = sealer.seal(b"AKIA-secret", "runner r1").unwrap();
        assert!(!sealed.contains("AKIA"));
        assert_eq!(sealer.open(&sealed, "runner r1").unwrap(), b"AKIA-secret");
        assert!(sealer.open(&sealed, "runner r2").is_err());
        // The same key file opens it again; another key does not.
        let again = Sealer::load_or_create(&dir.path().join("secrets.key")).unwrap();
        assert_eq!(again.open(&sealed, "runner r1").unwrap(), b"AKIA-secret");
        let other = Sealer::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open(&sealed, "runner r1").is_err());
        let mut altered = sealed.into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(
            sealer
                .open(std::str::from_utf8(&altered).unwrap(), "runner r1")
                .is_err()
        );
    }
}
