//! The SFTP subsystem (protocol version 3, with OpenSSH's extensions), over
//! the workspace as [`Root`] maps it.
//!
//! russh-sftp provides the packet types; the request loop is ours so that
//! requests run concurrently: reads and lookups (READ, STAT, LSTAT, FSTAT,
//! READLINK, REALPATH) run side by side, up to [`MAX_IN_FLIGHT`], while any
//! other request waits for those before it and holds back those after it, so a
//! client sees every change in the order it asked for it. Replies go out in
//! request order. Open files stay open in a handle table and are read and
//! written at offsets (`pread`/`pwrite`).
//!
//! Quick requests, those about the workspace's own disk, are answered on the
//! loop's thread: they take microseconds, and a hop to a blocking thread would
//! cost more than the call. Requests about `data/` (where datasets are mounted,
//! over the network) or outside the workspace go to blocking threads, so a slow
//! mount holds up nothing else; so do large writes, which the kernel may hold
//! up to write back dirty pages, while the thread goes on decrypting the next.

use std::{
    collections::HashMap,
    fs::{self, File, FileTimes, Metadata, OpenOptions, Permissions},
    io::{self, Read as _},
    os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, UNIX_EPOCH},
};

use bytes::Bytes;
use russh::{Channel, server::Msg};
use russh_sftp::{
    extensions::{
        self, FsyncExtension, HardlinkExtension, LimitsExtension, Statvfs, StatvfsExtension,
    },
    protocol::{
        Attrs, Close, Extended, ExtendedReply, FSetStat, File as Entry, FileAttributes, Fstat,
        Handle, Lstat, MkDir, Name, Open, OpenDir, OpenFlags, Packet, Read, ReadDir, ReadLink,
        RealPath, Remove, Rename, RmDir, SetStat, Stat, StatusCode, Symlink, Version, Write,
    },
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::{RwLock, mpsc},
    task::JoinHandle,
};

use super::root::{Root, outside};

/// Requests answered at the same time (and replies queued), at most.
const MAX_IN_FLIGHT: usize = 64;
/// The largest WRITE a client may send (advertised): 1 MiB, as FUSE hands
/// writes over, so a large upload takes a quarter of the requests (and of the
/// replies, each a trip back through the tunnel) that 255 KiB ones would.
const MAX_WRITE: u32 = 1024 * 1024;
/// The largest request packet accepted: a WRITE of `MAX_WRITE` and its header.
const MAX_PACKET: u32 = MAX_WRITE + 1024;
/// The most a READ returns (advertised): OpenSSH's figure, which keeps the
/// first bytes of a sequential read coming back early.
const MAX_READ: u32 = 255 * 1024;
/// Open files and directories per session, at most.
const MAX_HANDLES: usize = 4096;
/// Directory entries per READDIR reply.
const READDIR_BATCH: usize = 128;

/// Writes up to this size are quick (see the module docs).
const QUICK_WRITE: usize = 64 * 1024;
/// How the handles of files and directories outside the workspace's own
/// disk begin.
const REMOTE_HANDLE: &str = "r";

const POSIX_RENAME: &str = "posix-rename@openssh.com";
/// OPEN (read-only) and the first READ in one round trip, with the file's
/// attributes: all a FUSE client needs to open a file and answer its first
/// read. Request: string path, uint32 len. Reply (EXTENDED_REPLY): string
/// handle, ATTRS, string data (up to len bytes from offset 0; fewer only at
/// the end of the file). gractl's workspace sync uses it when offered.
const OPEN_READ: &str = "open-read@grad.dev";
const FSTATVFS: &str = "fstatvfs@openssh.com";

/// Serves SFTP on `channel` until the client ends it, then closes it.
pub(super) async fn run(channel: Channel<Msg>, root: Arc<Root>) {
    let (mut reader, writer) = channel.split();
    let (replies, mut outbox) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let send = async move {
        while let Some(reply) = outbox.recv().await {
            let bytes = match reply {
                Reply::Now(bytes) => bytes,
                Reply::Later(id, task) => task.await.unwrap_or_else(|e| internal_error(id, &e)),
            };
            if writer.data_bytes(bytes).await.is_err() {
                break;
            }
        }
        // As sshd reports sftp-server's exit: clients such as scp count a
        // session that ends without a status as failed.
        let _ = writer.eof().await;
        let _ = writer.exit_status(0).await;
        let _ = writer.close().await;
    };
    let fs = Arc::new(Fs {
        root,
        handles: Mutex::new(Handles::default()),
    });
    tokio::join!(serve(reader.make_reader(), fs, replies), send);
}

