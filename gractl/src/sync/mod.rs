//! `gractl workspace sync`: each runner's workspace mounted at
//! `workspace/runners/<name>/` (see `ARCHITECTURE.md`, "gractl"), one FUSE
//! mount per runner, backed by SFTP over the runner's SSH connection.
//!
//! [`mount`] is the filesystem itself and knows nothing about grad: it takes
//! a [`Connect`] closure that yields an SFTP byte stream (an SSH channel to a
//! runner, or a pipe to OpenSSH's `sftp-server` in tests) and calls it again
//! whenever the connection breaks. [`daemon`] is the process that keeps one
//! mount per ready runner, and [`state`] the file through which the CLI finds
//! and checks that process.
//!
//! Speed comes from keeping the link busy: requests are pipelined,
//! sequential reads are fetched ahead, writes are buffered and sent as large
//! writes, and attributes and listings are cached for [`Options::cache_ttl`]
//! and kept current by this mount's own changes. See [`fuse`] for what is
//! not supported.

pub mod daemon;
mod file;
pub mod fuse;
mod nodes;
mod remote;
pub mod state;

use std::{
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use fuser::{BackgroundSession, MountOption};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use remote::{BoxError, Connect, Connecting, Stream, connect_with};

use self::{
    fuse::{Core, Fs, Settings},
    nodes::Owner,
    remote::Remote,
};

/// How a mount behaves. The defaults suit a runner over a tunnel.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's directory shown at the mount point: `/` on a runner
    /// (its workspace), a temporary directory with OpenSSH's `sftp-server`.
    pub root: String,
    /// The mount's source in `/proc/self/mountinfo` (`gractl:r1`).
    pub name: String,
    /// Any SFTP request, and a reconnection attempt, fails with EIO after this.
    pub timeout: Duration,
    /// How long attributes, names and listings from the server are trusted
    /// (and how long the kernel may cache them).
    pub cache_ttl: Duration,
    /// Chunks (of the server's largest read, 255 KiB on OpenSSH) kept in
    /// flight ahead of a sequential reader.
    pub read_ahead: usize,
    /// Bytes of writes in flight per file before writers wait.
    pub write_window: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            root: "/".into(),
            name: "gractl".into(),
            timeout: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(1),
            read_ahead: 8,
            write_window: 8 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "/dev/fuse is missing: load the fuse kernel module (`modprobe fuse`), or give the \
         container the device (`--device /dev/fuse`)"
    )]
    NoFuseDevice,
    #[error("fusermount3 is not installed: install the `fuse3` package")]
    NoFusermount,
    #[error("cannot connect")]
    Connect(#[source] BoxError),
    #[error("the server did not start an SFTP session")]
    Sftp(#[source] russh_sftp::client::error::Error),
    #[error("the server's directory {root} cannot be used")]
    Root {
        root: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount at {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks what mounting needs: `/dev/fuse` and `fusermount3` (used to
/// mount as a normal user and to detach a busy mount).
pub fn check_prerequisites() -> Result<(), Error> {
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::NoFuseDevice);
    }
    let probe = Command::new("fusermount3")
        .arg("-V")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(Error::NoFusermount),
        _ => Ok(()),
    }
}

/// A mounted filesystem. Dropping it unmounts (best effort); prefer
/// [`Mount::unmount`], which reports failures and waits for the work in
/// flight.
pub struct Mount {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    remote: Arc<Remote>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.is_mounted())
            .finish_non_exhaustive()
    }
}

