//! Copying files between this machine and a runner over SFTP (`gractl cp`).
//!
//! A copy is planned first (what to create, which files, how many bytes),
//! so a progress bar knows the total, then executed: directories first,
//! then several files at once, each with many SFTP requests in flight
//! (russh-sftp pipelines the reads and writes of an open file). Mode bits
//! are kept; symbolic links to files are followed, other special files are
//! skipped and reported.

use std::{
    collections::VecDeque,
    fmt, fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use russh_sftp::{
    client::{SftpSession, error::Error as SftpError},
    protocol::{FileAttributes, FileType, OpenFlags, StatusCode},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinSet,
};

use crate::ssh::openssh::HOST_SUFFIX;

/// Bytes moved per read/write call; the SFTP layer splits them into
/// pipelined requests.
const BUFFER: usize = 1 << 20;
/// Files copied at the same time (many small files are latency-bound).
pub const PARALLEL_FILES: usize = 8;

/// Called with the number of bytes just copied.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// One side of a copy, as typed: `RUNNER:PATH` or a local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    /// `path` is the server's: relative paths start at the runner's
    /// workspace root, and so does `/`.
    Remote {
        runner: String,
        path: String,
    },
}

impl Location {
    /// `RUNNER:PATH` when the text before the first `:` is a runner name
    /// (lowercase letters, digits and `-`, optionally ending in `.grad`);
    /// anything else, like `./a:b` or `/tmp/a:b`, is a local path.
    pub fn parse(text: &str) -> Location {
        if let Some((host, path)) = text.split_once(':') {
            let runner = host.strip_suffix(HOST_SUFFIX).unwrap_or(host);
            let is_runner = runner.starts_with(|c: char| c.is_ascii_lowercase())
                && runner
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if is_runner {
                return Location::Remote {
                    runner: runner.to_owned(),
                    path: if path.is_empty() {
                        ".".into()
                    } else {
                        path.into()
                    },
                };
            }
        }
        Location::Local(PathBuf::from(text))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Remote { runner, path } => write!(f, "{runner}:{path}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path} is a directory; pass -r/--recursive to copy it")]
    IsDirectory { path: String },
    #[error("{path} is not a directory")]
    NotADirectory { path: String },
    #[error("cannot overwrite {path}, which is not a directory, with directory {source_path}")]
    NotADirectoryTarget { path: String, source_path: String },
    #[error("{path}: permission denied")]
    PermissionDenied { path: String },
    #[error("{path}: {source}")]
    Local {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Remote {
        path: String,
        #[source]
        source: SftpError,
    },
}

impl Error {
    fn local(path: &Path, source: io::Error) -> Error {
        let path = path.display().to_string();
        match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound { path },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied { path },
            _ => Error::Local { path, source },
        }
    }

