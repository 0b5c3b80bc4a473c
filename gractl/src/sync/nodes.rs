//! Inode numbers and the caches behind them: the attributes of each path
//! and the names in each directory, trusted for a short time (the TTL) and
//! kept up to date by this mount's own changes.
//!
//! An inode number stays with its path for the life of the mount (renames
//! carry it along); only a removed file's number is dropped, once the kernel
//! has forgotten it and nothing has it open.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use russh_sftp::protocol::FileAttributes;

use super::file::FileData;

pub(crate) const ROOT: u64 = 1;

/// `st_blksize`: programs size their buffers by it (cp, cat, stdio), and
/// bigger requests cost fewer round trips.
const BLKSIZE: u32 = 128 * 1024;

/// The user that files are shown as belonging to: the one who mounted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

pub(crate) struct Nodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<Arc<str>, u64>,
    next_ino: u64,
    ttl: Duration,
    owner: Owner,
}

pub(crate) struct Node {
    /// Relative to the mount's root; "" is the root.
    pub(crate) path: Arc<str>,
    attr: Option<(FileAttr, Instant)>,
    listing: Option<Listing>,
    /// Entries handed to the kernel and not yet forgotten.
    lookups: u64,
    /// Open file handles.
    pub(crate) open: u32,
    /// Still reachable by its path (false once removed or replaced).
    linked: bool,
    /// Shared by the open handles; set while the file is open.
    pub(crate) data: Option<Arc<FileData>>,
}

/// The names in a directory as last read from the server, plus this
/// mount's own changes since.
struct Listing {
    at: Instant,
    names: BTreeMap<Arc<str>, u64>,
}

/// One directory entry with its attributes.
pub(crate) struct Entry {
    pub(crate) name: Arc<str>,
    pub(crate) attr: FileAttr,
}

impl Nodes {
    pub(crate) fn new(ttl: Duration, owner: Owner) -> Nodes {
        let mut nodes = Nodes {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: ROOT,
            ttl,
            owner,
        };
        nodes.intern("");
        nodes
    }

    pub(crate) fn owner(&self) -> Owner {
        self.owner
    }

    pub(crate) fn get(&self, ino: u64) -> Result<&Node, Errno> {
        self.by_ino.get(&ino).ok_or(Errno::ESTALE)
    }

