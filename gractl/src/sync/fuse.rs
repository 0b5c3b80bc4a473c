//! The FUSE filesystem: kernel requests in, SFTP requests out.
//!
//! fuser calls in on one thread. Each callback runs its work right there
//! until the work first waits (by then its SFTP request is on the wire, or
//! the answer came from the caches), then hands the rest, reply included,
//! to a task on the tokio runtime: many requests are in flight together and
//! the kernel's loop never waits on the network.
//!
//! Files are shown as the mounting user's, with the server's permission
//! bits; the server decides what is allowed. Data written here reaches the
//! server at `close`/`fsync` at the latest (sooner in 255 KiB pieces);
//! changes made on the server show here within the cache TTL.
//!
//! Not supported: extended attributes (ENOSYS, which the kernel reports to
//! programs as "not supported"), POSIX and BSD locks (the kernel keeps them
//! locally, per machine), special files other than regular ones (mknod of a
//! FIFO, socket or device is EPERM), changing owners (EPERM), hard links
//! where the server lacks `hardlink@openssh.com` (EPERM), RENAME_EXCHANGE
//! (EINVAL), and names that are not UTF-8 (EINVAL). Times go to the server
//! in whole seconds (SFTP v3). After a reconnection, files open for reading
//! are opened again; files open for writing fail with EIO (what was in
//! flight is lost).

use std::{
    collections::HashMap,
    ffi::OsStr,
    future::Future,
    io,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use russh_sftp::protocol::{FileAttributes, OpenFlags as SftpFlags};
use tokio::runtime::Handle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    file::{Bytes, FileData, OpenFile, lock},
    nodes::{Entry, Nodes, Owner, ROOT, join, new_attr, split, to_attr},
    remote::{Conn, Remote, Started, start},
};

/// Largest write the kernel sends in one request (and read it asks for).
const MAX_IO: u32 = 1 << 20;
/// Kernel requests (reads, read-ahead) it keeps in flight in the background.
const MAX_BACKGROUND: u16 = 64;
const GENERATION: Generation = Generation(0);

