//! The S3 blob store: any S3-compatible service through `aws-sdk-s3`, which
//! presigns the URLs (SigV4 in the query). Credentials come the SDK's usual
//! way: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` and the
//! shared config and credentials files, or the instance's role.
//!
//! An upload URL carries the body's SHA-256 as a signed
//! `x-amz-checksum-sha256` header, which the uploader must send and S3
//! checks against the body.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Region},
    presigning::{PresignedRequest, PresigningConfig},
    types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart},
};
use base64::Engine;

use super::{
    BlobStore, BoxFuture, Key, Method, Multipart, Object, Presigned, Sha256, check_expiry,
};
use crate::error::{Error, Result};

/// Where the objects live.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub bucket: String,
    /// Prepended to every key (e.g. `grad/`).
    pub prefix: String,
    /// A non-AWS endpoint (`http://127.0.0.1:9000`); AWS's own otherwise.
    pub endpoint: Option<String>,
    /// Default: the SDK's (`AWS_REGION`, the profile), else `us-east-1`.
    pub region: Option<String>,
    /// `http://host/bucket/key` instead of `http://bucket.host/key`: what
    /// most S3-compatible servers need.
    pub path_style: bool,
    /// These keys instead of the SDK's chain (a dataset's own credentials).
    pub credentials: Option<Credentials>,
    /// No credentials at all (a public bucket): never the SDK's chain,
    /// which would be grad's own.
    pub anonymous: bool,
}

/// What listing a few objects found (see [`S3Store::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Keys relative to the prefix.
    pub sample: Vec<String>,
    pub truncated: bool,
}

/// Why listing failed: S3's error code, or `Unreachable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub code: String,
    pub message: String,
}

/// An access key pair; its Debug output hides the secret.
#[derive(Clone, Default)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    pub async fn new(settings: &Settings) -> Result<S3Store> {
        if settings.bucket.is_empty() {
            return Err(Error::InvalidArgument(
                "--s3-bucket: the S3 blob store needs a bucket".into(),
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if settings.anonymous {
            loader = loader.no_credentials();
        } else if let Some(keys) = &settings.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                &keys.access_key_id,
                &keys.secret_access_key,
                None,
                None,
                "grad",
            ));
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            config = config.region(Region::from_static("us-east-1"));
        }
        let config = config.force_path_style(settings.path_style).build();
        Ok(S3Store {
            client: Client::from_conf(config),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.clone(),
        })
    }

    /// Lists up to `max` objects under `prefix` (of the bucket, not the
    /// store's own prefix): can these settings read the bucket?
    pub async fn probe(&self, prefix: &str, max: i32) -> std::result::Result<Probe, ProbeError> {
        use aws_sdk_s3::error::ProvideErrorMetadata;
        match self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .max_keys(max)
            .send()
            .await
        {
            Ok(page) => Ok(Probe {
                sample: page
                    .contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(|k| k.strip_prefix(prefix).unwrap_or(k).to_owned())
                    .collect(),
                truncated: page.is_truncated().unwrap_or(false),
            }),
            Err(e) => match e.code() {
                Some(code) => Err(ProbeError {
                    code: code.to_owned(),
                    message: e.message().unwrap_or(code).to_owned(),
                }),
                None => Err(ProbeError {
                    code: "Unreachable".into(),
                    message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
                }),
            },
        }
    }

    fn object_key(&self, key: &Key) -> String {
        format!("{}{key}", self.prefix)
    }

    fn failed(&self, what: &str, key: &str, error: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!(
            "S3 {what} of s3://{}/{}{key} failed: {error}",
            self.bucket, self.prefix
        ))
    }
}

fn base64(sha256: &Sha256) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha256.0)
}

fn presigning(expires_in: Duration) -> Result<PresigningConfig> {
    check_expiry(expires_in)?;
    PresigningConfig::expires_in(expires_in)
        .map_err(|e| Error::InvalidArgument(format!("URL expiry: {e}")))
}

fn presigned(method: Method, request: &PresignedRequest, expires_in: Duration) -> Presigned {
    Presigned {
        method,
        url: request.uri().to_owned(),
        headers: request
            .headers()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
        expires_at: SystemTime::now() + expires_in,
    }
}