/// A reply, queued in request order. Requests run concurrently but are
/// answered in turn: OpenSSH's sftp and scp take a READ reply that overtakes
/// an earlier one as a gap and truncate the download there.
enum Reply {
    Now(Bytes),
    Later(u32, JoinHandle<Bytes>),
}

async fn serve(mut input: impl AsyncRead + Unpin, fs: Arc<Fs>, replies: mpsc::Sender<Reply>) {
    // Concurrent requests hold it shared until they are done, the others
    // exclusively.
    let order = Arc::new(RwLock::new(()));
    loop {
        let mut packet = match read_packet(&mut input).await {
            Ok(packet) => packet,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    tracing::debug!(error = %e, "sftp: reading a request");
                }
                break;
            }
        };
        let id = packet
            .get(1..5)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes);
        let reply = match Packet::try_from(&mut packet) {
            Err(e) => {
                tracing::debug!(error = %e, "sftp: a request that does not parse");
                Reply::Now(status(id, StatusCode::BadMessage, "bad message"))
            }
            Ok(request) if !fs.is_quick(&request) => {
                if runs_concurrently(&request) {
                    let turn = Arc::clone(&order).read_owned().await;
                    let fs = Arc::clone(&fs);
                    Reply::Later(
                        id,
                        tokio::task::spawn_blocking(move || {
                            let reply = fs.answer(request);
                            drop(turn);
                            reply
                        }),
                    )
                } else {
                    let _turn = order.write().await;
                    let fs = Arc::clone(&fs);
                    let reply = tokio::task::spawn_blocking(move || fs.answer(request)).await;
                    Reply::Now(reply.unwrap_or_else(|e| internal_error(id, &e)))
                }
            }
            Ok(request) => {
                // After the slow requests before it, unless neither changes
                // anything.
                let _turn = if runs_concurrently(&request) {
                    None
                } else {
                    Some(order.write().await)
                };
                Reply::Now(fs.answer(request))
            }
        };
        // Bounded: at most MAX_IN_FLIGHT replies wait to be sent.
        if replies.send(reply).await.is_err() {
            break;
        }
    }
}

fn internal_error(id: u32, e: &tokio::task::JoinError) -> Bytes {
    tracing::warn!(error = %e, "sftp: a request's task failed");
    status(id, StatusCode::Failure, "internal error")
}

/// Requests that change nothing, so their order among themselves can't
/// matter.
fn runs_concurrently(request: &Packet) -> bool {
    matches!(
        request,
        Packet::Read(_)
            | Packet::Stat(_)
            | Packet::Lstat(_)
            | Packet::Fstat(_)
            | Packet::ReadLink(_)
            | Packet::RealPath(_)
    )
}

async fn read_packet(input: &mut (impl AsyncRead + Unpin)) -> io::Result<Bytes> {
    let len = input.read_u32().await?;
    if len == 0 || len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request of {len} bytes"),
        ));
    }
    let mut buf = vec![0; len as usize];
    input.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}

/// Why a request failed, as the client will be told.
enum Fail {
    Eof,
    BadHandle,
    Unsupported,
    Io(io::Error),
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail::Io(e)
    }
}

type Answer = Result<Packet, Fail>;

#[derive(serde::Deserialize)]
struct OpenRead {
    path: String,
    len: u32,
}

/// The reply to [`OPEN_READ`] before its data.
#[derive(serde::Serialize)]
struct OpenReadReply {
    handle: String,
    attrs: FileAttributes,
}

/// What a handle names.
enum Opened {
    File(Arc<File>),
    Dir(Arc<Mutex<fs::ReadDir>>),
}

#[derive(Default)]
struct Handles {
    next: u64,
    open: HashMap<String, Opened>,
}

struct Fs {
    root: Arc<Root>,
    handles: Mutex<Handles>,
}

