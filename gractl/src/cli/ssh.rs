//! `gractl ssh`, `gractl ssh-config` and `gractl ssh-key`.

use std::{
    io::{self, IsTerminal, Read, Write},
    path::PathBuf,
    pin::Pin,
    task::{Context as TaskContext, Poll},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use grad_proto::{Runner, RunnerState};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};

use super::Context;
use crate::{
    client::Client,
    exit::{Code, Failure, RemoteExit},
    output::{self, Format, Table},
    ssh::{
        self,
        openssh::{self, KnownHosts},
        session::{Exit, Input, Pty, Request},
    },
    terminal,
};

/// Bytes read from stdin at a time.
const CHUNK: usize = 64 * 1024;
/// Chunks of stdin queued for the runner before reading stops.
const QUEUED: usize = 16;

#[derive(Debug, Args)]
pub struct SshArgs {
    /// Runner name (`r1`, or `r1.grad` as OpenSSH's %h gives it)
    runner: String,
    /// Connect stdin and stdout to the runner's SSH server, for OpenSSH:
    /// `ssh -o ProxyCommand='gractl ssh --stdio %h' r1` (see `gractl ssh-config`)
    #[arg(long, conflicts_with_all = ["tty", "no_tty", "command"])]
    stdio: bool,
    /// Give COMMAND a terminal too (for interactive programs like top)
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,
    /// Never allocate a terminal, not even for a shell
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// A command for the runner's shell instead of an interactive shell;
    /// several words are joined with spaces, as OpenSSH's ssh does
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Also runners that are not ready now (paused, starting, failed);
    /// runners that never started have no host key yet and are left out
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Subcommand)]
pub enum SshKeyCommand {
    /// List your SSH keys registered with grad
    #[command(visible_alias = "ls")]
    List,
    /// Register a public key (a .pub file) so your runners accept it
    Add {
        /// The public key file, e.g. ~/.ssh/id_ed25519.pub
        file: PathBuf,
        /// A name for it [default: the key's comment]
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a key: runners stop accepting it
    #[command(visible_alias = "rm")]
    Delete {
        /// As `gractl ssh-key list` shows it: SHA256:...
        fingerprint: String,
    },
}

pub(super) async fn ssh(context: &Context, args: SshArgs) -> anyhow::Result<()> {
    if args.stdio {
        return stdio(context, &args.runner).await;
    }
    let runner = openssh::runner_from_host(&args.runner).to_owned();
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let identity = context.identity()?;
    let record = ssh::lookup(&client, &identity, &runner).await?;
    remember_host_key(context, &runner, &record);
    let expected = ssh::host_key(&runner, &record.host_key)?;
    let handle = ssh::connect_pinned(&client, &identity, &runner, &expected).await?;

    let stdin_is_terminal = io::stdin().is_terminal();
    let command = (!args.command.is_empty()).then(|| args.command.join(" "));
    let wants_pty = if command.is_some() {
        args.tty
    } else {
        !args.no_tty && (args.tty || stdin_is_terminal)
    };
    let pty = wants_pty.then(|| {
        let (columns, rows) = terminal::size().unwrap_or((80, 24));
        Pty {
            term: context.term.clone().unwrap_or_else(|| "dumb".into()),
            columns,
            rows,
        }
    });
    let request = Request {
        command,
        pty,
        env: context.locale.clone(),
    };
    // Raw mode only with a remote terminal to interpret the keys; restored
    // when `raw_mode` is dropped, whatever happens below.
    let raw_mode = if request.pty.is_some() && stdin_is_terminal {
        Some(terminal::RawMode::enable().context("cannot put the terminal into raw mode")?)
    } else {
        None
    };
    let resizes = Resizes::new(request.pty.is_some())?;
    let input = stdin_stream().merge(resizes);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let exit = tokio::select! {
        exit = ssh::session::run(&handle, &request, input, &mut stdout, &mut stderr) => exit?,
        // Leave through the guard above, so the terminal is usable again.
        _ = terminate.recv() => Exit::Signal("TERM".into()),
        _ = hangup.recv() => Exit::Signal("HUP".into()),
    };
    drop(raw_mode);
    match exit {
        Exit::Status(0) => Ok(()),
        Exit::Unknown => Err(Failure::new(
            Code::Unavailable,
            format!("runner {runner} closed the session without an exit status"),
        )
        .into()),
        exit => Err(RemoteExit(exit.code()).into()),
    }
}

/// `--stdio`: the raw tunnel on stdin/stdout, SSH is OpenSSH's business.
async fn stdio(context: &Context, host: &str) -> anyhow::Result<()> {
    let runner = openssh::runner_from_host(host);
    // The ProxyCommand that `gractl ssh-config` writes names the server, so
    // whatever directory ssh runs in, its workspace does not matter.
    let workspace = match context.server {
        Some(_) => None,
        None => context.workspace()?,
    };
    let client = context.connect(workspace.as_ref()).await?;
    let identity = context.identity()?;
    let record = ssh::lookup(&client, &identity, runner).await?;
    remember_host_key(context, runner, &record);
    let tunnel = client.open_tunnel(runner).await?;
    let (mut from_runner, mut to_runner) = tokio::io::split(tunnel);

    let mut input = stdin_chunks();
    let upstream = async {
        while let Some(chunk) = input.recv().await {
            to_runner.write_all(&chunk).await?;
        }
        // OpenSSH closed our stdin: end our half; the runner ends its own.
        to_runner.shutdown().await
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        let mut buffer = vec![0; CHUNK * 4];
        loop {
            let n = from_runner.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            stdout.write_all(&buffer[..n]).await?;
            stdout.flush().await?;
        }
        Ok::<_, io::Error>(())
    };
    tokio::pin!(upstream, downstream);
    let mut upstream_done = false;
    loop {
        tokio::select! {
            done = &mut downstream => {
                // The runner hung up: there is nothing more to say.
                match done {
                    Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
                        return Err(anyhow::Error::from(error).context(format!("tunnel to runner {runner}")));
                    }
                    _ => return Ok(()),
                }
            }
            done = &mut upstream, if !upstream_done => {
                upstream_done = true;
                done.with_context(|| format!("tunnel to runner {runner}"))?;
            }
        }
    }
}

