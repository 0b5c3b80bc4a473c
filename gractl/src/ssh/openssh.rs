//! What OpenSSH needs to reach runners through `gractl ssh --stdio`: a
//! config block per runner (`gractl ssh-config`) and a `known_hosts` file
//! pinning each runner's host key as grad recorded it. With them `ssh r1`,
//! `scp`, `rsync -e ssh` and VS Code Remote-SSH work unchanged.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// Runners are reachable as `NAME.grad` as well as `NAME`; the suffix keeps
/// them apart from real hosts of the same name.
pub const HOST_SUFFIX: &str = ".grad";

/// The runner a host name given to `gractl ssh --stdio` (OpenSSH's `%h`)
/// stands for: `r1.grad` and `r1` are both runner `r1`.
pub fn runner_from_host(host: &str) -> &str {
    host.strip_suffix(HOST_SUFFIX)
        .filter(|name| !name.is_empty())
        .unwrap_or(host)
}

/// The host key alias OpenSSH looks up in `known_hosts` for `runner`.
pub fn host_alias(runner: &str) -> String {
    format!("{runner}{HOST_SUFFIX}")
}

/// Everything one `Host` block needs besides the runner's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The ProxyCommand's words before `ssh --stdio %h`: gractl's absolute
    /// path and its global flags (`--server URL`, `--config FILE`).
    pub gractl: Vec<String>,
    /// gractl's private key.
    pub identity: PathBuf,
    /// The `known_hosts` written by [`KnownHosts::save`].
    pub known_hosts: PathBuf,
    pub user: String,
}

/// One `Host` block for `runner`.
pub fn config_block(runner: &str, settings: &Settings) -> String {
    let mut proxy: Vec<String> = settings
        .gractl
        .iter()
        .map(|word| shell_word(word))
        .collect();
    proxy.extend(["ssh".into(), "--stdio".into()]);
    // `%` starts a token in ProxyCommand; a literal one is `%%`.
    let proxy = format!("{} %h", escape_percent(&proxy.join(" ")));
    let alias = host_alias(runner);
    format!(
        "Host {alias} {runner}\n\
         \x20   HostName {runner}\n\
         \x20   User {user}\n\
         \x20   ProxyCommand {proxy}\n\
         \x20   IdentityFile {identity}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   UserKnownHostsFile {known_hosts}\n\
         \x20   HostKeyAlias {alias}\n\
         \x20   StrictHostKeyChecking yes\n",
        user = config_word(&settings.user),
        identity = config_word(&settings.identity.to_string_lossy()),
        known_hosts = config_word(&settings.known_hosts.to_string_lossy()),
    )
}

/// The whole `gractl ssh-config` output: a header saying where it came
/// from, then one block per runner.
pub fn config(server: &str, runners: &[&str], settings: &Settings) -> String {
    let mut text = format!(
        "# OpenSSH configuration for the runners on {server}, written by `gractl ssh-config`.\n\
         # Save it (e.g. to ~/.ssh/gractl.conf) and add `Include gractl.conf` at the top of\n\
         # ~/.ssh/config; run `gractl ssh-config` again when runners change.\n"
    );
    for runner in runners {
        text.push('\n');
        text.push_str(&config_block(runner, settings));
    }
    text
}

/// A word for `sh -c` (OpenSSH runs ProxyCommand with the user's shell):
/// plain when it is safe, else single-quoted.
fn shell_word(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// An ssh_config argument (IdentityFile, UserKnownHostsFile): `%` escaped,
/// double-quoted when it holds spaces or quotes.
fn config_word(word: &str) -> String {
    let word = escape_percent(word);
    if word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '#') {
        format!("\"{}\"", word.replace('\\', r"\\").replace('"', "\\\""))
    } else {
        word
    }
}

fn escape_percent(text: &str) -> String {
    text.replace('%', "%%")
}

/// gractl's `known_hosts`: one line per runner, `r1.grad,r1 ssh-ed25519 AAAA...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownHosts {
    /// (runner, "ALGORITHM BASE64"), in file order.
    entries: Vec<(String, String)>,
}

impl KnownHosts {
    /// Reads `path`; a missing file is empty. Lines gractl did not write
    /// are dropped on the next save.
    pub fn load(path: &Path) -> io::Result<KnownHosts> {
        match fs::read_to_string(path) {
            Ok(text) => Ok(KnownHosts::parse(&text)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(KnownHosts::default()),
            Err(error) => Err(error),
        }
    }

    pub fn parse(text: &str) -> KnownHosts {
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let hosts = fields.next()?;
                let runner = hosts
                    .split(',')
                    .find_map(|host| host.strip_suffix(HOST_SUFFIX))?;
                let key = key_text(&fields.collect::<Vec<_>>().join(" "))?;
                Some((runner.to_owned(), key))
            })
            .collect();
        KnownHosts { entries }
    }

    /// Sets the host key of `runner` (OpenSSH format; a comment is dropped).
    /// Returns whether anything changed; an unreadable key changes nothing.
    pub fn set(&mut self, runner: &str, host_key: &str) -> bool {
        let Some(key) = key_text(host_key) else {
            return false;
        };
        match self.entries.iter_mut().find(|(name, _)| name == runner) {
            Some((_, existing)) if *existing == key => false,
            Some((_, existing)) => {
                *existing = key;
                true
            }
            None => {
                self.entries.push((runner.to_owned(), key));
                true
            }
        }
    }

    pub fn get(&self, runner: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(name, _)| name == runner)
            .map(|(_, key)| key.as_str())
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        for (runner, key) in &self.entries {
            text.push_str(&format!("{},{runner} {key}\n", host_alias(runner)));
        }
        text
    }

    /// Writes the file atomically (readers see the old or the new one).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&temporary)
            .and_then(|mut file| file.write_all(self.render().as_bytes()))
            .and_then(|()| fs::rename(&temporary, path));
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written
    }
}

