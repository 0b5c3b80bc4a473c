//! The SFTP side of a mount: one connection at a time, replaced with backoff
//! when it breaks, every request bounded by a timeout and answered as an
//! errno.
//!
//! Requests are pipelined: any number may be in flight on the connection.
//! Where order matters (a write before the read of the same bytes, a create
//! before the stat of the new file) the caller sends them in that order with
//! [`start`]; SFTP servers process requests about one file in the order they
//! arrive (draft-ietf-secsh-filexfer-02, 6.1), and OpenSSH's and russh-sftp's
//! servers process every request in order.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use fuser::Errno;
use russh_sftp::{
    client::{Config, RawSftpSession, error::Error as SftpError},
    protocol::{FileAttributes, OpenFlags, Packet, StatusCode},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Error, file::lock};

/// A byte stream that speaks SFTP: an SSH channel running the `sftp`
/// subsystem, or the pipes of an `sftp-server` process.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Any error a [`Connect`] closure reports; it is logged and retried.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future a [`Connect`] closure returns.
pub type Connecting = Pin<Box<dyn Future<Output = Result<Box<dyn Stream>, BoxError>> + Send>>;

/// Opens a fresh SFTP stream to the remote side; called once at mount time
/// and again after the connection breaks. Build one with [`connect_with`].
pub type Connect = Arc<dyn Fn() -> Connecting + Send + Sync>;

/// Wraps an async closure returning any [`Stream`] as a [`Connect`].
pub fn connect_with<F, Fut, S, E>(connect: F) -> Connect
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, E>> + Send + 'static,
    S: Stream,
    E: Into<BoxError>,
{
    Arc::new(move || {
        let connecting = connect();
        Box::pin(async move {
            connecting
                .await
                .map(|stream| Box::new(stream) as Box<dyn Stream>)
                .map_err(Into::into)
        })
    })
}

/// Largest SFTP packet accepted from the server: generous, since it only
/// bounds a buffer allocated per packet.
const MAX_PACKET: u32 = 16 << 20;
/// Read and write size when the server does not say (`limits@openssh.com`):
/// OpenSSH's own limit, which russh-sftp's 256 KiB packet ceiling also fits.
const DEFAULT_IO_LEN: u32 = 256 * 1024 - 1024;
/// Largest read or write we send even if the server allows more.
const MAX_IO_LEN: u32 = 1 << 20;
/// Open SFTP handles per connection. OpenSSH encodes a handle as a 32-bit
/// index; russh-sftp reads handles as UTF-8, so indices from 128 up would
/// come back mangled. OpenSSH reuses the lowest free ones, so staying below
/// 128 open at once keeps every handle intact.
const MAX_HANDLES: usize = 120;
/// First and longest wait between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a request waits for a new connection while the outage is
/// younger than `OUTAGE`, and after.
const FRESH_WAIT: Duration = Duration::from_secs(5);
const OUTAGE: Duration = Duration::from_secs(10);
const OUTAGE_WAIT: Duration = Duration::from_secs(1);
/// An idle connection is checked this often.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Polls `future` once, inside the current runtime, so that the request it
/// makes is queued on the connection before the caller sends the next one.
pub(crate) fn start<F>(future: F) -> Started<F>
where
    F: Future,
    F::Output: Unpin,
{
    let mut future = Box::pin(future);
    let mut context = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut context) {
        Poll::Ready(output) => Started::Done(Some(output)),
        Poll::Pending => Started::Running(future),
    }
}

/// A request already sent; await it for the answer.
pub(crate) enum Started<F: Future> {
    Done(Option<F::Output>),
    Running(Pin<Box<F>>),
}

impl<F> Future for Started<F>
where
    F: Future,
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        match self.get_mut() {
            Started::Done(output) => match output.take() {
                Some(output) => Poll::Ready(output),
                // Polled again after it finished: that is the caller's bug;
                // never finishing is the safe answer.
                None => Poll::Pending,
            },
            Started::Running(future) => future.as_mut().poll(context),
        }
    }
}

/// What the server supports beyond SFTP version 3.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Extensions {
    pub(crate) posix_rename: bool,
    pub(crate) statvfs: bool,
    pub(crate) fsync: bool,
    pub(crate) hardlink: bool,
    /// grad-runner's `open-read@grad.dev`: see [`Conn::open_read`].
    pub(crate) open_read: bool,
}