/// Writes the runner's host key into gractl's `known_hosts`, for OpenSSH.
/// Best effort: `gractl ssh` itself checks the key in memory. Another
/// user's runner (an admin's OWNER/NAME) is not one of the caller's hosts.
fn remember_host_key(context: &Context, name: &str, runner: &Runner) {
    if name.contains('/') {
        return;
    }
    let Ok(files) = context.ssh_files() else {
        return;
    };
    let Ok(mut known) = KnownHosts::load(&files.known_hosts) else {
        return;
    };
    if known.set(&runner.name, &runner.host_key) {
        let _ = known.save(&files.known_hosts);
    }
}

/// Reads stdin on its own thread: a blocking read cannot be cancelled, so
/// it must not hold up the runtime, and ends with the process.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (chunks, receiver) = mpsc::channel(QUEUED);
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buffer = vec![0; CHUNK];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if chunks.blocking_send(buffer[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    receiver
}

/// Stdin as session input, ending with `Eof`.
fn stdin_stream() -> impl Stream<Item = Input> {
    ReceiverStream::new(stdin_chunks())
        .map(Input::Data)
        .chain(tokio_stream::once(Input::Eof))
}

/// The terminal's new size on every SIGWINCH; nothing when not `wanted`.
struct Resizes {
    signal: Option<Signal>,
}

impl Resizes {
    fn new(wanted: bool) -> io::Result<Resizes> {
        let signal = match wanted {
            true => Some(signal(SignalKind::window_change())?),
            false => None,
        };
        Ok(Resizes { signal })
    }
}

impl Stream for Resizes {
    type Item = Input;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Input>> {
        let Some(signal) = self.signal.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match signal.poll_recv(cx) {
                Poll::Ready(Some(())) => {
                    if let Some((columns, rows)) = terminal::size() {
                        return Poll::Ready(Some(Input::Resize { columns, rows }));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

pub(super) async fn ssh_config(context: &Context, args: SshConfigArgs) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let identity = context.identity()?;
    let files = context.ssh_files()?;
    let (runners, ()) = tokio::try_join!(
        async { Ok::<_, ssh::Error>(client.list_runners(false).await?) },
        identity.register(&client),
    )?;

    let mut known = KnownHosts::default();
    for runner in &runners {
        known.set(&runner.name, &runner.host_key);
    }
    known
        .save(&files.known_hosts)
        .with_context(|| format!("cannot write {}", files.known_hosts.display()))?;

    let mut names: Vec<&str> = Vec::new();
    let mut without_key: Vec<&str> = Vec::new();
    for runner in &runners {
        if known.get(&runner.name).is_none() {
            without_key.push(&runner.name);
        } else if args.all || runner.state() == RunnerState::Ready {
            names.push(&runner.name);
        }
    }
    names.sort_unstable();
    let settings = openssh::Settings {
        gractl: proxy_words(context, &client)?,
        identity: identity.path().to_owned(),
        known_hosts: files.known_hosts.clone(),
        user: ssh::USER.into(),
    };
    let text = openssh::config(client.server(), &names, &settings);
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            out.write_all(text.as_bytes())?;
            if !without_key.is_empty() && io::stderr().is_terminal() {
                eprintln!(
                    "# left out (no host key yet: never started): {}",
                    without_key.join(", ")
                );
            }
        }
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &output::SshConfig {
                config: text,
                runners: names.iter().map(|name| (*name).to_owned()).collect(),
                identity_file: identity.path().display().to_string(),
                known_hosts_file: files.known_hosts.display().to_string(),
            },
        )?,
    }
    Ok(())
}

/// This gractl, as the ProxyCommand runs it: its absolute path, the server
/// (so it works from any directory), and the credentials file if not the
/// default one.
fn proxy_words(context: &Context, client: &Client) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the path of this gractl")?;
    let mut words = vec![
        exe.to_string_lossy().into_owned(),
        "--server".into(),
        client.server().to_owned(),
    ];
    if context.explicit_config
        && let Some(path) = &context.credentials_path
    {
        let path = std::path::absolute(path)
            .with_context(|| format!("cannot make {} absolute", path.display()))?;
        words.extend(["--config".into(), path.to_string_lossy().into_owned()]);
    }
    Ok(words)
}

pub(super) async fn ssh_key(context: &Context, command: SshKeyCommand) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let mut out = io::stdout().lock();
    match command {
        SshKeyCommand::List => {
            let keys = client.list_ssh_keys().await?;
            // Marks gractl's own key, if this machine has one (never makes one).
            let own = context
                .ssh_files()
                .ok()
                .and_then(|files| std::fs::read_to_string(&files.identity).ok())
                .and_then(|text| russh::keys::PrivateKey::from_openssh(&text).ok())
                .map(|key| ssh::fingerprint(key.public_key()));
            let keys: Vec<_> = keys
                .iter()
                .map(|key| output::SshKey::new(key, own.as_deref()))
                .collect();
            match context.format {
                Format::Table => {
                    let mut table = Table::new(&["FINGERPRINT", "NAME", "CREATED"]);
                    for key in &keys {
                        let mut name = key.name.clone();
                        if key.gractl {
                            name.push_str(" (gractl, this machine)");
                        }
                        table.row(vec![
                            key.fingerprint.clone(),
                            name,
                            key.created.clone().unwrap_or_else(|| "-".into()),
                        ]);
                    }
                    table.write(&mut out)?;
                }
                Format::Json => output::write_json(&mut out, &output::SshKeyList { keys })?,
                Format::Ndjson => {
                    for key in &keys {
                        output::write_json(&mut out, key)?;
                    }
                }
            }
        }
        SshKeyCommand::Add { file, name } => {
            let text = std::fs::read_to_string(&file).map_err(|error| {
                let code = match error.kind() {
                    io::ErrorKind::NotFound => Code::NotFound,
                    _ => Code::Usage,
                };
                Failure::new(code, format!("cannot read {}: {error}", file.display()))
            })?;
            let line = text
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("");
            let key = client
                .add_ssh_key(line.trim(), name.as_deref().unwrap_or(""))
                .await
                .with_context(|| format!("adding {}", file.display()))?;
            print_key(context, &mut out, &key, "added")?;
        }
        SshKeyCommand::Delete { fingerprint } => {
            let key = client.delete_ssh_key(&fingerprint).await?;
            print_key(context, &mut out, &key, "deleted")?;
        }
    }
    Ok(())
}

fn print_key(
    context: &Context,
    out: &mut impl Write,
    key: &grad_proto::SshKey,
    verb: &str,
) -> anyhow::Result<()> {
    match context.format {
        Format::Table => writeln!(out, "ssh-key/{} {verb}", key.fingerprint)?,
        Format::Json | Format::Ndjson => output::write_json(out, &output::SshKey::new(key, None))?,
    }
    Ok(())
}
