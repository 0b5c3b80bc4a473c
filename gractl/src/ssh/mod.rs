//! SSH to runners, end to end through grad (see `ARCHITECTURE.md`,
//! "Connections"): gractl opens a tunnel ([`Client::open_tunnel`]), runs a
//! russh client over it, checks the runner's host key against the one grad
//! recorded, and signs in with gractl's own key ([`Identity`]), which it
//! registers with grad first.
//!
//! [`connect`] gives an SSH connection [`Handle`]; [`sftp`] starts an SFTP
//! session on it (used by `gractl cp` and the workspace sync); [`session`]
//! runs commands and shells; [`openssh`] writes the config and
//! `known_hosts` that let OpenSSH's own tools in through `gractl ssh --stdio`.
//!
//! The layers are separate so each can be tested on its own:
//! [`connect_stream`] runs SSH over any byte stream (a TCP socket to
//! OpenSSH's `sshd` in tests) with an expected host key.

mod identity;
pub mod openssh;
pub mod session;

use std::{path::Path, sync::Arc, time::Duration};

use grad_proto::Runner;
use russh::{
    Preferred, cipher,
    client::{self, AuthResult},
    keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate},
};
use russh_sftp::client::SftpSession;
use tokio::io::{AsyncRead, AsyncWrite};

pub use identity::Identity;
pub use russh_sftp::client::Config as SftpConfig;

use crate::client::{Client, ClientError};

/// The user name gractl signs in as. Runners accept any name (the key
/// decides); OpenSSH configs written by [`openssh`] use the same one.
pub const USER: &str = "root";

/// An SSH connection to a runner. Cloning is not needed: channels are opened
/// through `&Handle`, any number at once.
pub type Handle = client::Handle<PinnedHostKey>;