/// One SFTP connection. See the module docs.
pub(crate) struct Conn {
    raw: RawSftpSession,
    /// Counts connections of this mount: handles from an older one are void.
    pub(crate) generation: u64,
    pub(crate) read_len: u32,
    pub(crate) write_len: u32,
    pub(crate) extensions: Extensions,
    root: Arc<str>,
    timeout: Duration,
    handles: Arc<Semaphore>,
    /// Cancelled when the connection is found broken.
    lost: CancellationToken,
    tasks: TaskTracker,
}

impl Conn {
    async fn start(
        stream: Box<dyn Stream>,
        generation: u64,
        root: Arc<str>,
        timeout: Duration,
        tasks: TaskTracker,
    ) -> Result<Conn, SftpError> {
        let config = Config {
            max_packet_len: MAX_PACKET,
            request_timeout_secs: timeout.as_secs().max(1),
            ..Config::default()
        };
        let raw = RawSftpSession::new_with_config(stream, config);
        let version = raw.init().await?;
        let has = |name: &str, expected: &str| {
            version
                .extensions
                .get(name)
                .is_some_and(|value| value == expected)
        };
        let extensions = Extensions {
            posix_rename: has("posix-rename@openssh.com", "1"),
            statvfs: has("statvfs@openssh.com", "2"),
            fsync: has("fsync@openssh.com", "1"),
            hardlink: has("hardlink@openssh.com", "1"),
            open_read: has(OPEN_READ, "1"),
        };
        let (mut read_len, mut write_len) = (DEFAULT_IO_LEN, DEFAULT_IO_LEN);
        if has("limits@openssh.com", "1") {
            let limits = raw.limits().await?;
            let clamp = |value: u64| u32::try_from(value).unwrap_or(MAX_IO_LEN).min(MAX_IO_LEN);
            if limits.max_read_len > 0 {
                read_len = clamp(limits.max_read_len);
            }
            if limits.max_write_len > 0 {
                write_len = clamp(limits.max_write_len);
            }
        }
        Ok(Conn {
            raw,
            generation,
            read_len: read_len.max(4096),
            write_len: write_len.max(4096),
            extensions,
            root,
            timeout,
            handles: Arc::new(Semaphore::new(MAX_HANDLES)),
            lost: CancellationToken::new(),
            tasks,
        })
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// The server's path for `path` (relative to the mount's root; "" is the root).
    pub(crate) fn remote(&self, path: &str) -> String {
        match (self.root.as_ref(), path) {
            (root, "") => root.to_owned(),
            ("/", path) => format!("/{path}"),
            ("", path) => path.to_owned(),
            (root, path) => format!("{}/{path}", root.trim_end_matches('/')),
        }
    }

    /// The errno for a failed request. A failure of the connection itself
    /// (I/O, timeout, protocol) marks it lost so that it is replaced.
    fn errno(&self, error: SftpError) -> Errno {
        match error {
            SftpError::Status(status) => status_errno(status.status_code),
            SftpError::Limited(_) => Errno::EINVAL,
            error => {
                if !self.lost.is_cancelled() {
                    tracing::warn!(generation = self.generation, %error, "SFTP connection lost");
                    self.lost.cancel();
                }
                Errno::EIO
            }
        }
    }

    /// Runs one request with the mount's timeout on top of russh-sftp's own.
    async fn bounded<T>(
        &self,
        request: impl Future<Output = Result<T, SftpError>>,
    ) -> Result<T, Errno> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(|error| self.errno(error)),
            Err(_) => Err(self.errno(SftpError::Timeout)),
        }
    }

    pub(crate) async fn lstat(&self, path: &str) -> Result<FileAttributes, Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.lstat(path)).await.map(|a| a.attrs)
    }

    /// Opens `path`. The handle is closed when dropped.
    pub(crate) async fn open(
        self: &Arc<Self>,
        path: &str,
        flags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<RemoteHandle, Errno> {
        let path = self.remote(path);
        let permit = self.handle_permit().await?;
        let handle = self.bounded(self.raw.open(path, flags, attrs)).await?;
        Ok(RemoteHandle::new(self, handle.handle, permit))
    }

    /// Opens `path` for reading and reads up to `len` bytes from its start,
    /// in one round trip (`open-read@grad.dev`, grad-runner's extension;
    /// check [`Extensions::open_read`] first). Also returns the file's
    /// attributes as of the open. Fewer than `len` bytes means the end of
    /// the file.
    pub(crate) async fn open_read(
        self: &Arc<Self>,
        path: &str,
        len: u32,
    ) -> Result<(RemoteHandle, FileAttributes, Vec<u8>), Errno> {
        let mut request = Vec::new();
        put_string(&mut request, &self.remote(path))?;
        request.extend_from_slice(&len.to_be_bytes());
        let permit = self.handle_permit().await?;
        let reply = match self.bounded(self.raw.extended(OPEN_READ, request)).await? {
            Packet::ExtendedReply(reply) => reply.data,
            Packet::Status(status) => return Err(status_errno(status.status_code)),
            _ => return Err(Errno::EIO),
        };
        let mut reply = bytes::Bytes::from(reply);
        let OpenReadReply { handle, attrs } =
            russh_sftp::de::from_bytes(&mut reply).map_err(|_| Errno::EIO)?;
        let handle = RemoteHandle::new(self, handle, permit);
        let data = match reply.get(..4) {
            Some(prefix) => {
                let n = u32::from_be_bytes(prefix.try_into().map_err(|_| Errno::EIO)?) as usize;
                reply.get(4..4 + n).ok_or(Errno::EIO)?.to_vec()
            }
            None => return Err(Errno::EIO),
        };
        Ok((handle, attrs, data))
    }

    pub(crate) async fn opendir(self: &Arc<Self>, path: &str) -> Result<RemoteHandle, Errno> {
        let path = self.remote(path);
        let permit = self.handle_permit().await?;
        let handle = self.bounded(self.raw.opendir(path)).await?;
        Ok(RemoteHandle::new(self, handle.handle, permit))
    }

    async fn handle_permit(&self) -> Result<OwnedSemaphorePermit, Errno> {
        let acquire = Arc::clone(&self.handles).acquire_owned();
        match tokio::time::timeout(self.timeout, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            // Too many files open at once for too long.
            Ok(Err(_)) | Err(_) => Err(Errno::EMFILE),
        }
    }

    /// Reads up to `len` bytes; an empty answer means end of file.
    pub(crate) async fn read(&self, handle: &str, offset: u64, len: u32) -> Result<Vec<u8>, Errno> {
        match tokio::time::timeout(self.timeout, self.raw.read(handle, offset, len)).await {
            Ok(Ok(data)) => Ok(data.data),
            Ok(Err(SftpError::Status(status))) if status.status_code == StatusCode::Eof => {
                Ok(Vec::new())
            }
            Ok(Err(error)) => Err(self.errno(error)),
            Err(_) => Err(self.errno(SftpError::Timeout)),
        }
    }

    pub(crate) async fn write(
        &self,
        handle: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), Errno> {
        self.bounded(self.raw.write(handle, offset, data))
            .await
            .map(drop)
    }

    /// One batch of directory entries; `None` at the end.
    pub(crate) async fn readdir(
        &self,
        handle: &str,
    ) -> Result<Option<Vec<(String, FileAttributes)>>, Errno> {
        match tokio::time::timeout(self.timeout, self.raw.readdir(handle)).await {
            Ok(Ok(name)) => Ok(Some(
                name.files
                    .into_iter()
                    .map(|file| (file.filename, file.attrs))
                    .collect(),
            )),
            Ok(Err(SftpError::Status(status))) if status.status_code == StatusCode::Eof => Ok(None),
            Ok(Err(error)) => Err(self.errno(error)),
            Err(_) => Err(self.errno(SftpError::Timeout)),
        }
    }

    pub(crate) async fn setstat(&self, path: &str, attrs: FileAttributes) -> Result<(), Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.setstat(path, attrs)).await.map(drop)
    }

    pub(crate) async fn mkdir(&self, path: &str, attrs: FileAttributes) -> Result<(), Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.mkdir(path, attrs)).await.map(drop)
    }

    pub(crate) async fn rmdir(&self, path: &str) -> Result<(), Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.rmdir(path)).await.map(drop)
    }

    pub(crate) async fn remove(&self, path: &str) -> Result<(), Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.remove(path)).await.map(drop)
    }

    /// Plain SFTP rename: fails when `to` exists (on OpenSSH).
    pub(crate) async fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        let (from, to) = (self.remote(from), self.remote(to));
        self.bounded(self.raw.rename(from, to)).await.map(drop)
    }

    /// rename(2): replaces `to` atomically. Needs `posix-rename@openssh.com`.
    pub(crate) async fn posix_rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        let mut data = Vec::new();
        for path in [self.remote(from), self.remote(to)] {
            put_string(&mut data, &path)?;
        }
        let reply = self
            .bounded(self.raw.extended("posix-rename@openssh.com", data))
            .await?;
        status_of(reply)
    }

    /// Makes `path` a symbolic link to `target`. The arguments go in
    /// OpenSSH's order (target first), which OpenSSH's own clients use and
    /// other servers follow, though the draft names them the other way round.
    pub(crate) async fn symlink(&self, path: &str, target: &str) -> Result<(), Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.symlink(target.to_owned(), path))
            .await
            .map(drop)
    }

    pub(crate) async fn readlink(&self, path: &str) -> Result<String, Errno> {
        let path = self.remote(path);
        let name = self.bounded(self.raw.readlink(path)).await?;
        name.files
            .into_iter()
            .next()
            .map(|file| file.filename)
            .ok_or(Errno::EIO)
    }

    pub(crate) async fn hardlink(&self, from: &str, to: &str) -> Result<(), Errno> {
        let (from, to) = (self.remote(from), self.remote(to));
        self.bounded(self.raw.hardlink(from, to)).await.map(drop)
    }

    pub(crate) async fn fsync(&self, handle: &str) -> Result<(), Errno> {
        self.bounded(self.raw.fsync(handle)).await.map(drop)
    }

    pub(crate) async fn statvfs(
        &self,
        path: &str,
    ) -> Result<russh_sftp::extensions::Statvfs, Errno> {
        let path = self.remote(path);
        self.bounded(self.raw.statvfs(path)).await
    }
}