/// State shared by the FUSE callbacks and their tasks.
pub(crate) struct Core {
    pub(crate) remote: Arc<Remote>,
    nodes: Mutex<Nodes>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    ttl: Duration,
    read_ahead: usize,
    write_window: usize,
    runtime: Handle,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// A directory entry as `opendir` saw it.
struct DirEntry {
    name: Arc<str>,
    attr: FileAttr,
}

pub(crate) struct Settings {
    pub(crate) ttl: Duration,
    pub(crate) read_ahead: usize,
    pub(crate) write_window: usize,
    pub(crate) owner: Owner,
}

impl Core {
    pub(crate) fn new(
        remote: Arc<Remote>,
        settings: Settings,
        runtime: Handle,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Core {
        Core {
            remote,
            nodes: Mutex::new(Nodes::new(settings.ttl, settings.owner)),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ttl: settings.ttl,
            read_ahead: settings.read_ahead,
            write_window: settings.write_window,
            runtime,
            tasks,
            shutdown,
        }
    }

    fn nodes(&self) -> MutexGuard<'_, Nodes> {
        lock(&self.nodes)
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<OpenFile>> {
        lock(&self.files).get(&fh.0).cloned()
    }

    async fn conn(&self) -> Result<Arc<Conn>, Errno> {
        self.remote.conn().await
    }

    /// Stores the root's attributes (checked at mount time).
    pub(crate) fn set_root(&self, attrs: &FileAttributes) {
        self.nodes().remember("", attrs, Instant::now());
    }

    fn child(&self, parent: u64, name: &str) -> Result<String, Errno> {
        Ok(join(&self.nodes().path(parent)?, name))
    }

    /// Records an entry handed to the kernel.
    fn entry(&self, path: &str, attrs: &FileAttributes, at: Instant) -> FileAttr {
        let mut nodes = self.nodes();
        let attr = nodes.remember(path, attrs, at);
        nodes.added(path, attr.ino.0);
        nodes.looked_up(attr.ino.0);
        attr
    }

    async fn lookup(&self, parent: u64, name: &str) -> Result<(FileAttr, Duration), Errno> {
        let path = {
            let mut nodes = self.nodes();
            let path = join(&nodes.path(parent)?, name);
            if let Some(ino) = nodes.ino(&path)
                && let Some(fresh) = nodes.fresh(ino)
            {
                nodes.looked_up(ino);
                return Ok(fresh);
            }
            if nodes.absent(parent, name) {
                return Err(Errno::ENOENT);
            }
            path
        };
        let conn = self.conn().await?;
        let at = Instant::now();
        match conn.lstat(&path).await {
            Ok(attrs) => {
                let mut nodes = self.nodes();
                let attr = nodes.remember(&path, &attrs, at);
                nodes.looked_up(attr.ino.0);
                Ok((attr, self.ttl))
            }
            Err(Errno::ENOENT) => {
                self.nodes().removed(&path);
                Err(Errno::ENOENT)
            }
            Err(error) => Err(error),
        }
    }

    async fn getattr(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        let path = {
            let nodes = self.nodes();
            if let Some(fresh) = nodes.fresh(ino) {
                return Ok(fresh);
            }
            match nodes.path(ino) {
                Ok(path) => path,
                // Removed but still open here: what was last known.
                Err(error) => return nodes.cached(ino).map(|a| (a, self.ttl)).ok_or(error),
            }
        };
        let conn = self.conn().await?;
        let at = Instant::now();
        let attrs = conn.lstat(&path).await?;
        Ok((self.nodes().remember(&path, &attrs, at), self.ttl))
    }

    #[allow(clippy::too_many_arguments)]
    async fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<(FileAttr, Duration), Errno> {
        let (path, cached, data, owner) = {
            let nodes = self.nodes();
            let data = nodes.get(ino)?.data.clone();
            (nodes.path(ino)?, nodes.cached(ino), data, nodes.owner())
        };
        if uid.is_some_and(|uid| uid != owner.uid) || gid.is_some_and(|gid| gid != owner.gid) {
            return Err(Errno::EPERM);
        }
        let conn = self.conn().await?;
        let mut attrs = FileAttributes {
            size,
            permissions: mode.map(|mode| mode & 0o7777),
            ..FileAttributes::default()
        };
        if atime.is_some() || mtime.is_some() {
            let base = match cached {
                Some(attr) => attr,
                None => to_attr(ino, &conn.lstat(&path).await?, owner),
            };
            attrs.atime = Some(seconds(atime, base.atime));
            attrs.mtime = Some(seconds(mtime, base.mtime));
        }
        if attrs.size.is_none() && attrs.permissions.is_none() && attrs.atime.is_none() {
            return self.getattr(ino).await;
        }
        // Buffered writes go out first, so the change applies after them.
        let request = {
            if let Some(data) = &data {
                data.push(&self.tasks);
            }
            start(conn.setstat(&path, attrs.clone()))
        };
        request.await?;
        if let (Some(data), Some(_)) = (&data, size) {
            data.changed();
        }
        let cached = self.nodes().cached(ino);
        match cached {
            Some(mut attr) => {
                if let Some(size) = attrs.size {
                    attr.size = size;
                    attr.blocks = size.div_ceil(512);
                    attr.mtime = SystemTime::now();
                }
                if let Some(mode) = attrs.permissions {
                    attr.perm = (mode & 0o7777) as u16;
                }
                if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
                    attr.atime = UNIX_EPOCH + Duration::from_secs(atime.into());
                    attr.mtime = UNIX_EPOCH + Duration::from_secs(mtime.into());
                }
                attr.ctime = SystemTime::now();
                self.nodes().set(ino, attr);
                Ok((attr, self.ttl))
            }
            None => {
                let at = Instant::now();
                let attrs = conn.lstat(&path).await?;
                Ok((self.nodes().remember(&path, &attrs, at), self.ttl))
            }
        }
    }

