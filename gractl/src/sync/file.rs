//! Open files: write-back of this mount's writes, read-ahead for
//! sequential readers.
//!
//! Write-back: a write is copied into a buffer and answered at once; full
//! buffers go out as large SFTP writes, many in flight at a time. Errors come
//! back at `flush`/`fsync`/`close` (and fail later writes) as EIO. Because
//! every request about a file is sent in the order the kernel asked for it
//! (see [`super::remote::start`]), a read, truncate or close after a write
//! only has to send the buffered bytes first, not wait for them.
//!
//! Read-ahead: a reader that goes on where its last read ended gets a
//! growing window of chunks requested ahead of it (up to the mount's
//! `read_ahead`), so most reads are answered from memory.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use fuser::{Errno, ReplyWrite};
use russh_sftp::protocol::OpenFlags;
use tokio::sync::{Notify, watch};
use tokio_util::task::TaskTracker;

use super::remote::{Remote, RemoteHandle, start};

/// Locks `mutex`, carrying on past a panic in another holder: every
/// critical section here leaves the state consistent at each step.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The contents of one file while it is open here, shared by its handles.
pub(crate) struct FileData {
    /// Bumped by every change made here; read-ahead from before is dropped.
    version: AtomicU64,
    /// Written through this mount since it was opened: its attributes here
    /// are newer than the server's.
    dirty: AtomicBool,
    writes: Mutex<Writes>,
    /// Signalled whenever a write request finishes.
    settled: Notify,
    /// Bytes in flight before writes are answered only as earlier ones finish.
    window: usize,
}

#[derive(Default)]
struct Writes {
    /// Bytes not sent yet, contiguous, for one handle.
    pending: Option<Pending>,
    /// Write requests sent and not answered, and their bytes.
    requests: usize,
    in_flight: usize,
    /// The first failure since the last flush.
    error: Option<Errno>,
    /// Writes held back until the window has room (their bytes are already
    /// buffered; the answer is what makes the writer wait).
    waiting: VecDeque<(ReplyWrite, u32)>,
}

struct Pending {
    handle: Arc<RemoteHandle>,
    offset: u64,
    buf: Vec<u8>,
}

