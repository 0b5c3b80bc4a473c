//! Collecting `outputs/` into grad's blob store, when grad asks
//! (`CollectOutputs`: on request, before a pause, before a delete).
//!
//! The collector walks `outputs/` without following symbolic links (a link
//! could point anywhere on the host; it is reported as skipped), hashes each
//! regular file with SHA-256 — reusing the hash of a file whose size,
//! modification and change times and inode are those it had last time —
//! and sends the manifest to grad (`PlanOutputs`), which answers upload
//! URLs for the contents it lacks. Those go up by presigned PUT (in parts
//! when grad says so), and the manifest is committed (`CommitOutputs`).
//! The index of hashes lives in the state dir, so it survives a restart.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use grad_proto::{
    BeginPartUploadRequest, CommitOutputsRequest, CompletedPartUpload, JobOutputs,
    JobOutputsCommit, JobPartUpload, OutputFile, OutputManifest, OutputUploads, PartUpload,
    PresignedRequest, blob_upload::How, runner_agent_client::RunnerAgentClient,
    worker_agent_client::WorkerAgentClient,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::servers::GradChannel;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};

/// Files (or parts) uploaded at once.
const UPLOADS_IN_FLIGHT: usize = 4;
/// The largest answer from grad (upload URLs for up to 100 000 files).
const MAX_MESSAGE: usize = 64 << 20;
/// Times a file that changes while it is hashed is hashed again.
const HASH_ATTEMPTS: usize = 3;

/// What a collection moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub uploaded_files: u32,
    pub uploaded_bytes: u64,
}

/// How a file looked when it was hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Indexed {
    stamp: Stamp,
    sha256: String,
}

/// The hashes of the files last collected, by path.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    files: HashMap<String, Indexed>,
}

/// A file found in outputs/.
#[derive(Debug, Clone)]
struct Found {
    path: String,
    stamp: Stamp,
}

pub struct Collector {
    root: PathBuf,
    index_file: Option<PathBuf>,
    http: grad_transfer::Client,
    /// One collection at a time, each updating the index.
    index: tokio::sync::Mutex<Index>,
}

impl Collector {
    /// Collects `workspace/outputs`, keeping its index in `state_dir`.
    pub fn new(workspace: &Path, state_dir: &Path) -> Result<Collector, grad_transfer::Error> {
        Ok(Collector::of(
            workspace.join("outputs"),
            Some(state_dir.join("outputs-index.json")),
            grad_transfer::Client::new()?,
        ))
    }