/// Bytes the runner may send on one channel before it waits for us (SFTP
/// keeps many reads in flight; the default 2 MiB would throttle them).
const WINDOW: u32 = 16 << 20;
/// The largest SSH packet the runner may send us (russh's ceiling).
const MAX_PACKET: u32 = 65535;
/// Notices a dead tunnel within about a minute, even when idle.
const KEEPALIVE: Duration = Duration::from_secs(20);
const KEEPALIVE_MAX: usize = 3;
/// How long the SSH handshake and sign-in may take over an open stream.
const HANDSHAKE: Duration = Duration::from_secs(30);
/// Requests in flight per open SFTP file, each up to the server's limit
/// (OpenSSH and grad-runner: about 256 KiB).
const SFTP_IN_FLIGHT: usize = 32;
const SFTP_PACKET: u32 = 256 * 1024;
const SFTP_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// grad refused or failed a call (the runner is unknown, paused, ...).
    #[error(transparent)]
    Grad(#[from] ClientError),
    #[error(
        "runner {runner} has no SSH host key recorded: a runner reports its key when it first \
         attaches to grad; wait until `gractl runner get {runner}` shows it ready"
    )]
    NoHostKey { runner: String },
    #[error("grad recorded an unreadable SSH host key for runner {runner}: {reason}")]
    BadHostKey { runner: String, reason: String },
    #[error(
        "host key of runner {runner} does not match the one grad recorded \
         (expected {expected}, got {got})"
    )]
    HostKeyMismatch {
        runner: String,
        expected: String,
        got: String,
    },
    #[error(
        "runner {runner} refused gractl's SSH key {fingerprint}; check that it is registered \
         (`gractl ssh-key list`)"
    )]
    KeyRejected { runner: String, fingerprint: String },
    #[error(
        "runner {runner} did not complete the SSH handshake within {}s",
        HANDSHAKE.as_secs()
    )]
    HandshakeTimeout { runner: String },
    #[error("SSH connection to runner {runner} failed: {source}")]
    Ssh {
        runner: String,
        #[source]
        source: russh::Error,
    },
    /// An SSH channel could not be opened or used (the connection ended).
    #[error("SSH channel failed: {0}")]
    Channel(#[source] russh::Error),
    #[error("the runner refused to start {what}")]
    Refused { what: String },
    #[error("cannot start SFTP: {0}")]
    Sftp(#[source] russh_sftp::client::error::Error),
    /// The remote side's output could not be written here.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    /// gractl's key file (`path`) cannot be read, created or parsed.
    #[error("SSH key {}: {reason}", path.display())]
    Key {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Reaches `runner` (NAME, or OWNER/NAME for admins) over SSH through grad:
/// registers `identity` with grad (once per process) while reading the
/// runner's recorded host key, opens a tunnel, and runs the SSH handshake
/// over it, refusing any other host key. The connection lives until the
/// handle is dropped or the tunnel ends.
pub async fn connect(client: &Client, identity: &Identity, runner: &str) -> Result<Handle, Error> {
    let record = lookup(client, identity, runner).await?;
    let expected = host_key(runner, &record.host_key)?;
    connect_pinned(client, identity, runner, &expected).await
}

/// The first half of [`connect`]: registers `identity` with grad and reads
/// the runner's record (its `host_key` is what to expect), at once.
pub async fn lookup(client: &Client, identity: &Identity, runner: &str) -> Result<Runner, Error> {
    let (record, ()) = tokio::try_join!(
        async { Ok::<_, Error>(client.get_runner(runner).await?) },
        identity.register(client),
    )?;
    Ok(record)
}

/// The second half of [`connect`]: a tunnel to `runner` with SSH over it,
/// accepting only the host key `expected`.
pub async fn connect_pinned(
    client: &Client,
    identity: &Identity,
    runner: &str,
    expected: &PublicKey,
) -> Result<Handle, Error> {
    let tunnel = client.open_tunnel(runner).await?;
    connect_stream(tunnel, runner, expected, identity, USER).await
}

/// Parses the host key grad recorded for `runner` (OpenSSH format).
pub fn host_key(runner: &str, recorded: &str) -> Result<PublicKey, Error> {
    if recorded.trim().is_empty() {
        return Err(Error::NoHostKey {
            runner: runner.to_owned(),
        });
    }
    PublicKey::from_openssh(recorded.trim()).map_err(|error| Error::BadHostKey {
        runner: runner.to_owned(),
        reason: error.to_string(),
    })
}

/// `SHA256:...`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Runs SSH over `stream` (a tunnel, or any socket), accepting only
/// `expected` as the server's host key, and signs in as `user` with
/// `identity`. `runner` names the other end in errors.
pub async fn connect_stream<S>(
    stream: S,
    runner: &str,
    expected: &PublicKey,
    identity: &Identity,
    user: &str,
) -> Result<Handle, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = handshake(stream, runner, expected, identity, user);
    tokio::time::timeout(HANDSHAKE, handshake)
        .await
        .unwrap_or_else(|_| {
            Err(Error::HandshakeTimeout {
                runner: runner.to_owned(),
            })
        })
}

async fn handshake<S>(
    stream: S,
    runner: &str,
    expected: &PublicKey,
    identity: &Identity,
    user: &str,
) -> Result<Handle, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = PinnedHostKey {
        expected: expected.clone(),
    };
    let mut handle = client::connect_stream(Arc::new(config()), stream, handler)
        .await
        .map_err(|error| match error {
            HandshakeError::HostKey { got } => Error::HostKeyMismatch {
                runner: runner.to_owned(),
                expected: fingerprint(expected),
                got,
            },
            HandshakeError::Ssh(source) => Error::Ssh {
                runner: runner.to_owned(),
                source,
            },
        })?;
    let key = PrivateKeyWithHashAlg::new(identity.private_key(), None);
    let ssh_error = |source| Error::Ssh {
        runner: runner.to_owned(),
        source,
    };
    match handle
        .authenticate_publickey(user, key)
        .await
        .map_err(ssh_error)?
    {
        AuthResult::Success => Ok(handle),
        AuthResult::Failure { .. } => Err(Error::KeyRejected {
            runner: runner.to_owned(),
            fingerprint: identity.fingerprint(),
        }),
    }
}

/// Starts an SFTP session on a new channel of `handle`, tuned for bulk
/// transfers (many large requests in flight per file). Paths are the
/// server's: on a runner `/` is its workspace root, and relative paths
/// start there too.
pub async fn sftp(handle: &Handle) -> Result<SftpSession, Error> {
    sftp_with(handle, sftp_config()).await
}

/// [`sftp`] with another configuration (the workspace sync tunes its own).
pub async fn sftp_with(handle: &Handle, config: SftpConfig) -> Result<SftpSession, Error> {
    SftpSession::new_with_config(sftp_channel(handle).await?, config)
        .await
        .map_err(Error::Sftp)
}

/// A new channel of `handle` running the server's `sftp` subsystem, as a
/// byte stream, for an SFTP client of one's own.
pub async fn sftp_channel(handle: &Handle) -> Result<russh::ChannelStream<client::Msg>, Error> {
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(Error::Channel)?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(Error::Channel)?;
    // Wait for the answer: a server without SFTP says so here instead of
    // leaving the first request to time out.
    loop {
        match channel.wait().await {
            Some(russh::ChannelMsg::Success) => return Ok(channel.into_stream()),
            Some(russh::ChannelMsg::Failure | russh::ChannelMsg::Close) | None => {
                return Err(Error::Refused {
                    what: "the sftp subsystem".into(),
                });
            }
            Some(_) => {}
        }
    }
}

/// The SFTP settings [`sftp`] uses.
pub fn sftp_config() -> SftpConfig {
    SftpConfig {
        max_packet_len: SFTP_PACKET + 1024,
        max_concurrent_reads: SFTP_IN_FLIGHT,
        max_concurrent_writes: SFTP_IN_FLIGHT,
        max_write_packet_len: SFTP_PACKET,
        request_timeout_secs: SFTP_TIMEOUT_SECS,
    }
}

fn config() -> client::Config {
    // AES-GCM runs on the CPU's AES instructions and beats ChaCha20 for bulk
    // copies; ChaCha20 stays as the fallback.
    let preferred = Preferred {
        cipher: std::borrow::Cow::Owned(vec![
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
        ]),
        ..Preferred::default()
    };
    client::Config {
        window_size: WINDOW,
        maximum_packet_size: MAX_PACKET,
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        preferred,
        client_id: russh::SshId::Standard(
            concat!("SSH-2.0-gractl_", env!("CARGO_PKG_VERSION")).into(),
        ),
        ..client::Config::default()
    }
}

/// The russh client handler: accepts exactly one host key, the one grad
/// recorded for the runner. Anything else ends the handshake.
pub struct PinnedHostKey {
    expected: PublicKey,
}

/// Why [`PinnedHostKey`] stopped a handshake; [`connect_stream`] turns it
/// into an [`Error`] naming the runner.
#[derive(Debug)]
pub enum HandshakeError {
    Ssh(russh::Error),
    HostKey { got: String },
}

impl From<russh::Error> for HandshakeError {
    fn from(error: russh::Error) -> Self {
        HandshakeError::Ssh(error)
    }
}

impl client::Handler for PinnedHostKey {
    type Error = HandshakeError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. }
                if key.key_data() == self.expected.key_data() =>
            {
                Ok(true)
            }
            PublicKeyOrCertificate::PublicKey { key, .. } => Err(HandshakeError::HostKey {
                got: fingerprint(key),
            }),
            PublicKeyOrCertificate::Certificate(certificate) => Err(HandshakeError::HostKey {
                got: format!(
                    "a certificate for {}",
                    certificate.public_key().fingerprint(HashAlg::Sha256)
                ),
            }),
        }
    }
}