const OPEN_READ: &str = "open-read@grad.dev";

/// The reply to `open-read@grad.dev` before its data.
#[derive(serde::Deserialize)]
struct OpenReadReply {
    handle: String,
    attrs: FileAttributes,
}

/// SFTP length-prefixed string, as extension requests carry them.
fn put_string(data: &mut Vec<u8>, text: &str) -> Result<(), Errno> {
    let len = u32::try_from(text.len()).map_err(|_| Errno::ENAMETOOLONG)?;
    data.extend_from_slice(&len.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    Ok(())
}

fn status_of(reply: Packet) -> Result<(), Errno> {
    match reply {
        Packet::Status(status) if status.status_code == StatusCode::Ok => Ok(()),
        Packet::Status(status) => Err(status_errno(status.status_code)),
        _ => Err(Errno::EIO),
    }
}

/// SFTP v3 has few codes: OpenSSH sends `Failure` for EEXIST, ENOTEMPTY,
/// ENOSPC and the like, which callers refine where they can tell.
pub(crate) fn status_errno(code: StatusCode) -> Errno {
    match code {
        StatusCode::Ok => Errno::EIO,
        StatusCode::Eof => Errno::EIO,
        StatusCode::NoSuchFile => Errno::ENOENT,
        StatusCode::PermissionDenied => Errno::EACCES,
        StatusCode::Failure => Errno::EIO,
        StatusCode::BadMessage => Errno::EINVAL,
        StatusCode::NoConnection | StatusCode::ConnectionLost => Errno::EIO,
        StatusCode::OpUnsupported => Errno::ENOTSUP,
    }
}

/// An open SFTP file or directory handle. Dropping it closes it on the
/// server in the background; [`RemoteHandle::close`] waits for the answer.
pub(crate) struct RemoteHandle {
    pub(crate) conn: Arc<Conn>,
    pub(crate) id: Arc<str>,
    permit: Option<OwnedSemaphorePermit>,
}

impl RemoteHandle {
    fn new(conn: &Arc<Conn>, id: String, permit: OwnedSemaphorePermit) -> RemoteHandle {
        RemoteHandle {
            conn: Arc::clone(conn),
            id: id.into(),
            permit: Some(permit),
        }
    }

    pub(crate) async fn close(mut self) -> Result<(), Errno> {
        let permit = self.permit.take();
        let result = if self.conn.is_lost() {
            Ok(())
        } else {
            let id = self.id.to_string();
            self.conn.bounded(self.conn.raw.close(id)).await.map(drop)
        };
        drop(permit);
        result
    }
}

impl Drop for RemoteHandle {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        if self.conn.is_lost() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = Arc::clone(&self.conn);
        let id = self.id.to_string();
        // The permit is held until the server has closed the handle, so its
        // index is free again before another open can be sent.
        self.conn.tasks.spawn_on(
            async move {
                let _ = conn.bounded(conn.raw.close(id)).await;
                drop(permit);
            },
            &runtime,
        );
    }
}

