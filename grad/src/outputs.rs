//! Outputs: what runners write to `outputs/`, collected into the blob store
//! as content-addressed objects (`users/<owner>/sha256/<hex>`, shared by all
//! of one user's runners) and recorded as one set per runner, which outlives
//! the runner until it is removed.
//!
//! A collection: grad asks the runner's agent (`CollectOutputs`); the agent
//! hashes `outputs/` (reusing the hashes of files that did not change) and
//! sends the manifest (`PlanOutputs`); grad answers upload URLs for the
//! objects it lacks — in parts, on S3, for large ones; the agent uploads
//! them and commits the manifest (`CommitOutputs`), which grad checks
//! against the store before recording it in place of the previous set. An
//! unchanged file costs a lookup, not an upload.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use grad_proto as pb;
use tokio::task::JoinSet;

use crate::{
    auth::UserCaller,
    blobs::{BlobStore, Key, MIN_PART, Multipart, Presigned, Sha256},
    error::{Error, Result},
    replicas::Origin,
    runners::{Reach, Runners},
    store::{self, OutputFile, OutputSet, Source, Store, now_ms},
};

/// The most files one set may have.
const MAX_FILES: usize = 100_000;
/// The longest path (bytes) of a file in outputs/.
const MAX_PATH: usize = 1024;
/// Reasons for skipped files kept per set; more are counted, not listed.
const MAX_SKIPPED: usize = 100;
/// S3 takes at most this many parts per object.
const MAX_PARTS: u64 = 10_000;
/// Parts of uploads in parts are at least this large (fewer requests).
const PART_BYTES: u64 = 64 << 20;
/// Objects checked against the store at once.
const HEADS_IN_FLIGHT: usize = 16;

/// A URL lives long enough to start the transfer of `bytes` at a slow
/// 10 MB/s, and at least 15 minutes.
fn expiry(bytes: u64) -> Duration {
    Duration::from_secs(15 * 60 + bytes / 10_000_000).min(crate::blobs::MAX_EXPIRY)
}

/// How an object is to be uploaded.
#[derive(Debug)]
pub enum How {
    Put(Presigned),
    /// In parts of this many bytes (`BeginPartUpload`).
    Parts(u64),
}

#[derive(Debug)]
pub struct Upload {
    pub sha256: Sha256,
    pub size: u64,
    pub how: How,
}

/// A set and its files, as a caller sees it.
#[derive(Debug)]
pub struct Found {
    pub set: OutputSet,
    pub files: Vec<OutputFile>,
}

/// The set a collection fills: a runner's, or a job's.
#[derive(Debug, Clone)]
pub struct Collecting {
    pub set_id: String,
    pub owner_id: String,
    pub owner_name: String,
    /// The runner's name, or `job/NAME`.
    pub name: String,
    pub source: Source,
}

impl Collecting {
    pub fn job(job: &store::Job) -> Collecting {
        Collecting {
            set_id: job.id.clone(),
            owner_id: job.owner_id.clone(),
            owner_name: job.owner_name.clone(),
            name: format!("job/{}", job.name),
            source: Source::Job,
        }
    }
}

/// A validated manifest.
struct Manifest {
    files: Vec<OutputFile>,
    skipped: Vec<String>,
}

pub struct Outputs {
    store: Store,
    blobs: Arc<dyn BlobStore>,
    runners: Arc<Runners>,
    /// On stores with parts (S3), objects this large go up in parts.
    part_threshold: u64,
    /// Held while a commit checks its objects and records its set, and while
    /// a removal decides which objects nobody refers to any more, so that
    /// neither sees the other half-done.
    objects: tokio::sync::Mutex<()>,
}

fn validate_path(path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "output path '{}': {why}",
            path.escape_debug()
        )))
    };
    if path.is_empty() || path.len() > MAX_PATH {
        return bad(&format!("must be 1-{MAX_PATH} bytes"));
    }
    if path.chars().any(|c| c.is_control()) {
        return bad("has control characters");
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return bad("must be relative, with no empty, '.' or '..' part");
    }
    Ok(())
}

