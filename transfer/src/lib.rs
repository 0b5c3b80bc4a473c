//! Moving bytes to and from presigned blob URLs (grad's embedded store or
//! S3), as grad-runner and gractl both need it: a file, or a range of one,
//! streamed as one PUT with the URL's signed headers; and a GET streamed
//! into a temporary file beside its destination, hashed on the way, and
//! renamed into place only when its size and SHA-256 are the expected ones.
//! Bodies are never held whole in memory, and errors never show a URL's
//! query (it carries the signature).

use std::{
    fs,
    io::{self, Read, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use grad_proto::PresignedRequest;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderName, HeaderValue};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::StreamExt;
use tokio_util::io::ReaderStream;

/// Called with the number of bytes just moved.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Bytes read from a file per body chunk.
const CHUNK: usize = 256 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A transfer that moves no byte for this long has failed.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{method} {url}: {source}")]
    Request {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The store answered with an error status; `code` is S3's error code
    /// (`SignatureDoesNotMatch`, `AccessDenied`, …) when it sent one.
    #[error("{method} {url} answered {status}: {message}")]
    Refused {
        method: String,
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what}: got {actual} bytes, expected {expected}")]
    Size {
        what: String,
        actual: u64,
        expected: u64,
    },
    #[error("{what}: SHA-256 {actual}, expected {expected}")]
    Checksum {
        what: String,
        actual: String,
        expected: String,
    },
    #[error("invalid presigned request: {0}")]
    Invalid(String),
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The SHA-256 of a file, and of each of its `part_bytes`-sized parts
/// when asked (for uploads in parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
    pub parts: Vec<String>,
}

/// Hashes `path` in one pass (blocking: call it off the async workers).
pub fn hash_file(path: &Path, part_bytes: Option<u64>) -> io::Result<FileDigest> {
    let mut file = fs::File::open(path)?;
    let mut whole = sha2::Sha256::new();
    let mut part = sha2::Sha256::new();
    let mut in_part = 0u64;
    let mut parts = Vec::new();
    let mut size = 0u64;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut chunk = &buffer[..n];
        whole.update(chunk);
        size += n as u64;
        if let Some(part_bytes) = part_bytes.filter(|&p| p > 0) {
            while !chunk.is_empty() {
                let take = chunk.len().min((part_bytes - in_part) as usize);
                part.update(&chunk[..take]);
                in_part += take as u64;
                chunk = &chunk[take..];
                if in_part == part_bytes {
                    parts.push(hex::encode(part.finalize_reset()));
                    in_part = 0;
                }
            }
        }
    }
    if part_bytes.is_some_and(|p| p > 0) && (in_part > 0 || parts.is_empty()) {
        parts.push(hex::encode(part.finalize()));
    }
    Ok(FileDigest {
        size,
        sha256: hex::encode(whole.finalize()),
        parts,
    })
}

/// The URL without its query, for messages.
fn shown(url: &str) -> String {
    url.split('?').next().unwrap_or_default().to_owned()
}

/// An HTTP client for presigned requests. Cloning shares its connections.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
}

