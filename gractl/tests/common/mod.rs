//! A private OpenSSH server for tests: `sshd -i` speaks SSH on its stdin and
//! stdout, so each connection gets its own server process and no port.
//!
//! Needs root and Debian's `openssh-server` (`/usr/sbin/sshd`); without them
//! [`Server::new`] says why and returns `None`, unless CI=true.

#![allow(dead_code)] // each test crate uses part of it

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
};

use gractl::ssh::{self, Handle, Identity};
use russh::keys::PublicKey;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

pub type Stream = tokio::io::Join<ChildStdout, ChildStdin>;

pub const SSHD: &str = "/usr/sbin/sshd";

/// A private OpenSSH server configuration: host key, authorised key
/// (gractl's), and a scratch directory the tests copy into.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub host_key: PublicKey,
    /// A key sshd accepts.
    pub identity: Identity,
}

impl Server {
    /// `None` (after saying why) when this machine cannot run sshd.
    pub fn new() -> Option<Server> {
        let missing = if !Path::new(SSHD).exists() {
            Some(format!(
                "{SSHD} is not installed (apt-get install openssh-server)"
            ))
        } else if !is_root() {
            Some("sshd -i needs root".to_owned())
        } else {
            None
        };
        if let Some(why) = missing {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true, but {why}"
            );
            eprintln!("skipping: {why}");
            return None;
        }
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();
        fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let host_key_path = dir.path().join("host_key");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key_path)
            .status()
            .unwrap();
        assert!(status.success());
        let host_key = PublicKey::read_openssh_file(dir.path().join("host_key.pub")).unwrap();
        let identity = Identity::load_or_create(&dir.path().join("gractl/id_ed25519")).unwrap();
        fs::write(
            dir.path().join("authorized_keys"),
            format!("{}\n", identity.public_key()),
        )
        .unwrap();
        fs::create_dir(dir.path().join("files")).unwrap();
        let config = dir.path().join("sshd_config");
        let d = dir.path().display();
        fs::write(
            &config,
            format!(
                "HostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile none\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 AcceptEnv LANG LC_*\n\
                 Subsystem sftp internal-sftp\n\
                 LogLevel ERROR\n"
            ),
        )
        .unwrap();
        Some(Server {
            dir,
            config,
            host_key,
            identity,
        })
    }

    /// Where the tests put files on the "remote" side.
    pub fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// One sshd for one connection, on its stdin and stdout.
    pub fn spawn(&self) -> (Child, Stream) {
        let mut child = Command::new(SSHD)
            .arg("-i")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stream = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
        (child, stream)
    }

    pub async fn connect(&self) -> (Child, Handle) {
        let (child, stream) = self.spawn();
        let handle = ssh::connect_stream(stream, "sshd", &self.host_key, &self.identity, &user())
            .await
            .unwrap();
        (child, handle)
    }
}

pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

pub fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}