/// "ALGORITHM BASE64" of an OpenSSH public key line, if it is one.
fn key_text(line: &str) -> Option<String> {
    let mut fields = line.split_whitespace();
    let (algorithm, blob) = (fields.next()?, fields.next()?);
    russh::keys::PublicKey::from_openssh(&format!("{algorithm} {blob}")).ok()?;
    Some(format!("{algorithm} {blob}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFwxNjMS61BO9lU4HLNZtAs7V3SZVOjctFI85IOQxleu";

    fn settings(gractl: &[&str], dir: &str) -> Settings {
        Settings {
            gractl: gractl.iter().map(|word| (*word).to_owned()).collect(),
            identity: Path::new(dir).join("id_ed25519"),
            known_hosts: Path::new(dir).join("known_hosts"),
            user: "root".into(),
        }
    }

    #[test]
    fn a_block_proxies_through_gractl_and_pins_the_host_key() {
        let settings = settings(
            &["/usr/bin/gractl", "--server", "http://127.0.0.1:7070"],
            "/home/a/.config/gractl",
        );
        assert_eq!(
            config_block("r1", &settings),
            "Host r1.grad r1\n\
             \x20   HostName r1\n\
             \x20   User root\n\
             \x20   ProxyCommand /usr/bin/gractl --server http://127.0.0.1:7070 ssh --stdio %h\n\
             \x20   IdentityFile /home/a/.config/gractl/id_ed25519\n\
             \x20   IdentitiesOnly yes\n\
             \x20   UserKnownHostsFile /home/a/.config/gractl/known_hosts\n\
             \x20   HostKeyAlias r1.grad\n\
             \x20   StrictHostKeyChecking yes\n"
        );
    }

    #[test]
    fn paths_with_spaces_quotes_and_percent_signs_are_quoted_for_each_reader() {
        let settings = settings(
            &[
                "/opt/my tools/gractl",
                "--config",
                "/home/o'neil/100%/config.yaml",
            ],
            "/home/a b/gractl",
        );
        let block = config_block("r1", &settings);
        assert!(
            block.contains(
                "    ProxyCommand '/opt/my tools/gractl' --config \
                 '/home/o'\\''neil/100%%/config.yaml' ssh --stdio %h\n"
            ),
            "{block}"
        );
        assert!(
            block.contains("    IdentityFile \"/home/a b/gractl/id_ed25519\"\n"),
            "{block}"
        );
        assert!(
            block.contains("    UserKnownHostsFile \"/home/a b/gractl/known_hosts\"\n"),
            "{block}"
        );
    }

    #[test]
    fn the_config_has_a_header_and_one_block_per_runner() {
        let text = config("http://h:7070", &["a", "b"], &settings(&["/g"], "/c"));
        assert!(text.starts_with("# OpenSSH configuration for the runners on http://h:7070"));
        assert_eq!(text.matches("\nHost ").count(), 2, "{text}");
        assert!(text.contains("\nHost a.grad a\n"));
        assert!(text.contains("\nHost b.grad b\n"));
    }

    #[test]
    fn the_grad_suffix_is_stripped_from_host_names() {
        assert_eq!(runner_from_host("r1.grad"), "r1");
        assert_eq!(runner_from_host("r1"), "r1");
        assert_eq!(runner_from_host("alice/r1"), "alice/r1");
        assert_eq!(runner_from_host(".grad"), ".grad");
        assert_eq!(runner_from_host("r1.grad.grad"), "r1.grad");
    }

    #[test]
    fn known_hosts_lines_name_the_alias_and_the_runner() {
        let mut known = KnownHosts::default();
        assert!(known.set("r1", &format!("{KEY} runner@r1")));
        assert!(!known.set("r1", KEY), "same key, no change");
        assert!(known.set("r2", KEY));
        assert!(!known.set("r3", "ssh-ed25519 garbage"));
        assert_eq!(
            known.render(),
            format!("r1.grad,r1 {KEY}\nr2.grad,r2 {KEY}\n")
        );
        assert_eq!(KnownHosts::parse(&known.render()), known);
        assert_eq!(known.get("r2"), Some(KEY));
        assert_eq!(known.get("r3"), None);
    }

    #[test]
    fn known_hosts_survive_a_save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("known_hosts");
        assert_eq!(
            KnownHosts::load(&path).expect("missing"),
            KnownHosts::default()
        );
        let mut known = KnownHosts::default();
        known.set("r1", KEY);
        known.save(&path).expect("save");
        assert_eq!(KnownHosts::load(&path).expect("load"), known);
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            format!("r1.grad,r1 {KEY}\n")
        );
    }
}
