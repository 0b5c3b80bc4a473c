//! gractl's two files: the credentials `gractl login` stores (server and
//! token, mode 0600, under the user's config directory) and a workspace's
//! `config.yaml` (server and defaults for the commands run inside it).

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::quantity::{Cpu, Size};

/// The server a fresh workspace points at: grad's embedded default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    /// A file that parsed badly: the message names the field and what is valid.
    #[error("{}: {}{message}", path.display(), line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error(
        "{} is not a workspace: it has no config.yaml; run `gractl workspace init {}`",
        dir.display(),
        dir.display()
    )]
    NotAWorkspace { dir: PathBuf },
    #[error("not logged in; run `gractl login --server URL --token-file FILE`")]
    NotLoggedIn,
    #[error(
        "no server configured; pass --server URL, set GRAD_SERVER, set `server` in the workspace config.yaml, or run `gractl login`"
    )]
    NoServer,
    #[error(
        "no runner given; pass -r/--runner NAME or set defaults.runner in the workspace config.yaml"
    )]
    NoRunner,
}

/// Parses YAML into `T`, turning serde_yaml's "path: message at line L column C"
/// into "FILE: line L: path: message".
pub(crate) fn parse_yaml<T: DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<Option<T>, ConfigError> {
    // An empty file, or one holding only comments, is an empty config.
    let has_content = text
        .lines()
        .any(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#'));
    if !has_content {
        return Ok(None);
    }
    serde_yaml::from_str::<T>(text).map(Some).map_err(|error| {
        let line = error.location().map(|location| location.line());
        let mut message = error.to_string();
        if let Some(location) = error.location() {
            let suffix = format!(" at line {} column {}", location.line(), location.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            message,
        }
    })
}

fn read(path: &Path) -> Result<Option<String>, ConfigError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What `gractl login` stores.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub server: String,
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// `$XDG_CONFIG_HOME/gractl/config.yaml`, else `$HOME/.config/gractl/config.yaml`.
    pub fn default_path(xdg_config_home: Option<&Path>, home: Option<&Path>) -> Option<PathBuf> {
        let base = match xdg_config_home.filter(|dir| dir.is_absolute()) {
            Some(dir) => dir.to_owned(),
            None => home?.join(".config"),
        };
        Some(base.join("gractl").join("config.yaml"))
    }

    /// The stored credentials; `None` when nobody logged in yet.
    pub fn load(path: &Path) -> Result<Option<Credentials>, ConfigError> {
        match read(path)? {
            Some(text) => parse_yaml(&text, path),
            None => Ok(None),
        }
    }

    /// Writes the file readable by its owner only. The file is created with
    /// mode 0600 and renamed into place, so the token is never readable by
    /// others, not even for a moment, and an existing looser file is replaced.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let write_error = |source| ConfigError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        if !dir.as_os_str().is_empty() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write_error)?;
        }
        let text = serde_yaml::to_string(self)
            .map_err(|error| write_error(io::Error::other(error.to_string())))?;
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "config.yaml".into());
        let temporary = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| {
                file.write_all(text.as_bytes())?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temporary, path));
        if let Err(error) = written {
            // Best effort: the write already failed; report that, not this.
            let _ = fs::remove_file(&temporary);
            return Err(write_error(error));
        }
        Ok(())
    }
}

/// A workspace's `config.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    /// The directory holding `config.yaml`.
    #[serde(skip)]
    pub root: PathBuf,
    pub server: Option<String>,
    pub defaults: Option<Defaults>,
}

/// Defaults for commands run inside the workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Used when `-r/--runner` is omitted.
    pub runner: Option<String>,
    pub cpu: Option<Cpu>,
    pub memory: Option<Size>,
    pub storage: Option<Size>,
    pub gpus: Option<u32>,
}

/// What `Workspace::init` made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    pub config: PathBuf,
    /// Directories that did not exist before.
    pub created_dirs: Vec<PathBuf>,
}

impl Workspace {
    pub const FILE: &'static str = "config.yaml";
    pub const DIRS: [&'static str; 2] = ["datasets", "runners"];

    /// The nearest of `start` and its ancestors that holds `config.yaml`
    /// next to a `runners/` directory.
    pub fn find(start: &Path) -> Option<PathBuf> {
        start
            .ancestors()
            .find(|dir| dir.join(Self::FILE).is_file() && dir.join("runners").is_dir())
            .map(Path::to_owned)
    }

    /// Reads `root/config.yaml`.
    pub fn load(root: &Path) -> Result<Workspace, ConfigError> {
        let path = root.join(Self::FILE);
        let text = read(&path)?.ok_or_else(|| ConfigError::NotAWorkspace {
            dir: root.to_owned(),
        })?;
        let mut workspace = Self::parse(&text, &path)?;
        workspace.root = root.to_owned();
        Ok(workspace)
    }

    /// Parses the text of a `config.yaml`; errors name `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Workspace, ConfigError> {
        let mut workspace: Workspace = parse_yaml(text, path)?.unwrap_or_default();
        if let Some(parent) = path.parent() {
            workspace.root = parent.to_owned();
        }
        Ok(workspace)
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults.clone().unwrap_or_default()
    }

