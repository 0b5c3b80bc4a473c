//! One Python interpreter running `driver.py`: the process, its pipes and the
//! wire protocol with the driver (see the module docs of `kernel`).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;

use super::{Config, Error};

/// The driver program, passed to `python -c`.
const DRIVER: &str = include_str!("driver.py");
// Linux caps one argv string at 128 KiB (MAX_ARG_STRLEN).
const _: () = assert!(DRIVER.len() < 120 * 1024);

/// Most bytes read from fd 1 or fd 2 at once.
const READ_SIZE: usize = 64 * 1024;
/// How often an abandoned call is interrupted again while it settles.
const REINTERRUPT: Duration = Duration::from_millis(300);
/// Most reads of what a pipe already holds, so that a process writing without
/// pause cannot hold us in one place.
const DRAIN_READS: usize = 16;

/// Where the interpreter is in the request/reply cycle. Lets the next call
/// recover when a caller dropped its `execute` future half-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Idle,
    /// A request may be half-written: the pipe is unusable.
    Writing,
    /// Request `n` is sent and its `done` not yet read.
    Running(u32),
}

/// What the driver sends on fd 3, one JSON object per line.
#[derive(Debug, Deserialize)]
#[serde(tag = "t")]
pub(super) enum Reply {
    #[serde(rename = "s")]
    Stream { n: String, x: String },
    #[serde(rename = "d")]
    Display {
        data: HashMap<String, String>,
        r: bool,
        f: Vec<String>,
    },
    #[serde(rename = "e")]
    Error {
        ename: String,
        evalue: String,
        tb: Vec<String>,
    },
    /// fd 1 / fd 2 hold output written before what follows.
    #[serde(rename = "r")]
    RawFirst,
    #[serde(rename = "done")]
    Done { n: u32, ok: bool },
}

#[derive(Serialize)]
struct Request<'a> {
    n: u32,
    code: &'a str,
    params: &'a serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Copy)]
enum Fd {
    Stdout,
    Stderr,
}

