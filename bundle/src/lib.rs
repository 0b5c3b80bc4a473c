//! The job bundle: a project directory as a `.tar.gz` that gractl makes and
//! grad-runner unpacks.
//!
//! Making one honours `.gitignore` (and `.git/info/exclude`) and `.gradignore`
//! files the way git does, leaves out `.git/` and symbolic links (reported),
//! and is deterministic — entries sorted, times, owners and gzip header
//! zeroed, modes reduced to 0644/0755 — so the same tree always hashes the
//! same, and a bundle grad already has is not uploaded again.
//!
//! Unpacking one refuses anything that could reach outside its directory or
//! the machine: absolute paths, `..`, links, devices, FIFOs; and it stops at
//! a file count and a byte total.

use std::{
    fs,
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use flate2::{Compression, GzBuilder, read::GzDecoder};
use sha2::Digest;

/// Ignore files read in every directory, beside `.gitignore`.
pub const IGNORE_FILE: &str = ".gradignore";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("reading ignore rules: {0}")]
    Ignore(#[from] ignore::Error),
    #[error("bundle entry '{path}': {why}")]
    Refused { path: String, why: String },
    #[error("the bundle is larger than {limit} bytes unpacked")]
    TooLarge { limit: u64 },
    #[error("the bundle has more than {limit} files")]
    TooMany { limit: u64 },
}

fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// What a bundle holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    /// Unpacked bytes.
    pub bytes: u64,
    /// Paths left out, each with why (symbolic links, special files).
    pub skipped: Vec<String>,
}

/// A bundle written out, with its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub sha256: String,
    /// Compressed bytes.
    pub size: u64,
    pub summary: Summary,
}

/// Counts and hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Bundles `dir` into `out` (blocking).
pub fn create(dir: &Path, out: impl Write) -> Result<Made, Error> {
    let mut walk = ignore::WalkBuilder::new(dir);
    walk.standard_filters(false)
        .git_ignore(true)
        .git_exclude(true)
        .require_git(false)
        .parents(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .filter_entry(|entry| entry.file_name() != ".git")
        .sort_by_file_name(|a, b| a.cmp(b));
    let hashing = Hashing {
        inner: out,
        hasher: sha2::Sha256::new(),
        size: 0,
    };
    let gz = GzBuilder::new()
        .mtime(0)
        .write(hashing, Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut summary = Summary::default();
    for entry in walk.build() {
        let entry = entry?;
        let path = entry.path();
        let Ok(relative) = path.strip_prefix(dir) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let Some(name) = relative.to_str() else {
            summary
                .skipped
                .push(format!("{}: the name is not UTF-8", relative.display()));
            continue;
        };
        let meta = fs::symlink_metadata(path).map_err(io(format!("reading {}", path.display())))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut h, format!("{name}/"), io::empty())
                .map_err(io(format!("bundling {name}")))?;
        } else if kind.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let file = fs::File::open(path).map_err(io(format!("reading {}", path.display())))?;
            let mut h = header(tar::EntryType::Regular, mode, meta.len());
            tar.append_data(&mut h, name, file.take(meta.len()))
                .map_err(io(format!("bundling {name}")))?;
            summary.files += 1;
            summary.bytes += meta.len();
        } else if kind.is_symlink() {
            summary
                .skipped
                .push(format!("{name}: a symbolic link (not bundled)"));
        } else {
            summary.skipped.push(format!("{name}: not a regular file"));
        }
    }
    let gz = tar.into_inner().map_err(io("finishing the bundle"))?;
    let mut hashing = gz.finish().map_err(io("finishing the bundle"))?;
    hashing.flush().map_err(io("writing the bundle"))?;
    Ok(Made {
        sha256: hex::encode(hashing.hasher.finalize()),
        size: hashing.size,
        summary,
    })
}

/// The most a bundle may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub files: u64,
    pub bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            files: 100_000,
            bytes: 8 << 30,
        }
    }
}

/// The entry's path as a relative path of plain names, or why not.
fn safe_path(path: &Path) -> Result<PathBuf, String> {
    let mut safe = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(name) => safe.push(name),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' would leave the job's directory".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("an absolute path would leave the job's directory".into());
            }
        }
    }
    if safe.as_os_str().is_empty() {
        return Err("an empty path".into());
    }
    Ok(safe)
}