/// The connection of one mount, replaced when it breaks. See the module docs.
pub(crate) struct Remote {
    connect: Connect,
    root: Arc<str>,
    timeout: Duration,
    current: watch::Sender<Option<Arc<Conn>>>,
    generation: AtomicU64,
    /// Since when there has been no connection.
    down_since: Mutex<Option<Instant>>,
    /// Cuts the wait before the next reconnection attempt short: someone
    /// is using the mount.
    kick: Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Remote {
    /// Connects once (an error here fails the mount) and starts the task
    /// that reconnects with backoff whenever the connection breaks.
    pub(crate) async fn start(
        connect: Connect,
        root: &str,
        timeout: Duration,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Arc<Remote>, Error> {
        let remote = Arc::new(Remote {
            connect,
            root: root.into(),
            timeout,
            current: watch::Sender::new(None),
            generation: AtomicU64::new(0),
            down_since: Mutex::new(None),
            kick: Notify::new(),
            shutdown,
            tasks,
        });
        let conn = remote.attempt().await?;
        remote.current.send_replace(Some(Arc::new(conn)));
        let supervisor = Arc::clone(&remote);
        remote
            .tasks
            .spawn(async move { supervisor.supervise().await });
        Ok(remote)
    }

    async fn attempt(&self) -> Result<Conn, Error> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let connect = async {
            let stream = (self.connect)().await.map_err(Error::Connect)?;
            Conn::start(
                stream,
                generation,
                Arc::clone(&self.root),
                self.timeout,
                self.tasks.clone(),
            )
            .await
            .map_err(Error::Sftp)
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(Error::Connect("timed out".into())),
        }
    }

    /// The live connection, waiting (at most the timeout) while it is being
    /// replaced.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, Errno> {
        if let Some(conn) = self.current.borrow().as_ref().filter(|c| !c.is_lost()) {
            return Ok(Arc::clone(conn));
        }
        // A fresh break is usually mended within a second, so wait for that;
        // during a long outage, answer EIO soon (but try again now).
        self.kick.notify_one();
        let down_for = lock(&self.down_since).map_or(Duration::ZERO, |since| since.elapsed());
        let patience = if down_for < OUTAGE {
            FRESH_WAIT
        } else {
            OUTAGE_WAIT
        };
        let mut changes = self.current.subscribe();
        let wait = changes.wait_for(|conn| conn.as_ref().is_some_and(|c| !c.is_lost()));
        match tokio::time::timeout(patience.min(self.timeout), wait).await {
            Ok(Ok(conn)) => conn.as_ref().map(Arc::clone).ok_or(Errno::EIO),
            Ok(Err(_)) | Err(_) => Err(Errno::EIO),
        }
    }