impl FileData {
    pub(crate) fn new(window: usize) -> FileData {
        FileData {
            version: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            writes: Mutex::new(Writes::default()),
            settled: Notify::new(),
            window,
        }
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The contents changed here (a write, a truncation).
    pub(crate) fn changed(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Buffers `data` for `offset` and answers `reply`, now or once the
    /// window has room. Runs on the FUSE thread inside the runtime.
    pub(crate) fn write(
        self: &Arc<Self>,
        handle: &Arc<RemoteHandle>,
        offset: u64,
        data: &[u8],
        reply: ReplyWrite,
        tasks: &TaskTracker,
    ) {
        let len = data.len() as u32;
        let mut writes = lock(&self.writes);
        if let Some(error) = writes.error {
            drop(writes);
            reply.error(error);
            return;
        }
        self.dirty.store(true, Ordering::Release);
        self.changed();
        let chunk = handle.conn.write_len as usize;
        let contiguous = writes.pending.as_ref().is_some_and(|pending| {
            Arc::ptr_eq(&pending.handle, handle)
                && pending.offset + pending.buf.len() as u64 == offset
        });
        if !contiguous {
            if let Some(pending) = writes.pending.take() {
                self.send(&mut writes, pending, tasks);
            }
            writes.pending = Some(Pending {
                handle: Arc::clone(handle),
                offset,
                buf: Vec::with_capacity(chunk.min(data.len().max(4096))),
            });
        }
        let mut rest = data;
        while !rest.is_empty() {
            let Some(pending) = writes.pending.as_mut() else {
                break;
            };
            let take = (chunk - pending.buf.len()).min(rest.len());
            if pending.buf.capacity() < pending.buf.len() + take {
                pending.buf.reserve_exact(chunk - pending.buf.len());
            }
            pending.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if pending.buf.len() >= chunk {
                let next = Pending {
                    handle: Arc::clone(&pending.handle),
                    offset: pending.offset + pending.buf.len() as u64,
                    buf: Vec::with_capacity(chunk),
                };
                if let Some(full) = writes.pending.replace(next) {
                    self.send(&mut writes, full, tasks);
                }
            }
        }
        if writes.in_flight > self.window {
            writes.waiting.push_back((reply, len));
        } else {
            drop(writes);
            reply.written(len);
        }
    }

    /// Sends the buffered bytes now (before a read, truncate or flush).
    pub(crate) fn push(self: &Arc<Self>, tasks: &TaskTracker) {
        let mut writes = lock(&self.writes);
        if let Some(pending) = writes.pending.take() {
            self.send(&mut writes, pending, tasks);
        }
    }

    fn send(self: &Arc<Self>, writes: &mut Writes, pending: Pending, tasks: &TaskTracker) {
        if pending.buf.is_empty() {
            return;
        }
        let len = pending.buf.len();
        writes.requests += 1;
        writes.in_flight += len;
        let Pending {
            handle,
            offset,
            buf,
        } = pending;
        // Sent here, in order; only the answer is awaited in the task.
        let request = start(async move { handle.conn.write(&handle.id, offset, buf).await });
        let data = Arc::clone(self);
        tasks.spawn(async move {
            let result = request.await;
            data.finished(len, result);
        });
    }

    fn finished(&self, len: usize, result: Result<(), Errno>) {
        let mut writes = lock(&self.writes);
        writes.requests -= 1;
        writes.in_flight -= len;
        if let Err(error) = result {
            writes.error.get_or_insert(error);
        }
        let mut answers = Vec::new();
        if let Some(error) = writes.error {
            answers.extend(
                writes
                    .waiting
                    .drain(..)
                    .map(|(reply, _)| (reply, Err(error))),
            );
        }
        while writes.in_flight <= self.window {
            let Some((reply, len)) = writes.waiting.pop_front() else {
                break;
            };
            answers.push((reply, Ok(len)));
        }
        drop(writes);
        for (reply, answer) in answers {
            match answer {
                Ok(len) => reply.written(len),
                Err(error) => reply.error(error),
            }
        }
        self.settled.notify_waiters();
    }

    /// Sends what is buffered, waits until every write has been answered,
    /// and reports the first failure since the last flush.
    pub(crate) async fn flush(self: &Arc<Self>, tasks: &TaskTracker) -> Result<(), Errno> {
        self.push(tasks);
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            {
                let mut writes = lock(&self.writes);
                if writes.requests == 0 && writes.pending.as_ref().is_none_or(|p| p.buf.is_empty())
                {
                    return writes.error.take().map_or(Ok(()), Err);
                }
                if writes.requests == 0 {
                    // A write buffered since the push above: send it too.
                    if let Some(pending) = writes.pending.take() {
                        self.send(&mut writes, pending, tasks);
                    }
                    continue;
                }
            }
            settled.await;
        }
    }
}

/// What a read returns: its own bytes, or a part of a chunk.
pub(crate) enum Bytes {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(data) => data,
            Bytes::Shared(data, range) => data.get(range.clone()).unwrap_or_default(),
        }
    }
}

/// A chunk requested ahead of the reader.
#[derive(Clone)]
struct Chunk {
    offset: u64,
    len: u32,
    data: watch::Receiver<Option<Result<Arc<Vec<u8>>, Errno>>>,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    async fn get(mut self) -> Result<Arc<Vec<u8>>, Errno> {
        match self.data.wait_for(Option::is_some).await {
            Ok(data) => data.clone().unwrap_or(Err(Errno::EIO)),
            Err(_) => Err(Errno::EIO),
        }
    }
}

#[derive(Default)]
struct ReadAhead {
    /// The connection and contents version the chunks belong to.
    generation: u64,
    version: u64,
    /// Where the last read ended, and how many reads in a row went on from there.
    next: u64,
    streak: u32,
    chunks: VecDeque<Chunk>,
}

/// One open file handle of the mount.
pub(crate) struct OpenFile {
    pub(crate) ino: u64,
    pub(crate) writable: bool,
    /// Flags to open it again with after a reconnection (reads only).
    reopen: OpenFlags,
    handle: Mutex<Arc<RemoteHandle>>,
    pub(crate) data: Arc<FileData>,
    read: Mutex<ReadAhead>,
    /// Chunks kept in flight for a sequential reader.
    read_ahead: usize,
}

