//! gractl's own SSH key: made on first use, kept beside the credentials in
//! OpenSSH's format (so OpenSSH's `ssh` can use it as `IdentityFile`), and
//! registered with grad, which authorises it on the user's runners.

use std::{
    collections::HashSet,
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use russh::keys::{
    HashAlg, PrivateKey,
    ssh_key::{LineEnding, private::Ed25519Keypair},
};

use super::Error;
use crate::client::Client;

/// gractl's SSH key pair. See the module docs.
pub struct Identity {
    path: PathBuf,
    key: Arc<PrivateKey>,
    /// Servers this process already registered the key with.
    registered: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Identity {
    // Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("path", &self.path)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads the key at `path`, or creates an Ed25519 key there (mode 0600,
    /// its directory 0700, the public half in `PATH.pub`). Two processes
    /// creating it at once end up with the same key: the first one wins.
    pub fn load_or_create(path: &Path) -> Result<Identity, Error> {
        let key_error = |reason: String| Error::Key {
            path: path.to_owned(),
            reason,
        };
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                create(path).map_err(|error| key_error(format!("cannot create it: {error}")))?;
                fs::read_to_string(path)
                    .map_err(|error| key_error(format!("cannot read it: {error}")))?
            }
            Err(error) => return Err(key_error(format!("cannot read it: {error}"))),
        };
        let key = PrivateKey::from_openssh(&text).map_err(|error| {
            key_error(format!(
                "not an OpenSSH private key ({error}); move it away and gractl makes a new one"
            ))
        })?;
        if key.is_encrypted() {
            return Err(key_error(
                "it is protected by a passphrase, which gractl cannot enter; \
                 move it away and gractl makes a new one"
                    .into(),
            ));
        }
        let identity = Identity {
            path: path.to_owned(),
            key: Arc::new(key),
            registered: Mutex::new(HashSet::new()),
        };
        identity.write_public_key().map_err(|error| Error::Key {
            path: identity.public_key_path(),
            reason: format!("cannot write it: {error}"),
        })?;
        Ok(identity)
    }

    /// The private key file (OpenSSH's `IdentityFile`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PATH.pub`.
    pub fn public_key_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".pub");
        PathBuf::from(name)
    }

    /// One line in OpenSSH format: `ssh-ed25519 AAAA... gractl@host`.
    pub fn public_key(&self) -> String {
        // Encoding a key we hold in memory cannot fail.
        self.key.public_key().to_openssh().unwrap_or_default()
    }

    /// `SHA256:...`, as grad and `ssh-keygen -l` show it.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }

    pub(crate) fn private_key(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.key)
    }

    /// Registers the public key with grad for the caller (AddSshKey is
    /// idempotent); done once per server and process.
    pub async fn register(&self, client: &Client) -> Result<(), Error> {
        let server = client.server().to_owned();
        if lock(&self.registered).contains(&server) {
            return Ok(());
        }
        let name = self.key.comment().as_str().unwrap_or("gractl").to_owned();
        client.add_ssh_key(&self.public_key(), &name).await?;
        lock(&self.registered).insert(server);
        Ok(())
    }

    /// Keeps `PATH.pub` in step with the private key (OpenSSH reads it, and
    /// people copy it).
    fn write_public_key(&self) -> io::Result<()> {
        let path = self.public_key_path();
        let line = format!("{}\n", self.public_key());
        if fs::read_to_string(&path).is_ok_and(|existing| existing == line) {
            return Ok(());
        }
        write_new(&path, line.as_bytes(), 0o644)?;
        let temporary = temporary_beside(&path);
        fs::rename(&temporary, &path).inspect_err(|_| {
            let _ = fs::remove_file(&temporary);
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The set stays valid even if a holder panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes a new key at `path` unless one appears there first.
fn create(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment());
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|error| io::Error::other(error.to_string()))?;
    write_new(path, text.as_bytes(), 0o600)?;
    let temporary = temporary_beside(path);
    // A hard link publishes the finished file without replacing one another
    // process made meanwhile; that one wins and this one is dropped.
    let published = match fs::hard_link(&temporary, path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        // Filesystems without hard links: rename, which may replace.
        Err(_) => fs::rename(&temporary, path),
    };
    let _ = fs::remove_file(&temporary);
    published
}

/// Writes `bytes` to a fresh temporary file beside `path` with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let temporary = temporary_beside(path);
    let _ = fs::remove_file(&temporary);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

fn temporary_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// `gractl@HOST`, so the key is recognisable in `gractl ssh-key list`.
fn comment() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        "gractl".into()
    } else {
        format!("gractl@{host}")
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, process::Command};

    use super::*;

    #[test]
    fn a_new_key_is_private_to_its_owner_and_reused_afterwards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gractl").join("id_ed25519");
        let first = Identity::load_or_create(&path).expect("created");
        let mode = |path: &Path| fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        assert_eq!(mode(&first.public_key_path()), 0o644);
        assert!(first.public_key().starts_with("ssh-ed25519 AAAA"));

        let again = Identity::load_or_create(&path).expect("loaded");
        assert_eq!(again.fingerprint(), first.fingerprint());
        assert_eq!(
            fs::read_to_string(again.public_key_path()).expect("pub"),
            format!("{}\n", first.public_key())
        );
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn ssh_keygen_reads_the_key_and_agrees_on_its_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("id_ed25519");
        let identity = Identity::load_or_create(&path).expect("created");
        let output = match Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(&path)
            .output()
        {
            Ok(output) => output,
            Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: ssh-keygen is not installed ({error})");
                return;
            }
            Err(error) => panic!("ssh-keygen: {error}"),
        };
        assert!(output.status.success(), "{output:?}");
        let printed = String::from_utf8_lossy(&output.stdout);
        // "256 SHA256:... gractl@host (ED25519)"
        assert_eq!(
            printed.split_whitespace().nth(1),
            Some(identity.fingerprint().as_str()),
            "{printed}"
        );
        assert!(printed.trim_end().ends_with("(ED25519)"), "{printed}");
        // The public half derived by ssh-keygen matches the .pub file.
        let output = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("ssh-keygen -y");
        let derived = String::from_utf8_lossy(&output.stdout);
        let written = fs::read_to_string(identity.public_key_path()).expect("pub");
        let fields = |line: &str| {
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(fields(&derived), fields(&written));
    }

    #[test]
    fn a_key_that_is_not_openssh_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("id_ed25519");
        fs::write(&path, "not a key").expect("write");
        let error = Identity::load_or_create(&path).expect_err("garbage");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "SSH key {}: not an OpenSSH private key",
                path.display()
            )),
            "{message}"
        );
        assert!(message.contains("move it away"), "{message}");
    }

    #[test]
    fn a_missing_public_half_is_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("id_ed25519");
        let identity = Identity::load_or_create(&path).expect("created");
        fs::remove_file(identity.public_key_path()).expect("remove");
        let again = Identity::load_or_create(&path).expect("loaded");
        assert_eq!(
            fs::read_to_string(again.public_key_path()).expect("pub"),
            format!("{}\n", identity.public_key())
        );
    }
}
