//! The persistent Python kernel: one interpreter per session, started on first
//! use and driven over pipes by `driver.py` (shipped inside the binary), with
//! Jupyter's cell semantics and display conventions.
//!
//! Wire protocol, one JSON object per line:
//! - requests on the child's stdin: `{"n": execution_count, "code": "...", "params": {...}}`;
//! - replies on fd 3: `{"t":"s","n":"stdout","x":text}`,
//!   `{"t":"d","data":{mime: text},"r":is_result,"f":[files]}`,
//!   `{"t":"e","ename":..,"evalue":..,"tb":[lines]}`, `{"t":"r"}`, then
//!   `{"t":"done","n":..,"ok":bool}`;
//! - fd 1 and fd 2 carry what C code and subprocesses write; they are forwarded
//!   as stdout/stderr chunks. The driver sends `{"t":"r"}` before anything it
//!   sends while those pipes hold unread bytes, which places raw output among
//!   prints and results in the order it was written, and inside the call that
//!   produced it;
//! - fd 4 is a lifeline: when grad-runner goes away the driver kills its
//!   process group;
//! - interrupts (timeout, cancel) are SIGINT to the interpreter's process
//!   group, which the driver turns into KeyboardInterrupt only while user code
//!   runs; an interpreter that does not come back within [`GRACE`] is killed.

mod interp;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use grad_proto::exec_event::Event;
use grad_proto::{DisplayData, ExecError, ExecEvent, ExecFinished, ExecStatus, StreamChunk};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::interp::{Incoming, Interp, Phase, Reply};

/// The session used when a request names none.
pub const DEFAULT_SESSION: &str = "default";

/// How long an interrupted interpreter may take to come back before it is
/// killed (it may be stuck in C code that never checks for signals).
pub const GRACE: Duration = Duration::from_secs(3);

/// Largest text in one [`StreamChunk`], in bytes.
pub const MAX_CHUNK: usize = 64 * 1024;

/// How every interpreter of a runner is started.
#[derive(Debug, Clone)]
pub struct Config {
    /// Program name (looked up in `PATH`) or path, e.g. `python3`.
    pub python: String,
    /// The runner's workspace, holding `code/` (the interpreter's working
    /// directory), `outputs/` (saved figures) and `data/`.
    pub workspace: PathBuf,
    /// Set in the interpreter's environment, on top of grad-runner's own.
    pub env: Vec<(String, String)>,
}

/// One piece of code to run.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub execution_id: String,
    pub code: String,
    /// A JSON object, or empty; the code sees it as the dict `params`.
    pub params_json: String,
    /// `None` (or zero, as `timeout_ms = 0` in the API) means no limit.
    pub timeout: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "python interpreter '{python}' not found; set --python or GRAD_PYTHON to a Python 3 with pandas and duckdb"
    )]
    PythonNotFound { python: String },
    #[error("could not start python interpreter '{python}'")]
    Spawn {
        python: String,
        #[source]
        source: io::Error,
    },
    #[error("python interpreter '{python}' failed ({status}): {stderr}")]
    PythonFailed {
        python: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(
        "python interpreter '{python}' is Python {version}; the kernel needs Python 3.8 or newer (set --python or GRAD_PYTHON)"
    )]
    UnsupportedPython { python: String, version: String },
    #[error("cannot create workspace directory {}", path.display())]
    Workspace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kernel driver sent an unreadable message: {line}")]
    DriverProtocol {
        line: String,
        #[source]
        source: serde_json::Error,
    },
}