    fn remote(runner: &str, path: &str, source: SftpError) -> Error {
        let path = format!("{runner}:{path}");
        match &source {
            SftpError::Status(status) if status.status_code == StatusCode::NoSuchFile => {
                Error::NotFound { path }
            }
            SftpError::Status(status) if status.status_code == StatusCode::PermissionDenied => {
                Error::PermissionDenied { path }
            }
            _ => Error::Remote { path, source },
        }
    }
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Upload,
    Download,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Dir {
    local: PathBuf,
    remote: String,
    mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct File {
    local: PathBuf,
    remote: String,
    size: u64,
    mode: u32,
}

/// What a copy will do. Made by [`plan_upload`] or [`plan_download`], run
/// by [`Plan::execute`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    direction: Direction,
    runner: String,
    /// Parents before children.
    dirs: Vec<Dir>,
    files: Vec<File>,
    skipped: Vec<String>,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The files written, as destination paths (`r1:code/a.py` or local).
    pub copied: Vec<String>,
    pub bytes: u64,
    /// Special files left out (sockets, links to directories, ...), with why.
    pub skipped: Vec<String>,
}

impl Plan {
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Bytes the copy will move.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Copies everything, up to `parallel` files at once, reporting bytes
    /// to `progress` as they are written.
    pub async fn execute(
        self,
        sftp: Arc<SftpSession>,
        parallel: usize,
        progress: Progress,
    ) -> Result<Report, Error> {
        let runner = self.runner.as_str();
        for dir in &self.dirs {
            match self.direction {
                Direction::Upload => make_remote_dir(&sftp, runner, &dir.remote).await?,
                Direction::Download => tokio::fs::create_dir_all(&dir.local)
                    .await
                    .map_err(|error| Error::local(&dir.local, error))?,
            }
        }
        let mut report = Report {
            skipped: self.skipped.clone(),
            ..Report::default()
        };
        let mut queue: VecDeque<File> = self.files.iter().cloned().collect();
        let mut running = JoinSet::new();
        loop {
            while running.len() < parallel.max(1) {
                let Some(file) = queue.pop_front() else {
                    break;
                };
                let sftp = Arc::clone(&sftp);
                let runner = self.runner.clone();
                let progress = Arc::clone(&progress);
                let direction = self.direction;
                running.spawn(async move {
                    let bytes = match direction {
                        Direction::Upload => upload(&sftp, &runner, &file, &progress).await?,
                        Direction::Download => download(&sftp, &runner, &file, &progress).await?,
                    };
                    let copied = match direction {
                        Direction::Upload => format!("{runner}:{}", file.remote),
                        Direction::Download => file.local.display().to_string(),
                    };
                    Ok::<_, Error>((copied, bytes))
                });
            }
            // Dropping the set on an error aborts the copies still running.
            let Some(done) = running.join_next().await else {
                break;
            };
            let (copied, bytes) = match done {
                Ok(result) => result?,
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            };
            report.copied.push(copied);
            report.bytes += bytes;
        }
        // Modes last, so a read-only directory still received its files.
        for dir in self.dirs.iter().rev() {
            match self.direction {
                Direction::Upload => sftp
                    .set_metadata(dir.remote.as_str(), mode_attributes(dir.mode))
                    .await
                    .map_err(|error| Error::remote(runner, &dir.remote, error))?,
                Direction::Download => {
                    fs::set_permissions(&dir.local, fs::Permissions::from_mode(dir.mode))
                        .map_err(|error| Error::local(&dir.local, error))?
                }
            }
        }
        // Completion order varies with parallelism; the report does not.
        report.copied.sort();
        Ok(report)
    }
}

fn mode_attributes(mode: u32) -> FileAttributes {
    FileAttributes {
        permissions: Some(mode & 0o7777),
        ..FileAttributes::empty()
    }
}

async fn make_remote_dir(sftp: &SftpSession, runner: &str, path: &str) -> Result<(), Error> {
    match sftp.create_dir(path).await {
        Ok(()) => Ok(()),
        // It may exist already (copying into an existing tree): fine if a directory.
        Err(error) => match sftp.metadata(path).await {
            Ok(attributes) if attributes.is_dir() => Ok(()),
            Ok(_) => Err(Error::NotADirectory {
                path: format!("{runner}:{path}"),
            }),
            Err(_) => Err(Error::remote(runner, path, error)),
        },
    }
}

async fn upload(
    sftp: &SftpSession,
    runner: &str,
    file: &File,
    progress: &Progress,
) -> Result<u64, Error> {
    let local_error = |error| Error::local(&file.local, error);
    let remote_error = |error| Error::remote(runner, &file.remote, error);
    let mut source = tokio::fs::File::open(&file.local)
        .await
        .map_err(local_error)?;
    let mut target = sftp
        .open_with_flags_and_attributes(
            file.remote.as_str(),
            OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
            mode_attributes(file.mode),
        )
        .await
        .map_err(remote_error)?;
    let mut buffer = vec![0; BUFFER];
    let mut copied = 0;
    loop {
        let n = source.read(&mut buffer).await.map_err(local_error)?;
        if n == 0 {
            break;
        }
        target
            .write_all(&buffer[..n])
            .await
            .map_err(|error| remote_error(error.into()))?;
        copied += n as u64;
        progress(n as u64);
    }
    // The server applied its umask at creation; set the mode exactly.
    target
        .set_metadata(mode_attributes(file.mode))
        .await
        .map_err(remote_error)?;
    // Waits for every write to be acknowledged.
    target
        .shutdown()
        .await
        .map_err(|error| remote_error(error.into()))?;
    Ok(copied)
}

async fn download(
    sftp: &SftpSession,
    runner: &str,
    file: &File,
    progress: &Progress,
) -> Result<u64, Error> {
    let local_error = |error| Error::local(&file.local, error);
    let remote_error = |error| Error::remote(runner, &file.remote, error);
    let mut source = sftp
        .open(file.remote.as_str())
        .await
        .map_err(remote_error)?;
    let mut target = tokio::fs::File::create(&file.local)
        .await
        .map_err(local_error)?;
    let mut buffer = vec![0; BUFFER];
    let mut copied = 0;
    loop {
        let n = source
            .read(&mut buffer)
            .await
            .map_err(|error| remote_error(error.into()))?;
        if n == 0 {
            break;
        }
        target.write_all(&buffer[..n]).await.map_err(local_error)?;
        copied += n as u64;
        progress(n as u64);
    }
    target.flush().await.map_err(local_error)?;
    drop(target);
    tokio::fs::set_permissions(&file.local, fs::Permissions::from_mode(file.mode & 0o7777))
        .await
        .map_err(local_error)?;
    // Closing a read handle cannot lose data; its answer does not matter.
    let _ = source.shutdown().await;
    Ok(copied)
}

/// `base/name` in SFTP's `/`-separated paths.
fn join_remote(base: &str, name: &str) -> String {
    if base.is_empty() || base == "." {
        name.to_owned()
    } else if base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

/// The last component of a remote path; `None` for `.`, `..` and `/`,
/// whose contents are copied instead.
fn remote_name(path: &str) -> Option<&str> {
    let name = path.trim_end_matches('/').rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

fn local_name(path: &Path) -> Option<String> {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
}

/// Checks that local `sources` exist and that directories come with
/// `recursive`, before anything is sent anywhere.
pub fn check_local_sources(sources: &[PathBuf], recursive: bool) -> Result<(), Error> {
    for source in sources {
        let metadata = fs::metadata(source).map_err(|error| Error::local(source, error))?;
        if metadata.is_dir() && !recursive {
            return Err(Error::IsDirectory {
                path: source.display().to_string(),
            });
        }
    }
    Ok(())
}

/// Plans copying local `sources` to `dest` on `runner`. With several
/// sources, or when `dest` is an existing directory, each goes into it
/// under its own name; otherwise `dest` is the new name.
pub async fn plan_upload(
    sftp: &SftpSession,
    runner: &str,
    sources: &[PathBuf],
    dest: &str,
    recursive: bool,
) -> Result<Plan, Error> {
    let dest_attributes = match sftp.metadata(dest).await {
        Ok(attributes) => Some(attributes),
        Err(SftpError::Status(status)) if status.status_code == StatusCode::NoSuchFile => None,
        Err(error) => return Err(Error::remote(runner, dest, error)),
    };
    let dest_is_dir = dest_attributes.as_ref().is_some_and(FileAttributes::is_dir);
    if !dest_is_dir && (sources.len() > 1 || dest.ends_with('/')) {
        return Err(match dest_attributes {
            None => Error::NotFound {
                path: format!("{runner}:{dest}"),
            },
            Some(_) => Error::NotADirectory {
                path: format!("{runner}:{dest}"),
            },
        });
    }
    let mut plan = Plan {
        direction: Direction::Upload,
        runner: runner.to_owned(),
        dirs: Vec::new(),
        files: Vec::new(),
        skipped: Vec::new(),
    };
    for source in sources {
        let metadata = fs::metadata(source).map_err(|error| Error::local(source, error))?;
        let target = match (dest_is_dir, local_name(source)) {
            (true, Some(name)) => join_remote(dest, &name),
            _ => dest.to_owned(),
        };
        if metadata.is_dir() {
            if !recursive {
                return Err(Error::IsDirectory {
                    path: source.display().to_string(),
                });
            }
            if !dest_is_dir && dest_attributes.is_some() {
                return Err(Error::NotADirectoryTarget {
                    path: format!("{runner}:{dest}"),
                    source_path: source.display().to_string(),
                });
            }
            let source = source.clone();
            let walked = tokio::task::spawn_blocking(move || walk_local(&source, &target))
                .await
                .map_err(|join| io::Error::other(join.to_string()))
                .map_err(|error| Error::local(Path::new("."), error))??;
            plan.dirs.extend(walked.dirs);
            plan.files.extend(walked.files);
            plan.skipped.extend(walked.skipped);
        } else if metadata.is_file() {
            plan.files.push(File {
                local: source.clone(),
                remote: target,
                size: metadata.len(),
                mode: metadata.permissions().mode() & 0o7777,
            });
        } else {
            plan.skipped
                .push(format!("{}: not a regular file", source.display()));
        }
    }
    Ok(plan)
}

struct Walked {
    dirs: Vec<Dir>,
    files: Vec<File>,
    skipped: Vec<String>,
}

/// Lists the local tree under `root` (parents first), mapped to `target`.
fn walk_local(root: &Path, target: &str) -> Result<Walked, Error> {
    let mut walked = Walked {
        dirs: Vec::new(),
        files: Vec::new(),
        skipped: Vec::new(),
    };
    let mut pending = vec![(root.to_owned(), target.to_owned())];
    while let Some((dir, remote)) = pending.pop() {
        let metadata = fs::metadata(&dir).map_err(|error| Error::local(&dir, error))?;
        walked.dirs.push(Dir {
            local: dir.clone(),
            remote: remote.clone(),
            mode: metadata.permissions().mode() & 0o7777,
        });
        let mut entries = fs::read_dir(&dir)
            .map_err(|error| Error::local(&dir, error))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| Error::local(&dir, error))?;
        entries.sort_by_key(fs::DirEntry::file_name);
        let mut subdirs = Vec::new();
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let file_type = entry
                .file_type()
                .map_err(|error| Error::local(&path, error))?;
            if file_type.is_dir() {
                subdirs.push((path, join_remote(&remote, &name)));
                continue;
            }
            // Follows links to files; a link to a directory could loop.
            match fs::metadata(&path) {
                Ok(metadata) if metadata.is_file() => walked.files.push(File {
                    local: path,
                    remote: join_remote(&remote, &name),
                    size: metadata.len(),
                    mode: metadata.permissions().mode() & 0o7777,
                }),
                Ok(metadata) if metadata.is_dir() => walked
                    .skipped
                    .push(format!("{}: a link to a directory", path.display())),
                Ok(_) => walked
                    .skipped
                    .push(format!("{}: not a regular file", path.display())),
                Err(_) => walked
                    .skipped
                    .push(format!("{}: a broken link", path.display())),
            }
        }
        // Reversed so the stack visits them in name order.
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(walked)
}

/// Plans copying `sources` on `runner` to local `dest`, with the same
/// naming rules as [`plan_upload`].
pub async fn plan_download(
    sftp: &SftpSession,
    runner: &str,
    sources: &[String],
    dest: &Path,
    recursive: bool,
) -> Result<Plan, Error> {
    let dest_metadata = match fs::metadata(dest) {
        Ok(metadata) => Some(metadata),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => return Err(Error::local(dest, error)),
    };
    let dest_is_dir = dest_metadata.as_ref().is_some_and(fs::Metadata::is_dir);
    let dest_text = dest.to_string_lossy();
    if !dest_is_dir && (sources.len() > 1 || dest_text.ends_with('/')) {
        let path = dest.display().to_string();
        return Err(match dest_metadata {
            None => Error::NotFound { path },
            Some(_) => Error::NotADirectory { path },
        });
    }
    let mut plan = Plan {
        direction: Direction::Download,
        runner: runner.to_owned(),
        dirs: Vec::new(),
        files: Vec::new(),
        skipped: Vec::new(),
    };
    for source in sources {
        let attributes = sftp
            .metadata(source.as_str())
            .await
            .map_err(|error| Error::remote(runner, source, error))?;
        let target = match (dest_is_dir, remote_name(source)) {
            (true, Some(name)) => dest.join(name),
            _ => dest.to_owned(),
        };
        match attributes.file_type() {
            FileType::Dir => {
                if !recursive {
                    return Err(Error::IsDirectory {
                        path: format!("{runner}:{source}"),
                    });
                }
                if !dest_is_dir && dest_metadata.is_some() {
                    return Err(Error::NotADirectoryTarget {
                        path: dest.display().to_string(),
                        source_path: format!("{runner}:{source}"),
                    });
                }
                walk_remote(sftp, runner, source, &target, &mut plan).await?;
            }
            FileType::File => plan.files.push(File {
                local: target,
                remote: source.clone(),
                size: attributes.len(),
                mode: attributes.permissions.unwrap_or(0o644) & 0o7777,
            }),
            _ => plan
                .skipped
                .push(format!("{runner}:{source}: not a regular file")),
        }
    }
    Ok(plan)
}

/// Lists the remote tree under `root` into `plan` (parents first).
async fn walk_remote(
    sftp: &SftpSession,
    runner: &str,
    root: &str,
    target: &Path,
    plan: &mut Plan,
) -> Result<(), Error> {
    let mut pending = vec![(root.to_owned(), target.to_owned())];
    while let Some((dir, local)) = pending.pop() {
        let attributes = sftp
            .metadata(dir.as_str())
            .await
            .map_err(|error| Error::remote(runner, &dir, error))?;
        plan.dirs.push(Dir {
            local: local.clone(),
            remote: dir.clone(),
            mode: attributes.permissions.unwrap_or(0o755) & 0o7777,
        });
        let mut entries: Vec<_> = sftp
            .read_dir(dir.as_str())
            .await
            .map_err(|error| Error::remote(runner, &dir, error))?
            .collect();
        entries.sort_by_key(|entry| entry.file_name());
        let mut subdirs = Vec::new();
        for entry in entries {
            let name = entry.file_name();
            let remote = join_remote(&dir, &name);
            let mut attributes = entry.metadata();
            if attributes.file_type() == FileType::Symlink {
                // Follow links to files; a link to a directory could loop.
                match sftp.metadata(remote.as_str()).await {
                    Ok(target) if target.file_type() == FileType::File => attributes = target,
                    Ok(target) if target.file_type() == FileType::Dir => {
                        plan.skipped
                            .push(format!("{runner}:{remote}: a link to a directory"));
                        continue;
                    }
                    _ => {
                        plan.skipped
                            .push(format!("{runner}:{remote}: a broken link"));
                        continue;
                    }
                }
            }
            match attributes.file_type() {
                FileType::Dir => subdirs.push((remote, local.join(&name))),
                FileType::File => plan.files.push(File {
                    local: local.join(&name),
                    remote,
                    size: attributes.len(),
                    mode: attributes.permissions.unwrap_or(0o644) & 0o7777,
                }),
                _ => plan
                    .skipped
                    .push(format!("{runner}:{remote}: not a regular file")),
            }
        }
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(runner: &str, path: &str) -> Location {
        Location::Remote {
            runner: runner.into(),
            path: path.into(),
        }
    }

    #[test]
    fn runner_colon_path_is_remote_and_anything_else_local() {
        assert_eq!(Location::parse("r1:code/x.py"), remote("r1", "code/x.py"));
        assert_eq!(
            Location::parse("r1:/outputs/plot.png"),
            remote("r1", "/outputs/plot.png")
        );
        assert_eq!(Location::parse("r1:"), remote("r1", "."));
        assert_eq!(Location::parse("r1.grad:code/"), remote("r1", "code/"));
        assert_eq!(
            Location::parse("my-runner-2:a:b"),
            remote("my-runner-2", "a:b")
        );
        for local in [
            "./a:b",
            "/tmp/a:b",
            "data.csv",
            "file.txt:1",
            "C:stuff",
            ":x",
            "dir/r1:x",
            "1r:x",
            ".",
        ] {
            assert_eq!(
                Location::parse(local),
                Location::Local(PathBuf::from(local)),
                "{local}"
            );
        }
    }

    #[test]
    fn locations_print_as_typed() {
        assert_eq!(remote("r1", "code/x.py").to_string(), "r1:code/x.py");
        assert_eq!(Location::parse("./a:b").to_string(), "./a:b");
    }

    #[test]
    fn remote_paths_join_and_name_like_posix_paths() {
        assert_eq!(join_remote("code", "x.py"), "code/x.py");
        assert_eq!(join_remote("code/", "x.py"), "code/x.py");
        assert_eq!(join_remote(".", "x.py"), "x.py");
        assert_eq!(join_remote("/", "x.py"), "/x.py");
        assert_eq!(remote_name("outputs/plot.png"), Some("plot.png"));
        assert_eq!(remote_name("outputs/"), Some("outputs"));
        assert_eq!(remote_name("."), None);
        assert_eq!(remote_name("/"), None);
        assert_eq!(remote_name("a/.."), None);
    }

    #[test]
    fn a_local_tree_is_listed_parents_first_with_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("src");
        fs::create_dir_all(root.join("b/c")).expect("mkdir");
        fs::write(root.join("a.txt"), "a").expect("write");
        fs::write(root.join("b/c/d.sh"), "echo").expect("write");
        fs::set_permissions(root.join("b/c/d.sh"), fs::Permissions::from_mode(0o750))
            .expect("chmod");
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("link")).expect("link");
        std::os::unix::fs::symlink(root.join("b"), root.join("dirlink")).expect("link");
        let walked = walk_local(&root, "dst").expect("walk");
        let dirs: Vec<_> = walked.dirs.iter().map(|d| d.remote.as_str()).collect();
        assert_eq!(dirs, ["dst", "dst/b", "dst/b/c"]);
        let files: Vec<_> = walked
            .files
            .iter()
            .map(|f| (f.remote.as_str(), f.size, f.mode))
            .collect();
        assert_eq!(
            files,
            [
                ("dst/a.txt", 1, 0o644),
                ("dst/link", 1, 0o644),
                ("dst/b/c/d.sh", 4, 0o750)
            ]
        );
        assert_eq!(walked.skipped.len(), 1);
        assert!(walked.skipped[0].ends_with("dirlink: a link to a directory"));
    }

    #[test]
    fn errors_name_the_path_and_the_flag() {
        let error = Error::IsDirectory {
            path: "./data".into(),
        };
        assert_eq!(
            error.to_string(),
            "./data is a directory; pass -r/--recursive to copy it"
        );
        let error = Error::local(
            Path::new("./missing.csv"),
            io::Error::from(io::ErrorKind::NotFound),
        );
        assert_eq!(
            error.to_string(),
            "./missing.csv: no such file or directory"
        );
    }
}
