//! A command or a shell on an SSH connection: what `gractl ssh` runs. The
//! caller supplies the input (bytes, end of input, terminal resizes) as a
//! stream and the two outputs, so the same code serves a terminal, pipes and
//! tests.

use std::pin::pin;

use russh::{ChannelMsg, Sig};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_stream::{Stream, StreamExt};

use super::{Error, Handle};

/// What to start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// A command line for the remote shell; `None` starts a login shell.
    pub command: Option<String>,
    /// A pseudo-terminal, for interactive use.
    pub pty: Option<Pty>,
    /// Environment variables to ask for (servers may ignore them).
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pty {
    /// `TERM`, e.g. `xterm-256color`.
    pub term: String,
    pub columns: u32,
    pub rows: u32,
}

/// Something for the remote side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Data(Vec<u8>),
    /// No more input: the remote side reads end of file.
    Eof,
    /// The local terminal changed size.
    Resize {
        columns: u32,
        rows: u32,
    },
}

/// How the remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Status(u32),
    /// Killed by a signal (`TERM`, `KILL`, ...).
    Signal(String),
    /// The channel closed without saying.
    Unknown,
}

impl Exit {
    /// The exit code a local shell would report: the status, or 128 plus
    /// the signal's number; 255 when unknown (as OpenSSH's `ssh` does).
    pub fn code(&self) -> u8 {
        match self {
            Exit::Status(status) => u8::try_from(*status).unwrap_or(255),
            Exit::Signal(name) => signal_number(name).map_or(255, |number| 128 + number),
            Exit::Unknown => 255,
        }
    }
}

fn signal_number(name: &str) -> Option<u8> {
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => return None,
    })
}

fn signal_name(signal: &Sig) -> String {
    match signal {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
    .to_owned()
}

/// Runs `request` on a new channel of `handle`: `input` goes to the remote
/// side, its stdout and stderr to `stdout` and `stderr` as they arrive
/// (with a PTY both come on stdout). Returns when the remote side closes
/// the channel; input left over is dropped.
pub async fn run<I, O, E>(
    handle: &Handle,
    request: &Request,
    input: I,
    stdout: &mut O,
    stderr: &mut E,
) -> Result<Exit, Error>
where
    I: Stream<Item = Input>,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let channel = handle
        .channel_open_session()
        .await
        .map_err(Error::Channel)?;
    for (name, value) in &request.env {
        channel
            .set_env(false, name.as_str(), value.as_str())
            .await
            .map_err(Error::Channel)?;
    }
    if let Some(pty) = &request.pty {
        channel
            .request_pty(false, &pty.term, pty.columns, pty.rows, 0, 0, &[])
            .await
            .map_err(Error::Channel)?;
    }
    let what = match &request.command {
        Some(command) => {
            channel
                .exec(true, command.as_bytes())
                .await
                .map_err(Error::Channel)?;
            "the command"
        }
        None => {
            channel.request_shell(true).await.map_err(Error::Channel)?;
            "a shell"
        }
    };
    let (mut reader, writer) = channel.split();

    // Output and input move independently: waiting for the remote window
    // to write input must not stop output from being read, or both sides
    // could wait on each other.
    let output = async {
        let mut exit = Exit::Unknown;
        let mut started = false;
        while let Some(message) = reader.wait().await {
            match message {
                ChannelMsg::Data { data } => write(stdout, &data).await?,
                ChannelMsg::ExtendedData { data, .. } => write(stderr, &data).await?,
                ChannelMsg::ExitStatus { exit_status } => exit = Exit::Status(exit_status),
                ChannelMsg::ExitSignal { signal_name: s, .. } => {
                    exit = Exit::Signal(signal_name(&s))
                }
                ChannelMsg::Success => started = true,
                ChannelMsg::Failure if !started => {
                    return Err(Error::Refused { what: what.into() });
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok(exit)
    };
    let input = async {
        let mut input = pin!(input);
        let mut eof = false;
        while let Some(item) = input.next().await {
            let sent = match item {
                Input::Data(_) if eof => Ok(()),
                Input::Data(bytes) => writer.data_bytes(bytes).await,
                Input::Resize { columns, rows } => writer.window_change(columns, rows, 0, 0).await,
                Input::Eof if eof => Ok(()),
                Input::Eof => {
                    eof = true;
                    writer.eof().await
                }
            };
            // The channel is gone: the output side sees why.
            if sent.is_err() {
                return;
            }
        }
        if !eof {
            let _ = writer.eof().await;
        }
    };
    let mut output = pin!(output);
    let mut input = pin!(input);
    let mut input_done = false;
    loop {
        tokio::select! {
            exit = &mut output => return exit,
            () = &mut input, if !input_done => input_done = true,
        }
    }
}

async fn write(out: &mut (impl AsyncWrite + Unpin), data: &[u8]) -> Result<(), Error> {
    let written = async {
        out.write_all(data).await?;
        out.flush().await
    };
    written.await.map_err(Error::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(Exit::Status(0).code(), 0);
        assert_eq!(Exit::Status(3).code(), 3);
        assert_eq!(Exit::Status(300).code(), 255);
        assert_eq!(Exit::Signal("KILL".into()).code(), 137);
        assert_eq!(Exit::Signal("TERM".into()).code(), 143);
        assert_eq!(Exit::Signal("WINCH".into()).code(), 255);
        assert_eq!(Exit::Unknown.code(), 255);
    }
}