    /// Whether a connection is up right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|conn| !conn.is_lost())
    }

    async fn supervise(&self) {
        loop {
            let conn = self.current.borrow().clone();
            if let Some(conn) = conn {
                // A request now and then notices a dead link (a tunnel
                // that ended) even when nobody uses the mount.
                loop {
                    tokio::select! {
                        () = conn.lost.cancelled() => break,
                        () = self.shutdown.cancelled() => {
                            let _ = conn.raw.close_session();
                            return;
                        }
                        () = tokio::time::sleep(KEEPALIVE) => {
                            let _ = conn.lstat("").await;
                        }
                    }
                }
                // Ends russh-sftp's tasks for the old stream; requests still
                // waiting on it fail at once.
                let _ = conn.raw.close_session();
            }
            *lock(&self.down_since) = Some(Instant::now());
            self.current.send_replace(None);
            let mut delay = BACKOFF_START;
            loop {
                let attempt = tokio::select! {
                    attempt = self.attempt() => attempt,
                    () = self.shutdown.cancelled() => return,
                };
                match attempt {
                    Ok(conn) => {
                        tracing::info!(generation = conn.generation, "SFTP connection restored");
                        *lock(&self.down_since) = None;
                        self.current.send_replace(Some(Arc::new(conn)));
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error_chain(&error), retry_in = ?delay, "cannot reconnect");
                    }
                }
                // At least the first step of the backoff, then until the
                // rest has passed or someone uses the mount.
                tokio::select! {
                    () = tokio::time::sleep(BACKOFF_START) => {}
                    () = self.shutdown.cancelled() => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(delay.saturating_sub(BACKOFF_START)) => {}
                    () = self.kick.notified() => {}
                    () = self.shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// "outer: inner: innermost", for logs.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
