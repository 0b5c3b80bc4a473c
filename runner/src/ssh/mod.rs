//! The SSH server embedded in every runner. Runners have no inbound port: the
//! agent hands each tunnel that grad splices to gractl (or any byte stream) to
//! [`Server::serve`], and SSH runs end to end inside it (ARCHITECTURE.md,
//! "Connections").
//!
//! One [`Server`] per runner holds the host key (kept in the state dir across
//! restarts) and the set of user keys allowed in, which grad keeps up to date.
//! Every session channel gets its own task ([`channel`]) that runs a command
//! or a shell ([`process`], with a PTY when asked) or the SFTP subsystem
//! ([`sftp`], confined to the workspace by [`root`] when configured).

mod channel;
mod host_key;
mod process;
mod root;
mod sftp;

use std::{
    collections::HashMap,
    io,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use russh::{
    Channel, ChannelId, MethodKind, MethodSet, SshId,
    keys::{PrivateKey, PublicKey, ssh_key::public::KeyData},
    server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
};

use self::root::Root;

/// The host key's file name inside [`Config::state_dir`].
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Where the server keeps its state and which files it serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// The runner's workspace root (code/, outputs/, data/). SFTP is confined
    /// to it; shells and exec start in it.
    pub workspace: PathBuf,
    /// Where the host key is kept across restarts (file
    /// `ssh_host_ed25519_key`, mode 0600, created on first start).
    pub state_dir: PathBuf,
    /// Confine SFTP to `workspace`: its "/" is the workspace, and neither
    /// `..` nor a symlink leads out of it.
    pub confine: bool,
}

/// Why the server could not start or a connection failed.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("workspace {path} is not usable")]
    Workspace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the state dir {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading or writing the host key {path}")]
    HostKeyFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host key {path} is not an OpenSSH private key")]
    HostKeyFormat {
        path: PathBuf,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("generating the host key")]
    HostKeyGenerate(#[source] russh::keys::ssh_key::Error),
    #[error("drawing random bytes for the host key")]
    Random(#[source] rand::rand_core::OsError),
    #[error("ssh connection")]
    Ssh(#[from] russh::Error),
}

/// A runner's SSH server. Shared as `Arc<Server>`; every connection is one
/// [`Server::serve`] call.
pub struct Server {
    workspace: PathBuf,
    root: Arc<Root>,
    host_key: PublicKey,
    ssh: Arc<russh::server::Config>,
    authorized: RwLock<Vec<KeyData>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("workspace", &self.workspace)
            .field("host_key", &self.host_public_key())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads the host key from `config.state_dir` (creating it on first
    /// start). Nobody can log in until [`Server::set_authorized_keys`].
    pub fn new(config: Config) -> Result<Arc<Server>, Error> {
        let workspace = config
            .workspace
            .canonicalize()
            .map_err(|source| Error::Workspace {
                path: config.workspace.clone(),
                source,
            })?;
        let root = Root::new(&workspace, config.confine);
        let key = host_key::load_or_create(&config.state_dir)?;
        let host_key = PublicKey::from(key.public_key().key_data().clone());
        Ok(Arc::new(Server {
            workspace,
            root: Arc::new(root),
            host_key,
            ssh: Arc::new(ssh_config(key)),
            authorized: RwLock::new(Vec::new()),
        }))
    }

    /// The host public key in OpenSSH format, `ssh-ed25519 AAAA…` (no
    /// comment). grad records it; clients pin it.
    pub fn host_public_key(&self) -> String {
        // An Ed25519 public key always encodes; the fallback is unreachable.
        self.host_key.to_openssh().unwrap_or_default()
    }

    /// Replaces the user keys (OpenSSH public key lines) allowed to log in.
    /// Lines that don't parse are skipped with a warning. Connections already
    /// in are not affected; new attempts see the new set.
    pub fn set_authorized_keys(&self, keys: &[String]) {
        let parsed: Vec<KeyData> = keys
            .iter()
            .map(|line| line.trim())
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| match PublicKey::from_openssh(line) {
                Ok(key) => Some(key.key_data().clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an authorized key that does not parse");
                    None
                }
            })
            .collect();
        match self.authorized.write() {
            Ok(mut authorized) => *authorized = parsed,
            Err(poisoned) => *poisoned.into_inner() = parsed,
        }
    }

    /// Runs one SSH connection over `stream` until either side ends it.
    /// Dropping the future ends the connection's channels and their processes.
    pub async fn serve<S>(self: &Arc<Self>, stream: S) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handler = Connection {
            server: Arc::clone(self),
            channels: HashMap::new(),
            tasks: JoinSet::new(),
        };
        let session = russh::server::run_stream(Arc::clone(&self.ssh), stream, handler).await?;
        // russh runs the session in its own task: if this future is dropped
        // (the agent shutting down), tell that task to end too.
        let mut guard = DisconnectOnDrop(Some(session.handle()));
        let result = session.await;
        guard.0 = None;
        result
    }

    fn is_authorized(&self, key: &PublicKey) -> bool {
        let authorized = match self.authorized.read() {
            Ok(authorized) => authorized,
            Err(poisoned) => poisoned.into_inner(),
        };
        authorized.iter().any(|k| k == key.key_data())
    }
}

fn ssh_config(key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        server_id: SshId::Standard(
            concat!("SSH-2.0-grad-runner_", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Rejections are answered after a constant delay; short, so a client
        // offering several keys is not slowed down much.
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        // A tunnel may sit idle for hours (an open shell); keep-alives find
        // dead ones instead of an inactivity timeout.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        // Room for a long-latency tunnel: the client may keep this much in
        // flight per channel before waiting for a window adjustment.
        window_size: 8 * 1024 * 1024,
        // The largest channel packet a client may send (russh's ceiling, as
        // gractl's): twice the default, so half the packets for an upload.
        maximum_packet_size: 65535,
        ..Default::default()
    }
}

/// Tells the session to disconnect if [`Server::serve`] is dropped early.
struct DisconnectOnDrop(Option<russh::server::Handle>);

impl Drop for DisconnectOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Drop can't await; the task only queues one message and ends.
            runtime.spawn(async move {
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "runner closing".into(),
                        String::new(),
                    )
                    .await;
            });
        }
    }
}