    /// Collects `root`, with its index of hashes in `index_file` (none: a
    /// directory collected once, such as a job's).
    pub fn of(
        root: PathBuf,
        index_file: Option<PathBuf>,
        http: grad_transfer::Client,
    ) -> Collector {
        let index = index_file
            .as_ref()
            .and_then(|file| fs::read(file).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Collector {
            root,
            index_file,
            http,
            index: tokio::sync::Mutex::new(index),
        }
    }

    /// One collection, start to end; the error says what went wrong in
    /// words for the user.
    pub async fn collect(&self, mut sink: Sink) -> Result<Report, String> {
        let mut index = self.index.lock().await;
        let root = self.root.clone();
        let previous = std::mem::take(&mut index.files);
        let (hashed, skipped) = tokio::task::spawn_blocking(move || hash_all(&root, &previous))
            .await
            .map_err(|e| format!("hashing outputs/: {e}"))?;
        let files: Vec<OutputFile> = hashed
            .iter()
            .map(|(found, sha256)| OutputFile {
                path: found.path.clone(),
                size: found.stamp.size,
                sha256: sha256.clone(),
                modify_time: Some(prost_types::Timestamp {
                    seconds: found.stamp.mtime.0,
                    nanos: found.stamp.mtime.1 as i32,
                }),
                download: None,
            })
            .collect();
        // The index is what was hashed, whatever becomes of the upload.
        index.files = hashed
            .iter()
            .map(|(found, sha256)| {
                let indexed = Indexed {
                    stamp: found.stamp.clone(),
                    sha256: sha256.clone(),
                };
                (found.path.clone(), indexed)
            })
            .collect();
        self.save(&index);

        let manifest = OutputManifest { files, skipped };
        let plan = sink
            .plan(manifest.clone())
            .await
            .map_err(|s| format!("asking grad where to upload: {}", s.message()))?;

        // Any file with the content will do as its source.
        let sources: HashMap<&str, &str> = manifest
            .files
            .iter()
            .map(|f| (f.sha256.as_str(), f.path.as_str()))
            .collect();
        let mut report = Report::default();
        let mut puts = Vec::new();
        let mut completed = Vec::new();
        for upload in plan.uploads {
            let Some(path) = sources.get(upload.sha256.as_str()) else {
                return Err(format!(
                    "grad asked for content {} that outputs/ does not have",
                    upload.sha256
                ));
            };
            let file = self.root.join(path);
            report.uploaded_files += 1;
            report.uploaded_bytes += upload.size;
            match upload.how {
                Some(How::Put(put)) => puts.push((put, file, 0, upload.size, path.to_string())),
                Some(How::PartBytes(part_bytes)) => {
                    let (parts, done) = self
                        .begin_parts(&mut sink, &file, path, &upload.sha256, part_bytes)
                        .await?;
                    let mut offset = 0;
                    for (index, put) in parts.into_iter().enumerate() {
                        let len = part_bytes.min(upload.size - offset);
                        let what = format!("{path} (part {})", index + 1);
                        puts.push((put, file.clone(), offset, len, what));
                        offset += len;
                    }
                    completed.push(done);
                }
                None => return Err(format!("grad gave no way to upload outputs/{path}")),
            }
        }
        let etags = self.put_all(puts).await?;
        let mut etags = etags.into_iter();
        for done in &mut completed {
            done.etags = etags.by_ref().take(done.part_sha256.len()).collect();
        }
        if report.uploaded_files > 0 || !completed.is_empty() {
            tracing::info!(
                files = report.uploaded_files,
                bytes = report.uploaded_bytes,
                "outputs uploaded"
            );
        }
        sink.commit(CommitOutputsRequest {
            manifest: Some(manifest),
            completed,
        })
        .await
        .map_err(|s| format!("recording the outputs in grad: {}", s.message()))?;
        Ok(report)
    }

    /// Hashes `file`'s parts and starts its upload in parts.
    async fn begin_parts(
        &self,
        sink: &mut Sink,
        file: &Path,
        path: &str,
        sha256: &str,
        part_bytes: u64,
    ) -> Result<(Vec<PresignedRequest>, CompletedPartUpload), String> {
        let source = file.to_owned();
        let digest = tokio::task::spawn_blocking(move || {
            grad_transfer::hash_file(&source, Some(part_bytes))
        })
        .await
        .map_err(|e| format!("hashing outputs/{path}: {e}"))?
        .map_err(|e| format!("reading outputs/{path}: {e}"))?;
        if digest.sha256 != sha256 {
            return Err(changed(path));
        }
        let started = sink
            .begin_parts(BeginPartUploadRequest {
                sha256: sha256.to_owned(),
                size: digest.size,
                part_bytes,
                part_sha256: digest.parts.clone(),
            })
            .await
            .map_err(|s| format!("uploading outputs/{path} in parts: {}", s.message()))?;
        let done = CompletedPartUpload {
            sha256: sha256.to_owned(),
            upload_id: started.upload_id,
            part_sha256: digest.parts,
            etags: Vec::new(),
        };
        Ok((started.parts, done))
    }

    /// Runs the PUTs, a few at once; answers their ETags in order.
    async fn put_all(
        &self,
        puts: Vec<(PresignedRequest, PathBuf, u64, u64, String)>,
    ) -> Result<Vec<String>, String> {
        let mut etags = vec![String::new(); puts.len()];
        let mut running = JoinSet::new();
        let mut queue = puts.into_iter().enumerate();
        loop {
            while running.len() < UPLOADS_IN_FLIGHT {
                let Some((index, (put, file, offset, len, what))) = queue.next() else {
                    break;
                };
                let http = self.http.clone();
                running.spawn(async move {
                    let etag = http.put_file(&put, &file, offset, len, None).await;
                    (index, what, etag)
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let (index, what, etag) = done.map_err(|e| format!("uploading outputs: {e}"))?;
            match etag {
                Ok(etag) => etags[index] = etag.unwrap_or_default(),
                Err(grad_transfer::Error::Refused { code, .. }) if is_digest_mismatch(&code) => {
                    return Err(changed(&what));
                }
                Err(e) => return Err(format!("uploading outputs/{what}: {e}")),
            }
        }
        Ok(etags)
    }

    /// Writes the index (0600, replaced atomically); a failure only costs
    /// hashing again next time.
    fn save(&self, index: &Index) {
        let Some(index_file) = &self.index_file else {
            return;
        };
        let write = || -> std::io::Result<()> {
            let temp = index_file.with_extension("json.tmp");
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&serde_json::to_vec(index).map_err(std::io::Error::other)?)?;
            fs::rename(&temp, index_file)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %index_file.display(), error = %e, "saving the outputs index");
        }
    }
}

fn authed<T>(auth: &MetadataValue<Ascii>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}

/// Where a collection goes: a runner's outputs (its agent's token), or a
/// job attempt's (the worker's token).
pub enum Sink {
    Runner {
        client: RunnerAgentClient<Channel>,
        auth: MetadataValue<Ascii>,
    },
    Job {
        client: WorkerAgentClient<GradChannel>,
        auth: MetadataValue<Ascii>,
        id: String,
        attempt: u32,
    },
}

impl Sink {
    pub fn runner(channel: Channel, auth: MetadataValue<Ascii>) -> Sink {
        // Thousands of new files make an answer of many URLs.
        let client = RunnerAgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        Sink::Runner { client, auth }
    }

    pub fn job(channel: GradChannel, auth: MetadataValue<Ascii>, id: &str, attempt: u32) -> Sink {
        let client = WorkerAgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        Sink::Job {
            client,
            auth,
            id: id.to_owned(),
            attempt,
        }
    }

    async fn plan(&mut self, manifest: OutputManifest) -> Result<OutputUploads, Status> {
        Ok(match self {
            Sink::Runner { client, auth } => client.plan_outputs(authed(auth, manifest)).await?,
            Sink::Job {
                client,
                auth,
                id,
                attempt,
            } => {
                let message = JobOutputs {
                    id: id.clone(),
                    attempt: *attempt,
                    manifest: Some(manifest),
                };
                client.plan_job_outputs(authed(auth, message)).await?
            }
        }
        .into_inner())
    }

    async fn begin_parts(&mut self, upload: BeginPartUploadRequest) -> Result<PartUpload, Status> {
        Ok(match self {
            Sink::Runner { client, auth } => client.begin_part_upload(authed(auth, upload)).await?,
            Sink::Job {
                client,
                auth,
                id,
                attempt,
            } => {
                let message = JobPartUpload {
                    id: id.clone(),
                    attempt: *attempt,
                    upload: Some(upload),
                };
                client.begin_job_part_upload(authed(auth, message)).await?
            }
        }
        .into_inner())
    }

    async fn commit(&mut self, commit: CommitOutputsRequest) -> Result<(), Status> {
        match self {
            Sink::Runner { client, auth } => {
                client.commit_outputs(authed(auth, commit)).await?;
            }
            Sink::Job {
                client,
                auth,
                id,
                attempt,
            } => {
                let message = JobOutputsCommit {
                    id: id.clone(),
                    attempt: *attempt,
                    commit: Some(commit),
                };
                client.commit_job_outputs(authed(auth, message)).await?;
            }
        }
        Ok(())
    }
}

/// S3's (and grad's embedded store's) words for a body that is not the one
/// the URL names.
fn is_digest_mismatch(code: &str) -> bool {
    matches!(
        code,
        "BadDigest" | "XAmzContentSHA256Mismatch" | "InvalidDigest"
    )
}

fn changed(path: &str) -> String {
    format!("outputs/{path} changed while it was being collected; collect again")
}

/// Walks `root` (blocking) and hashes what changed since `previous`.
fn hash_all(
    root: &Path,
    previous: &HashMap<String, Indexed>,
) -> (Vec<(Found, String)>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    if root.is_dir() {
        walk(root, "", &mut found, &mut skipped);
    }
    let mut hashed = Vec::with_capacity(found.len());
    for file in found {
        match previous.get(&file.path) {
            Some(indexed) if indexed.stamp == file.stamp => {
                hashed.push((file, indexed.sha256.clone()));
            }
            _ => match hash_one(root, &file) {
                Ok((file, sha256)) => hashed.push((file, sha256)),
                Err(reason) => skipped.push(format!("{}: {reason}", file.path)),
            },
        }
    }
    (hashed, skipped)
}

/// Hashes a file, again if it changed meanwhile; answers how it looked.
fn hash_one(root: &Path, file: &Found) -> Result<(Found, String), String> {
    let path = root.join(&file.path);
    let mut stamp = file.stamp.clone();
    for _ in 0..HASH_ATTEMPTS {
        let digest = grad_transfer::hash_file(&path, None).map_err(|e| e.to_string())?;
        let after = fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
        let now = Stamp::of(&after);
        if now == stamp && digest.size == stamp.size {
            let found = Found {
                path: file.path.clone(),
                stamp,
            };
            return Ok((found, digest.sha256));
        }
        stamp = now;
    }
    Err("kept changing while it was read".into())
}

fn walk(dir: &Path, prefix: &str, found: &mut Vec<Found>, skipped: &mut Vec<String>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            skipped.push(format!("{}: {e}", shown(prefix)));
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            skipped.push(format!(
                "{}{}: the name is not UTF-8",
                prefix,
                name.to_string_lossy()
            ));
            continue;
        };
        let path = format!("{prefix}{name}");
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) => {
                skipped.push(format!("{path}: {e}"));
                continue;
            }
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            walk(&entry.path(), &format!("{path}/"), found, skipped);
        } else if kind.is_file() {
            found.push(Found {
                path,
                stamp: Stamp::of(&meta),
            });
        } else if kind.is_symlink() {
            skipped.push(format!("{path}: a symbolic link (not followed)"));
        } else {
            skipped.push(format!("{path}: not a regular file"));
        }
    }
}