    pub(crate) fn get_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.by_ino.get_mut(&ino).ok_or(Errno::ESTALE)
    }

    pub(crate) fn path(&self, ino: u64) -> Result<Arc<str>, Errno> {
        let node = self.get(ino)?;
        if node.linked {
            Ok(Arc::clone(&node.path))
        } else {
            Err(Errno::ENOENT)
        }
    }

    pub(crate) fn ino(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// The inode number of `path`, made up on first sight.
    pub(crate) fn intern(&mut self, path: &str) -> u64 {
        if let Some(ino) = self.by_path.get(path) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let path: Arc<str> = path.into();
        self.by_path.insert(Arc::clone(&path), ino);
        self.by_ino.insert(
            ino,
            Node {
                path,
                attr: None,
                listing: None,
                lookups: 0,
                open: 0,
                linked: true,
                data: None,
            },
        );
        ino
    }

    /// Stores what the server said about `path`; returns the attributes to
    /// show, which are this mount's own while it has writes in progress.
    pub(crate) fn remember(&mut self, path: &str, attrs: &FileAttributes, at: Instant) -> FileAttr {
        let ino = self.intern(path);
        let attr = to_attr(ino, attrs, self.owner);
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return attr;
        };
        if node.pinned()
            && let Some((pinned, _)) = node.attr
        {
            return pinned;
        }
        node.attr = Some((attr, at));
        attr
    }

    /// Attributes still within their TTL, with the time they have left.
    pub(crate) fn fresh(&self, ino: u64) -> Option<(FileAttr, Duration)> {
        let node = self.by_ino.get(&ino)?;
        let (attr, at) = node.attr?;
        if node.pinned() {
            return Some((attr, self.ttl));
        }
        let left = self.ttl.checked_sub(at.elapsed())?;
        Some((attr, left))
    }

    /// The last attributes known, however old.
    pub(crate) fn cached(&self, ino: u64) -> Option<FileAttr> {
        self.by_ino.get(&ino)?.attr.map(|(attr, _)| attr)
    }

    /// Applies a change this mount made (size, mode, times).
    pub(crate) fn update(&mut self, ino: u64, change: impl FnOnce(&mut FileAttr)) {
        if let Some((attr, at)) = self.by_ino.get_mut(&ino).and_then(|n| n.attr.as_mut()) {
            change(attr);
            attr.blocks = attr.size.div_ceil(512);
            *at = Instant::now();
        }
    }

    /// Sets fresh attributes this mount worked out itself.
    pub(crate) fn set(&mut self, ino: u64, attr: FileAttr) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.attr = Some((attr, Instant::now()));
        }
    }

    /// Forgets the attributes so the next `stat` asks the server.
    pub(crate) fn invalidate(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino).filter(|n| !n.pinned()) {
            node.attr = None;
        }
    }

    /// The kernel got an entry for `ino` (it will `forget` it later).
    pub(crate) fn looked_up(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    pub(crate) fn forget(&mut self, ino: u64, count: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(count);
        }
        self.collect(ino);
    }

    /// Drops a removed node nobody refers to any more.
    pub(crate) fn collect(&mut self, ino: u64) {
        let unused = self
            .by_ino
            .get(&ino)
            .is_some_and(|n| !n.linked && n.lookups == 0 && n.open == 0);
        if unused && ino != ROOT {
            self.by_ino.remove(&ino);
        }
    }

    /// True when a fresh listing of `parent` lacks `name`: it does not
    /// exist, and no round trip is needed to say so.
    pub(crate) fn absent(&self, parent: u64, name: &str) -> bool {
        self.by_ino
            .get(&parent)
            .and_then(|node| node.listing.as_ref())
            .is_some_and(|listing| {
                listing.at.elapsed() < self.ttl && !listing.names.contains_key(name)
            })
    }

    /// The entries of `parent` if its listing and all their attributes are
    /// fresh.
    pub(crate) fn listing(&self, parent: u64) -> Option<Vec<Entry>> {
        let listing = self.by_ino.get(&parent)?.listing.as_ref()?;
        if listing.at.elapsed() >= self.ttl {
            return None;
        }
        listing
            .names
            .iter()
            .map(|(name, ino)| {
                let (attr, _) = self.fresh(*ino)?;
                Some(Entry {
                    name: Arc::clone(name),
                    attr,
                })
            })
            .collect()
    }

    /// Stores a listing read from the server (without `.` and `..`).
    pub(crate) fn set_listing(
        &mut self,
        parent: u64,
        entries: Vec<(String, FileAttributes)>,
        at: Instant,
    ) -> Result<Vec<Entry>, Errno> {
        let dir = self.path(parent)?;
        let mut names = BTreeMap::new();
        let mut result = Vec::with_capacity(entries.len());
        for (name, attrs) in entries {
            if name == "." || name == ".." || name.contains('/') {
                continue;
            }
            let path = join(&dir, &name);
            let attr = self.remember(&path, &attrs, at);
            let name: Arc<str> = name.into();
            names.insert(Arc::clone(&name), attr.ino.0);
            result.push(Entry { name, attr });
        }
        self.get_mut(parent)?.listing = Some(Listing { at, names });
        Ok(result)
    }

    /// A directory this mount just made: known to be empty.
    pub(crate) fn set_empty_listing(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.listing = Some(Listing {
                at: Instant::now(),
                names: BTreeMap::new(),
            });
        }
    }

    /// Records a name this mount created.
    pub(crate) fn added(&mut self, path: &str, ino: u64) {
        let (parent, name) = split(path);
        let Some(parent) = self.by_path.get(parent).copied() else {
            return;
        };
        if let Some(listing) = self
            .by_ino
            .get_mut(&parent)
            .and_then(|n| n.listing.as_mut())
        {
            listing.names.insert(name.into(), ino);
        }
    }

    /// Records that `path` is gone (unlink, rmdir, replaced by a rename).
    pub(crate) fn removed(&mut self, path: &str) {
        let (parent, name) = split(path);
        if let Some(parent) = self.by_path.get(parent).copied()
            && let Some(listing) = self
                .by_ino
                .get_mut(&parent)
                .and_then(|n| n.listing.as_mut())
        {
            listing.names.remove(name);
        }
        let Some(ino) = self.by_path.remove(path) else {
            return;
        };
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.linked = false;
            if let Some((attr, _)) = node.attr.as_mut() {
                attr.nlink = 0;
            }
        }
        self.collect(ino);
    }

    /// Moves `from` (and everything below it) to `to`, which it replaced.
    pub(crate) fn renamed(&mut self, from: &str, to: &str) {
        self.removed(to);
        let ino = self.by_path.get(from).copied();
        let (parent, name) = split(from);
        if let Some(parent) = self.by_path.get(parent).copied()
            && let Some(listing) = self
                .by_ino
                .get_mut(&parent)
                .and_then(|n| n.listing.as_mut())
        {
            listing.names.remove(name);
        }
        let Some(ino) = ino else {
            // Never seen here: nothing below it is known either.
            return;
        };
        self.added(to, ino);
        let is_dir = self.by_ino.get(&ino).is_some_and(|node| {
            node.listing.is_some()
                || node
                    .attr
                    .is_some_and(|(attr, _)| attr.kind == FileType::Directory)
        });
        let moved: Vec<(Arc<str>, u64)> = if is_dir {
            let below = format!("{from}/");
            self.by_path
                .iter()
                .filter(|(path, _)| path.as_ref() == from || path.starts_with(&below))
                .map(|(path, ino)| (Arc::clone(path), *ino))
                .collect()
        } else {
            vec![(from.into(), ino)]
        };
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let new: Arc<str> = format!("{to}{}", &old[from.len()..]).into();
            self.by_path.insert(Arc::clone(&new), ino);
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.path = new;
            }
        }
    }
}