impl Client {
    pub fn new() -> Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(concat!("grad-transfer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Request {
                method: "setting up".into(),
                url: "the HTTP client".into(),
                source,
            })?;
        Ok(Client { http })
    }

    fn request(
        &self,
        presigned: &PresignedRequest,
        expected: &str,
    ) -> Result<reqwest::RequestBuilder> {
        if !presigned.method.eq_ignore_ascii_case(expected) {
            return Err(Error::Invalid(format!(
                "{} is a {} URL, not a {expected} one",
                shown(&presigned.url),
                presigned.method
            )));
        }
        let method = reqwest::Method::from_bytes(expected.as_bytes())
            .map_err(|_| Error::Invalid(format!("method {expected}")))?;
        let mut builder = self.http.request(method, &presigned.url);
        for header in &presigned.headers {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| Error::Invalid(format!("header name '{}'", header.name)))?;
            let value = HeaderValue::from_str(&header.value)
                .map_err(|_| Error::Invalid(format!("the value of header '{}'", header.name)))?;
            builder = builder.header(name, value);
        }
        Ok(builder)
    }

    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
        presigned: &PresignedRequest,
    ) -> Result<reqwest::Response> {
        let failed = |source| Error::Request {
            method: presigned.method.clone(),
            url: shown(&presigned.url),
            source,
        };
        let response = builder.send().await.map_err(failed)?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        let (code, message) = error_body(&body);
        Err(Error::Refused {
            method: presigned.method.clone(),
            url: shown(&presigned.url),
            status,
            code,
            message,
        })
    }

    /// PUTs `len` bytes of `path` from `offset`; answers the ETag the store
    /// sent back, if any (uploads in parts need them).
    pub async fn put_file(
        &self,
        presigned: &PresignedRequest,
        path: &Path,
        offset: u64,
        len: u64,
        progress: Option<Progress>,
    ) -> Result<Option<String>> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(Error::io(format!("opening {}", path.display())))?;
        if offset > 0 {
            file.seek(io::SeekFrom::Start(offset))
                .await
                .map_err(Error::io(format!("reading {}", path.display())))?;
        }
        let stream = ReaderStream::with_capacity(file.take(len), CHUNK);
        let counted = stream.map(move |chunk| {
            if let (Ok(bytes), Some(progress)) = (&chunk, &progress) {
                progress(bytes.len() as u64);
            }
            chunk
        });
        let body = reqwest::Body::wrap_stream(counted);
        let mut builder = self
            .request(presigned, "PUT")?
            .header(CONTENT_LENGTH, len)
            .body(body);
        if !presigned
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("content-type"))
        {
            builder = builder.header(CONTENT_TYPE, "application/octet-stream");
        }
        let response = self.send(builder, presigned).await?;
        Ok(response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned))
    }

    /// GETs the object into `dest` (through a temporary file beside it),
    /// checking it has `size` bytes hashing to `sha256`; sets its
    /// modification time to `modified` when given. A failed download
    /// leaves `dest` as it was.
    pub async fn get_file(
        &self,
        presigned: &PresignedRequest,
        dest: &Path,
        size: u64,
        sha256: &str,
        modified: Option<SystemTime>,
        progress: Option<Progress>,
    ) -> Result<()> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let what = || dest.display().to_string();
        // Created as any new file is (0666 less the umask), not 0600.
        let temp = tempfile::Builder::new()
            .prefix(".grad-download-")
            .permissions(fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(Error::io(format!("creating a file in {}", dir.display())))?;
        let mut response = self
            .send(self.request(presigned, "GET")?, presigned)
            .await?;
        let mut hasher = sha2::Sha256::new();
        let mut received = 0u64;
        let mut writer = io::BufWriter::with_capacity(CHUNK, temp.as_file());
        loop {
            let chunk = response.chunk().await.map_err(|source| Error::Request {
                method: presigned.method.clone(),
                url: shown(&presigned.url),
                source,
            })?;
            let Some(chunk) = chunk else { break };
            received += chunk.len() as u64;
            if received > size {
                return Err(Error::Size {
                    what: what(),
                    actual: received,
                    expected: size,
                });
            }
            hasher.update(&chunk);
            // Small synchronous writes into the page cache; a blocking hop
            // per chunk would cost more than it saves.
            writer
                .write_all(&chunk)
                .map_err(Error::io(format!("writing {}", what())))?;
            if let Some(progress) = &progress {
                progress(chunk.len() as u64);
            }
        }
        writer
            .flush()
            .map_err(Error::io(format!("writing {}", what())))?;
        drop(writer);
        if received != size {
            return Err(Error::Size {
                what: what(),
                actual: received,
                expected: size,
            });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(Error::Checksum {
                what: what(),
                actual,
                expected: sha256.to_owned(),
            });
        }
        if let Some(modified) = modified {
            temp.as_file()
                .set_modified(modified)
                .map_err(Error::io(format!("setting the time of {}", what())))?;
        }
        temp.persist(dest)
            .map_err(|e| Error::io(format!("moving the download to {}", what()))(e.error))?;
        Ok(())
    }
}

/// S3's XML error (`<Code>…</Code><Message>…</Message>`), else the start
/// of whatever the server said.
fn error_body(body: &str) -> (String, String) {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].trim().to_owned())
    };
    match tag("Code") {
        Some(code) => {
            let message = tag("Message").unwrap_or_default();
            let shown = if message.is_empty() {
                code.clone()
            } else {
                format!("{code}: {message}")
            };
            (code, shown)
        }
        None => {
            let text: String = body.trim().chars().take(300).collect();
            (String::new(), text)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_file_hashes_whole_and_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &bytes).unwrap();
        let digest = hash_file(&path, Some(1 << 20)).unwrap();
        assert_eq!(digest.size, bytes.len() as u64);
        assert_eq!(digest.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
        let expected: Vec<String> = bytes
            .chunks(1 << 20)
            .map(|c| hex::encode(sha2::Sha256::digest(c)))
            .collect();
        assert_eq!(digest.parts, expected);
        assert!(hash_file(&path, None).unwrap().parts.is_empty());
    }

    #[test]
    fn an_empty_file_has_one_empty_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        fs::write(&path, b"").unwrap();
        let digest = hash_file(&path, Some(5 << 20)).unwrap();
        assert_eq!(digest.parts, std::slice::from_ref(&digest.sha256));
    }

    #[test]
    fn s3_errors_show_their_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                   <Message>The request signature we calculated does not match</Message></Error>";
        let (code, message) = error_body(xml);
        assert_eq!(code, "SignatureDoesNotMatch");
        assert_eq!(
            message,
            "SignatureDoesNotMatch: The request signature we calculated does not match"
        );
        assert_eq!(error_body(" expired \n").1, "expired");
    }

    #[test]
    fn messages_never_show_the_signature() {
        assert_eq!(
            shown("http://h/blobs/k?expires=1&signature=abc"),
            "http://h/blobs/k"
        );
    }
}