/// What the connection has decided about one session channel, so that it
/// answers each request the way the channel's task will act on it.
#[derive(Default)]
struct ChannelState {
    /// A command, shell or subsystem is running: later requests of that kind
    /// (and pty/env) are refused.
    started: bool,
}

/// The russh handler of one connection: authenticates, accepts channels and
/// answers their requests. The work happens in one task per channel, owned by
/// `tasks` so that it ends with the connection.
struct Connection {
    server: Arc<Server>,
    channels: HashMap<ChannelId, ChannelState>,
    tasks: JoinSet<()>,
}

impl Connection {
    fn start(&mut self, channel: ChannelId) -> bool {
        let state = self.channels.entry(channel).or_default();
        !std::mem::replace(&mut state.started, true)
    }

    fn not_started(&self, channel: ChannelId) -> bool {
        self.channels.get(&channel).is_some_and(|s| !s.started)
    }

    fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), Error> {
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }
}

impl russh::server::Handler for Connection {
    type Error = Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Error> {
        Ok(if self.server.is_authorized(offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Error> {
        if self.server.is_authorized(key.public_key) {
            tracing::info!(user, "ssh login");
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Error> {
        self.reap();
        self.channels.insert(channel.id(), ChannelState::default());
        let context = channel::Context {
            workspace: self.server.workspace.clone(),
            root: Arc::clone(&self.server.root),
            handle: session.handle(),
        };
        self.tasks.spawn(channel::run(channel, context));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Error> {
        self.reap();
        let target = (host_to_connect.to_string(), port_to_connect);
        self.tasks.spawn(channel::forward(channel, reply, target));
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _: &mut Session) -> Result<(), Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Error> {
        let ok = self.not_started(channel);
        Self::reply(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Error> {
        let ok = self.not_started(channel) && channel::env_allowed(name);
        Self::reply(session, channel, ok)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Error> {
        let ok = self.start(channel);
        Self::reply(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Error> {
        let ok = self.start(channel);
        Self::reply(session, channel, ok)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Error> {
        let ok = name == "sftp" && self.start(channel);
        Self::reply(session, channel, ok)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Error> {
        Self::reply(session, channel, true)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Error> {
        Self::reply(session, channel, false)
    }
}