/// The operations.
impl Fs {
    fn answer(&self, request: Packet) -> Bytes {
        let id = request.get_request_id();
        let answer = match request {
            Packet::Init(_) => Ok(Packet::Version(version())),
            Packet::Read(read) => return self.read(read).unwrap_or_else(|f| fail(id, f)),
            Packet::Write(write) => self.write(write),
            Packet::Open(open) => self.open(open),
            Packet::Close(close) => self.close(close),
            Packet::Fstat(fstat) => self.fstat(fstat),
            Packet::FSetStat(fsetstat) => self.fsetstat(fsetstat),
            Packet::Stat(Stat { id, path }) => self.stat(id, &path, true),
            Packet::Lstat(Lstat { id, path }) => self.stat(id, &path, false),
            Packet::SetStat(setstat) => self.setstat(setstat),
            Packet::OpenDir(opendir) => self.opendir(opendir),
            Packet::ReadDir(readdir) => self.readdir(readdir),
            Packet::Remove(remove) => self.remove(remove),
            Packet::MkDir(mkdir) => self.mkdir(mkdir),
            Packet::RmDir(rmdir) => self.rmdir(rmdir),
            Packet::RealPath(realpath) => self.realpath(realpath),
            Packet::Rename(Rename {
                id,
                oldpath,
                newpath,
            }) => self.rename(id, &oldpath, &newpath),
            Packet::ReadLink(readlink) => self.readlink(readlink),
            Packet::Symlink(symlink) => self.symlink(symlink),
            Packet::Extended(extended) => self.extended(extended),
            _ => Err(Fail::Unsupported),
        };
        match answer {
            Ok(packet) => encode(packet, id),
            Err(f) => fail(id, f),
        }
    }

    /// Whether `request` is answered on the loop's thread (see the module
    /// docs). A handle says where it was opened: those of remote paths start
    /// with [`REMOTE_HANDLE`].
    fn is_quick(&self, request: &Packet) -> bool {
        let handle = |handle: &str| !handle.starts_with(REMOTE_HANDLE);
        let path = |path: &str| self.root.is_local(path);
        match request {
            Packet::Write(Write { data, .. }) if data.len() > QUICK_WRITE => false,
            Packet::Read(Read { handle: h, .. })
            | Packet::Write(Write { handle: h, .. })
            | Packet::Fstat(Fstat { handle: h, .. })
            | Packet::FSetStat(FSetStat { handle: h, .. })
            | Packet::Close(Close { handle: h, .. })
            | Packet::ReadDir(ReadDir { handle: h, .. }) => handle(h),
            Packet::Open(Open { filename: p, .. })
            | Packet::Stat(Stat { path: p, .. })
            | Packet::Lstat(Lstat { path: p, .. })
            | Packet::SetStat(SetStat { path: p, .. })
            | Packet::OpenDir(OpenDir { path: p, .. })
            | Packet::Remove(Remove { filename: p, .. })
            | Packet::MkDir(MkDir { path: p, .. })
            | Packet::RmDir(RmDir { path: p, .. })
            | Packet::RealPath(RealPath { path: p, .. })
            | Packet::ReadLink(ReadLink { path: p, .. }) => path(p),
            Packet::Rename(Rename {
                oldpath, newpath, ..
            }) => path(oldpath) && path(newpath),
            Packet::Symlink(Symlink { targetpath, .. }) => path(targetpath),
            Packet::Extended(Extended { request, data, .. }) if request == OPEN_READ => {
                first_string(data).is_some_and(path)
            }
            Packet::Init(_) => true,
            // Other extensions name paths and handles in their own encodings.
            _ => false,
        }
    }

    fn insert(&self, open: Opened, local: bool) -> Result<String, Fail> {
        let mut handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        if handles.open.len() >= MAX_HANDLES {
            return Err(Fail::Io(io::Error::other("too many open handles")));
        }
        let handle = if local {
            handles.next.to_string()
        } else {
            format!("{REMOTE_HANDLE}{}", handles.next)
        };
        handles.next += 1;
        handles.open.insert(handle.clone(), open);
        Ok(handle)
    }

    fn file(&self, handle: &str) -> Result<Arc<File>, Fail> {
        let handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        match handles.open.get(handle) {
            Some(Opened::File(file)) => Ok(Arc::clone(file)),
            _ => Err(Fail::BadHandle),
        }
    }

