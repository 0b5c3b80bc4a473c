//! Users' SSH public keys: parsed just enough to refuse garbage and to
//! compute the fingerprint `ssh-keygen -l` prints. The runners' SSH servers
//! do the real checking.

use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::STANDARD_NO_PAD};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// A public key in OpenSSH format, normalised to "ALGORITHM BASE64".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub text: String,
    pub fingerprint: String,
    pub comment: String,
}

pub fn parse(line: &str) -> Result<PublicKey> {
    let invalid = |why: &str| {
        Error::InvalidArgument(format!(
            "public_key: {why}; expected one line like 'ssh-ed25519 AAAAC3Nza... you@host' \
             (the contents of a .pub file)"
        ))
    };
    let mut parts = line.split_whitespace();
    let (Some(algorithm), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(invalid("not an OpenSSH public key"));
    };
    if !ALGORITHMS.contains(&algorithm) {
        return Err(invalid(&format!(
            "unsupported key type '{algorithm}' (supported: {})",
            ALGORITHMS.join(", ")
        )));
    }
    let bytes = STANDARD
        .decode(blob)
        .map_err(|_| invalid("the key data is not base64"))?;
    // The blob starts with the algorithm name as an SSH string.
    let name_len = bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let named = name_len.and_then(|n| bytes.get(4..4 + n));
    if named != Some(algorithm.as_bytes()) {
        return Err(invalid("the key data does not match its type"));
    }
    let fingerprint = format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(&bytes)));
    Ok(PublicKey {
        text: format!("{algorithm} {blob}"),
        fingerprint,
        comment: parts.collect::<Vec<_>>().join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with `ssh-keygen -t ed25519 -C test`; its fingerprint from `ssh-keygen -l`.
    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwxNjMS61BO9lU4HLNZtAs7V3SZVOjctFI85IOQxleu test";

    #[test]
    fn an_openssh_key_parses_with_its_fingerprint_and_comment() {
        let key = parse(KEY).unwrap();
        assert_eq!(key.comment, "test");
        assert!(key.text.starts_with("ssh-ed25519 AAAA") && !key.text.ends_with("test"));
        assert_eq!(
            key.fingerprint,
            "SHA256:AE1qvapWigr2BiiDT7/EbUBMqYt07b/Q7URHRUQSkD4"
        );
    }

    #[test]
    fn garbage_is_refused_naming_the_field_and_the_valid_form() {
        for bad in [
            "",
            "hello",
            "ssh-ed25519 !!!",
            "ssh-dss AAAA",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIFwxNjMS61BO9lU4HLNZtAs7V3SZVOjctFI85IOQxleu",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("public_key: "), "{bad}: {err}");
            assert!(err.contains("ssh-ed25519 AAAA"), "{bad}: {err}");
        }
    }
}