/// All sessions of one runner: session name -> persistent interpreter,
/// started lazily on first use.
pub struct Sessions {
    config: Config,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Session {
    /// Held for a whole call, so calls on one session queue up (tokio's mutex
    /// is fair: first come, first served).
    state: tokio::sync::Mutex<State>,
    /// Process group of the running interpreter, 0 when there is none;
    /// readable without the lock (for `count` and `shutdown`).
    live: Arc<AtomicI32>,
}

#[derive(Default)]
struct State {
    interp: Option<Interp>,
    /// Calls run so far; kept across interpreter restarts so that figure
    /// file names stay unique.
    count: u32,
}

impl Sessions {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            sessions: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Runs `req` in `session`'s interpreter (starting it if needed; "" is
    /// [`DEFAULT_SESSION`]). Stream chunks, display data and errors go to
    /// `events` as they happen; the returned value is the final
    /// `ExecFinished` (the caller sends it). Calls on the same session run one
    /// after another; different sessions run in parallel.
    ///
    /// `cancel` fired (or `events` closed) interrupts the code: status
    /// CANCELLED, and the interpreter stays usable. Dropping the future
    /// interrupts the code too; the session's next call then waits for it.
    pub async fn execute(
        &self,
        session: &str,
        req: Request,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> ExecFinished {
        let name = if session.is_empty() {
            DEFAULT_SESSION
        } else {
            session
        };
        let span = tracing::debug_span!("exec", session = name, execution = %req.execution_id);
        self.execute_in(name, req, events, cancel)
            .instrument(span)
            .await
    }

    async fn execute_in(
        &self,
        name: &str,
        req: Request,
        events: mpsc::Sender<ExecEvent>,
        cancel: CancellationToken,
    ) -> ExecFinished {
        let params = match parse_params(&req.params_json) {
            Ok(params) => params,
            Err(message) => return finished(ExecStatus::Failed, 0, Duration::ZERO, message),
        };
        if self.is_closed() {
            return shutting_down();
        }
        let session = self.session(name);
        let mut state = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                return finished(ExecStatus::Cancelled, 0, Duration::ZERO, "cancelled before it started".into());
            }
            state = session.state.lock() => state,
        };
        if self.is_closed() {
            return shutting_down();
        }
        let started = std::time::Instant::now();
        let timeout = req.timeout.filter(|t| !t.is_zero());
        let mut call = Call {
            events: &events,
            disconnected: false,
            watch: Watch {
                cancel: &cancel,
                deadline: timeout.map(|t| Instant::now() + t),
                stop: None,
                grace_until: None,
                pgid: 0,
            },
            armed: None,
        };
        let (status, count, message) = call
            .run(&self.config, &mut state, &session.live, &req.code, &params)
            .await;
        let message = match (status, timeout) {
            (ExecStatus::Timeout, Some(t)) => format!("timed out after {}; {message}", human(t)),
            (ExecStatus::Failed, _) if self.is_closed() => "the runner is shutting down".into(),
            _ => message,
        };
        finished(status, count, started.elapsed(), message)
    }

