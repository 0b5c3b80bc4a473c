//! Commands and shells on a session channel: `/bin/sh -c CMD` for `exec`, a
//! login shell for `shell`, with pipes (stdout as data, stderr as extended
//! data) or with a PTY when the client asked for one. Ends the channel the way
//! sshd does: output, EOF, `exit-status` (or `exit-signal`), close.

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use bytes::Bytes;
use russh::{
    ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig,
    server::{Handle, Msg},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The runner's own credential, which its environment may carry; sessions
/// inherit the rest of the runner's environment (PATH, the image's setup).
const TOKEN_VAR: &str = "GRAD_RUNNER_TOKEN";

/// How long output is still forwarded after a PTY session's process exits,
/// when something it started keeps the terminal open.
const PTY_DRAIN: Duration = Duration::from_millis(500);

pub(super) enum Program {
    /// `exec`: the command line, run by `/bin/sh -c`.
    Command(Vec<u8>),
    /// `shell`: an interactive login shell.
    Shell,
}

pub(super) struct PtyRequest {
    pub(super) term: String,
    pub(super) cols: u32,
    pub(super) rows: u32,
}

pub(super) struct Launch {
    pub(super) program: Program,
    pub(super) pty: Option<PtyRequest>,
    pub(super) env: Vec<(String, String)>,
    pub(super) workspace: PathBuf,
}

impl Launch {
    /// The program, its `argv[0]` and its arguments.
    fn argv(&self) -> (&'static str, &'static str, Vec<&OsStr>) {
        match &self.program {
            Program::Command(command) => (
                "/bin/sh",
                "sh",
                vec![OsStr::new("-c"), OsStr::from_bytes(command)],
            ),
            // A leading "-" in argv[0] makes it a login shell, which reads
            // /etc/profile: the image's PATH and setup, as with sshd.
            Program::Shell if Path::new("/bin/bash").exists() => ("/bin/bash", "-bash", vec![]),
            Program::Shell => ("/bin/sh", "-sh", vec![]),
        }
    }
}

pub(super) async fn run(channel: russh::Channel<Msg>, handle: Handle, launch: Launch) {
    let id = channel.id();
    let (mut reader, writer) = channel.split();
    let result = match &launch.pty {
        Some(pty) => with_pty(&launch, pty, &mut reader, &writer).await,
        None => with_pipes(&launch, &mut reader, &writer).await,
    };
    match result {
        Ok(Some(status)) => {
            let _ = writer.eof().await;
            match (status.code(), status.signal()) {
                (Some(code), _) => {
                    let _ = writer.exit_status(u32::try_from(code).unwrap_or(255)).await;
                }
                (None, Some(signal)) => {
                    let _ = handle
                        .exit_signal_request(
                            id,
                            signal_name(signal),
                            status.core_dumped(),
                            String::new(),
                            String::new(),
                        )
                        .await;
                }
                (None, None) => {}
            }
            let _ = writer.close().await;
        }
        // The client closed the channel; the process has been killed.
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "ssh: starting a session program");
            let message = format!("grad-runner: cannot start the program: {e}\r\n");
            let _ = writer.extended_data_bytes(1, message).await;
            let _ = writer.eof().await;
            let _ = writer.exit_status(127).await;
            let _ = writer.close().await;
        }
    }
}

/// Runs with pipes. `Ok(None)` when the client closed the channel first.
async fn with_pipes(
    launch: &Launch,
    reader: &mut ChannelReadHalf,
    writer: &ChannelWriteHalf<Msg>,
) -> io::Result<Option<ExitStatus>> {
    let (program, arg0, args) = launch.argv();
    let mut command = tokio::process::Command::new(program);
    command
        .arg0(arg0)
        .args(args)
        .current_dir(&launch.workspace)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env_remove(TOKEN_VAR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());

    let output = async {
        let stdout = async {
            if let Some(stdout) = stdout {
                pump(stdout, writer, None).await;
            }
        };
        let stderr = async {
            if let Some(stderr) = stderr {
                pump(stderr, writer, Some(1)).await;
            }
        };
        tokio::join!(stdout, stderr);
    };
    let input = feed(reader, stdin, |signal| send_signal(pid, signal, false));
    tokio::pin!(input);
    // Like sshd, the session lasts until the output is closed (background
    // processes that keep it open keep the session) and the process exits.
    tokio::select! {
        () = output => {}
        () = &mut input => return Ok(None),
    }
    tokio::select! {
        status = child.wait() => Ok(Some(status?)),
        () = &mut input => Ok(None),
    }
}