impl OpenFile {
    pub(crate) fn new(
        ino: u64,
        writable: bool,
        reopen: OpenFlags,
        handle: RemoteHandle,
        data: Arc<FileData>,
        read_ahead: usize,
    ) -> OpenFile {
        OpenFile {
            ino,
            writable,
            reopen,
            handle: Mutex::new(Arc::new(handle)),
            data,
            read: Mutex::new(ReadAhead::default()),
            read_ahead: read_ahead.max(1),
        }
    }

    pub(crate) fn handle(&self) -> Arc<RemoteHandle> {
        Arc::clone(&lock(&self.handle))
    }

    /// The handle to read with: opened again on the new connection if the
    /// old one broke.
    async fn read_handle(&self, remote: &Remote, path: &str) -> Result<Arc<RemoteHandle>, Errno> {
        let handle = self.handle();
        if !handle.conn.is_lost() {
            return Ok(handle);
        }
        let conn = remote.conn().await?;
        let reopened = Arc::new(conn.open(path, self.reopen, Default::default()).await?);
        *lock(&self.handle) = Arc::clone(&reopened);
        Ok(reopened)
    }

    /// Buffers a write (see [`FileData::write`]). Writes on a handle whose
    /// connection broke fail: what was in flight is lost.
    pub(crate) fn write(&self, offset: u64, data: &[u8], reply: ReplyWrite, tasks: &TaskTracker) {
        let handle = self.handle();
        if !self.writable {
            reply.error(Errno::EBADF);
        } else if handle.conn.is_lost() {
            reply.error(Errno::EIO);
        } else {
            self.data.write(&handle, offset, data, reply, tasks);
        }
    }

    /// Starts reading the beginning of a file that was just opened, so the
    /// first read finds it on its way.
    pub(crate) fn prefetch(&self, size: u64, tasks: &TaskTracker) {
        if size == 0 {
            return;
        }
        let handle = self.handle();
        let mut ahead = lock(&self.read);
        if ahead.chunks.is_empty() {
            ahead.generation = handle.conn.generation;
            ahead.version = self.data.version();
            let len = handle.conn.read_len;
            ahead.chunks.push_back(fetch(&handle, 0, len, tasks));
        }
    }

    /// Takes `data`, read from the start of the file as it was opened, as
    /// the first chunk of the read-ahead (a chunk shorter than the
    /// connection's read length ends at the end of the file).
    pub(crate) fn seed(&self, data: Vec<u8>) {
        let handle = self.handle();
        let mut ahead = lock(&self.read);
        ahead.generation = handle.conn.generation;
        ahead.version = self.data.version();
        ahead.chunks.clear();
        let (_, data) = watch::channel(Some(Ok(Arc::new(data))));
        ahead.chunks.push_back(Chunk {
            offset: 0,
            len: handle.conn.read_len,
            data,
        });
    }

    /// Drops the read-ahead (the file is being closed).
    pub(crate) fn forget_reads(&self) {
        lock(&self.read).chunks.clear();
    }