pub(super) enum Incoming {
    Reply(Reply),
    /// Text the process wrote to fd 1 ("stdout") or fd 2 ("stderr").
    Output(&'static str, String),
    /// The reply pipe closed: the interpreter is gone.
    Closed,
}

pub(super) struct Interp {
    child: Child,
    pgid: i32,
    requests: ChildStdin,
    replies: Replies,
    stdout: Raw,
    stderr: Raw,
    /// Decoded but not yet returned by `next`.
    queued: VecDeque<Incoming>,
    /// Never written; the driver kills its process group when this closes.
    _lifeline: io::PipeWriter,
    /// The session's "live process group" slot, cleared when this ends.
    live: Arc<AtomicI32>,
    /// Set once the interpreter has been reaped.
    exit: Option<ExitStatus>,
    /// The process group has been sent SIGKILL.
    killed: bool,
    pub(super) phase: Phase,
}

impl Interp {
    /// Starts the interpreter. Returns once the process exists; Python's own
    /// start-up overlaps with whatever the caller does next, and the first
    /// request simply waits in the pipe.
    pub(super) fn spawn(config: &Config, live: Arc<AtomicI32>) -> Result<Self, Error> {
        let python = &config.python;
        let spawn_error = |source: io::Error| Error::Spawn {
            python: python.clone(),
            source,
        };
        for dir in ["code", "outputs"] {
            let path = config.workspace.join(dir);
            std::fs::create_dir_all(&path).map_err(|source| Error::Workspace { path, source })?;
        }
        let (reply_r, reply_w) = io::pipe().map_err(spawn_error)?;
        let (life_r, life_w) = io::pipe().map_err(spawn_error)?;
        let (out_r, out_w) = io::pipe().map_err(spawn_error)?;
        let (err_r, err_w) = io::pipe().map_err(spawn_error)?;
        let replies = Replies::new(reply_r).map_err(spawn_error)?;
        let stdout = Raw::new("stdout", out_r).map_err(spawn_error)?;
        let stderr = Raw::new("stderr", err_r).map_err(spawn_error)?;

        let mut cmd = Command::new(python);
        // The driver travels in the environment, which the interpreter pops at
        // once, rather than in argv, where every `ps` would print all of it.
        cmd.arg("-u")
            .arg("-c")
            .arg("import os; exec(compile(os.environ.pop('GRAD_KERNEL_DRIVER'), '<grad-driver>', 'exec'))")
            .current_dir(config.workspace.join("code"))
            .env("GRAD_KERNEL_DRIVER", DRIVER)
            // The runner's own credential is no business of user code.
            .env_remove("GRAD_RUNNER_TOKEN")
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .env("MPLBACKEND", "Agg")
            .env("PYTHONUNBUFFERED", "1")
            .env("GRAD_OUTPUTS", config.workspace.join("outputs"))
            .stdin(Stdio::piped())
            .stdout(out_w)
            .stderr(err_w)
            .process_group(0)
            .kill_on_drop(true);
        map_protocol_fds(&mut cmd, reply_w.as_raw_fd(), life_r.as_raw_fd());
        let spawned = cmd.spawn();
        // Close our copies of the child's ends, or EOF would never come.
        drop(cmd);
        drop(reply_w);
        drop(life_r);
        let mut child = spawned.map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::PythonNotFound {
                    python: python.clone(),
                }
            } else {
                spawn_error(source)
            }
        })?;
        // Neither can fail for a child just spawned with a piped stdin; if
        // one did, dropping `child` kills it.
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| spawn_error(io::Error::other("the interpreter exited at once")))?;
        let requests = child
            .stdin
            .take()
            .ok_or_else(|| spawn_error(io::Error::other("no stdin pipe")))?;
        live.store(pgid, Ordering::SeqCst);
        Ok(Self {
            child,
            pgid,
            requests,
            replies,
            stdout,
            stderr,
            queued: VecDeque::new(),
            _lifeline: life_w,
            live,
            exit: None,
            killed: false,
            phase: Phase::Idle,
        })
    }

    pub(super) fn pgid(&self) -> i32 {
        self.pgid
    }

    /// The exit status if the process has ended (e.g. killed while idle).
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.mark_dead();
            self.exit = Some(status);
        }
        self.exit
    }

    pub(super) async fn send(
        &mut self,
        n: u32,
        code: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> io::Result<()> {
        let mut line = serde_json::to_vec(&Request { n, code, params })?;
        line.push(b'\n');
        self.requests.write_all(&line).await?;
        self.requests.flush().await
    }

    /// The next thing the interpreter says. Cancel safe.
    ///
    /// Replies and raw output travel in different pipes, which have no common
    /// order. The driver puts a `RawFirst` reply before anything it sends
    /// while fd 1 or fd 2 hold unread bytes, and raw output is placed by it:
    /// read at that mark, and otherwise after the waiting replies that were
    /// sent before it was written (see `raw_ready`).
    pub(super) async fn next(&mut self) -> Result<Incoming, Error> {
        loop {
            if let Some(queued) = self.queued.pop_front() {
                return Ok(queued);
            }
            if let Some(reply) = self.replies.take()? {
                self.arrived(reply);
                continue;
            }
            if self.replies.eof {
                return Ok(Incoming::Closed);
            }
            tokio::select! {
                biased;
                filled = self.replies.fill() => {
                    if let Err(e) = filled {
                        tracing::warn!(error = %e, "reading kernel replies");
                        self.replies.eof = true;
                    }
                }
                ready = self.stdout.pipe.readable(), if !self.stdout.eof => {
                    match ready {
                        Ok(()) => self.raw_ready(Fd::Stdout)?,
                        Err(e) => {
                            self.stdout.fail(&e);
                        }
                    }
                }
                ready = self.stderr.pipe.readable(), if !self.stderr.eof => {
                    match ready {
                        Ok(()) => self.raw_ready(Fd::Stderr)?,
                        Err(e) => {
                            self.stderr.fail(&e);
                        }
                    }
                }
                // Children forked by user code may hold the reply pipe open
                // after the interpreter died, so EOF alone is not enough.
                status = self.child.wait(), if self.exit.is_none() => {
                    if let Ok(status) = status {
                        self.mark_dead();
                        self.exit = Some(status);
                    }
                    return Ok(Incoming::Closed);
                }
            }
        }
    }

    fn arrived(&mut self, reply: Reply) {
        if matches!(reply, Reply::RawFirst) {
            for (name, text) in self.read_now() {
                self.queued.push_back(Incoming::Output(name, text));
            }
        } else {
            self.queued.push_back(Incoming::Reply(reply));
        }
    }

    /// Reads raw output and places it. The replies already in their pipe are
    /// taken first; any of them sent before the first `RawFirst` among them
    /// was sent while fd 1 and fd 2 held nothing unread, so before this
    /// output was written, and goes first. (Only a reply and output that
    /// both appear between the two reads below can still be swapped.)
    fn raw_ready(&mut self, fd: Fd) -> Result<(), Error> {
        self.replies.fill_now();
        let raw = match fd {
            Fd::Stdout => &mut self.stdout,
            Fd::Stderr => &mut self.stderr,
        };
        let name = raw.name;
        let Some(text) = raw.read_ready() else {
            return Ok(());
        };
        while let Some(reply) = self.replies.take()? {
            if matches!(reply, Reply::RawFirst) {
                self.queued.push_back(Incoming::Output(name, text));
                self.arrived(reply);
                return Ok(());
            }
            self.queued.push_back(Incoming::Reply(reply));
        }
        self.queued.push_back(Incoming::Output(name, text));
        Ok(())
    }

    /// Raw output already sitting in the fd 1 / fd 2 pipes, without waiting.
    fn read_now(&mut self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for raw in [&mut self.stdout, &mut self.stderr] {
            if let Some(text) = raw.read_now() {
                out.push((raw.name, text));
            }
        }
        out
    }

    /// Raw output until both pipes close or `deadline`; for a process that
    /// has died, so that e.g. a fatal error message still reaches the user.
    pub(super) async fn read_to_end(&mut self, deadline: Instant) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        while !(self.stdout.eof && self.stderr.eof) {
            let next = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    text = self.stdout.read(), if !self.stdout.eof => text.map(|t| (self.stdout.name, t)),
                    text = self.stderr.read(), if !self.stderr.eof => text.map(|t| (self.stderr.name, t)),
                }
            });
            match next.await {
                Ok(Some(item)) => out.push(item),
                Ok(None) => {}
                Err(_elapsed) => break,
            }
        }
        out
    }

    /// SIGINT to the process group: KeyboardInterrupt in user code, and
    /// subprocesses it waits on stop too, as on Ctrl-C in a terminal.
    pub(super) fn interrupt(&self) {
        if self.exit.is_none() {
            signal_group(self.pgid, libc::SIGINT);
        }
    }

    /// Kills the process group (the interpreter and what it started) and
    /// reaps the interpreter; its exit status when known.
    pub(super) async fn kill(&mut self) -> Option<ExitStatus> {
        self.kill_group();
        self.mark_dead();
        if self.exit.is_none() {
            match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
                Ok(Ok(status)) => self.exit = Some(status),
                Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the python interpreter"),
                Err(_elapsed) => {
                    tracing::warn!(pid = self.pgid, "python interpreter did not die on SIGKILL");
                }
            }
        }
        self.exit
    }

    fn kill_group(&mut self) {
        // Normally before reaping, while the zombie keeps the group id from
        // being reused. After the interpreter was reaped the group lives on
        // only if something it started still runs, which is what this is for.
        if !self.killed {
            self.killed = true;
            signal_group(self.pgid, libc::SIGKILL);
        }
    }

    /// After an abandoned call: interrupts it (every [`REINTERRUPT`]) and
    /// reads up to its `done`,
    /// discarding its output. False when the interpreter is unusable.
    pub(super) async fn settle(&mut self, grace: Duration) -> bool {
        let n = match self.phase {
            Phase::Idle => return true,
            Phase::Writing => return false,
            Phase::Running(n) => n,
        };
        self.interrupt();
        // Again every REINTERRUPT until the call is done: an interrupt that
        // lands while the driver cannot take it (mid-write) is dropped, and
        // a busy machine may be slow to act on the first. (From a task of
        // its own, so that reading the replies is never cut short.)
        let pgid = self.pgid;
        let repeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REINTERRUPT).await;
                signal_group(pgid, libc::SIGINT);
            }
        });
        let deadline = Instant::now() + grace;
        let settled = loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Ok(Incoming::Reply(Reply::Done { n: done, .. }))) if done == n => {
                    self.phase = Phase::Idle;
                    break true;
                }
                Ok(Ok(Incoming::Closed) | Err(_)) | Err(_) => break false,
                Ok(Ok(_)) => {}
            }
        };
        repeat.abort();
        settled
    }

    fn mark_dead(&self) {
        // Only if the slot still names this process, not a successor.
        let _ = self
            .live
            .compare_exchange(self.pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

impl Drop for Interp {
    fn drop(&mut self) {
        self.kill_group();
        self.mark_dead();
    }
}

/// The driver's reply pipe (fd 3), split into lines.
struct Replies {
    pipe: pipe::Receiver,
    /// The same pipe, for reads that must not wait on tokio's readiness
    /// cache (which may not yet know about bytes already in the pipe).
    direct: File,
    chunk: Box<[u8]>,
    buf: Vec<u8>,
    /// `buf[..start]` has been parsed.
    start: usize,
    /// `buf[start..scanned]` holds no newline.
    scanned: usize,
    eof: bool,
}

impl Replies {
    fn new(reader: io::PipeReader) -> io::Result<Self> {
        let pipe = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        let direct = File::from(pipe.as_fd().try_clone_to_owned()?);
        Ok(Self {
            pipe,
            direct,
            chunk: vec![0; READ_SIZE].into_boxed_slice(),
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            eof: false,
        })
    }

    fn line_end(&mut self) -> Option<usize> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => Some(self.scanned + i),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// The next complete reply already read, if any.
    fn take(&mut self) -> Result<Option<Reply>, Error> {
        let Some(end) = self.line_end() else {
            return Ok(None);
        };
        let line = &self.buf[self.start..end];
        let reply = serde_json::from_slice(line).map_err(|source| Error::DriverProtocol {
            line: String::from_utf8_lossy(line).chars().take(200).collect(),
            source,
        });
        self.start = end + 1;
        self.scanned = self.start;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        }
        reply.map(Some)
    }

    fn push(&mut self, n: usize) {
        if n == 0 {
            self.eof = true;
            return;
        }
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(&self.chunk[..n]);
    }

    /// Reads what the pipe holds now, without waiting.
    fn fill_now(&mut self) {
        for _ in 0..DRAIN_READS {
            if self.eof {
                break;
            }
            match (&self.direct).read(&mut self.chunk) {
                Ok(n) => self.push(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading kernel replies");
                    self.eof = true;
                }
            }
        }
    }

    /// Waits until a whole line, or EOF, is buffered. Cancel safe.
    async fn fill(&mut self) -> io::Result<()> {
        while !self.eof && self.line_end().is_none() {
            self.pipe.readable().await?;
            match self.pipe.try_read(&mut self.chunk) {
                Ok(n) => self.push(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One of the interpreter's raw output pipes (fd 1 or fd 2).
struct Raw {
    name: &'static str,
    pipe: pipe::Receiver,
    /// The same pipe, for reads that must not wait on tokio's readiness
    /// cache (which may not yet know about bytes already in the pipe).
    direct: File,
    buf: Box<[u8]>,
    /// The start of a UTF-8 sequence cut by the end of a read.
    partial: Vec<u8>,
    eof: bool,
}

impl Raw {
    fn new(name: &'static str, reader: io::PipeReader) -> io::Result<Self> {
        // Sets O_NONBLOCK on the pipe, which `direct` shares.
        let pipe = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        let direct = File::from(pipe.as_fd().try_clone_to_owned()?);
        Ok(Self {
            name,
            pipe,
            direct,
            buf: vec![0; READ_SIZE].into_boxed_slice(),
            partial: Vec::new(),
            eof: false,
        })
    }

    /// Waits for output; None at EOF or when only part of a character came.
    /// Cancel safe.
    async fn read(&mut self) -> Option<String> {
        match self.pipe.read(&mut self.buf).await {
            Ok(n) => self.take(n),
            Err(e) => self.fail(&e),
        }
    }

    /// After `pipe.readable()`: what the pipe holds, through tokio so that
    /// its readiness is cleared once the pipe is empty.
    fn read_ready(&mut self) -> Option<String> {
        self.read_available(true)
    }

    /// What the pipe holds, past tokio's readiness cache.
    fn read_now(&mut self) -> Option<String> {
        self.read_available(false)
    }

    fn read_available(&mut self, via_tokio: bool) -> Option<String> {
        let mut text = String::new();
        for _ in 0..DRAIN_READS {
            if self.eof {
                break;
            }
            let read = if via_tokio {
                self.pipe.try_read(&mut self.buf)
            } else {
                (&self.direct).read(&mut self.buf)
            };
            match read {
                Ok(n) => {
                    if let Some(more) = self.take(n) {
                        text.push_str(&more);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.fail(&e);
                }
            }
        }
        (!text.is_empty()).then_some(text)
    }

    /// Decodes the `n` bytes just read (0 = EOF).
    fn take(&mut self, n: usize) -> Option<String> {
        let text = if n == 0 {
            self.eof = true;
            String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned()
        } else {
            decode_utf8(&mut self.partial, &self.buf[..n])
        };
        (!text.is_empty()).then_some(text)
    }

    fn fail(&mut self, e: &io::Error) -> Option<String> {
        tracing::warn!(stream = self.name, error = %e, "reading python output");
        self.eof = true;
        None
    }
}

/// Appends `data` to `partial` and returns the longest decodable prefix
/// (invalid bytes become U+FFFD), keeping an incomplete trailing character in
/// `partial` for the next read.
pub(super) fn decode_utf8(partial: &mut Vec<u8>, data: &[u8]) -> String {
    partial.extend_from_slice(data);
    let mut out = String::with_capacity(partial.len());
    let mut rest: &[u8] = partial;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[bad..];
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.len();
    partial.drain(..partial.len() - keep);
    out
}

/// Places the reply pipe's write end on fd 3 and the lifeline's read end on
/// fd 4 in the child.
#[allow(unsafe_code)]
fn map_protocol_fds(cmd: &mut Command, reply: RawFd, lifeline: RawFd) {
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (fcntl, dup2) on descriptors that the parent
    // keeps open until `spawn` returns; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Copy both above 9 first so that placing one on 3 or 4 cannot
            // overwrite the other. The copies are close-on-exec; dup2 clears
            // that flag on 3 and 4.
            let reply = check(libc::fcntl(reply, libc::F_DUPFD_CLOEXEC, 10))?;
            let lifeline = check(libc::fcntl(lifeline, libc::F_DUPFD_CLOEXEC, 10))?;
            check(libc::dup2(reply, 3))?;
            check(libc::dup2(lifeline, 4))?;
            Ok(())
        });
    }
}

/// Sends `signal` to process group `pgid`; a group that is gone is fine.
#[allow(unsafe_code)]
pub(super) fn signal_group(pgid: i32, signal: libc::c_int) {
    // kill(-1) would signal every process we may signal, kill(0) our own group.
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %e, "signalling the python interpreter");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::decode_utf8;

    #[test]
    fn utf8_split_across_reads_is_joined() {
        let text = "héllo ✓";
        let bytes = text.as_bytes();
        let mut partial = Vec::new();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&decode_utf8(&mut partial, std::slice::from_ref(b)));
        }
        assert_eq!(out, text);
        assert!(partial.is_empty());
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        let mut partial = Vec::new();
        assert_eq!(decode_utf8(&mut partial, b"a\xffb\xe2\x9c"), "a\u{fffd}b");
        assert_eq!(partial, b"\xe2\x9c");
        assert_eq!(decode_utf8(&mut partial, b"\x93!"), "✓!");
    }
}