    fn dir(&self, handle: &str) -> Result<Arc<Mutex<fs::ReadDir>>, Fail> {
        let handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        match handles.open.get(handle) {
            Some(Opened::Dir(dir)) => Ok(Arc::clone(dir)),
            _ => Err(Fail::BadHandle),
        }
    }

    /// A DATA reply, encoded here so the file is read straight into it.
    fn read(
        &self,
        Read {
            id,
            handle,
            offset,
            len,
        }: Read,
    ) -> Result<Bytes, Fail> {
        const HEADER: usize = 13;
        let file = self.file(&handle)?;
        let len = len.min(MAX_READ);
        let mut buf = vec![0; HEADER + len as usize];
        let n = read_at(&file, &mut buf[HEADER..], offset)?;
        if n == 0 {
            return Err(Fail::Eof);
        }
        buf.truncate(HEADER + n);
        let n = u32::try_from(n).unwrap_or(len); // n <= len
        buf[0..4].copy_from_slice(&(9 + n).to_be_bytes());
        buf[4] = SSH_FXP_DATA;
        buf[5..9].copy_from_slice(&id.to_be_bytes());
        buf[9..13].copy_from_slice(&n.to_be_bytes());
        Ok(Bytes::from(buf))
    }

    fn write(&self, write: Write) -> Answer {
        self.file(&write.handle)?
            .write_all_at(&write.data, write.offset)?;
        Ok(ok(write.id))
    }

    fn open(&self, open: Open) -> Answer {
        let Open {
            id,
            filename,
            pflags,
            attrs,
        } = open;
        let path = self.root.resolve(&filename)?;
        let writes = pflags.intersects(OpenFlags::WRITE | OpenFlags::APPEND);
        let mut options = OpenOptions::new();
        options
            .read(pflags.contains(OpenFlags::READ) || !writes)
            .write(pflags.contains(OpenFlags::WRITE))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(attrs.permissions.map_or(0o666, |mode| mode & 0o7777))
            // The path was resolved without symlinks; one swapped in since is
            // refused rather than followed.
            .custom_flags(libc::O_NOFOLLOW);
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        let file = options.open(path)?;
        let local = self.root.is_local(&filename);
        let handle = self.insert(Opened::File(Arc::new(file)), local)?;
        Ok(Packet::Handle(Handle { id, handle }))
    }