fn shown(prefix: &str) -> &str {
    match prefix.trim_end_matches('/') {
        "" => ".",
        dir => dir,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_walk_finds_files_and_skips_links_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("top.csv"), "x").unwrap();
        fs::write(root.join("a/b/deep.txt"), "y").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("a/link")).unwrap();
        let fifo = root.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        let (hashed, skipped) = hash_all(root, &HashMap::new());
        let paths: Vec<&str> = hashed.iter().map(|(f, _)| f.path.as_str()).collect();
        assert_eq!(paths, ["a/b/deep.txt", "top.csv"]);
        assert!(skipped.contains(&"a/link: a symbolic link (not followed)".to_string()));
        if made.is_ok_and(|s| s.success()) {
            assert!(
                skipped.contains(&"pipe: not a regular file".to_string()),
                "{skipped:?}"
            );
        }
        assert_eq!(
            hashed[1].1,
            "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
        );
    }

    #[test]
    fn unchanged_files_reuse_their_hash_and_changed_ones_are_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a"), "one").unwrap();
        fs::write(root.join("b"), "two").unwrap();
        let (first, _) = hash_all(root, &HashMap::new());
        // A planted hash shows whether the index was believed.
        let index: HashMap<String, Indexed> = first
            .iter()
            .map(|(f, _)| {
                let indexed = Indexed {
                    stamp: f.stamp.clone(),
                    sha256: format!("planted-{}", f.path),
                };
                (f.path.clone(), indexed)
            })
            .collect();
        fs::write(root.join("b"), "changed").unwrap();
        let (second, _) = hash_all(root, &index);
        assert_eq!(second[0].1, "planted-a");
        assert_ne!(second[1].1, "planted-b");
        assert_eq!(
            second[1].1,
            grad_transfer::hash_file(&root.join("b"), None)
                .unwrap()
                .sha256
        );
    }

    #[test]
    fn a_missing_outputs_directory_is_an_empty_collection() {
        let dir = tempfile::tempdir().unwrap();
        let (hashed, skipped) = hash_all(&dir.path().join("outputs"), &HashMap::new());
        assert!(hashed.is_empty() && skipped.is_empty());
    }
}