/// Unpacks a bundle into `dest` (made if missing; blocking).
pub fn extract(archive: impl Read, dest: &Path, limits: Limits) -> Result<Summary, Error> {
    fs::create_dir_all(dest).map_err(io(format!("creating {}", dest.display())))?;
    let mut tar = tar::Archive::new(GzDecoder::new(archive));
    let mut summary = Summary::default();
    for entry in tar.entries().map_err(io("reading the bundle"))? {
        let mut entry = entry.map_err(io("reading the bundle"))?;
        let raw = entry.path().map_err(io("reading the bundle"))?.into_owned();
        let shown = raw.display().to_string();
        let refuse = |why: String| Error::Refused {
            path: shown.clone(),
            why,
        };
        let relative = safe_path(&raw).map_err(refuse)?;
        let target = dest.join(&relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(io(format!("creating {shown}")))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                summary.files += 1;
                if summary.files > limits.files {
                    return Err(Error::TooMany {
                        limit: limits.files,
                    });
                }
                let size = entry.header().size().map_err(io("reading the bundle"))?;
                if summary.bytes + size > limits.bytes {
                    return Err(Error::TooLarge {
                        limit: limits.bytes,
                    });
                }
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io(format!("creating {shown}")))?;
                }
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                // A second entry for the same path does not overwrite the
                // first: archives with duplicates are refused.
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode | 0o600)
                    .open(&target)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            refuse("it is in the bundle twice".into())
                        } else {
                            io(format!("creating {shown}"))(e)
                        }
                    })?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut file)
                    .map_err(io(format!("unpacking {shown}")))?;
                summary.bytes += copied;
            }
            other => {
                return Err(refuse(format!(
                    "a {}: bundles hold only files and directories",
                    kind_name(other)
                )));
            }
        }
    }
    Ok(summary)
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        _ => "special entry",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("src/data")).unwrap();
        fs::create_dir_all(root.join(".git/objects")).unwrap();
        fs::write(root.join(".git/HEAD"), "ref").unwrap();
        fs::write(root.join("train.py"), "print('hi')").unwrap();
        fs::write(root.join("run.sh"), "#!/bin/sh\necho run").unwrap();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("src/model.py"), "x = 1").unwrap();
        fs::write(root.join("src/data/big.csv"), "a,b").unwrap();
        fs::write(root.join("notes.log"), "log").unwrap();
        fs::write(root.join(".gitignore"), "*.log\n").unwrap();
        fs::write(root.join("src/.gradignore"), "data/\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        dir
    }

    fn names(archive: &[u8]) -> Vec<String> {
        let mut tar = tar::Archive::new(GzDecoder::new(archive));
        tar.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn bundles_honour_ignore_files_and_leave_out_git_and_links() {
        let dir = tree();
        let mut out = Vec::new();
        let made = create(dir.path(), &mut out).unwrap();
        assert_eq!(
            names(&out),
            [
                ".gitignore",
                "run.sh",
                "src/",
                "src/.gradignore",
                "src/model.py",
                "train.py"
            ]
        );
        assert_eq!(made.summary.files, 5);
        assert_eq!(
            made.summary.skipped,
            ["link: a symbolic link (not bundled)"]
        );
        assert_eq!(made.size, out.len() as u64);
        assert_eq!(made.sha256, hex::encode(sha2::Sha256::digest(&out)));
    }

    #[test]
    fn the_same_tree_makes_the_same_bytes() {
        let dir = tree();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let first = create(dir.path(), &mut a).unwrap();
        // Touching a file changes its time, not the bundle.
        fs::write(dir.path().join("train.py"), "print('hi')").unwrap();
        let second = create(dir.path(), &mut b).unwrap();
        assert_eq!(first.sha256, second.sha256);
        assert!(a == b);
    }

    #[test]
    fn a_bundle_unpacks_with_its_modes() {
        let dir = tree();
        let mut out = Vec::new();
        create(dir.path(), &mut out).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let summary = extract(&out[..], dest.path(), Limits::default()).unwrap();
        assert_eq!(summary.files, 5);
        assert_eq!(
            fs::read_to_string(dest.path().join("src/model.py")).unwrap(),
            "x = 1"
        );
        let mode = fs::metadata(dest.path().join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    /// An archive with one entry whose name is written raw (the tar crate
    /// refuses to write such names itself).
    fn crafted(name: &str, kind: tar::EntryType, body: &[u8]) -> Vec<u8> {
        let mut h = header(kind, 0o644, body.len() as u64);
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        let mut tar = tar::Builder::new(Vec::new());
        tar.append(&h, body).unwrap();
        let bytes = tar.into_inner().unwrap();
        let mut gz = GzBuilder::new().write(Vec::new(), Compression::fast());
        gz.write_all(&bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn paths_out_of_the_directory_links_and_devices_are_refused() {
        let cases = [
            ("../evil.sh", tar::EntryType::Regular, "'..'"),
            ("a/../../evil.sh", tar::EntryType::Regular, "'..'"),
            ("/etc/cron.d/evil", tar::EntryType::Regular, "absolute path"),
            ("link", tar::EntryType::Symlink, "symbolic link"),
            ("hard", tar::EntryType::Link, "hard link"),
            ("dev", tar::EntryType::Char, "character device"),
            ("fifo", tar::EntryType::Fifo, "FIFO"),
        ];
        let outside = tempfile::tempdir().unwrap();
        for (name, kind, why) in cases {
            let dest = outside.path().join("job");
            let err = extract(&crafted(name, kind, b"x")[..], &dest, Limits::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{name}: {err}");
            assert!(!outside.path().join("evil.sh").exists());
            let _ = fs::remove_dir_all(&dest);
        }
    }

    #[test]
    fn size_and_count_limits_hold() {
        let dir = tree();
        let mut out = Vec::new();
        create(dir.path(), &mut out).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let small = Limits {
            files: 100,
            bytes: 10,
        };
        let err = extract(&out[..], &dest.path().join("a"), small).unwrap_err();
        assert!(matches!(err, Error::TooLarge { limit: 10 }), "{err}");
        let few = Limits {
            files: 2,
            bytes: 1 << 20,
        };
        let err = extract(&out[..], &dest.path().join("b"), few).unwrap_err();
        assert!(matches!(err, Error::TooMany { limit: 2 }), "{err}");
    }
}