    async fn mkdir(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        let path = self.child(parent, name)?;
        let conn = self.conn().await?;
        let perm = mode & !umask & 0o7777;
        let attrs = FileAttributes {
            permissions: Some(perm),
            ..FileAttributes::default()
        };
        let at = Instant::now();
        // One round trip: the stat is answered after the mkdir.
        let made = start(conn.mkdir(&path, attrs));
        let stat = start(conn.lstat(&path));
        let (made, stat) = (made.await, stat.await);
        match made {
            Ok(()) => {}
            Err(Errno::EIO) if stat.is_ok() => return Err(Errno::EEXIST),
            Err(error) => return Err(error),
        }
        let attr = match stat {
            Ok(attrs) => self.entry(&path, &attrs, at),
            Err(_) => self.made(&path, FileType::Directory, perm),
        };
        self.nodes().set_empty_listing(attr.ino.0);
        Ok(attr)
    }

    /// Records something this mount made whose attributes the server did
    /// not report.
    fn made(&self, path: &str, kind: FileType, perm: u32) -> FileAttr {
        let mut nodes = self.nodes();
        let ino = nodes.intern(path);
        let attr = new_attr(ino, kind, (perm & 0o7777) as u16, nodes.owner());
        nodes.set(ino, attr);
        nodes.added(path, ino);
        nodes.looked_up(ino);
        attr
    }

    async fn unlink(&self, parent: u64, name: &str) -> Result<(), Errno> {
        let path = self.child(parent, name)?;
        let conn = self.conn().await?;
        match conn.remove(&path).await {
            Ok(()) => {
                self.nodes().removed(&path);
                Ok(())
            }
            Err(Errno::EIO) => {
                let is_dir = {
                    let nodes = self.nodes();
                    nodes
                        .ino(&path)
                        .and_then(|ino| nodes.cached(ino))
                        .is_some_and(|attr| attr.kind == FileType::Directory)
                };
                Err(if is_dir { Errno::EISDIR } else { Errno::EIO })
            }
            Err(error) => Err(error),
        }
    }

    async fn rmdir(&self, parent: u64, name: &str) -> Result<(), Errno> {
        let path = self.child(parent, name)?;
        let conn = self.conn().await?;
        match conn.rmdir(&path).await {
            Ok(()) => {
                self.nodes().removed(&path);
                Ok(())
            }
            // OpenSSH answers "failure" for a directory that is not empty.
            Err(Errno::EIO) => match conn.lstat(&path).await {
                Ok(attrs)
                    if to_attr(0, &attrs, self.nodes().owner()).kind == FileType::Directory =>
                {
                    Err(Errno::ENOTEMPTY)
                }
                Ok(_) => Err(Errno::ENOTDIR),
                Err(_) => Err(Errno::EIO),
            },
            Err(error) => Err(error),
        }
    }

    async fn symlink(&self, parent: u64, name: &str, target: &str) -> Result<FileAttr, Errno> {
        let path = self.child(parent, name)?;
        let conn = self.conn().await?;
        let at = Instant::now();
        let made = start(conn.symlink(&path, target));
        let stat = start(conn.lstat(&path));
        let (made, stat) = (made.await, stat.await);
        match made {
            Ok(()) => {}
            Err(Errno::EIO) if stat.is_ok() => return Err(Errno::EEXIST),
            Err(error) => return Err(error),
        }
        Ok(match stat {
            Ok(attrs) => self.entry(&path, &attrs, at),
            Err(_) => self.made(&path, FileType::Symlink, 0o777),
        })
    }