    /// See [`OPEN_READ`].
    fn open_read(&self, id: u32, OpenRead { path, len }: OpenRead) -> Answer {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.root.resolve(&path)?)?;
        let meta = file.metadata()?;
        let len = len.min(MAX_READ);
        // Sized by the file, but read to `len` whatever it says: files such
        // as those of /proc report a size of 0.
        let mut data = Vec::with_capacity(meta.size().min(u64::from(len)) as usize);
        (&file).take(u64::from(len)).read_to_end(&mut data)?;
        let local = self.root.is_local(&path);
        let handle = self.insert(Opened::File(Arc::new(file)), local)?;
        let mut reply = russh_sftp::ser::to_bytes(&OpenReadReply {
            handle,
            attrs: attributes(&meta),
        })
        .map_err(|e| Fail::Io(io::Error::other(e)))?
        .to_vec();
        reply.reserve(4 + data.len());
        reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
        reply.extend_from_slice(&data);
        Ok(Packet::ExtendedReply(ExtendedReply { id, data: reply }))
    }

    fn close(&self, Close { id, handle }: Close) -> Answer {
        let closed = self
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(&handle);
        // Dropped (closed) here, outside the lock.
        match closed {
            Some(_) => Ok(ok(id)),
            None => Err(Fail::BadHandle),
        }
    }

    fn fstat(&self, Fstat { id, handle }: Fstat) -> Answer {
        let meta = self.file(&handle)?.metadata()?;
        Ok(Packet::Attrs(Attrs {
            id,
            attrs: attributes(&meta),
        }))
    }

    fn fsetstat(&self, FSetStat { id, handle, attrs }: FSetStat) -> Answer {
        let file = self.file(&handle)?;
        if let Some(size) = attrs.size {
            file.set_len(size)?;
        }
        if let Some(mode) = attrs.permissions {
            file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
        }
        if attrs.uid.is_some() || attrs.gid.is_some() {
            std::os::unix::fs::fchown(&*file, attrs.uid, attrs.gid)?;
        }
        if attrs.atime.is_some() || attrs.mtime.is_some() {
            let (atime, mtime) = times(&attrs, &file.metadata()?);
            file.set_times(
                FileTimes::new()
                    .set_accessed(UNIX_EPOCH + Duration::from_secs(atime))
                    .set_modified(UNIX_EPOCH + Duration::from_secs(mtime)),
            )?;
        }
        Ok(ok(id))
    }

    fn stat(&self, id: u32, path: &str, follow: bool) -> Answer {
        let meta = if follow {
            fs::metadata(self.root.resolve(path)?)?
        } else {
            fs::symlink_metadata(self.root.resolve_entry(path)?)?
        };
        Ok(Packet::Attrs(Attrs {
            id,
            attrs: attributes(&meta),
        }))
    }

    fn setstat(&self, SetStat { id, path, attrs }: SetStat) -> Answer {
        let path = self.root.resolve(&path)?;
        if let Some(size) = attrs.size {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?
                .set_len(size)?;
        }
        if let Some(mode) = attrs.permissions {
            fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777))?;
        }
        if attrs.uid.is_some() || attrs.gid.is_some() {
            std::os::unix::fs::chown(&path, attrs.uid, attrs.gid)?;
        }
        if attrs.atime.is_some() || attrs.mtime.is_some() {
            let (atime, mtime) = times(&attrs, &fs::metadata(&path)?);
            set_path_times(&path, atime, mtime)?;
        }
        Ok(ok(id))
    }

    fn opendir(&self, OpenDir { id, path }: OpenDir) -> Answer {
        let listing = fs::read_dir(self.root.resolve(&path)?)?;
        let local = self.root.is_local(&path);
        let handle = self.insert(Opened::Dir(Arc::new(Mutex::new(listing))), local)?;
        Ok(Packet::Handle(Handle { id, handle }))
    }

    fn readdir(&self, ReadDir { id, handle }: ReadDir) -> Answer {
        let dir = self.dir(&handle)?;
        let mut listing = dir.lock().unwrap_or_else(PoisonError::into_inner);
        let mut files = Vec::new();
        for entry in listing.by_ref() {
            let entry = entry?;
            // Gone since it was listed: leave it out.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            files.push(entry_for(
                entry.file_name().to_string_lossy().into_owned(),
                &meta,
            ));
            if files.len() == READDIR_BATCH {
                break;
            }
        }
        if files.is_empty() {
            return Err(Fail::Eof);
        }
        Ok(Packet::Name(Name { id, files }))
    }

    fn remove(&self, Remove { id, filename }: Remove) -> Answer {
        let path = self.root.resolve_entry(&filename)?;
        if self.root.is_base(&path) {
            return Err(outside().into());
        }
        fs::remove_file(path)?;
        Ok(ok(id))
    }

    fn mkdir(&self, MkDir { id, path, attrs }: MkDir) -> Answer {
        fs::DirBuilder::new()
            .mode(attrs.permissions.map_or(0o777, |mode| mode & 0o7777))
            .create(self.root.resolve_entry(&path)?)?;
        Ok(ok(id))
    }

    fn rmdir(&self, RmDir { id, path }: RmDir) -> Answer {
        let path = self.root.resolve_entry(&path)?;
        if self.root.is_base(&path) {
            return Err(outside().into());
        }
        fs::remove_dir(path)?;
        Ok(ok(id))
    }

    /// The canonical name of a path as the client sees it; a path that doesn't
    /// exist yet (but whose directory does) is normalised as written.
    fn realpath(&self, RealPath { id, path }: RealPath) -> Answer {
        let real = match self.root.resolve(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.root.resolve_entry(&path)?,
            resolved => resolved?,
        };
        Ok(name(id, self.root.client_path(&real)))
    }

    /// POSIX rename: an existing target is replaced, as with
    /// `posix-rename@openssh.com` (which FUSE needs and OpenSSH's sftp uses).
    fn rename(&self, id: u32, from: &str, to: &str) -> Answer {
        let from = self.root.resolve_entry(from)?;
        let to = self.root.resolve_entry(to)?;
        if self.root.is_base(&from) || self.root.is_base(&to) {
            return Err(outside().into());
        }
        fs::rename(from, to)?;
        Ok(ok(id))
    }

    fn readlink(&self, ReadLink { id, path }: ReadLink) -> Answer {
        let target = fs::read_link(self.root.resolve_entry(&path)?)?;
        Ok(name(id, self.root.link_target_to_client(&target)))
    }

    /// SSH_FXP_SYMLINK with its arguments in OpenSSH's order, target first
    /// and then the link to create, which every common client follows (the
    /// draft's order is the reverse; russh-sftp names the fields after it).
    fn symlink(&self, symlink: Symlink) -> Answer {
        let Symlink {
            id,
            linkpath: target,
            targetpath: link,
        } = symlink;
        let link = self.root.resolve_entry(&link)?;
        std::os::unix::fs::symlink(self.root.link_target_to_disk(&target), link)?;
        Ok(ok(id))
    }

    fn extended(&self, Extended { id, request, data }: Extended) -> Answer {
        fn parse<T: serde::de::DeserializeOwned>(data: Vec<u8>) -> Result<T, Fail> {
            russh_sftp::de::from_bytes(&mut Bytes::from(data))
                .map_err(|e| Fail::Io(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))
        }
        match request.as_str() {
            POSIX_RENAME => {
                let paths: HardlinkExtension = parse(data)?;
                self.rename(id, &paths.oldpath, &paths.newpath)
            }
            OPEN_READ => self.open_read(id, parse(data)?),
            extensions::HARDLINK => {
                let paths: HardlinkExtension = parse(data)?;
                fs::hard_link(
                    self.root.resolve_entry(&paths.oldpath)?,
                    self.root.resolve_entry(&paths.newpath)?,
                )?;
                Ok(ok(id))
            }
            extensions::FSYNC => {
                let FsyncExtension { handle } = parse(data)?;
                self.file(&handle)?.sync_all()?;
                Ok(ok(id))
            }
            extensions::STATVFS => {
                let StatvfsExtension { path } = parse(data)?;
                let stat =
                    rustix::fs::statvfs(&self.root.resolve(&path)?).map_err(io::Error::from)?;
                extended_reply(id, &statvfs(&stat))
            }
            FSTATVFS => {
                let FsyncExtension { handle } = parse(data)?;
                let stat = rustix::fs::fstatvfs(&*self.file(&handle)?).map_err(io::Error::from)?;
                extended_reply(id, &statvfs(&stat))
            }
            extensions::LIMITS => extended_reply(
                id,
                &LimitsExtension {
                    max_packet_len: MAX_PACKET.into(),
                    max_read_len: MAX_READ.into(),
                    max_write_len: MAX_WRITE.into(),
                    max_open_handles: MAX_HANDLES as u64,
                },
            ),
            _ => Err(Fail::Unsupported),
        }
    }
}

