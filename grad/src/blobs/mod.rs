//! The blob store: where outputs, job bundles and logs live. Clients never
//! stream blobs through gRPC: grad hands out a presigned URL and they PUT or
//! GET the bytes there themselves.
//!
//! One trait, two stores:
//! - [`S3Store`]: any S3-compatible service through `aws-sdk-s3`, which signs
//!   the URLs (SigV4 query signing);
//! - [`DirStore`], the embedded default: a directory under the data dir that
//!   grad serves on its own HTTP port behind HMAC-signed, expiring URLs with
//!   the same semantics (a PUT URL names the SHA-256 its body must have).
//!
//! Keys are grad's own (`sha256/<hex>` for content-addressed objects, under a
//! per-user prefix), so they are restricted to a safe alphabet: see [`Key`].

pub mod dir;
pub mod s3;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime},
};

pub use dir::DirStore;
pub use s3::S3Store;

use crate::error::{Error, Result};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The longest a presigned URL may live (SigV4's own ceiling is a week).
pub const MAX_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// An object key: 1–1024 bytes of `/`-separated segments, each of ASCII
/// letters, digits, `.`, `_`, `-` and `=`, none empty, `.` or `..`. Such a
/// key means the same in a URL path, on S3 and as a relative file path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    pub fn new(key: impl Into<String>) -> Result<Key> {
        let key = key.into();
        let valid_segment = |segment: &str| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-=".contains(&b))
        };
        if key.is_empty() || key.len() > 1024 || !key.split('/').all(valid_segment) {
            return Err(Error::InvalidArgument(format!(
                "blob key '{key}': must be 1-1024 characters of '/'-separated segments \
                 made of letters, digits, '.', '_', '-' and '=' (no empty, '.' or '..' segment)"
            )));
        }
        Ok(Key(key))
    }

    /// The key of content with this SHA-256, under `prefix` (`users/ID`).
    pub fn content(prefix: &str, sha256: &Sha256) -> Result<Key> {
        Key::new(format!("{prefix}/sha256/{sha256}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest, shown as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn parse(hex_digits: &str) -> Result<Sha256> {
        let mut digest = [0u8; 32];
        match hex::decode_to_slice(hex_digits, &mut digest) {
            Ok(()) if hex_digits.bytes().all(|b| !b.is_ascii_uppercase()) => Ok(Sha256(digest)),
            _ => Err(Error::InvalidArgument(format!(
                "sha256 '{hex_digits}': must be 64 lowercase hex digits"
            ))),
        }
    }

    pub fn of(bytes: &[u8]) -> Sha256 {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// A request the holder may make without credentials until `expires_at`:
/// `method` on `url`, sending `headers` as they are (they are signed).
#[derive(Debug, Clone)]
pub struct Presigned {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub expires_at: SystemTime,
}

impl From<&Presigned> for grad_proto::PresignedRequest {
    fn from(p: &Presigned) -> grad_proto::PresignedRequest {
        let expires_ms = p
            .expires_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        grad_proto::PresignedRequest {
            method: p.method.as_str().to_owned(),
            url: p.url.clone(),
            headers: p
                .headers
                .iter()
                .map(|(name, value)| grad_proto::Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            expire_time: Some(prost_types::Timestamp {
                seconds: expires_ms.div_euclid(1000),
                nanos: (expires_ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
        }
    }
}

/// An upload in parts (S3 takes at most 5 GiB in one PUT): one presigned
/// PUT per part, in order (part numbers start at 1), then
/// [`BlobStore::complete_multipart`] with the ETag each PUT answered.
#[derive(Debug, Clone)]
pub struct Multipart {
    pub upload_id: String,
    pub parts: Vec<Presigned>,
}

/// S3's smallest part but the last one.
pub const MIN_PART: u64 = 5 << 20;

/// An object as a listing or a HEAD shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: Key,
    pub size: u64,
}

pub trait BlobStore: Send + Sync + 'static {
    /// "s3" or "dir", for logs and status.
    fn kind(&self) -> &'static str;
    /// A URL to upload `key` with one PUT whose body must hash to `sha256`
    /// (the store refuses any other body).
    fn presign_put<'a>(
        &'a self,
        key: &'a Key,
        sha256: Sha256,
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Presigned>>;
    /// A URL to download `key`.
    fn presign_get<'a>(
        &'a self,
        key: &'a Key,
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Presigned>>;
    /// The object at `key`, if there is one.
    fn head<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Object>>>;
    /// Every object whose key starts with `prefix`, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Object>>>;
    /// Removes `key`; a missing key is not an error.
    fn delete<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<()>>;
    /// Starts an upload of `key` in parts whose bodies hash to `parts`
    /// (each part but the last at least [`MIN_PART`] bytes). Stores that take
    /// any size in one PUT refuse it.
    fn begin_multipart<'a>(
        &'a self,
        key: &'a Key,
        parts: &'a [Sha256],
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Multipart>> {
        let _ = (parts, expires_in);
        Box::pin(async move {
            Err(Error::FailedPrecondition(format!(
                "the {} blob store takes {key} in one PUT of any size: no parts needed",
                self.kind()
            )))
        })
    }
    /// Joins the parts (their SHA-256s and the ETags their PUTs answered, in
    /// order) into the object.
    fn complete_multipart<'a>(
        &'a self,
        key: &'a Key,
        upload_id: &'a str,
        parts: &'a [(Sha256, String)],
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (upload_id, parts);
        Box::pin(async move {
            Err(Error::FailedPrecondition(format!(
                "the {} blob store has no upload in parts of {key}",
                self.kind()
            )))
        })
    }
}

fn check_expiry(expires_in: Duration) -> Result<()> {
    if expires_in.is_zero() || expires_in > MAX_EXPIRY {
        return Err(Error::InvalidArgument(format!(
            "URL expiry {}: must be between 1s and 7 days",
            humantime::format_duration(expires_in)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe_relative_paths() {
        for good in ["a", "users/u1/sha256/ab12", "x.tar.gz", "a=b/c_d-e"] {
            assert!(Key::new(good).is_ok(), "{good}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", "./a", "a b", "a\\b", "é", "a?b", "a%2e",
        ] {
            let err = Key::new(bad).unwrap_err().to_string();
            assert!(err.contains("blob key"), "{bad}: {err}");
        }
        assert!(Key::new("a".repeat(1025)).is_err());
    }

    #[test]
    fn sha256_parses_only_lowercase_hex_of_the_right_length() {
        let digest = Sha256::of(b"hello");
        assert_eq!(Sha256::parse(&digest.to_string()).unwrap(), digest);
        assert!(Sha256::parse(&digest.to_string().to_uppercase()).is_err());
        assert!(Sha256::parse("abc").is_err());
        assert_eq!(
            digest.to_string(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
