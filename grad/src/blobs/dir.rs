//! The embedded blob store: objects in a directory under the data dir,
//! uploaded and downloaded through grad's own HTTP port with URLs signed like
//! S3's presigned ones: `PUT|GET /blobs/<key>?expires=<unix>&sha256=<hex>&signature=<hex>`,
//! where the signature is HMAC-SHA256 (a key kept in the data dir) over the
//! method, the key, the expiry and, for a PUT, the SHA-256 the body must have.
//! An expired or altered URL is refused; so is a body with another digest.
//! Refusals are S3-style XML errors (`SignatureDoesNotMatch`, `BadDigest`, …).
//! Uploads land in `partial/` and are renamed into `objects/` only once
//! their digest checks out, so a reader never sees half an object.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Body,
    extract::Path as UrlPath,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::put,
};
use hmac::{Hmac, Mac};
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::{BlobStore, BoxFuture, Key, Method, Object, Presigned, Sha256, check_expiry};
use crate::error::{Error, Result};

type HmacSha256 = Hmac<sha2::Sha256>;

pub struct DirStore {
    objects: PathBuf,
    partial: PathBuf,
    secret: Vec<u8>,
    /// grad's URL as clients reach it (`http://host:port`).
    base_url: String,
}

impl DirStore {
    /// Opens (creating) the store in `root`, signing with the secret in
    /// `secret` (made at first use); URLs start with `base_url`.
    pub fn open(root: &Path, secret: &Path, base_url: &str) -> Result<DirStore> {
        let objects = root.join("objects");
        let partial = root.join("partial");
        for dir in [&objects, &partial] {
            std::fs::create_dir_all(dir)
                .map_err(Error::io(format!("creating {}", dir.display())))?;
        }
        Ok(DirStore {
            objects,
            partial,
            secret: crate::auth::load_or_create_secret(secret, "the blob signing key")?,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    fn mac(&self, method: Method, key: &str, expires: u64, sha256: &str) -> HmacSha256 {
        // Cannot fail: HMAC takes a key of any length.
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC key");
        mac.update(format!("{}\n{key}\n{expires}\n{sha256}", method.as_str()).as_bytes());
        mac
    }

    fn presign(
        &self,
        method: Method,
        key: &Key,
        sha256: Option<Sha256>,
        expires_in: Duration,
    ) -> Result<Presigned> {
        check_expiry(expires_in)?;
        // Whole seconds, rounded down: a URL never lives longer than asked.
        let expires = unix(SystemTime::now() + expires_in);
        let expires_at = UNIX_EPOCH + Duration::from_secs(expires);
        let sha256 = sha256.map(|s| s.to_string()).unwrap_or_default();
        let signature = hex::encode(
            self.mac(method, key.as_str(), expires, &sha256)
                .finalize()
                .into_bytes(),
        );
        let mut url = format!("{}/blobs/{key}?expires={expires}", self.base_url);
        if !sha256.is_empty() {
            url.push_str(&format!("&sha256={sha256}"));
        }
        url.push_str(&format!("&signature={signature}"));
        Ok(Presigned {
            method,
            url,
            headers: Vec::new(),
            expires_at,
        })
    }

    /// Checks a request's URL; answers why it is refused.
    fn verify(&self, method: Method, key: &str, uri: &Uri) -> Result<Signed, Refusal> {
        let refuse = |status, message| Refusal::new(status, message);
        let key = Key::new(key).map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))?;
        let mut expires = None;
        let mut sha256 = String::new();
        let mut signature = None;
        for pair in uri.query().unwrap_or_default().split('&') {
            match pair.split_once('=') {
                Some(("expires", value)) => expires = value.parse::<u64>().ok(),
                Some(("sha256", value)) => sha256 = value.to_owned(),
                Some(("signature", value)) => signature = hex::decode(value).ok(),
                _ => {}
            }
        }
        let (Some(expires), Some(signature)) = (expires, signature) else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "this URL is not signed: ask grad for a URL to this blob".into(),
            ));
        };
        if self
            .mac(method, key.as_str(), expires, &sha256)
            .verify_slice(&signature)
            .is_err()
        {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "SignatureDoesNotMatch",
                "the URL's signature does not match: it was altered or is for another method"
                    .into(),
            ));
        }
        if SystemTime::now() >= UNIX_EPOCH + Duration::from_secs(expires) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "this URL expired at {}: ask grad for a new one",
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(expires))
                ),
            ));
        }
        let sha256 = if sha256.is_empty() {
            None
        } else {
            Some(
                Sha256::parse(&sha256)
                    .map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))?,
            )
        };
        Ok(Signed { key, sha256 })
    }

    fn path(&self, key: &Key) -> PathBuf {
        // A key's segments are plain names (see `Key`): it stays inside.
        self.objects.join(key.as_str())
    }

    /// Routes `/blobs/<key>` on grad's HTTP port.
    pub fn router(self: Arc<Self>) -> Router {
        let getter = Arc::clone(&self);
        Router::new().route(
            "/blobs/{*key}",
            put(move |UrlPath(key): UrlPath<String>, uri: Uri, body: Body| {
                let store = Arc::clone(&self);
                async move { store.receive(&key, &uri, body).await }
            })
            .get(move |UrlPath(key): UrlPath<String>, uri: Uri| {
                let store = Arc::clone(&getter);
                async move { store.send(&key, &uri).await }
            }),
        )
    }

    async fn receive(&self, key: &str, uri: &Uri, body: Body) -> Response {
        let signed = match self.verify(Method::Put, key, uri) {
            Ok(signed) => signed,
            Err(refused) => return refused.into_response(),
        };
        let Some(expected) = signed.sha256 else {
            return Refusal::new(
                StatusCode::FORBIDDEN,
                "an upload URL must name its SHA-256".into(),
            )
            .into_response();
        };
        let partial = self.partial.join(uuid::Uuid::new_v4().to_string());
        let result = self.write(&partial, body, expected, &signed.key).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        match result {
            Ok(()) => {
                let mut headers = HeaderMap::new();
                if let Ok(etag) = format!("\"{expected}\"").parse() {
                    headers.insert(header::ETAG, etag);
                }
                (StatusCode::OK, headers).into_response()
            }
            Err(refused) => refused.into_response(),
        }
    }

    async fn write(
        &self,
        partial: &Path,
        body: Body,
        expected: Sha256,
        key: &Key,
    ) -> Result<(), Refusal> {
        let internal = |what: &str, e: io::Error| {
            tracing::warn!(error = %e, key = %key, "blob store: {what}");
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storing the blob failed ({what})"),
            )
        };
        let mut file = tokio::fs::File::create(partial)
            .await
            .map_err(|e| internal("creating", e))?;
        let mut hasher = sha2::Sha256::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Refusal(
                    StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    format!("the upload broke off: {e}"),
                )
            })?;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| internal("writing", e))?;
        }
        file.sync_all().await.map_err(|e| internal("syncing", e))?;
        let got = Sha256(hasher.finalize().into());
        if got != expected {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "BadDigest",
                format!(
                    "the body's SHA-256 is {got}, not {expected} as the URL says: nothing stored"
                ),
            ));
        }
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| internal("creating its directory", e))?;
        }
        tokio::fs::rename(partial, &path)
            .await
            .map_err(|e| internal("moving it in place", e))
    }

    async fn send(&self, key: &str, uri: &Uri) -> Response {
        let signed = match self.verify(Method::Get, key, uri) {
            Ok(signed) => signed,
            Err(refused) => return refused.into_response(),
        };
        let file = match tokio::fs::File::open(self.path(&signed.key)).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Refusal(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    format!("no blob '{}'", signed.key),
                )
                .into_response();
            }
            Err(e) => {
                tracing::warn!(error = %e, key = %signed.key, "blob store: opening");
                return Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "reading the blob failed".into(),
                )
                .into_response();
            }
        };
        let mut headers = HeaderMap::new();
        if let Ok(meta) = file.metadata().await {
            headers.insert(header::CONTENT_LENGTH, meta.len().into());
        }
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/octet-stream"),
        );
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
        (StatusCode::OK, headers, body).into_response()
    }
}