    async fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return Err(Errno::EINVAL);
        }
        let from = self.child(parent, name)?;
        let to = self.child(new_parent, new_name)?;
        let conn = self.conn().await?;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            match conn.lstat(&to).await {
                Ok(_) => return Err(Errno::EEXIST),
                Err(Errno::ENOENT) => {}
                Err(error) => return Err(error),
            }
            conn.rename(&from, &to).await?;
        } else if conn.extensions.posix_rename {
            conn.posix_rename(&from, &to).await?;
        } else {
            // Plain SFTP rename refuses to replace: remove the target first.
            match conn.rename(&from, &to).await {
                Ok(()) => {}
                Err(Errno::EIO) => {
                    let target = conn.lstat(&to).await.map_err(|_| Errno::EIO)?;
                    if target.is_dir() {
                        conn.rmdir(&to).await.map_err(|_| Errno::ENOTEMPTY)?;
                    } else {
                        conn.remove(&to).await?;
                    }
                    conn.rename(&from, &to).await?;
                }
                Err(error) => return Err(error),
            }
        }
        self.nodes().renamed(&from, &to);
        Ok(())
    }

    async fn link(&self, ino: u64, new_parent: u64, new_name: &str) -> Result<FileAttr, Errno> {
        let from = self.nodes().path(ino)?;
        let to = self.child(new_parent, new_name)?;
        let conn = self.conn().await?;
        if !conn.extensions.hardlink {
            return Err(Errno::EPERM);
        }
        let at = Instant::now();
        conn.hardlink(&from, &to).await?;
        let attrs = conn.lstat(&to).await?;
        let attr = self.entry(&to, &attrs, at);
        // Its link count changed.
        self.nodes().invalidate(ino);
        Ok(attr)
    }

    /// Registers an open handle of `ino`.
    fn opened(
        &self,
        ino: u64,
        file: impl FnOnce(Arc<FileData>) -> OpenFile,
    ) -> (u64, Arc<OpenFile>) {
        let data = {
            let mut nodes = self.nodes();
            match nodes.get_mut(ino) {
                Ok(node) => {
                    node.open += 1;
                    Arc::clone(
                        node.data
                            .get_or_insert_with(|| Arc::new(FileData::new(self.write_window))),
                    )
                }
                Err(_) => Arc::new(FileData::new(self.write_window)),
            }
        };
        let file = Arc::new(file(data));
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::clone(&file));
        (fh, file)
    }

    async fn open(&self, ino: u64, flags: OpenFlags) -> Result<u64, Errno> {
        let (read, write) = access(flags.acc_mode());
        let truncate = write && flags.0 & libc::O_TRUNC != 0;
        let mut reopen = SftpFlags::empty();
        if read {
            reopen |= SftpFlags::READ;
        }
        if write {
            reopen |= SftpFlags::WRITE;
        }
        if flags.0 & libc::O_APPEND != 0 {
            reopen |= SftpFlags::APPEND;
        }
        let open_flags = if truncate {
            reopen | SftpFlags::TRUNCATE
        } else {
            reopen
        };
        let (path, fresh) = {
            let nodes = self.nodes();
            (nodes.path(ino)?, nodes.fresh(ino).is_some())
        };
        let conn = self.conn().await?;
        let read_ahead = self.read_ahead;
        if read && !write && conn.extensions.open_read {
            // The open, the first read and a fresh stat in one round trip.
            let at = Instant::now();
            let (handle, attrs, data) = conn.open_read(&path, conn.read_len).await?;
            self.nodes().remember(&path, &attrs, at);
            let (fh, file) = self.opened(ino, |data| {
                OpenFile::new(ino, write, reopen, handle, data, read_ahead)
            });
            file.seed(data);
            return Ok(fh);
        }
        // A writer's attributes become the ones shown while it writes, so
        // they must be current; the stat rides along with the open.
        let at = Instant::now();
        let opening = start(conn.open(&path, open_flags, FileAttributes::default()));
        let stat = (write && !fresh).then(|| start(conn.lstat(&path)));
        let handle = opening.await?;
        if let Some(stat) = stat
            && let Ok(attrs) = stat.await
        {
            self.nodes().remember(&path, &attrs, at);
        }
        if truncate {
            self.nodes().update(ino, |attr| {
                attr.size = 0;
                attr.mtime = SystemTime::now();
                attr.ctime = attr.mtime;
            });
        }
        let (fh, file) = self.opened(ino, |data| {
            OpenFile::new(ino, write, reopen, handle, data, read_ahead)
        });
        if truncate {
            file.data.changed();
        }
        if read && !truncate {
            let size = self.nodes().cached(ino).map_or(0, |attr| attr.size);
            file.prefetch(size, &self.tasks);
        }
        Ok(fh)
    }

    async fn create(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let path = self.child(parent, name)?;
        let conn = self.conn().await?;
        let (read, write) = access(OpenFlags(flags).acc_mode());
        let mut reopen = SftpFlags::empty();
        if read {
            reopen |= SftpFlags::READ;
        }
        if write {
            reopen |= SftpFlags::WRITE;
        }
        let mut open_flags = reopen | SftpFlags::CREATE;
        if flags & libc::O_EXCL != 0 {
            open_flags |= SftpFlags::EXCLUDE;
        }
        if flags & libc::O_TRUNC != 0 {
            open_flags |= SftpFlags::TRUNCATE;
        }
        let perm = mode & !umask & 0o7777;
        let attrs = FileAttributes {
            permissions: Some(perm),
            ..FileAttributes::default()
        };
        let at = Instant::now();
        let opening = start(conn.open(&path, open_flags, attrs));
        let stat = start(conn.lstat(&path));
        let (handle, stat) = (opening.await, stat.await);
        let handle = match handle {
            Ok(handle) => handle,
            Err(Errno::EIO) if flags & libc::O_EXCL != 0 && stat.is_ok() => {
                return Err(Errno::EEXIST);
            }
            Err(error) => return Err(error),
        };
        let attr = match stat {
            Ok(attrs) => self.entry(&path, &attrs, at),
            Err(_) => self.made(&path, FileType::RegularFile, perm),
        };
        let ino = attr.ino.0;
        let read_ahead = self.read_ahead;
        let (fh, _) = self.opened(ino, |data| {
            OpenFile::new(ino, write, reopen, handle, data, read_ahead)
        });
        Ok((attr, fh))
    }

    async fn mknod(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EPERM);
        }
        let path = self.child(parent, name)?;
        let conn = self.conn().await?;
        let perm = mode & !umask & 0o7777;
        let attrs = FileAttributes {
            permissions: Some(perm),
            ..FileAttributes::default()
        };
        let at = Instant::now();
        let flags = SftpFlags::WRITE | SftpFlags::CREATE | SftpFlags::EXCLUDE;
        let opening = start(conn.open(&path, flags, attrs));
        let stat = start(conn.lstat(&path));
        let (handle, stat) = (opening.await, stat.await);
        match handle {
            // Closed in the background.
            Ok(handle) => drop(handle),
            Err(Errno::EIO) if stat.is_ok() => return Err(Errno::EEXIST),
            Err(error) => return Err(error),
        }
        Ok(match stat {
            Ok(attrs) => self.entry(&path, &attrs, at),
            Err(_) => self.made(&path, FileType::RegularFile, perm),
        })
    }

    async fn read(&self, file: &OpenFile, offset: u64, size: u32) -> Result<Bytes, Errno> {
        let (path, known_size) = {
            let nodes = self.nodes();
            let path = nodes.get(file.ino)?.path.clone();
            (path, nodes.cached(file.ino).map(|attr| attr.size))
        };
        file.read(&self.remote, &path, offset, size, known_size, &self.tasks)
            .await
    }

    async fn release(&self, fh: FileHandle) -> Result<(), Errno> {
        let Some(file) = lock(&self.files).remove(&fh.0) else {
            return Ok(());
        };
        let flushed = if file.writable {
            file.data.flush(&self.tasks).await
        } else {
            Ok(())
        };
        file.forget_reads();
        let handle = file.handle();
        let ino = file.ino;
        drop(file);
        // Waits for the close unless someone else still holds the handle.
        if let Some(handle) = Arc::into_inner(handle) {
            let _ = handle.close().await;
        }
        let mut nodes = self.nodes();
        let wrote = nodes.get_mut(ino).is_ok_and(|node| {
            node.open = node.open.saturating_sub(1);
            node.open == 0 && node.data.take().is_some_and(|data| data.is_dirty())
        });
        // What this mount wrote stays the view for one TTL.
        if wrote && let Some(attr) = nodes.cached(ino) {
            nodes.set(ino, attr);
        }
        nodes.collect(ino);
        flushed
    }

    async fn fsync(&self, file: &OpenFile) -> Result<(), Errno> {
        if file.writable {
            file.data.flush(&self.tasks).await?;
        }
        let handle = file.handle();
        if handle.conn.extensions.fsync && !handle.conn.is_lost() {
            handle.conn.fsync(&handle.id).await?;
        }
        Ok(())
    }

    async fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let cached = self.nodes().listing(ino);
        let entries = match cached {
            Some(entries) => entries,
            None => {
                let path = self.nodes().path(ino)?;
                let conn = self.conn().await?;
                let at = Instant::now();
                let listed = list(&conn, &path).await?;
                self.nodes().set_listing(ino, listed, at)?
            }
        };
        let mut snapshot = Vec::with_capacity(entries.len() + 2);
        {
            let nodes = self.nodes();
            let owner = nodes.owner();
            let path = nodes.path(ino)?;
            let parent = if ino == ROOT {
                ROOT
            } else {
                nodes.ino(split(&path).0).unwrap_or(ROOT)
            };
            for (name, ino) in [(".", ino), ("..", parent)] {
                let attr = nodes
                    .cached(ino)
                    .unwrap_or_else(|| new_attr(ino, FileType::Directory, 0o755, owner));
                snapshot.push(DirEntry {
                    name: name.into(),
                    attr,
                });
            }
        }
        snapshot.extend(
            entries
                .into_iter()
                .map(|Entry { name, attr }| DirEntry { name, attr }),
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(snapshot));
        Ok(fh)
    }

    async fn statfs(&self) -> Result<Statfs, Errno> {
        let conn = self.conn().await?;
        if !conn.extensions.statvfs {
            return Ok(Statfs::UNKNOWN);
        }
        let vfs = conn.statvfs("").await?;
        let narrow = |value: u64, default: u32| u32::try_from(value).unwrap_or(default);
        Ok(Statfs {
            blocks: vfs.blocks,
            bfree: vfs.blocks_free,
            bavail: vfs.blocks_avail,
            files: vfs.inodes,
            ffree: vfs.inodes_free,
            bsize: narrow(vfs.block_size, 4096),
            namelen: narrow(vfs.name_max, 255),
            frsize: narrow(vfs.fragment_size, 4096),
        })
    }

    async fn access(&self, ino: u64, mask: AccessFlags, uid: u32) -> Result<(), Errno> {
        let cached = self.nodes().cached(ino);
        let attr = match cached {
            Some(attr) => attr,
            None => self.getattr(ino).await?.0,
        };
        if mask == AccessFlags::F_OK {
            return Ok(());
        }
        let owner = self.nodes().owner();
        if uid == 0 {
            let needs_x = mask.contains(AccessFlags::X_OK)
                && attr.kind != FileType::Directory
                && attr.perm & 0o111 == 0;
            return if needs_x { Err(Errno::EACCES) } else { Ok(()) };
        }
        let bits = if uid == owner.uid {
            attr.perm >> 6
        } else {
            attr.perm
        } & 0o7;
        let wanted = [
            (AccessFlags::R_OK, 0o4),
            (AccessFlags::W_OK, 0o2),
            (AccessFlags::X_OK, 0o1),
        ];
        let denied = wanted
            .iter()
            .any(|(flag, bit)| mask.contains(*flag) && bits & bit == 0);
        if denied { Err(Errno::EACCES) } else { Ok(()) }
    }
}