    /// Reads `size` bytes at `offset`; fewer at the end of the file.
    /// `known_size` is the size as last seen (it bounds the read-ahead).
    pub(crate) async fn read(
        &self,
        remote: &Remote,
        path: &str,
        offset: u64,
        size: u32,
        known_size: Option<u64>,
        tasks: &TaskTracker,
    ) -> Result<Bytes, Errno> {
        self.data.push(tasks);
        let handle = self.read_handle(remote, path).await?;
        let end = offset + u64::from(size);
        let chunks = self.plan(&handle, offset, end, known_size, tasks);
        // Most reads lie in one chunk: answered from it, without a copy.
        if let Some(chunk) = chunks.first().filter(|c| c.offset <= offset).cloned() {
            let (chunk_offset, chunk_len) = (chunk.offset, chunk.len);
            let data = self.chunk(chunk).await?;
            let data_end = chunk_offset + data.len() as u64;
            let at_end =
                data.len() < chunk_len as usize && known_size.is_some_and(|s| data_end >= s);
            if data_end >= end || at_end {
                let from = ((offset - chunk_offset) as usize).min(data.len());
                let to = ((end.min(data_end)) - chunk_offset) as usize;
                return Ok(Bytes::Shared(data, from..to.max(from)));
            }
        }
        let mut out = Vec::with_capacity(size as usize);
        let mut pos = offset;
        for chunk in chunks {
            if chunk.offset > pos || pos >= end {
                break;
            }
            let (chunk_offset, chunk_len) = (chunk.offset, chunk.len);
            let data = self.chunk(chunk).await?;
            let data_end = chunk_offset + data.len() as u64;
            if data_end > pos {
                let from = (pos - chunk_offset) as usize;
                let to = (data_end.min(end) - chunk_offset) as usize;
                out.extend_from_slice(&data[from..to]);
                pos = chunk_offset + to as u64;
            }
            if data.len() < chunk_len as usize {
                // End of file, or a server that answered short: the size
                // as known tells which.
                if known_size.is_some_and(|size| pos >= size) {
                    return Ok(Bytes::Owned(out));
                }
                break;
            }
        }
        let len = handle.conn.read_len;
        while pos < end {
            let want = (end - pos).min(u64::from(len)) as u32;
            let data = handle.conn.read(&handle.id, pos, want).await?;
            if data.is_empty() {
                break;
            }
            pos += data.len() as u64;
            out.extend_from_slice(&data);
        }
        Ok(Bytes::Owned(out))
    }

    /// The data of a chunk; a failed one is dropped so the next read asks again.
    async fn chunk(&self, chunk: Chunk) -> Result<Arc<Vec<u8>>, Errno> {
        let result = chunk.get().await;
        if result.is_err() {
            lock(&self.read).chunks.clear();
        }
        result
    }

    /// Decides what to request ahead of a read of `offset..end` and returns
    /// the chunks that cover it (none for a random read, which is sent as is).
    fn plan(
        &self,
        handle: &Arc<RemoteHandle>,
        offset: u64,
        end: u64,
        known_size: Option<u64>,
        tasks: &TaskTracker,
    ) -> Vec<Chunk> {
        let version = self.data.version();
        let len = handle.conn.read_len;
        let mut ahead = lock(&self.read);
        if ahead.version != version || ahead.generation != handle.conn.generation {
            ahead.chunks.clear();
            ahead.version = version;
            ahead.generation = handle.conn.generation;
        }
        let within = ahead.chunks.front().is_some_and(|c| c.offset <= offset)
            && ahead.chunks.back().is_some_and(|c| offset < c.end());
        let sequential = within || offset == ahead.next;
        if sequential {
            ahead.streak = ahead.streak.saturating_add(1);
            ahead.next = ahead.next.max(end);
        } else {
            ahead.streak = 0;
            ahead.next = end;
            ahead.chunks.clear();
            if offset != 0 {
                return Vec::new();
            }
        }
        // Keep one chunk behind the reader: the kernel's own concurrent
        // reads may arrive slightly out of order.
        while ahead
            .chunks
            .front()
            .is_some_and(|c| c.end() + u64::from(len) <= offset)
        {
            ahead.chunks.pop_front();
        }
        let window = (1usize << ahead.streak.min(10)).min(self.read_ahead) as u64;
        let target = end + window * u64::from(len);
        let mut next = ahead.chunks.back().map_or(offset, Chunk::end);
        while next < target {
            if next >= end && known_size.is_some_and(|size| next >= size) {
                break;
            }
            ahead.chunks.push_back(fetch(handle, next, len, tasks));
            next += u64::from(len);
        }
        ahead
            .chunks
            .iter()
            .filter(|c| c.offset < end && c.end() > offset)
            .cloned()
            .collect()
    }
}

/// Requests a chunk. The request is sent here, so chunks go out in file
/// order and the server answers first the one the reader needs next; a task
/// waits for the answer.
fn fetch(handle: &Arc<RemoteHandle>, offset: u64, len: u32, tasks: &TaskTracker) -> Chunk {
    let (sender, receiver) = watch::channel(None);
    let handle = Arc::clone(handle);
    let request = start(async move { handle.conn.read(&handle.id, offset, len).await });
    tasks.spawn(async move {
        let data = request.await.map(Arc::new);
        let _ = sender.send(Some(data));
    });
    Chunk {
        offset,
        len,
        data: receiver,
    }
}
