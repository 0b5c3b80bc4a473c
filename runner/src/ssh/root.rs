//! How SFTP paths map onto the runner's filesystem.
//!
//! Confined, the client's "/" is the workspace: `..` stops at it (as in a
//! chroot) and every path is resolved on the real filesystem, symlinks
//! included, and refused unless it lands inside. Unconfined, "/" is the real
//! root and relative paths start in the workspace, like a home directory.
//!
//! This keeps SFTP (and the FUSE mount on top of it) inside the workspace; it
//! is not a sandbox against the same user's shell, which SSH also offers.

use std::{
    io,
    path::{Component, Path, PathBuf},
};

pub(super) struct Root {
    /// The real directory the client's "/" stands for (canonical).
    base: PathBuf,
    /// Where relative paths start, relative to `base`.
    home: PathBuf,
}

/// The error for a path that would leave the root.
pub(super) fn outside() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "path leads outside the workspace",
    )
}

impl Root {
    /// `workspace` must be canonical.
    pub(super) fn new(workspace: &Path, confine: bool) -> Root {
        if confine {
            Root {
                base: workspace.to_owned(),
                home: PathBuf::new(),
            }
        } else {
            Root {
                base: PathBuf::from("/"),
                home: workspace.strip_prefix("/").unwrap_or(workspace).to_owned(),
            }
        }
    }

    /// The client's path as a path under `base`, with `.` and `..` applied
    /// lexically and clamped at the root.
    fn logical(&self, client: &str) -> PathBuf {
        let mut path = if client.starts_with('/') {
            PathBuf::new()
        } else {
            self.home.clone()
        };
        for component in Path::new(client).components() {
            match component {
                Component::Normal(name) => path.push(name),
                Component::ParentDir => {
                    path.pop();
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        path
    }

    fn check(&self, real: PathBuf) -> io::Result<PathBuf> {
        if real.starts_with(&self.base) {
            Ok(real)
        } else {
            Err(outside())
        }
    }

    /// Resolves a path the way `open`/`stat` see it: symlinks followed, the
    /// result canonical and inside the root. A path that doesn't exist yet
    /// resolves if its parent does (so it can be created), unless it is a
    /// dangling symlink, which could point anywhere.
    pub(super) fn resolve(&self, client: &str) -> io::Result<PathBuf> {
        let path = self.base.join(self.logical(client));
        match path.canonicalize() {
            Ok(real) => self.check(real),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let real = self.resolve_parent(&path)?;
                match real.symlink_metadata() {
                    Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "dangling symbolic link",
                    )),
                    _ => Ok(real),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves a path the way `lstat`/`remove`/`rename` see it: the last
    /// component is taken as it is (a symlink stays a symlink), the directory
    /// holding it must resolve inside the root.
    pub(super) fn resolve_entry(&self, client: &str) -> io::Result<PathBuf> {
        self.resolve_parent(&self.base.join(self.logical(client)))
    }

    fn resolve_parent(&self, path: &Path) -> io::Result<PathBuf> {
        match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) if path != self.base => {
                let parent = self.check(parent.canonicalize()?)?;
                Ok(parent.join(name))
            }
            _ => Ok(self.base.clone()),
        }
    }

    /// Whether `client` names a path on the workspace's own disk: inside the
    /// workspace and not under `data/`, where datasets are mounted over the
    /// network. Lexical, so a symlink can lead elsewhere: it only decides
    /// where a request runs, never whether it may.
    pub(super) fn is_local(&self, client: &str) -> bool {
        let path = self.base.join(self.logical(client));
        match path.strip_prefix(self.base.join(&self.home)) {
            Ok(rest) => rest.components().next() != Some(Component::Normal("data".as_ref())),
            Err(_) => false,
        }
    }

    /// Whether `real` is the root itself, which may not be removed or renamed.
    pub(super) fn is_base(&self, real: &Path) -> bool {
        real == self.base
    }

    /// A resolved path as the client names it ("/code/x" when confined).
    pub(super) fn client_path(&self, real: &Path) -> String {
        match real.strip_prefix(&self.base) {
            Ok(rest) => Path::new("/").join(rest).to_string_lossy().into_owned(),
            Err(_) => real.to_string_lossy().into_owned(),
        }
    }

    /// A symlink target as the client wrote it, as it is stored on disk: an
    /// absolute target names a path in the client's view of the tree.
    pub(super) fn link_target_to_disk(&self, target: &str) -> PathBuf {
        if target.starts_with('/') {
            self.base.join(self.logical(target))
        } else {
            PathBuf::from(target)
        }
    }

    /// A stored symlink target as the client should read it.
    pub(super) fn link_target_to_client(&self, target: &Path) -> String {
        if target.is_absolute() {
            self.client_path(target)
        } else {
            target.to_string_lossy().into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_stops_at_the_root() {
        let root = Root::new(Path::new("/ws"), true);
        assert_eq!(
            root.logical("../../etc/passwd"),
            PathBuf::from("etc/passwd")
        );
        assert_eq!(root.logical("/../etc"), PathBuf::from("etc"));
        assert_eq!(root.logical("/code/./a/../b"), PathBuf::from("code/b"));
        assert_eq!(root.logical(""), PathBuf::new());
    }

    #[test]
    fn unconfined_relative_paths_start_in_the_workspace() {
        let root = Root::new(Path::new("/home/u/ws"), false);
        assert_eq!(root.logical("code"), PathBuf::from("home/u/ws/code"));
        assert_eq!(root.logical("/etc"), PathBuf::from("etc"));
        assert_eq!(root.client_path(Path::new("/home/u/ws")), "/home/u/ws");
    }

    #[test]
    fn the_workspace_is_local_but_its_data_mounts_and_the_rest_are_not() {
        let root = Root::new(Path::new("/ws"), true);
        assert!(root.is_local("/code/x.py"));
        assert!(root.is_local("/"));
        assert!(root.is_local("outputs/../code"));
        assert!(root.is_local("/database"));
        assert!(!root.is_local("/data"));
        assert!(!root.is_local("/data/taxi/a.parquet"));
        let unconfined = Root::new(Path::new("/home/u/ws"), false);
        assert!(unconfined.is_local("code"));
        assert!(!unconfined.is_local("data/taxi"));
        assert!(!unconfined.is_local("/etc/passwd"));
    }

    #[test]
    fn client_paths_are_relative_to_the_root() {
        let root = Root::new(Path::new("/ws"), true);
        assert_eq!(root.client_path(Path::new("/ws")), "/");
        assert_eq!(root.client_path(Path::new("/ws/code/x")), "/code/x");
        assert_eq!(
            root.link_target_to_disk("/code/x"),
            PathBuf::from("/ws/code/x")
        );
        assert_eq!(root.link_target_to_disk("../x"), PathBuf::from("../x"));
        assert_eq!(root.link_target_to_client(Path::new("/ws/code")), "/code");
    }
}