struct Signed {
    key: Key,
    sha256: Option<Sha256>,
}

/// A request refused, and why: S3's error code and a message, sent as S3
/// sends them (an XML `Error` document), so clients handle both stores alike.
struct Refusal(StatusCode, &'static str, String);

impl Refusal {
    /// A refusal with the code S3 uses for `status` in general.
    fn new(status: StatusCode, message: String) -> Refusal {
        let code = match status {
            StatusCode::FORBIDDEN => "AccessDenied",
            StatusCode::NOT_FOUND => "NoSuchKey",
            StatusCode::BAD_REQUEST => "InvalidArgument",
            _ => "InternalError",
        };
        Refusal(status, code, message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let escape = |text: &str| {
            text.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>\n",
            self.1,
            escape(&self.2)
        );
        let mut response = (self.0, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/xml"),
        );
        response
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl BlobStore for DirStore {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn presign_put<'a>(
        &'a self,
        key: &'a Key,
        sha256: Sha256,
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Presigned>> {
        Box::pin(async move { self.presign(Method::Put, key, Some(sha256), expires_in) })
    }

    fn presign_get<'a>(
        &'a self,
        key: &'a Key,
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Presigned>> {
        Box::pin(async move { self.presign(Method::Get, key, None, expires_in) })
    }

    fn head<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Object>>> {
        Box::pin(async move {
            match tokio::fs::metadata(self.path(key)).await {
                Ok(meta) if meta.is_file() => Ok(Some(Object {
                    key: key.clone(),
                    size: meta.len(),
                })),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("reading blob {key}"))(e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Object>>> {
        let objects = self.objects.clone();
        let prefix = prefix.to_owned();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || list(&objects, &prefix))
                .await
                .map_err(|e| Error::Unavailable(format!("listing blobs: {e}")))?
        })
    }

    fn delete<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(key)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("removing blob {key}"))(e)),
            }
        })
    }
}

/// The objects under `objects` whose keys start with `prefix`, in key order.
fn list(objects: &Path, prefix: &str) -> Result<Vec<Object>> {
    // Only the directory the prefix ends in (and below) can hold matches.
    let start = match prefix.rfind('/') {
        Some(slash) => objects.join(&prefix[..slash]),
        None => objects.to_owned(),
    };
    let mut found = Vec::new();
    let mut dirs = vec![start];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()))(e)),
        };
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("listing {}", dir.display())))?;
            let path = entry.path();
            let meta = entry
                .metadata()
                .map_err(Error::io(format!("reading {}", path.display())))?;
            if meta.is_dir() {
                dirs.push(path);
                continue;
            }
            let Some(relative) = path.strip_prefix(objects).ok().and_then(Path::to_str) else {
                continue;
            };
            if relative.starts_with(prefix)
                && let Ok(key) = Key::new(relative)
            {
                found.push(Object {
                    key,
                    size: meta.len(),
                });
            }
        }
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(found)
}