/// A NAME reply with one name (REALPATH, READLINK).
fn name(id: u32, name: String) -> Packet {
    Packet::Name(Name {
        id,
        files: vec![Entry {
            filename: name.clone(),
            longname: name,
            attrs: FileAttributes::empty(),
        }],
    })
}

const SSH_FXP_DATA: u8 = 103;
const SSH_FXP_STATUS: u8 = 101;

fn version() -> Version {
    let mut version = Version::new();
    for (name, revision) in [
        (POSIX_RENAME, "1"),
        (extensions::STATVFS, "2"),
        (FSTATVFS, "2"),
        (extensions::HARDLINK, "1"),
        (extensions::FSYNC, "1"),
        (extensions::LIMITS, "1"),
        (OPEN_READ, "1"),
    ] {
        version.extensions.insert(name.into(), revision.into());
    }
    version
}

fn ok(id: u32) -> Packet {
    Packet::Status(russh_sftp::protocol::Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Success".into(),
        language_tag: "en".into(),
    })
}

fn extended_reply<T: serde::Serialize>(id: u32, value: &T) -> Answer {
    let data = russh_sftp::ser::to_bytes(value).map_err(|e| Fail::Io(io::Error::other(e)))?;
    Ok(Packet::ExtendedReply(ExtendedReply {
        id,
        data: data.to_vec(),
    }))
}

fn encode(packet: Packet, id: u32) -> Bytes {
    Bytes::try_from(packet).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "sftp: encoding a reply");
        status(id, StatusCode::Failure, "encoding the reply failed")
    })
}

