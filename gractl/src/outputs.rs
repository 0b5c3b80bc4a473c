//! Pulling a runner's collected outputs into a local directory: each file
//! of the set grad recorded is fetched by presigned GET (several at once),
//! checked against its SHA-256 and size, and renamed into place; a local
//! file that already has that content is left alone. The set's paths come
//! from the server and are checked here again, and nothing is written
//! through a symbolic link, so a pull cannot reach outside its directory.
//! Local files that are not in the set are never touched.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use grad_proto::{OutputFile, OutputSet};
use tokio::task::JoinSet;

/// Files downloaded at once.
const DOWNLOADS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("grad sent an unsafe output path '{0}'; nothing was written for it")]
    UnsafePath(String),
    #[error("{0} is a symbolic link: not writing through it")]
    Symlink(PathBuf),
    #[error("{0} is in the way: it is not a directory")]
    NotADirectory(PathBuf),
    #[error("{what}: {source}")]
    Local {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("outputs/{path}: {source}")]
    Download {
        path: String,
        #[source]
        source: Box<grad_transfer::Error>,
    },
    #[error("grad sent no download URL for outputs/{0}")]
    NoUrl(String),
}

/// What a pull did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// Paths (relative to the set) downloaded.
    pub downloaded: Vec<String>,
    pub downloaded_bytes: u64,
    /// Paths whose local copy already had the content.
    pub unchanged: Vec<String>,
}

/// Whether `path` is relative, with no empty, `.` or `..` part.
pub fn safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Makes `dir/path`'s parent directories, refusing to pass a symbolic link
/// or a non-directory on the way; answers the file's full path.
fn prepare(dir: &Path, path: &str) -> Result<PathBuf, Error> {
    let mut at = dir.to_path_buf();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(Error::Symlink(at)),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::NotADirectory(at)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(|source| Error::Local {
                    what: format!("creating {}", at.display()),
                    source,
                })?;
            }
            Err(source) => {
                return Err(Error::Local {
                    what: format!("reading {}", at.display()),
                    source,
                });
            }
        }
    }
    at.push(parts[parts.len() - 1]);
    Ok(at)
}

/// Whether the regular file at `dest` already is `file` (blocking).
fn unchanged(dest: &Path, file: &OutputFile) -> bool {
    match fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_file() && meta.len() == file.size => {
            grad_transfer::hash_file(dest, None).is_ok_and(|d| d.sha256 == file.sha256)
        }
        _ => false,
    }
}

fn modified(file: &OutputFile) -> Option<SystemTime> {
    let t = file.modify_time.as_ref()?;
    let secs = u64::try_from(t.seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, t.nanos.max(0) as u32))
}

/// The bytes `pull` would download at most (for a progress bar).
pub fn total_bytes(set: &OutputSet) -> u64 {
    set.files.iter().map(|f| f.size).sum()
}

/// Downloads `set` (fetched with download URLs) into `dir`, creating it.
/// `progress` hears of every byte received.
pub async fn pull(
    set: &OutputSet,
    dir: &Path,
    progress: Option<grad_transfer::Progress>,
) -> Result<Pulled, Error> {
    if let Some(bad) = set.files.iter().find(|f| !safe_path(&f.path)) {
        return Err(Error::UnsafePath(bad.path.clone()));
    }
    fs::create_dir_all(dir).map_err(|source| Error::Local {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let http = grad_transfer::Client::new().map_err(|source| Error::Download {
        path: String::new(),
        source: Box::new(source),
    })?;
    let mut pulled = Pulled::default();
    let mut running = JoinSet::new();
    let mut queue = set.files.iter().cloned();
    let dir: Arc<Path> = dir.into();
    loop {
        while running.len() < DOWNLOADS_IN_FLIGHT {
            let Some(file) = queue.next() else { break };
            let (http, dir, progress) = (http.clone(), dir.clone(), progress.clone());
            running.spawn(async move {
                let outcome = fetch(&http, &dir, &file, progress).await;
                (file, outcome)
            });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (file, outcome) = done.map_err(|e| Error::Local {
            what: "downloading".into(),
            source: io::Error::other(e),
        })?;
        match outcome? {
            true => {
                pulled.downloaded_bytes += file.size;
                pulled.downloaded.push(file.path);
            }
            false => pulled.unchanged.push(file.path),
        }
    }
    pulled.downloaded.sort();
    pulled.unchanged.sort();
    Ok(pulled)
}

/// One file; answers whether it was downloaded (false: already there).
async fn fetch(
    http: &grad_transfer::Client,
    dir: &Path,
    file: &OutputFile,
    progress: Option<grad_transfer::Progress>,
) -> Result<bool, Error> {
    let dest = {
        let (dir, path) = (dir.to_owned(), file.path.clone());
        tokio::task::spawn_blocking(move || prepare(&dir, &path))
            .await
            .map_err(|e| Error::Local {
                what: "preparing a directory".into(),
                source: io::Error::other(e),
            })??
    };
    let same = {
        let (dest, file) = (dest.clone(), file.clone());
        tokio::task::spawn_blocking(move || unchanged(&dest, &file))
            .await
            .unwrap_or(false)
    };
    if same {
        if let Some(progress) = &progress {
            progress(file.size);
        }
        return Ok(false);
    }
    let url = file
        .download
        .as_ref()
        .ok_or_else(|| Error::NoUrl(file.path.clone()))?;
    http.get_file(
        url,
        &dest,
        file.size,
        &file.sha256,
        modified(file),
        progress,
    )
    .await
    .map_err(|source| Error::Download {
        path: file.path.clone(),
        source: Box::new(source),
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_relative_paths_inside_the_directory_are_safe() {
        for good in ["a", "a/b.csv", "x..y/z"] {
            assert!(safe_path(good), "{good}");
        }
        for bad in ["", "/etc/passwd", "..", "a/../../b", "a//b", "./a", "a/"] {
            assert!(!safe_path(bad), "{bad}");
        }
    }

    #[test]
    fn a_pull_does_not_write_through_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("a")).unwrap();
        let err = prepare(dir.path(), "a/b.txt").unwrap_err();
        assert!(matches!(err, Error::Symlink(_)), "{err}");
        fs::write(dir.path().join("file"), "x").unwrap();
        let err = prepare(dir.path(), "file/b.txt").unwrap_err();
        assert!(matches!(err, Error::NotADirectory(_)), "{err}");
        let ok = prepare(dir.path(), "c/d/e.txt").unwrap();
        assert_eq!(ok, dir.path().join("c/d/e.txt"));
        assert!(dir.path().join("c/d").is_dir());
    }
}
