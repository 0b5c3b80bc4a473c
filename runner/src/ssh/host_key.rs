//! The runner's Ed25519 host key: created once in the state dir (OpenSSH
//! private key format, mode 0600, so `ssh-keygen -l -f` reads it) and reused
//! on every start, so that clients that pinned it keep trusting the runner.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rand::{TryRngCore, rngs::OsRng};
use russh::keys::{
    PrivateKey,
    ssh_key::{
        LineEnding,
        private::{Ed25519Keypair, KeypairData},
    },
};

use super::{Error, HOST_KEY_FILE};

pub(super) fn load_or_create(state_dir: &Path) -> Result<PrivateKey, Error> {
    let path = state_dir.join(HOST_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(pem) => load(pem, path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(state_dir, path),
        Err(source) => Err(Error::HostKeyFile { path, source }),
    }
}

fn load(pem: String, path: PathBuf) -> Result<PrivateKey, Error> {
    PrivateKey::from_openssh(pem).map_err(|source| Error::HostKeyFormat { path, source })
}

fn create(state_dir: &Path, path: PathBuf) -> Result<PrivateKey, Error> {
    fs::create_dir_all(state_dir).map_err(|source| Error::StateDir {
        path: state_dir.to_owned(),
        source,
    })?;
    let mut seed = [0u8; 32];
    OsRng.try_fill_bytes(&mut seed).map_err(Error::Random)?;
    let key = PrivateKey::new(KeypairData::from(Ed25519Keypair::from_seed(&seed)), "")
        .map_err(Error::HostKeyGenerate)?;
    seed.fill(0);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(Error::HostKeyGenerate)?;

    // Written whole under a private name, then linked into place: a crash
    // never leaves half a key, and of two processes starting at once the
    // second finds the first one's key instead of replacing it.
    let tmp = state_dir.join(format!(".{HOST_KEY_FILE}.{}", std::process::id()));
    let file_error = |source| Error::HostKeyFile {
        path: path.clone(),
        source,
    };
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(pem.as_bytes())?;
            file.sync_all()
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(file_error(e));
    }
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let pem = fs::read_to_string(&path).map_err(file_error)?;
            load(pem, path)
        }
        Err(e) => Err(file_error(e)),
    }
}