fn fail(id: u32, fail: Fail) -> Bytes {
    match fail {
        Fail::Eof => status(id, StatusCode::Eof, "end of file"),
        Fail::BadHandle => status(id, StatusCode::Failure, "no such handle"),
        Fail::Unsupported => status(id, StatusCode::OpUnsupported, "operation unsupported"),
        Fail::Io(e) => {
            let code = match e.kind() {
                io::ErrorKind::NotFound => StatusCode::NoSuchFile,
                io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
                _ => StatusCode::Failure,
            };
            status(id, code, &e.to_string())
        }
    }
}

/// A STATUS reply, encoded by hand: it can't fail.
fn status(id: u32, code: StatusCode, message: &str) -> Bytes {
    const LANGUAGE: &[u8] = b"en";
    let message = message.as_bytes();
    let len = 1 + 4 + 4 + 4 + message.len() + 4 + LANGUAGE.len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.push(SSH_FXP_STATUS);
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(&(code as u32).to_be_bytes());
    buf.extend_from_slice(&(message.len() as u32).to_be_bytes());
    buf.extend_from_slice(message);
    buf.extend_from_slice(&(LANGUAGE.len() as u32).to_be_bytes());
    buf.extend_from_slice(LANGUAGE);
    Bytes::from(buf)
}

/// Reads until `buf` is full or the file ends.
/// The string an extension request's data starts with.
fn first_string(data: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(data.get(4..4usize.checked_add(len)?)?).ok()
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn seconds(t: i64) -> u32 {
    u32::try_from(t).unwrap_or(if t < 0 { 0 } else { u32::MAX })
}

fn attributes(meta: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(meta.size()),
        uid: Some(meta.uid()),
        user: None,
        gid: Some(meta.gid()),
        group: None,
        permissions: Some(meta.mode()),
        atime: Some(seconds(meta.atime())),
        mtime: Some(seconds(meta.mtime())),
    }
}

/// A directory entry with an `ls -l` style long name.
fn entry_for(name: String, meta: &Metadata) -> Entry {
    let mut entry = Entry::new(name, attributes(meta));
    // russh-sftp's long name knows only directories and files.
    let kind = meta.file_type();
    let letter = if kind.is_symlink() {
        'l'
    } else if kind.is_dir() {
        'd'
    } else if kind.is_file() {
        '-'
    } else {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            'p'
        } else if kind.is_socket() {
            's'
        } else if kind.is_char_device() {
            'c'
        } else {
            'b'
        }
    };
    entry
        .longname
        .replace_range(..1, letter.encode_utf8(&mut [0; 4]));
    entry
}

/// The access and modification times to set, the missing one kept.
fn times(attrs: &FileAttributes, meta: &Metadata) -> (u64, u64) {
    let keep = |t: i64| u64::try_from(t).unwrap_or(0);
    (
        attrs.atime.map_or_else(|| keep(meta.atime()), u64::from),
        attrs.mtime.map_or_else(|| keep(meta.mtime()), u64::from),
    )
}

fn set_path_times(path: &Path, atime: u64, mtime: u64) -> io::Result<()> {
    use rustix::fs::{AtFlags, CWD, Timestamps, utimensat};
    let at = |secs: u64| rustix::fs::Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: at(atime),
        last_modification: at(mtime),
    };
    utimensat(CWD, path, &times, AtFlags::empty())?;
    Ok(())
}

fn statvfs(stat: &rustix::fs::StatVfs) -> Statvfs {
    use rustix::fs::StatVfsMountFlags;
    // OpenSSH's SSH2_FXE_STATVFS_ST_RDONLY and _ST_NOSUID.
    let mut flags = 0;
    if stat.f_flag.contains(StatVfsMountFlags::RDONLY) {
        flags |= 1;
    }
    if stat.f_flag.contains(StatVfsMountFlags::NOSUID) {
        flags |= 2;
    }
    Statvfs {
        block_size: stat.f_bsize,
        fragment_size: stat.f_frsize,
        blocks: stat.f_blocks,
        blocks_free: stat.f_bfree,
        blocks_avail: stat.f_bavail,
        inodes: stat.f_files,
        inodes_free: stat.f_ffree,
        inodes_avail: stat.f_favail,
        fs_id: stat.f_fsid,
        flags,
        name_max: stat.f_namemax,
    }
}