/// (read, write) for an access mode.
fn access(mode: OpenAccMode) -> (bool, bool) {
    match mode {
        OpenAccMode::O_RDONLY => (true, false),
        OpenAccMode::O_WRONLY => (false, true),
        OpenAccMode::O_RDWR => (true, true),
    }
}

/// Whole seconds since the epoch, as SFTP v3 carries times.
fn seconds(time: Option<TimeOrNow>, current: SystemTime) -> u32 {
    let time = match time {
        Some(TimeOrNow::SpecificTime(time)) => time,
        Some(TimeOrNow::Now) => SystemTime::now(),
        None => current,
    };
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Reads a whole directory. Two READDIRs go out at once, so a small
/// directory (one batch, then end) takes one round trip; big ones keep four
/// in flight. Servers answer them in order.
async fn list(conn: &Arc<Conn>, path: &str) -> Result<Vec<(String, FileAttributes)>, Errno> {
    let handle = conn.opendir(path).await?;
    let mut entries = Vec::new();
    let mut depth = 2;
    'batches: loop {
        let requests: Vec<_> = (0..depth)
            .map(|_| start(conn.readdir(&handle.id)))
            .collect();
        for request in requests {
            match request.await? {
                Some(batch) => entries.extend(batch),
                None => break 'batches,
            }
        }
        depth = 4;
    }
    // Closed in the background.
    drop(handle);
    Ok(entries)
}