impl Node {
    /// Writes through this mount are in progress: its own attributes are
    /// newer than the server's.
    fn pinned(&self) -> bool {
        self.data.as_ref().is_some_and(|data| data.is_dirty())
    }
}

/// `dir/name`, for paths relative to the root ("" is the root).
pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// (`dir`, `name`) of a relative path.
pub(crate) fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

pub(crate) fn to_attr(ino: u64, attrs: &FileAttributes, owner: Owner) -> FileAttr {
    let mode = attrs.permissions.unwrap_or(0o100_644);
    let kind = match mode & 0o170_000 {
        0o040_000 => FileType::Directory,
        0o120_000 => FileType::Symlink,
        0o010_000 => FileType::NamedPipe,
        0o020_000 => FileType::CharDevice,
        0o060_000 => FileType::BlockDevice,
        0o140_000 => FileType::Socket,
        _ => FileType::RegularFile,
    };
    let size = attrs.size.unwrap_or(0);
    let time =
        |secs: Option<u32>| secs.map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s.into()));
    let mtime = time(attrs.mtime);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: time(attrs.atime),
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: (mode & 0o7777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Attributes for something this mount just made, before the server's
/// answer is known.
pub(crate) fn new_attr(ino: u64, kind: FileType, perm: u16, owner: Owner) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> FileAttributes {
        FileAttributes {
            size: Some(size),
            permissions: Some(0o100_644),
            mtime: Some(1_700_000_000),
            atime: Some(1_700_000_000),
            ..FileAttributes::default()
        }
    }

    fn dir() -> FileAttributes {
        FileAttributes {
            permissions: Some(0o040_755),
            ..FileAttributes::default()
        }
    }

    fn nodes() -> Nodes {
        Nodes::new(Duration::from_secs(60), Owner { uid: 7, gid: 8 })
    }

    #[test]
    fn a_path_keeps_its_inode_number_and_the_root_is_one() {
        let mut nodes = nodes();
        assert_eq!(nodes.intern(""), ROOT);
        let a = nodes.intern("a");
        let b = nodes.intern("a/b");
        assert_ne!(a, b);
        assert_eq!(nodes.intern("a"), a);
        assert_eq!(nodes.path(b).as_deref(), Ok("a/b"));
    }

    #[test]
    fn renaming_a_directory_moves_the_paths_below_it_and_keeps_their_numbers() {
        let mut nodes = nodes();
        let now = Instant::now();
        nodes
            .set_listing(ROOT, vec![("d".into(), dir()), ("x".into(), file(1))], now)
            .expect("root");
        let d = nodes.ino("d").expect("d");
        let f = nodes.intern("d/f");
        let g = nodes.intern("d/e/g");
        let x = nodes.ino("x").expect("x");
        nodes.renamed("d", "x");
        assert_eq!(nodes.ino("x"), Some(d));
        assert_eq!(nodes.path(f).as_deref(), Ok("x/f"));
        assert_eq!(nodes.path(g).as_deref(), Ok("x/e/g"));
        assert_eq!(nodes.ino("d/f"), None);
        // The replaced file is unreachable and, unreferenced, dropped.
        assert!(nodes.get(x).is_err());
        let names: Vec<_> = nodes
            .listing(ROOT)
            .expect("fresh")
            .into_iter()
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(names, ["x"]);
    }

    #[test]
    fn a_fresh_listing_answers_for_missing_names_and_sees_local_creates() {
        let mut nodes = nodes();
        nodes
            .set_listing(ROOT, vec![("a".into(), file(3))], Instant::now())
            .expect("root");
        assert!(nodes.absent(ROOT, "b"));
        assert!(!nodes.absent(ROOT, "a"));
        let b = nodes.intern("b");
        nodes.added("b", b);
        assert!(!nodes.absent(ROOT, "b"));
        nodes.removed("a");
        assert!(nodes.absent(ROOT, "a"));
    }

    #[test]
    fn a_removed_file_that_the_kernel_still_knows_stays_until_forgotten() {
        let mut nodes = nodes();
        let a = nodes.intern("a");
        nodes.looked_up(a);
        nodes.removed("a");
        assert!(nodes.get(a).is_ok());
        assert_eq!(nodes.path(a), Err(Errno::ENOENT));
        nodes.forget(a, 1);
        assert!(nodes.get(a).is_err());
    }

    #[test]
    fn server_attributes_become_file_attributes_owned_by_the_local_user() {
        let attr = to_attr(5, &file(1000), Owner { uid: 7, gid: 8 });
        assert_eq!(attr.kind, FileType::RegularFile);
        assert_eq!((attr.perm, attr.size, attr.blocks), (0o644, 1000, 2));
        assert_eq!((attr.uid, attr.gid), (7, 8));
        let attr = to_attr(6, &dir(), Owner { uid: 7, gid: 8 });
        assert_eq!(
            (attr.kind, attr.perm, attr.nlink),
            (FileType::Directory, 0o755, 2)
        );
        let link = FileAttributes {
            permissions: Some(0o120_777),
            ..FileAttributes::default()
        };
        assert_eq!(
            to_attr(7, &link, Owner { uid: 0, gid: 0 }).kind,
            FileType::Symlink
        );
    }
}