    /// The commented `config.yaml` a new workspace starts with.
    pub fn template(server: &str) -> String {
        // A JSON string is a valid YAML scalar, whatever the URL holds.
        let server = serde_json::Value::from(server);
        format!(
            "\
# gractl workspace: commands run anywhere under this directory use these
# settings. Flags (--server, -r, --cpu, ...) and GRAD_SERVER override them.
#
#   config.yaml        this file
#   datasets/*.yaml    dataset connection descriptions
#   runners/<name>/    runner workspaces, mounted by `gractl workspace sync`

# The grad server to talk to.
server: {server}

defaults:
  # The runner used when -r/--runner is omitted (null: none).
  runner: null
  # For `gractl runner create`. CPU in cores: 2, 0.5 or 500m.
  cpu: \"1\"
  # Sizes: 512Mi, 4Gi (binary) or 1G (decimal), or plain bytes.
  memory: 2Gi
  storage: 10Gi
  # GPUs need the pro plan.
  gpus: 0
"
        )
    }

    /// Creates `dir/config.yaml` and the workspace's directories. Existing
    /// directories are kept; an existing `config.yaml` is an error unless `force`.
    pub fn init(dir: &Path, server: &str, force: bool) -> Result<Init, ConfigError> {
        let write_error = |path: &Path, source| ConfigError::Write {
            path: path.to_owned(),
            source,
        };
        let mut created_dirs = Vec::new();
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(|source| write_error(dir, source))?;
            created_dirs.push(dir.to_owned());
        }
        let config = dir.join(Self::FILE);
        let mut options = fs::OpenOptions::new();
        options.write(true);
        if force {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        let mut file = options.open(&config).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                ConfigError::Exists {
                    path: config.clone(),
                }
            } else {
                write_error(&config, source)
            }
        })?;
        file.write_all(Self::template(server).as_bytes())
            .map_err(|source| write_error(&config, source))?;
        for name in Self::DIRS {
            let path = dir.join(name);
            match fs::create_dir(&path) {
                Ok(()) => created_dirs.push(path),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
                Err(source) => return Err(write_error(&path, source)),
            }
        }
        Ok(Init {
            config,
            created_dirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Workspace, String> {
        Workspace::parse(text, Path::new("/tmp/ws/config.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_template_parses_to_the_builtin_defaults() {
        let workspace = parse(&Workspace::template(DEFAULT_SERVER)).expect("template parses");
        assert_eq!(workspace.server.as_deref(), Some(DEFAULT_SERVER));
        let defaults = workspace.defaults();
        assert_eq!(defaults.runner, None);
        assert_eq!(defaults.cpu, Some(Cpu(1000)));
        assert_eq!(defaults.memory, Some(Size(2 << 30)));
        assert_eq!(defaults.storage, Some(Size(10 << 30)));
        assert_eq!(defaults.gpus, Some(0));
    }

    #[test]
    fn quantities_in_defaults_may_be_numbers_or_strings() {
        let workspace = parse("defaults:\n  cpu: 0.5\n  memory: 1073741824\n  storage: \"1Gi\"\n")
            .expect("parses");
        let defaults = workspace.defaults();
        assert_eq!(defaults.cpu, Some(Cpu(500)));
        assert_eq!(defaults.memory, Some(Size(1 << 30)));
        assert_eq!(defaults.storage, Some(Size(1 << 30)));
    }

    #[test]
    fn a_bad_cpu_names_the_file_the_line_and_the_field() {
        let error = parse("server: http://x:1\ndefaults:\n  cpu: two\n").expect_err("bad cpu");
        assert_eq!(
            error,
            "/tmp/ws/config.yaml: line 3: defaults.cpu: invalid value \"two\": \
             expected a CPU amount like 2, 0.5 or 500m"
        );
    }

    #[test]
    fn a_bad_memory_names_the_field_and_the_valid_forms() {
        let error = parse("defaults:\n  memory: 4GB\n").expect_err("bad memory");
        assert_eq!(
            error,
            "/tmp/ws/config.yaml: line 2: defaults.memory: invalid value \"4GB\": \
             expected a size like 512Mi, 4Gi or 1G"
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_the_valid_keys() {
        let error = parse("defaults:\n  runer: a\n").expect_err("unknown key");
        assert!(
            error.starts_with("/tmp/ws/config.yaml: line 2: defaults: unknown field `runer`"),
            "{error}"
        );
        for key in ["runner", "cpu", "memory", "storage", "gpus"] {
            assert!(error.contains(&format!("`{key}`")), "{error}");
        }
        let error = parse("sever: a\n").expect_err("unknown top-level key");
        assert!(
            error.contains("unknown field `sever`, expected `server` or `defaults`"),
            "{error}"
        );
    }

    #[test]
    fn broken_yaml_names_the_file_and_line() {
        let error = parse("defaults:\n  cpu: [1\n").expect_err("broken yaml");
        assert!(error.starts_with("/tmp/ws/config.yaml: line "), "{error}");
    }

    #[test]
    fn an_empty_or_comment_only_file_is_an_empty_config() {
        assert_eq!(parse("").expect("empty").server, None);
        assert_eq!(parse("# nothing yet\n\n").expect("comments").defaults, None);
    }

    #[test]
    fn the_credentials_path_prefers_xdg_config_home() {
        assert_eq!(
            Credentials::default_path(Some(Path::new("/x")), Some(Path::new("/home/a"))),
            Some(PathBuf::from("/x/gractl/config.yaml"))
        );
        assert_eq!(
            Credentials::default_path(None, Some(Path::new("/home/a"))),
            Some(PathBuf::from("/home/a/.config/gractl/config.yaml"))
        );
        // A relative XDG_CONFIG_HOME is invalid by the spec and ignored.
        assert_eq!(
            Credentials::default_path(Some(Path::new("rel")), Some(Path::new("/home/a"))),
            Some(PathBuf::from("/home/a/.config/gractl/config.yaml"))
        );
        assert_eq!(Credentials::default_path(None, None), None);
    }
}