fn validate(manifest: pb::OutputManifest) -> Result<Manifest> {
    if manifest.files.len() > MAX_FILES {
        return Err(Error::InvalidArgument(format!(
            "outputs/ has {} files; at most {MAX_FILES} are collected",
            manifest.files.len()
        )));
    }
    let mut files = Vec::with_capacity(manifest.files.len());
    let mut paths = HashSet::with_capacity(manifest.files.len());
    for file in manifest.files {
        validate_path(&file.path)?;
        let sha256 = Sha256::parse(&file.sha256)?;
        if !paths.insert(file.path.clone()) {
            return Err(Error::InvalidArgument(format!(
                "output path '{}' is listed twice",
                file.path
            )));
        }
        let modified_at = file
            .modify_time
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
            .unwrap_or_default();
        files.push(OutputFile {
            path: file.path,
            size: file.size,
            sha256: sha256.to_string(),
            modified_at,
        });
    }
    // A file may not also be a directory of another ("a" and "a/b").
    for file in &files {
        let mut dir = file.path.as_str();
        while let Some((parent, _)) = dir.rsplit_once('/') {
            if paths.contains(parent) {
                return Err(Error::InvalidArgument(format!(
                    "output path '{}' is both a file and the directory of '{}'",
                    parent, file.path
                )));
            }
            dir = parent;
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut skipped = manifest.skipped;
    if skipped.len() > MAX_SKIPPED {
        let more = skipped.len() - MAX_SKIPPED;
        skipped.truncate(MAX_SKIPPED);
        skipped.push(format!("... and {more} more"));
    }
    for reason in &mut skipped {
        reason.truncate(MAX_PATH + 200);
    }
    Ok(Manifest { files, skipped })
}

/// The part size for an object of `size` bytes: 64 MiB (or the threshold,
/// if lower), more when S3's 10 000 parts would not hold it, never under
/// S3's 5 MiB minimum.
fn part_bytes(threshold: u64, size: u64) -> u64 {
    let fewest = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    PART_BYTES.min(threshold).max(fewest).max(MIN_PART)
}

/// Whether `name` is a runner id (what ListOutputs shows for a deleted runner).
fn is_runner_id(name: &str) -> bool {
    uuid::Uuid::try_parse(name).is_ok()
}

impl Outputs {
    pub fn new(
        store: Store,
        blobs: Arc<dyn BlobStore>,
        runners: Arc<Runners>,
        part_threshold: u64,
    ) -> Arc<Outputs> {
        Arc::new(Outputs {
            store,
            blobs,
            runners,
            part_threshold: part_threshold.max(MIN_PART),
            objects: tokio::sync::Mutex::new(()),
        })
    }

    fn key(owner_id: &str, sha256: &str) -> Result<Key> {
        Key::content(&format!("users/{owner_id}"), &Sha256::parse(sha256)?)
    }

    /// Has the caller's ready runner collect its outputs now.
    pub async fn collect(
        &self,
        caller: &UserCaller,
        name: &str,
        origin: &Origin,
    ) -> Result<(Found, pb::OutputsCollected)> {
        let (runner, agent) = match self.runners.usable(caller, name, origin).await? {
            Reach::Here(runner, agent) => (runner, agent),
            // It connected to another replica after the caller checked.
            Reach::Replica(..) => {
                return Err(Error::Unavailable(format!(
                    "runner {name} just moved to another grad replica; try again"
                )));
            }
        };
        let report = self.runners.collect_outputs(&runner, &agent).await?;
        let found = self.of_runner(&runner).await?;
        Ok((found, report))
    }

    /// A live runner's set (empty if it never collected).
    async fn of_runner(&self, runner: &store::Runner) -> Result<Found> {
        match self.store.output_set(&runner.id).await? {
            Some(set) => {
                let files = self.store.output_files(&set.runner_id).await?;
                Ok(Found { set, files })
            }
            None => Ok(Found {
                set: OutputSet {
                    runner_id: runner.id.clone(),
                    owner_id: runner.owner_id.clone(),
                    owner_name: runner.owner_name.clone(),
                    runner_name: runner.name.clone(),
                    collected_at: 0,
                    file_count: 0,
                    total_bytes: 0,
                    skipped: Vec::new(),
                    deleted_at: None,
                    source: Source::Runner,
                },
                files: Vec::new(),
            }),
        }
    }

    /// A job's set (empty if it collected nothing).
    pub async fn of_job(&self, job: &store::Job) -> Result<Found> {
        match self.store.output_set(&job.id).await? {
            Some(set) => {
                let files = self.store.output_files(&set.runner_id).await?;
                Ok(Found { set, files })
            }
            None => Ok(Found {
                set: OutputSet {
                    runner_id: job.id.clone(),
                    owner_id: job.owner_id.clone(),
                    owner_name: job.owner_name.clone(),
                    runner_name: format!("job/{}", job.name),
                    collected_at: 0,
                    file_count: 0,
                    total_bytes: 0,
                    skipped: Vec::new(),
                    deleted_at: None,
                    source: Source::Job,
                },
                files: Vec::new(),
            }),
        }
    }

    /// The set `name` refers to: a live runner's (OWNER/NAME for admins),
    /// else the most recently deleted runner's of that name, or a set by
    /// runner id. Other users' sets are "not found".
    pub async fn find(&self, caller: &UserCaller, name: &str) -> Result<Found> {
        let not_found = || Error::NotFound(format!("no runner '{name}' and no outputs of one"));
        if is_runner_id(name) {
            let set = self
                .store
                .output_set(name)
                .await?
                .filter(|set| set.source == Source::Runner)
                .filter(|set| set.owner_id == caller.id || caller.is_admin())
                .ok_or_else(not_found)?;
            let files = self.store.output_files(&set.runner_id).await?;
            return Ok(Found { set, files });
        }
        let (owner_id, short) = self.runners.owner_of(caller, name).await?;
        if let Some(runner) = self.store.runner_by_name(&owner_id, short).await? {
            return self.of_runner(&runner).await;
        }
        let set = self
            .store
            .deleted_output_set(&owner_id, short)
            .await?
            .ok_or_else(not_found)?;
        let files = self.store.output_files(&set.runner_id).await?;
        Ok(Found { set, files })
    }

    /// Download URLs for `files` (one per distinct content).
    pub async fn download_urls(&self, found: &Found) -> Result<HashMap<String, Presigned>> {
        let expires_in = expiry(found.set.total_bytes);
        let mut urls = HashMap::new();
        for file in &found.files {
            if urls.contains_key(&file.sha256) {
                continue;
            }
            let key = Self::key(&found.set.owner_id, &file.sha256)?;
            let url = self.blobs.presign_get(&key, expires_in).await?;
            urls.insert(file.sha256.clone(), url);
        }
        Ok(urls)
    }

    /// The caller's sets (everyone's for `all_users`, admins only).
    pub async fn list(&self, caller: &UserCaller, all_users: bool) -> Result<Vec<OutputSet>> {
        if all_users && !caller.is_admin() {
            return Err(Error::PermissionDenied(
                "only admins can list every user's outputs".into(),
            ));
        }
        let owner = (!all_users).then_some(caller.id.as_str());
        self.store.output_sets(owner).await
    }

    /// Forgets a deleted runner's set and deletes the objects no other
    /// output of its owner refers to.
    pub async fn delete(&self, caller: &UserCaller, name: &str) -> Result<OutputSet> {
        let found = self.find(caller, name).await?;
        if found.set.deleted_at.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "runner {} still exists: its outputs go when it is deleted \
                 (`gractl runner delete {}`)",
                found.set.runner_name, found.set.runner_name
            )));
        }
        self.objects_locked(&found.set.owner_id, async {
            self.store.delete_output_set(&found.set.runner_id).await?;
            let contents: HashSet<&str> = found.files.iter().map(|f| f.sha256.as_str()).collect();
            self.delete_unreferenced(&found.set.owner_id, contents)
                .await
        })
        .await?;
        tracing::info!(runner = %found.set.runner_name, owner = %found.set.owner_name, "outputs removed");
        Ok(found.set)
    }

    /// The set of the runner behind an agent token (which must still exist).
    pub async fn runner_set(&self, runner_id: &str) -> Result<Collecting> {
        let runner = self
            .store
            .runner_by_id(runner_id)
            .await?
            .ok_or_else(|| Error::NotFound("this runner no longer exists".into()))?;
        Ok(Collecting {
            set_id: runner.id,
            owner_id: runner.owner_id,
            owner_name: runner.owner_name,
            name: runner.name,
            source: Source::Runner,
        })
    }

    /// The contents (and sizes) in `files` that are not in `previous` and
    /// are not in the store with that size.
    async fn missing(
        &self,
        owner_id: &str,
        files: &[OutputFile],
        previous: &[OutputFile],
    ) -> Result<Vec<(String, u64)>> {
        let known: HashSet<(&str, u64)> = previous
            .iter()
            .map(|f| (f.sha256.as_str(), f.size))
            .collect();
        let mut unknown: Vec<(String, u64)> = files
            .iter()
            .filter(|f| !known.contains(&(f.sha256.as_str(), f.size)))
            .map(|f| (f.sha256.clone(), f.size))
            .collect();
        unknown.sort();
        unknown.dedup();
        let mut missing = Vec::new();
        for batch in unknown.chunks(HEADS_IN_FLIGHT) {
            let mut heads = JoinSet::new();
            for (sha256, size) in batch.iter().cloned() {
                let (blobs, key) = (self.blobs.clone(), Self::key(owner_id, &sha256)?);
                heads.spawn(async move {
                    let found = blobs.head(&key).await?;
                    Ok::<_, Error>((sha256, size, found.is_some_and(|o| o.size == size)))
                });
            }
            while let Some(head) = heads.join_next().await {
                let (sha256, size, present) =
                    head.map_err(|e| Error::Unavailable(format!("checking the blob store: {e}")))??;
                if !present {
                    missing.push((sha256, size));
                }
            }
        }
        missing.sort();
        Ok(missing)
    }

    fn part_bytes(&self, size: u64) -> u64 {
        part_bytes(self.part_threshold, size)
    }

    /// PlanOutputs: how to upload what the store lacks.
    pub async fn plan(
        &self,
        set: &Collecting,
        manifest: pb::OutputManifest,
    ) -> Result<Vec<Upload>> {
        let manifest = validate(manifest)?;
        let previous = self.store.output_files(&set.set_id).await?;
        let missing = self
            .missing(&set.owner_id, &manifest.files, &previous)
            .await?;
        let parts = self.blobs.kind() == "s3";
        let mut uploads = Vec::with_capacity(missing.len());
        for (sha256, size) in missing {
            let how = if parts && size >= self.part_threshold {
                How::Parts(self.part_bytes(size))
            } else {
                let key = Self::key(&set.owner_id, &sha256)?;
                let put = self
                    .blobs
                    .presign_put(&key, Sha256::parse(&sha256)?, expiry(size))
                    .await?;
                How::Put(put)
            };
            uploads.push(Upload {
                sha256: Sha256::parse(&sha256)?,
                size,
                how,
            });
        }
        let in_parts = uploads
            .iter()
            .filter(|u| matches!(u.how, How::Parts(_)))
            .count();
        tracing::info!(
            set = %set.name, files = manifest.files.len(), uploads = uploads.len(), in_parts,
            "outputs upload planned"
        );
        Ok(uploads)
    }

    /// BeginPartUpload: presigned URLs for each part of one object.
    pub async fn begin_parts(
        &self,
        set: &Collecting,
        request: pb::BeginPartUploadRequest,
    ) -> Result<Multipart> {
        let key = Self::key(&set.owner_id, &request.sha256)?;
        let expected = self.part_bytes(request.size);
        if request.part_bytes != expected {
            return Err(Error::InvalidArgument(format!(
                "parts of {} bytes: grad asked for {expected}",
                request.part_bytes
            )));
        }
        let count = request.size.div_ceil(expected).max(1);
        if request.part_sha256.len() as u64 != count {
            return Err(Error::InvalidArgument(format!(
                "{} bytes in parts of {expected} make {count} parts, not {}",
                request.size,
                request.part_sha256.len()
            )));
        }
        let parts = request
            .part_sha256
            .iter()
            .map(|s| Sha256::parse(s))
            .collect::<Result<Vec<_>>>()?;
        self.blobs
            .begin_multipart(&key, &parts, expiry(request.size))
            .await
    }

    /// CommitOutputs: completes the uploads in parts, checks that every
    /// object is in the store, and records the manifest as the runner's set.
    pub async fn commit(
        &self,
        set: &Collecting,
        request: pb::CommitOutputsRequest,
    ) -> Result<OutputSet> {
        let manifest = validate(request.manifest.unwrap_or_default())?;
        let contents: HashSet<&str> = manifest.files.iter().map(|f| f.sha256.as_str()).collect();
        for done in &request.completed {
            if !contents.contains(done.sha256.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "an upload in parts of {} that no output file has",
                    done.sha256
                )));
            }
            if done.part_sha256.len() != done.etags.len() {
                return Err(Error::InvalidArgument(format!(
                    "the upload in parts of {}: {} parts but {} ETags",
                    done.sha256,
                    done.part_sha256.len(),
                    done.etags.len()
                )));
            }
            let parts = done
                .part_sha256
                .iter()
                .map(|s| Sha256::parse(s))
                .zip(done.etags.iter().cloned())
                .map(|(sha, etag)| sha.map(|sha| (sha, etag)))
                .collect::<Result<Vec<_>>>()?;
            let key = Self::key(&set.owner_id, &done.sha256)?;
            self.blobs
                .complete_multipart(&key, &done.upload_id, &parts)
                .await?;
        }

        self.objects_locked(&set.owner_id, async {
            let previous = self.store.output_files(&set.set_id).await?;
            let missing = self
                .missing(&set.owner_id, &manifest.files, &previous)
                .await?;
            if let Some((sha256, _)) = missing.first() {
                let path = manifest
                    .files
                    .iter()
                    .find(|f| &f.sha256 == sha256)
                    .map(|f| f.path.as_str())
                    .unwrap_or_default();
                return Err(Error::FailedPrecondition(format!(
                    "outputs/{path}: its content ({sha256}) is not in the blob store \
                     ({} objects missing in all): upload before committing",
                    missing.len()
                )));
            }
            let recorded = OutputSet {
                runner_id: set.set_id.clone(),
                owner_id: set.owner_id.clone(),
                owner_name: set.owner_name.clone(),
                runner_name: set.name.clone(),
                collected_at: now_ms(),
                file_count: manifest.files.len() as u64,
                total_bytes: manifest.files.iter().map(|f| f.size).sum(),
                skipped: manifest.skipped,
                deleted_at: None,
                source: set.source,
            };
            self.store
                .replace_outputs(&recorded, &manifest.files)
                .await?;
            let kept: HashSet<&str> = manifest.files.iter().map(|f| f.sha256.as_str()).collect();
            let dropped: HashSet<&str> = previous
                .iter()
                .map(|f| f.sha256.as_str())
                .filter(|sha256| !kept.contains(sha256))
                .collect();
            self.delete_unreferenced(&set.owner_id, dropped).await?;
            Ok(recorded)
        })
        .await
    }

    /// Runs `work` holding the lock on `owner_id`'s content objects: this
    /// grad's mutex, and on PostgreSQL the database's lock that every
    /// replica takes, so that no replica deletes an object another is
    /// recording a set with.
    async fn objects_locked<T>(
        &self,
        owner_id: &str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let _objects = self.objects.lock().await;
        let held = self.store.lock_objects(owner_id).await?;
        let done = work.await;
        if let Err(e) = held.release().await {
            // Its connection was closed instead, which released it.
            tracing::warn!(error = %e, "unlocking the outputs' objects");
        }
        done
    }

    /// Deletes the objects among `contents` that no output of `owner_id`
    /// refers to. Caller holds the objects lock (`objects_locked`).
    async fn delete_unreferenced<'a>(
        &self,
        owner_id: &str,
        contents: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        for sha256 in contents {
            // Job bundles and logs will live beside outputs under the same
            // prefix: this check must cover them too once they exist.
            if !self.store.owner_has_output(owner_id, sha256).await? {
                self.blobs.delete(&Self::key(owner_id, sha256)?).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(path: &str) -> pb::OutputFile {
        pb::OutputFile {
            path: path.into(),
            size: 1,
            sha256: Sha256::of(path.as_bytes()).to_string(),
            modify_time: None,
            download: None,
        }
    }

    fn manifest(paths: &[&str]) -> pb::OutputManifest {
        pb::OutputManifest {
            files: paths.iter().map(|p| file(p)).collect(),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn paths_must_stay_inside_outputs() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/",
            "a\nb",
        ] {
            let err = validate(manifest(&[bad])).err().unwrap().to_string();
            assert!(err.contains("output path"), "{bad:?}: {err}");
        }
        let ok = validate(manifest(&["b.csv", "a/plot.png", "a/b/c..d"])).unwrap();
        let paths: Vec<&str> = ok.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a/b/c..d", "a/plot.png", "b.csv"]);
    }

    #[test]
    fn a_path_cannot_be_listed_twice_or_be_a_file_and_a_directory() {
        let twice = validate(manifest(&["a", "a"])).err().unwrap().to_string();
        assert!(twice.contains("listed twice"), "{twice}");
        let both = validate(manifest(&["a/b/c", "a"]))
            .err()
            .unwrap()
            .to_string();
        assert!(both.contains("both a file and the directory"), "{both}");
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        let mut m = manifest(&["a"]);
        m.files[0].sha256 = "xyz".into();
        let err = validate(m).err().unwrap().to_string();
        assert!(err.contains("sha256"), "{err}");
    }

    #[test]
    fn long_lists_of_skipped_files_are_cut() {
        let mut m = manifest(&[]);
        m.skipped = (0..150).map(|i| format!("s{i}: a symbolic link")).collect();
        let v = validate(m).unwrap();
        assert_eq!(v.skipped.len(), MAX_SKIPPED + 1);
        assert_eq!(v.skipped.last().unwrap(), "... and 50 more");
    }

    #[test]
    fn parts_are_64_mib_or_the_threshold_and_never_too_many() {
        const MI: u64 = 1 << 20;
        assert_eq!(part_bytes(1 << 30, 2 << 30), 64 * MI);
        assert_eq!(part_bytes(5 * MI, 13 * MI), 5 * MI);
        // 5 TiB, S3's largest object, still fits in 10 000 parts.
        let huge = 5u64 << 40;
        let part = part_bytes(1 << 30, huge);
        assert!(huge.div_ceil(part) <= MAX_PARTS, "{part}");
        assert_eq!(part % MI, 0);
    }

    #[test]
    fn runner_ids_are_told_from_names() {
        assert!(is_runner_id("0b5c3a55-5f5e-4a52-9a0e-3c4a3f0c8e11"));
        assert!(!is_runner_id("r1"));
    }
}