struct Statfs {
    blocks: u64,
    bfree: u64,
    bavail: u64,
    files: u64,
    ffree: u64,
    bsize: u32,
    namelen: u32,
    frsize: u32,
}

impl Statfs {
    /// For servers without `statvfs@openssh.com`: plenty of room.
    const UNKNOWN: Statfs = Statfs {
        blocks: 1 << 30,
        bfree: 1 << 30,
        bavail: 1 << 30,
        files: 1 << 24,
        ffree: 1 << 24,
        bsize: 4096,
        namelen: 255,
        frsize: 4096,
    };
}

fn utf8(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_owned).ok_or(Errno::EINVAL)
}

/// The filesystem fuser runs. See the module docs.
pub(crate) struct Fs {
    core: Arc<Core>,
}

impl Fs {
    pub(crate) fn new(core: Arc<Core>) -> Fs {
        Fs { core }
    }

    /// Runs `work`, which answers its own reply: right here up to its first
    /// wait (usually an SFTP request sent), then on the runtime. Sending from
    /// this thread saves waking a runtime thread before the request leaves.
    fn run<F, Fut>(&self, work: F)
    where
        F: FnOnce(Arc<Core>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let _runtime = self.core.runtime.enter();
        let started = start(work(Arc::clone(&self.core)));
        if let Started::Running(_) = started {
            self.core.tasks.spawn_on(started, &self.core.runtime);
        }
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>, ttl: Duration) {
    match result {
        Ok(attr) => reply.entry(&ttl, &attr, GENERATION),
        Err(error) => reply.error(error),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(error) => reply.error(error),
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each setting is best effort: an older kernel keeps its default.
        let _ = config.set_max_write(MAX_IO);
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        for capability in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(capability);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.core.shutdown.cancel();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match utf8(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            match core.lookup(parent.0, &name).await {
                Ok((attr, ttl)) => reply.entry(&ttl, &attr, GENERATION),
                Err(error) => reply.error(error),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.nodes().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some((attr, ttl)) = self.core.nodes().fresh(ino.0) {
            return reply.attr(&ttl, &attr);
        }
        self.run(move |core| async move {
            match core.getattr(ino.0).await {
                Ok((attr, ttl)) => reply.attr(&ttl, &attr),
                Err(error) => reply.error(error),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.run(move |core| async move {
            match core
                .setattr(ino.0, mode, uid, gid, size, atime, mtime)
                .await
            {
                Ok((attr, ttl)) => reply.attr(&ttl, &attr),
                Err(error) => reply.error(error),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run(move |core| async move {
            let target = async {
                let path = core.nodes().path(ino.0)?;
                core.conn().await?.readlink(&path).await
            };
            match target.await {
                Ok(target) => reply.data(target.as_bytes()),
                Err(error) => reply.error(error),
            }
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = match utf8(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            let result = core.mknod(parent.0, &name, mode, umask).await;
            reply_entry(reply, result, core.ttl);
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match utf8(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            let result = core.mkdir(parent.0, &name, mode, umask).await;
            reply_entry(reply, result, core.ttl);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            reply_empty(reply, core.unlink(parent.0, &name).await);
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            reply_empty(reply, core.rmdir(parent.0, &name).await);
        });
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = match (utf8(link_name), utf8(target.as_os_str())) {
            (Ok(name), Ok(target)) => (name, target),
            (Err(error), _) | (_, Err(error)) => return reply.error(error),
        };
        self.run(move |core| async move {
            let result = core.symlink(parent.0, &name, &target).await;
            reply_entry(reply, result, core.ttl);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, new_name) = match (utf8(name), utf8(newname)) {
            (Ok(name), Ok(new_name)) => (name, new_name),
            (Err(error), _) | (_, Err(error)) => return reply.error(error),
        };
        self.run(move |core| async move {
            let result = core
                .rename(parent.0, &name, newparent.0, &new_name, flags)
                .await;
            reply_empty(reply, result);
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let name = match utf8(newname) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            let result = core.link(ino.0, newparent.0, &name).await;
            reply_entry(reply, result, core.ttl);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.run(move |core| async move {
            match core.open(ino.0, flags).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(error) => reply.error(error),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.core.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        self.run(move |core| async move {
            match core.read(&file, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(error) => reply.error(error),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(file) = self.core.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let end = offset + data.len() as u64;
        self.core.nodes().update(ino.0, |attr| {
            attr.size = attr.size.max(end);
            attr.mtime = SystemTime::now();
            attr.ctime = attr.mtime;
        });
        // Buffered and sent from here, in the kernel's order.
        let _runtime = self.core.runtime.enter();
        file.write(offset, data, reply, &self.core.tasks);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let Some(file) = self.core.file(fh).filter(|file| file.writable) else {
            return reply.ok();
        };
        self.run(move |core| async move {
            reply_empty(reply, file.data.flush(&core.tasks).await);
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.run(move |core| async move {
            reply_empty(reply, core.release(fh).await);
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(file) = self.core.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        self.run(move |core| async move {
            reply_empty(reply, core.fsync(&file).await);
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run(move |core| async move {
            match core.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(error) => reply.error(error),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = lock(&self.core.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, entry) in entries.iter().enumerate().skip(start) {
            if reply.add(
                entry.attr.ino,
                index as u64 + 1,
                entry.attr.kind,
                &*entry.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = lock(&self.core.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let ttl = self.core.ttl;
        let mut nodes = self.core.nodes();
        for (index, entry) in entries.iter().enumerate().skip(start) {
            let full = reply.add(
                entry.attr.ino,
                index as u64 + 1,
                &*entry.name,
                &ttl,
                &entry.attr,
                GENERATION,
            );
            if full {
                break;
            }
            // The kernel counts lookups for all but `.` and `..`.
            if index >= 2 {
                nodes.looked_up(entry.attr.ino.0);
            }
        }
        drop(nodes);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.core.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are made on the server as they happen.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(move |core| async move {
            match core.statfs().await {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                ),
                Err(error) => reply.error(error),
            }
        });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let uid = req.uid();
        self.run(move |core| async move {
            reply_empty(reply, core.access(ino.0, mask, uid).await);
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match utf8(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        self.run(move |core| async move {
            match core.create(parent.0, &name, mode, umask, flags).await {
                Ok((attr, fh)) => {
                    reply.created(
                        &core.ttl,
                        &attr,
                        GENERATION,
                        FileHandle(fh),
                        FopenFlags::empty(),
                    );
                }
                Err(error) => reply.error(error),
            }
        });
    }
}
