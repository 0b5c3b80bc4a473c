//! The sync state file, `<workspace>/.gractl/sync.json`: written by the
//! background process as its mounts change, read by `gractl workspace sync`
//! (to wait until the mounts are up), `sync --status` and `unsync`. Also the
//! checks those commands make from outside: is a path mounted, is the
//! process alive.
//!
//! ```json
//! {
//!   "pid": 4242,
//!   "started": "2025-01-01T12:00:00Z",
//!   "scans": 1,
//!   "mounts": [
//!     {"runner": "r1", "path": "runners/r1", "mounted": "2025-01-01T12:00:01Z", "connected": true}
//!   ],
//!   "failed": [{"runner": "r2", "error": "cannot connect: ..."}]
//! }
//! ```

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a sync state file ({message}); remove it", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// What the background process has mounted. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The background process.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started: String,
    /// Times it has mounted the ready runners (once at start, once per
    /// `gractl workspace sync` since): callers wait for this to go up.
    pub scans: u64,
    pub mounts: Vec<Mounted>,
    /// Ready runners the last scan could not mount.
    #[serde(default)]
    pub failed: Vec<Failed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    pub runner: String,
    /// Relative to the workspace: `runners/<name>`.
    pub path: String,
    /// When it was mounted (RFC 3339).
    pub mounted: String,
    /// The SSH/SFTP connection is up (false while it is re-established).
    pub connected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub runner: String,
    pub error: String,
}

impl State {
    pub const DIR: &'static str = ".gractl";
    pub const FILE: &'static str = "sync.json";
    pub const LOG: &'static str = "sync.log";

    pub fn path(workspace: &Path) -> PathBuf {
        workspace.join(Self::DIR).join(Self::FILE)
    }

    /// Where the background process writes its output.
    pub fn log_path(workspace: &Path) -> PathBuf {
        workspace.join(Self::DIR).join(Self::LOG)
    }

    /// The state, if a background process wrote one.
    pub fn load(workspace: &Path) -> Result<Option<State>, Error> {
        let path = Self::path(workspace);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| Error::Invalid {
                path,
                message: error.to_string(),
            })
    }

    /// Writes the file whole (a temporary file renamed into place), so a
    /// reader never sees half of it.
    pub fn save(&self, workspace: &Path) -> Result<(), Error> {
        let path = Self::path(workspace);
        let write_error = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let dir = workspace.join(Self::DIR);
        fs::create_dir_all(&dir).map_err(write_error)?;
        let text =
            serde_json::to_string_pretty(self).map_err(|e| write_error(io::Error::other(e)))?;
        let temporary = dir.join(format!(".{}.{}.tmp", Self::FILE, std::process::id()));
        fs::write(&temporary, text + "\n")
            .and_then(|()| fs::rename(&temporary, &path))
            .map_err(write_error)
    }

    pub fn remove(workspace: &Path) -> Result<(), Error> {
        let path = Self::path(workspace);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Write { path, source }),
        }
    }

    /// The background process is still running.
    pub fn is_running(&self) -> bool {
        is_sync_process(self.pid)
    }
}

/// RFC 3339, as the rest of gractl's output has times.
pub fn timestamp(time: SystemTime) -> String {
    let mut timestamp = prost_types::Timestamp::from(time);
    timestamp.nanos = 0;
    timestamp.to_string()
}

/// Whether `pid` is a live `gractl workspace sync --foreground` process (a
/// recycled pid belongs to something else).
pub fn is_sync_process(pid: u32) -> bool {
    let Some(raw) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    if rustix::process::test_kill_process(raw).is_err() {
        return false;
    }
    let proc = PathBuf::from(format!("/proc/{pid}"));
    // "PID (comm) S ...": a zombie has exited already.
    let zombie = fs::read_to_string(proc.join("stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    });
    let ours = fs::read(proc.join("cmdline")).is_ok_and(|cmdline| {
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.contains(&b"sync".as_slice()) && args.contains(&b"--foreground".as_slice())
    });
    !zombie && ours
}

/// Whether something is mounted at `path`, by `/proc/self/mountinfo`. Works
/// on a mount whose process died (where `stat` fails).
pub fn is_mounted(path: &Path) -> bool {
    let candidates = candidates(path);
    mount_points()
        .iter()
        .any(|mount| candidates.contains(&mount.point))
}

/// gractl's mounts (FUSE, source `gractl` or `gractl:<runner>`) at or
/// below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dirs = candidates(dir);
    mount_points()
        .into_iter()
        .filter(|mount| {
            mount.fstype.starts_with("fuse")
                && (mount.source == "gractl" || mount.source.starts_with("gractl:"))
                && dirs.iter().any(|dir| mount.point.starts_with(dir))
        })
        .map(|mount| mount.point)
        .collect()
}

/// `path` made absolute, and with its parent's symlinks resolved (the path
/// itself may be a dead mount, which cannot be resolved).
fn candidates(path: &Path) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(absolute) = std::path::absolute(path) {
        if let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name())
            && let Ok(parent) = parent.canonicalize()
        {
            candidates.push(parent.join(name));
        }
        candidates.push(absolute);
    }
    candidates
}

struct MountInfo {
    point: PathBuf,
    fstype: String,
    source: String,
}

/// Every mount this process sees.
fn mount_points() -> Vec<MountInfo> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            // ID PARENT DEV ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let separator = fields.iter().position(|field| *field == "-")?;
            Some(MountInfo {
                point: PathBuf::from(unescape(point)),
                fstype: unescape(fields.get(separator + 1)?),
                source: unescape(fields.get(separator + 2)?),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(State::load(dir.path()).expect("load"), None);
        let state = State {
            pid: 42,
            started: timestamp(SystemTime::UNIX_EPOCH),
            scans: 1,
            mounts: vec![Mounted {
                runner: "r1".into(),
                path: "runners/r1".into(),
                mounted: "1970-01-01T00:00:00Z".into(),
                connected: true,
            }],
            failed: vec![],
        };
        state.save(dir.path()).expect("save");
        assert_eq!(State::load(dir.path()).expect("load"), Some(state));
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        State::remove(dir.path()).expect("remove");
        assert_eq!(State::load(dir.path()).expect("load"), None);
    }

    #[test]
    fn a_broken_state_file_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(State::DIR)).expect("mkdir");
        fs::write(State::path(dir.path()), "{").expect("write");
        let error = State::load(dir.path()).expect_err("invalid");
        assert!(error.to_string().ends_with("; remove it"), "{error}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    #[test]
    fn the_root_is_mounted_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_mounted(dir.path()));
    }

    #[test]
    fn this_test_process_is_not_a_sync_process() {
        assert!(!is_sync_process(std::process::id()));
        assert!(!is_sync_process(0));
    }
}