    /// Starts the default session's interpreter now, so the first call does
    /// not wait for Python to start; a no-op if it runs (or is busy). Call it
    /// from within a tokio runtime.
    pub fn prestart(&self) {
        if self.is_closed() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::warn!(
                "kernel prestart outside a tokio runtime; the interpreter starts on first use"
            );
            return;
        }
        let session = self.session(DEFAULT_SESSION);
        let Ok(mut state) = session.state.try_lock() else {
            return;
        };
        if state.interp.is_none() {
            match Interp::spawn(&self.config, session.live.clone()) {
                Ok(interp) => state.interp = Some(interp),
                Err(e) => tracing::warn!(error = %chain(&e), "prestarting the python kernel"),
            }
        }
    }

    /// Sessions with a running interpreter.
    pub fn count(&self) -> usize {
        self.lock_sessions()
            .values()
            .filter(|s| s.live.load(Ordering::SeqCst) != 0)
            .count()
    }

    /// The interpreter's version, e.g. "3.11.7", from a separate short-lived
    /// process, or an error naming the interpreter when it cannot be run.
    pub async fn python_version(&self) -> Result<String, Error> {
        let python = &self.config.python;
        let output = tokio::process::Command::new(python)
            .args(["-c", "import sys; print(sys.version.split()[0])"])
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => Error::PythonNotFound {
                    python: python.clone(),
                },
                _ => Error::Spawn {
                    python: python.clone(),
                    source,
                },
            })?;
        if !output.status.success() {
            return Err(Error::PythonFailed {
                python: python.clone(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (3, 8) {
            return Err(Error::UnsupportedPython {
                python: python.clone(),
                version,
            });
        }
        Ok(version)
    }

    /// Stops every interpreter (kills its process group) and waits for them.
    /// Calls still running end with status FAILED; later calls are refused.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let sessions: Vec<Arc<Session>> = self.lock_sessions().values().cloned().collect();
        // Kill first, without the locks: a running call holds its session's
        // lock until it sees its interpreter die.
        for session in &sessions {
            interp::signal_group(session.live.load(Ordering::SeqCst), libc::SIGKILL);
        }
        for session in sessions {
            let mut state = loop {
                tokio::select! {
                    state = session.state.lock() => break state,
                    // A call may have started an interpreter after the kill above.
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        interp::signal_group(session.live.load(Ordering::SeqCst), libc::SIGKILL);
                    }
                }
            };
            if let Some(mut interp) = state.interp.take() {
                interp.kill().await;
            }
        }
    }

    fn session(&self, name: &str) -> Arc<Session> {
        self.lock_sessions()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // The map is only read or inserted into under the lock; a panic
        // elsewhere cannot leave it half-updated.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// One `execute` call in progress.
struct Call<'a> {
    events: &'a mpsc::Sender<ExecEvent>,
    /// The receiver of `events` is gone; later events are dropped.
    disconnected: bool,
    watch: Watch<'a>,
    /// Process group to interrupt if this call is dropped mid-way.
    armed: Option<i32>,
}

/// Why a call could not finish normally.
enum End {
    /// Interrupted, and the interpreter did not come back within [`GRACE`].
    Stuck,
    /// The interpreter died.
    Closed,
    /// The driver broke the protocol.
    Broken(Error),
}

impl Call<'_> {
    async fn run(
        &mut self,
        config: &Config,
        state: &mut State,
        live: &Arc<AtomicI32>,
        code: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> (ExecStatus, u32, String) {
        if let Some(interp) = &mut state.interp {
            if let Some(status) = interp.exited() {
                state.interp = None;
                self.note(&format!(
                    "the session's interpreter had exited ({status}); starting a fresh one, earlier variables are gone"
                ))
                .await;
            } else if !interp.settle(GRACE).await {
                interp.kill().await;
                state.interp = None;
                self.note("the session's interpreter did not stop after an abandoned call; starting a fresh one, earlier variables are gone")
                    .await;
            }
        }
        if state.interp.is_none() {
            match Interp::spawn(config, live.clone()) {
                Ok(interp) => state.interp = Some(interp),
                Err(e) => return (ExecStatus::Failed, 0, chain(&e)),
            }
        }
        let Some(interp) = state.interp.as_mut() else {
            return (ExecStatus::Failed, 0, "no interpreter".into());
        };
        match self.watch.stop {
            // Stopped while starting up (only the notes above can notice).
            Some(Stop::Cancelled) => {
                return (
                    ExecStatus::Cancelled,
                    0,
                    "cancelled before it started".into(),
                );
            }
            Some(Stop::Timeout) => return (ExecStatus::Timeout, 0, "before it started".into()),
            None => {}
        }
        state.count += 1;
        let n = state.count;
        self.watch.pgid = interp.pgid();
        self.armed = Some(interp.pgid());
        let result = self.converse(interp, n, code, params).await;
        self.armed = None;
        let stop = self.watch.stop;
        let (status, message) = match result {
            Ok(ok) => {
                interp.phase = Phase::Idle;
                match stop {
                    Some(Stop::Timeout) => (ExecStatus::Timeout, "interrupted".to_owned()),
                    Some(Stop::Cancelled) => {
                        (ExecStatus::Cancelled, "cancelled; interrupted".to_owned())
                    }
                    None if ok => (ExecStatus::Ok, String::new()),
                    None => (ExecStatus::Error, String::new()),
                }
            }
            Err(End::Stuck) => {
                interp.kill().await;
                state.interp = None;
                let lost = format!(
                    "the interpreter did not stop within {} and was restarted; its state (variables, imports) is lost",
                    human(GRACE)
                );
                match stop {
                    Some(Stop::Cancelled) => (ExecStatus::Cancelled, format!("cancelled; {lost}")),
                    _ => (ExecStatus::Timeout, lost),
                }
            }
            Err(End::Closed) => {
                let deadline = Instant::now() + Duration::from_secs(1);
                // Kill first: subprocesses in the group may hold fd 1 and 2.
                let status = interp.kill().await;
                let output = interp.read_to_end(deadline).await;
                state.interp = None;
                for (name, text) in output {
                    self.stream(name, text).await.ok();
                }
                let how = status.map_or_else(|| "unknown status".to_owned(), |s| s.to_string());
                let lost = "its state is lost and the next call starts a fresh interpreter";
                match stop {
                    Some(Stop::Timeout) => (
                        ExecStatus::Timeout,
                        format!("the interpreter died when interrupted ({how}); {lost}"),
                    ),
                    Some(Stop::Cancelled) => (
                        ExecStatus::Cancelled,
                        format!("cancelled; the interpreter died when interrupted ({how}); {lost}"),
                    ),
                    None => (
                        ExecStatus::Failed,
                        format!("python interpreter died during the call ({how}); {lost}"),
                    ),
                }
            }
            Err(End::Broken(e)) => {
                tracing::error!(error = %chain(&e), "kernel driver protocol error");
                interp.kill().await;
                state.interp = None;
                (
                    ExecStatus::Failed,
                    format!(
                        "{}; the interpreter was restarted and its state is lost",
                        chain(&e)
                    ),
                )
            }
        };
        (status, n, message)
    }

    /// Sends request `n` and relays what comes back until its `done`.
    /// Ok(true) when the code ran without raising.
    async fn converse(
        &mut self,
        interp: &mut Interp,
        n: u32,
        code: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<bool, End> {
        interp.phase = Phase::Writing;
        match self.watch.guard(interp.send(n, code, params)).await? {
            Ok(()) => interp.phase = Phase::Running(n),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(End::Closed),
            Err(e) => {
                tracing::warn!(error = %e, "sending a request to the kernel");
                return Err(End::Closed);
            }
        }
        let ok = loop {
            let incoming = self
                .watch
                .guard(interp.next())
                .await?
                .map_err(End::Broken)?;
            match incoming {
                Incoming::Output(name, text) => self.stream(name, text).await?,
                Incoming::Reply(Reply::Stream { n: name, x }) => {
                    let name = if name == "stderr" { "stderr" } else { "stdout" };
                    self.stream(name, x).await?;
                }
                Incoming::Reply(Reply::Display { data, r, f }) => {
                    self.emit(Event::Display(DisplayData {
                        data,
                        is_result: r,
                        files: f,
                    }))
                    .await?;
                }
                Incoming::Reply(Reply::Error { ename, evalue, tb }) => {
                    self.emit(Event::Error(ExecError {
                        ename,
                        evalue,
                        traceback: tb,
                    }))
                    .await?;
                }
                Incoming::Reply(Reply::RawFirst) => {}
                Incoming::Reply(Reply::Done { n: done, ok }) if done == n => break ok,
                Incoming::Reply(Reply::Done { n: done, .. }) => {
                    tracing::warn!(expected = n, got = done, "stale reply from the kernel");
                }
                Incoming::Closed => return Err(End::Closed),
            }
        };
        Ok(ok)
    }

    async fn stream(&mut self, name: &str, text: String) -> Result<(), End> {
        for piece in split_chunks(text, MAX_CHUNK) {
            self.emit(Event::Stream(StreamChunk {
                name: name.to_owned(),
                text: piece,
            }))
            .await?;
        }
        Ok(())
    }

    /// A line from grad-runner itself on the call's stderr.
    async fn note(&mut self, text: &str) {
        self.stream("stderr", format!("grad: {text}\n")).await.ok();
    }

    async fn emit(&mut self, event: Event) -> Result<(), End> {
        if self.disconnected {
            return Ok(());
        }
        let event = ExecEvent { event: Some(event) };
        match self.watch.guard(self.events.send(event)).await? {
            Ok(()) => {}
            Err(_closed) => {
                // Nobody listens any more: stop the code, as a cancel would.
                self.disconnected = true;
                self.watch.stop(Stop::Cancelled);
            }
        }
        Ok(())
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        // The caller dropped `execute` while the code ran: stop it; the next
        // call on the session waits for its `done` (Interp::settle).
        if let Some(pgid) = self.armed {
            interp::signal_group(pgid, libc::SIGINT);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Timeout,
    Cancelled,
}

enum Alarm {
    Stop(Stop),
    /// The interpreter was interrupted and has not come back within GRACE.
    Grace,
}

/// The timeout, the cancel token and the grace period of one call.
struct Watch<'a> {
    cancel: &'a CancellationToken,
    deadline: Option<Instant>,
    stop: Option<Stop>,
    grace_until: Option<Instant>,
    pgid: i32,
}

impl Watch<'_> {
    async fn alarm(&self) -> Alarm {
        if let Some(until) = self.grace_until {
            tokio::time::sleep_until(until).await;
            return Alarm::Grace;
        }
        let deadline = async {
            match self.deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.cancel.cancelled() => Alarm::Stop(Stop::Cancelled),
            () = deadline => Alarm::Stop(Stop::Timeout),
        }
    }

    /// Interrupts the code (once) and starts the grace period.
    fn stop(&mut self, why: Stop) {
        if self.stop.is_none() {
            self.stop = Some(why);
            self.grace_until = Some(Instant::now() + GRACE);
            interp::signal_group(self.pgid, libc::SIGINT);
        }
    }

    /// Runs `fut`, interrupting the interpreter when the deadline passes or
    /// the call is cancelled; Err(Stuck) once the grace period has run out.
    async fn guard<F: Future>(&mut self, fut: F) -> Result<F::Output, End> {
        tokio::pin!(fut);
        loop {
            let alarm = tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                alarm = self.alarm() => alarm,
            };
            match alarm {
                Alarm::Grace => return Err(End::Stuck),
                Alarm::Stop(why) => self.stop(why),
            }
        }
    }
}

fn parse_params(json: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if json.trim().is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_str(json) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(r#"params_json must be a JSON object, like {"n": 3}"#.to_owned()),
        Err(e) => Err(format!("params_json is not valid JSON: {e}")),
    }
}

fn finished(status: ExecStatus, count: u32, took: Duration, message: String) -> ExecFinished {
    ExecFinished {
        status: status as i32,
        execution_count: count,
        duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        message,
    }
}

fn shutting_down() -> ExecFinished {
    finished(
        ExecStatus::Failed,
        0,
        Duration::ZERO,
        "the runner is shutting down".into(),
    )
}

/// An error with its causes, for messages that leave this process.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// "2s", "500ms", "1.5s".
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Splits `text` into pieces of at most `max` bytes, on character boundaries.
fn split_chunks(text: String, max: usize) -> Vec<String> {
    if text.len() <= max {
        return vec![text];
    }
    let mut pieces = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, after) = rest.split_at(end);
        pieces.push(piece.to_owned());
        rest = after;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_split_on_character_boundaries() {
        let text = "é".repeat(10);
        let pieces = split_chunks(text.clone(), 3);
        assert!(pieces.iter().all(|p| p.len() <= 3));
        assert_eq!(pieces.concat(), text);
        assert_eq!(split_chunks("abc".into(), 3), vec!["abc"]);
    }

    #[test]
    fn params_must_be_an_object_or_empty() {
        assert_eq!(parse_params(""), Ok(serde_json::Map::new()));
        assert_eq!(
            parse_params(r#"{"a": 1}"#).map(|p| p["a"].clone()),
            Ok(serde_json::json!(1))
        );
        assert!(parse_params("[1]").is_err_and(|e| e.contains("JSON object")));
        assert!(parse_params("{").is_err_and(|e| e.contains("not valid JSON")));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_millis(500)), "500ms");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
    }
}