/// Mounts the server's `options.root` at `mountpoint` (an existing, empty
/// directory) and serves it until [`Mount::unmount`]. `connect` is called
/// now (its failure fails the mount) and again after every broken
/// connection, with backoff.
///
/// The filesystem's work runs on the current tokio runtime; a multi-thread
/// runtime lets it use more than one core.
pub async fn mount(mountpoint: &Path, connect: Connect, options: Options) -> Result<Mount, Error> {
    check_prerequisites()?;
    let mountpoint = std::path::absolute(mountpoint).map_err(|source| Error::Mount {
        path: mountpoint.to_owned(),
        source,
    })?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Stops the reconnection task if mounting fails below.
    let stop_on_failure = shutdown.clone().drop_guard();
    let remote = Remote::start(
        connect,
        &options.root,
        options.timeout,
        shutdown.clone(),
        tasks.clone(),
    )
    .await?;
    let root_error = |source: io::Error| Error::Root {
        root: options.root.clone(),
        source,
    };
    let conn = remote
        .conn()
        .await
        .map_err(|errno| root_error(io::Error::from_raw_os_error(errno.code())))?;
    let root = conn
        .lstat("")
        .await
        .map_err(|errno| root_error(io::Error::from_raw_os_error(errno.code())))?;
    if !root.is_dir() {
        return Err(root_error(io::Error::other("not a directory")));
    }
    let owner = Owner {
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
    };
    let settings = Settings {
        ttl: options.cache_ttl,
        read_ahead: options.read_ahead,
        write_window: options.write_window,
        owner,
    };
    let core = Arc::new(Core::new(
        Arc::clone(&remote),
        settings,
        tokio::runtime::Handle::current(),
        tasks.clone(),
        shutdown.clone(),
    ));
    core.set_root(&root);
    let mut config = fuser::Config::default();
    // Shown as `fuse.gractl` (with fusermount3) or `fuse`, source `gractl:r1`.
    config.mount_options = vec![
        MountOption::FSName(options.name.clone()),
        MountOption::Subtype("gractl".into()),
        MountOption::NoAtime,
    ];
    let fs = Fs::new(core);
    let at = mountpoint.clone();
    let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &at, &config))
        .await
        .map_err(|error| Error::Mount {
            path: mountpoint.clone(),
            source: io::Error::other(error.to_string()),
        })?
        .map_err(|source| Error::Mount {
            path: mountpoint.clone(),
            source,
        })?;
    stop_on_failure.disarm();
    Ok(Mount {
        mountpoint,
        session: Some(session),
        remote,
        shutdown,
        tasks,
    })
}

/// How long unmounting waits for requests still being answered.
const DRAIN: Duration = Duration::from_secs(5);

impl Mount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The kernel still has it mounted (nobody unmounted it from outside).
    pub fn is_mounted(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|session| !session.guard.is_finished())
    }

    /// The SFTP connection is up (false while it is being re-established).
    pub fn is_connected(&self) -> bool {
        self.remote.is_connected()
    }

    /// Unmounts. A mount still in use (a shell inside it, an open file) is
    /// detached instead: it disappears now and the kernel lets go of it when
    /// the last user does.
    pub async fn unmount(mut self) -> Result<(), Error> {
        let result = match self.session.take() {
            Some(session) => {
                let unmounted = tokio::task::spawn_blocking(move || session.umount_and_join())
                    .await
                    .map_err(|error| io::Error::other(error.to_string()))
                    .and_then(|result| result);
                match unmounted {
                    Ok(()) => Ok(()),
                    Err(_) if !state::is_mounted(&self.mountpoint) => Ok(()),
                    Err(_) => force_unmount(&self.mountpoint),
                }
            }
            None => Ok(()),
        };
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(DRAIN, self.tasks.wait()).await;
        result
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Dropping the session unmounts (fuser logs a failure).
        self.session.take();
    }
}

/// Detaches whatever is mounted at `path` (`fusermount3 -u -z`, or
/// `umount -l` where fusermount3 cannot): for a mount whose process died,
/// or one still in use.
pub fn force_unmount(path: &Path) -> Result<(), Error> {
    let run = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    let mut last = None;
    for (program, args) in [
        ("fusermount3", &["-u", "-z", "--"][..]),
        ("umount", &["-l"][..]),
    ] {
        match run(program, args) {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => {
                last = Some(io::Error::other(
                    String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                ));
            }
            Err(error) => last = Some(error),
        }
        if !state::is_mounted(path) {
            return Ok(());
        }
    }
    Err(Error::Unmount {
        path: path.to_owned(),
        source: last.unwrap_or_else(|| io::Error::other("still mounted")),
    })
}