impl BlobStore for S3Store {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn presign_put<'a>(
        &'a self,
        key: &'a Key,
        sha256: Sha256,
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Presigned>> {
        Box::pin(async move {
            let request = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .checksum_sha256(base64(&sha256))
                .presigned(presigning(expires_in)?)
                .await
                .map_err(|e| self.failed("presigning a PUT", key.as_str(), e))?;
            Ok(presigned(Method::Put, &request, expires_in))
        })
    }

    fn presign_get<'a>(
        &'a self,
        key: &'a Key,
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Presigned>> {
        Box::pin(async move {
            let request = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .presigned(presigning(expires_in)?)
                .await
                .map_err(|e| self.failed("presigning a GET", key.as_str(), e))?;
            Ok(presigned(Method::Get, &request, expires_in))
        })
    }

    fn head<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Object>>> {
        Box::pin(async move {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .send()
                .await
            {
                Ok(head) => Ok(Some(Object {
                    key: key.clone(),
                    size: head.content_length().unwrap_or(0).max(0) as u64,
                })),
                Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
                Err(e) => Err(self.failed(
                    "HEAD",
                    key.as_str(),
                    aws_sdk_s3::error::DisplayErrorContext(e),
                )),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Object>>> {
        Box::pin(async move {
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{}{prefix}", self.prefix))
                .into_paginator()
                .send();
            let mut found = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| {
                    self.failed("listing", prefix, aws_sdk_s3::error::DisplayErrorContext(e))
                })?;
                for object in page.contents() {
                    let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                        continue;
                    };
                    // Objects that grad did not write are not grad's.
                    if let Ok(key) = Key::new(key) {
                        found.push(Object {
                            key,
                            size: object.size().unwrap_or(0).max(0) as u64,
                        });
                    }
                }
            }
            found.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(found)
        })
    }

    fn delete<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .send()
                .await
                .map(drop)
                .map_err(|e| {
                    self.failed(
                        "DELETE",
                        key.as_str(),
                        aws_sdk_s3::error::DisplayErrorContext(e),
                    )
                })
        })
    }

    fn begin_multipart<'a>(
        &'a self,
        key: &'a Key,
        parts: &'a [Sha256],
        expires_in: Duration,
    ) -> BoxFuture<'a, Result<Multipart>> {
        Box::pin(async move {
            if parts.is_empty() || parts.len() > 10_000 {
                return Err(Error::InvalidArgument(format!(
                    "an upload in parts has 1 to 10000 parts, not {}",
                    parts.len()
                )));
            }
            let config = presigning(expires_in)?;
            let created = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .send()
                .await
                .map_err(|e| {
                    self.failed(
                        "starting an upload in parts",
                        key.as_str(),
                        aws_sdk_s3::error::DisplayErrorContext(e),
                    )
                })?;
            let upload_id = created
                .upload_id()
                .ok_or_else(|| {
                    self.failed("starting an upload in parts", key.as_str(), "no upload id")
                })?
                .to_owned();
            let mut presigned_parts = Vec::with_capacity(parts.len());
            for (index, sha256) in parts.iter().enumerate() {
                let request = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(self.object_key(key))
                    .upload_id(&upload_id)
                    .part_number(index as i32 + 1)
                    .checksum_sha256(base64(sha256))
                    .presigned(config.clone())
                    .await
                    .map_err(|e| self.failed("presigning a part", key.as_str(), e))?;
                presigned_parts.push(presigned(Method::Put, &request, expires_in));
            }
            Ok(Multipart {
                upload_id,
                parts: presigned_parts,
            })
        })
    }

    fn complete_multipart<'a>(
        &'a self,
        key: &'a Key,
        upload_id: &'a str,
        parts: &'a [(Sha256, String)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let completed = parts
                .iter()
                .enumerate()
                .map(|(index, (sha256, etag))| {
                    CompletedPart::builder()
                        .part_number(index as i32 + 1)
                        .e_tag(etag)
                        .checksum_sha256(base64(sha256))
                        .build()
                })
                .collect();
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(completed))
                        .build(),
                )
                .send()
                .await
                .map(drop)
                .map_err(|e| {
                    self.failed(
                        "completing an upload in parts",
                        key.as_str(),
                        aws_sdk_s3::error::DisplayErrorContext(e),
                    )
                })
        })
    }
}