/// Where gractl keeps its SSH files: beside the credentials file
/// (`$XDG_CONFIG_HOME/gractl/`, or the directory of `--config`/`GRACTL_CONFIG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// gractl's private key (`id_ed25519`, mode 0600; `id_ed25519.pub` beside it).
    pub identity: std::path::PathBuf,
    /// The runners' host keys for OpenSSH (`known_hosts`), written by
    /// `gractl ssh-config` and refreshed by `gractl ssh`.
    pub known_hosts: std::path::PathBuf,
}

impl Files {
    pub fn in_dir(dir: &Path) -> Files {
        Files {
            identity: dir.join("id_ed25519"),
            known_hosts: dir.join("known_hosts"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwxNjMS61BO9lU4HLNZtAs7V3SZVOjctFI85IOQxleu test";

    #[test]
    fn a_runner_without_a_recorded_host_key_is_refused_by_name() {
        let error = host_key("r1", "").expect_err("empty");
        assert!(
            error
                .to_string()
                .starts_with("runner r1 has no SSH host key recorded"),
            "{error}"
        );
        let error = host_key("r1", "ssh-ed25519 !!!").expect_err("garbage");
        assert!(
            error
                .to_string()
                .starts_with("grad recorded an unreadable SSH host key for runner r1: "),
            "{error}"
        );
    }

    #[test]
    fn a_recorded_host_key_parses_with_the_fingerprint_ssh_keygen_prints() {
        let key = host_key("r1", KEY_A).expect("parses");
        // As grad's own tests and `ssh-keygen -l` have it.
        assert_eq!(
            fingerprint(&key),
            "SHA256:AE1qvapWigr2BiiDT7/EbUBMqYt07b/Q7URHRUQSkD4"
        );
    }

    #[test]
    fn a_host_key_mismatch_names_the_runner_and_both_fingerprints() {
        let error = Error::HostKeyMismatch {
            runner: "r1".into(),
            expected: "SHA256:aaa".into(),
            got: "SHA256:bbb".into(),
        };
        assert_eq!(
            error.to_string(),
            "host key of runner r1 does not match the one grad recorded \
             (expected SHA256:aaa, got SHA256:bbb)"
        );
    }

    #[test]
    fn gractl_files_live_beside_the_credentials() {
        let files = Files::in_dir(Path::new("/home/a/.config/gractl"));
        assert_eq!(
            files.identity,
            Path::new("/home/a/.config/gractl/id_ed25519")
        );
        assert_eq!(
            files.known_hosts,
            Path::new("/home/a/.config/gractl/known_hosts")
        );
    }
}