/// Runs on a new PTY. `Ok(None)` when the client closed the channel first.
async fn with_pty(
    launch: &Launch,
    request: &PtyRequest,
    reader: &mut ChannelReadHalf,
    writer: &ChannelWriteHalf<Msg>,
) -> io::Result<Option<ExitStatus>> {
    let (pty, pts) = pty_process::open().map_err(pty_error)?;
    pty.resize(size(request.cols, request.rows))
        .map_err(pty_error)?;
    let (program, arg0, args) = launch.argv();
    let term = if request.term.is_empty() {
        "xterm"
    } else {
        request.term.as_str()
    };
    let mut child = pty_process::Command::new(program)
        .arg0(arg0)
        .args(args)
        .current_dir(&launch.workspace)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env("TERM", term)
        .env_remove(TOKEN_VAR)
        .kill_on_drop(true)
        .spawn(pts)
        .map_err(pty_error)?;
    let pid = child.id();
    let (pty_out, pty_in) = pty.into_split();

    let output = pump(pty_out, writer, None);
    tokio::pin!(output);
    let input = feed_terminal(reader, pty_in, pid);
    tokio::pin!(input);
    let mut output_done = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            () = &mut output, if !output_done => output_done = true,
            () = &mut input => return Ok(None),
        }
    };
    // What the process wrote last may still be in the PTY; it reads as EOF
    // once every holder of the terminal has closed it.
    if !output_done {
        let _ = tokio::time::timeout(PTY_DRAIN, &mut output).await;
    }
    Ok(Some(status))
}

fn pty_error(e: pty_process::Error) -> io::Error {
    match e {
        pty_process::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

fn size(cols: u32, rows: u32) -> pty_process::Size {
    let clamp = |n: u32, default: u16| match u16::try_from(n) {
        Ok(0) | Err(_) => default,
        Ok(n) => n,
    };
    pty_process::Size::new(clamp(rows, 24), clamp(cols, 80))
}

/// Copies a process's output to the channel until EOF (a PTY reads as an
/// error once the terminal is closed).
async fn pump(mut from: impl AsyncRead + Unpin, to: &ChannelWriteHalf<Msg>, ext: Option<u32>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = Bytes::copy_from_slice(&buf[..n]);
        let sent = match ext {
            None => to.data_bytes(data).await,
            Some(ext) => to.extended_data_bytes(ext, data).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Feeds the channel's data to the process's stdin until the client closes
/// the channel; EOF closes stdin.
async fn feed(
    reader: &mut ChannelReadHalf,
    mut stdin: Option<impl AsyncWrite + Unpin>,
    signal: impl Fn(&Sig),
) {
    while let Some(message) = reader.wait().await {
        match message {
            ChannelMsg::Data { data } => {
                if let Some(pipe) = &mut stdin
                    && pipe.write_all(&data).await.is_err()
                {
                    stdin = None;
                }
            }
            ChannelMsg::Eof => stdin = None,
            ChannelMsg::Signal { signal: sig } => signal(&sig),
            ChannelMsg::Close => return,
            _ => {}
        }
    }
}

/// Feeds the channel's data to the terminal until the client closes the
/// channel, and resizes it on `window-change`.
async fn feed_terminal(
    reader: &mut ChannelReadHalf,
    mut pty: pty_process::OwnedWritePty,
    pid: Option<u32>,
) {
    while let Some(message) = reader.wait().await {
        match message {
            ChannelMsg::Data { data } => {
                let Ok(()) = pty.write_all(&data).await else {
                    return;
                };
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                if let Err(e) = pty.resize(size(col_width, row_height)) {
                    tracing::debug!(error = %e, "ssh: resizing a pty");
                }
            }
            ChannelMsg::Signal { signal } => send_signal(pid, &signal, true),
            ChannelMsg::Close => return,
            _ => {}
        }
    }
}

/// Delivers a client's `signal` request: to the process, or to its whole
/// process group on a PTY (where it leads its own session).
fn send_signal(pid: Option<u32>, signal: &Sig, group: bool) {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let signal = match signal {
        Sig::ABRT => Signal::ABORT,
        Sig::ALRM => Signal::ALARM,
        Sig::FPE => Signal::FPE,
        Sig::HUP => Signal::HUP,
        Sig::ILL => Signal::ILL,
        Sig::INT => Signal::INT,
        Sig::KILL => Signal::KILL,
        Sig::PIPE => Signal::PIPE,
        Sig::QUIT => Signal::QUIT,
        Sig::SEGV => Signal::SEGV,
        Sig::TERM => Signal::TERM,
        Sig::USR1 => Signal::USR1,
        Sig::Custom(name) if name == "USR2" => Signal::USR2,
        Sig::Custom(_) => return,
    };
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(Pid::from_raw)
    else {
        return;
    };
    let sent = if group {
        kill_process_group(pid, signal)
    } else {
        kill_process(pid, signal)
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "ssh: delivering a signal");
    }
}

/// The SSH name of the signal that ended a process (RFC 4254 §6.10).
fn signal_name(signal: i32) -> Sig {
    match signal {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        libc::SIGUSR2 => Sig::Custom("USR2".into()),
        other => Sig::Custom(other.to_string()),
    }
}
