//! The runner's SSH server against OpenSSH's own clients (`ssh`, `sftp`,
//! `scp`, `ssh-keygen`), served on a loopback port the way the agent serves
//! tunnels: one `Server::serve` per accepted connection.
//!
//! Without OpenSSH's client a test prints why and passes, unless CI=true,
//! where it fails.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::Arc,
    time::Duration,
};

use grad_runner::ssh::{Config, HOST_KEY_FILE, Server};
use rand::RngCore;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    process::Command,
    task::JoinSet,
};

/// Every client command gets this long before the test fails instead of
/// hanging.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn openssh_present() -> bool {
    let found = ["ssh", "sftp", "scp", "ssh-keygen"].iter().all(|tool| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        assert!(
            !in_ci(),
            "OpenSSH's client (ssh, sftp, scp, ssh-keygen) is required when CI=true"
        );
        eprintln!("skipping: OpenSSH's client (ssh, sftp, scp, ssh-keygen) not found");
    }
    found
}

/// A runner's SSH server on a loopback port, over a fresh workspace, with a
/// client key authorised.
struct Runner {
    server: Arc<Server>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    key: PathBuf,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Runner {
    /// None (after saying why) without OpenSSH.
    async fn start() -> Option<Runner> {
        Runner::start_with(true).await
    }

    async fn start_with(confine: bool) -> Option<Runner> {
        if !openssh_present() {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let workspace = dir.path().join("workspace");
        for sub in ["code", "outputs", "data"] {
            std::fs::create_dir_all(workspace.join(sub)).expect("workspace dir");
        }
        std::fs::create_dir(dir.path().join("client")).expect("client dir");
        let server = Server::new(Config {
            workspace,
            state_dir: dir.path().join("state"),
            confine,
        })
        .expect("server starts");
        let key = keygen(&dir.path().join("client/id_ed25519")).await;
        server.set_authorized_keys(&[public_key(&key)]);

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let accept = tokio::spawn(serve(listener, Arc::clone(&server)));
        let runner = Runner {
            server,
            addr,
            dir,
            key,
            accept,
        };
        let known_hosts = format!(
            "[127.0.0.1]:{} {}\n",
            addr.port(),
            runner.server.host_public_key()
        );
        std::fs::write(runner.known_hosts(), known_hosts).expect("known_hosts");
        Some(runner)
    }

    fn workspace(&self) -> PathBuf {
        self.dir
            .path()
            .join("workspace")
            .canonicalize()
            .expect("workspace")
    }

    fn client(&self, name: &str) -> PathBuf {
        self.dir.path().join("client").join(name)
    }

    fn known_hosts(&self) -> PathBuf {
        self.client("known_hosts")
    }

    /// Options every OpenSSH client gets: nothing from the user's own
    /// config, agent or keys; the host key pinned.
    fn options(&self, key: &Path) -> Vec<String> {
        let mut args = vec!["-F".to_string(), "/dev/null".to_string()];
        for option in [
            "BatchMode=yes".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "IdentitiesOnly=yes".to_string(),
            "IdentityAgent=none".to_string(),
            "LogLevel=ERROR".to_string(),
        ] {
            args.push("-o".into());
            args.push(option);
        }
        args.push("-i".into());
        args.push(key.display().to_string());
        args
    }

    fn ssh_with(&self, key: &Path) -> Command {
        let mut command = Command::new("ssh");
        command
            .args(self.options(key))
            .args(["-p", &self.addr.port().to_string()]);
        command
    }

    /// `ssh … root@127.0.0.1 ARGS…` with the authorised key.
    async fn ssh(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut command = self.ssh_with(&self.key);
        command.args(args);
        run(command, stdin).await
    }

    /// `sftp -b BATCH`; the batch stops at the first failing command.
    async fn sftp(&self, batch: &str) -> Output {
        let file = self.client("batch");
        std::fs::write(&file, batch).expect("batch file");
        let mut command = Command::new("sftp");
        command
            .args(self.options(&self.key))
            .args(["-P", &self.addr.port().to_string(), "-b"])
            .arg(&file)
            .arg("root@127.0.0.1");
        run(command, b"").await
    }

    async fn scp(&self, args: &[&str]) -> Output {
        let mut command = Command::new("scp");
        command
            .args(self.options(&self.key))
            .args(["-P", &self.addr.port().to_string()])
            .args(args);
        run(command, b"").await
    }
}

async fn serve(listener: TcpListener, server: Arc<Server>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(&server);
        connections.spawn(async move {
            if let Err(e) = server.serve(stream).await {
                eprintln!("connection ended: {e}");
            }
        });
    }
}

async fn run(mut command: Command, stdin: &[u8]) -> Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("client starts");
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    let feed = tokio::spawn(async move {
        let _ = pipe.write_all(&input).await;
    });
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .expect("client finishes in time")
        .expect("client output");
    feed.await.expect("stdin fed");
    output
}

async fn keygen(path: &Path) -> PathBuf {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .status()
        .await
        .expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen failed");
    path.to_owned()
}

fn public_key(key: &Path) -> String {
    std::fs::read_to_string(key.with_extension("pub")).expect("public key")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rng().fill_bytes(&mut data);
    data
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_returns_output_and_exit_status() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let out = runner
        .ssh(
            &["root@127.0.0.1", "sh -c 'echo out; echo err >&2; exit 3'"],
            b"",
        )
        .await;
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_in_the_workspace() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let out = runner.ssh(&["root@127.0.0.1", "pwd"], b"").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        runner.workspace().display().to_string()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_reaches_the_command() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    // Larger than any window or buffer on the way, so flow control and EOF
    // both matter.
    let data = random_bytes(3 * 1024 * 1024 + 17);
    let out = runner.ssh(&["root@127.0.0.1", "cat"], &data).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat returned other bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signal_that_kills_the_command_is_reported() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let out = runner.ssh(&["root@127.0.0.1", "kill -TERM $$"], b"").await;
    // OpenSSH's client exits with 255 when the command died of a signal.
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_locale_and_terminal_are_passed_but_nothing_else() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let out = runner
        .ssh(
            &[
                "-o",
                "SetEnv=LC_GRAD_TEST=passed GRAD_EVIL=leaked",
                "root@127.0.0.1",
                "echo \"$LC_GRAD_TEST-$GRAD_EVIL\"",
            ],
            b"",
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "passed-\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pty_shell_runs_and_reports_its_size() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    // `-tt` forces a PTY although the client's stdin is a pipe; it then has
    // no size to send, so the server's default applies.
    let out = runner
        .ssh(
            &["-tt", "root@127.0.0.1", "tty; stty size; echo TERM=$TERM"],
            b"",
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("24 80"), "{stdout:?}");
    assert!(!stdout.contains("TERM=\r"), "{stdout:?}");

    // An interactive shell, reading from the terminal.
    let out = runner
        .ssh(
            &["-tt", "root@127.0.0.1"],
            b"echo shell-$((40 + 2))\nexit 7\n",
        )
        .await;
    assert!(
        text(&out.stdout).contains("shell-42"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(7));
}

/// OpenSSH's client sends `window-change` only on SIGWINCH from a real
/// terminal, so this test drives the PTY with russh's client.
#[tokio::test(flavor = "multi_thread")]
async fn window_change_resizes_the_pty() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let session = russh_client(&runner).await;
    let mut channel = session.channel_open_session().await.expect("channel");
    channel
        .request_pty(true, "xterm-256color", 100, 30, 0, 0, &[])
        .await
        .expect("pty-req");
    channel
        .exec(true, "stty size; echo $TERM; read line; stty size")
        .await
        .expect("exec");
    let mut output = String::new();
    read_until(&mut channel, &mut output, "30 100").await;
    read_until(&mut channel, &mut output, "xterm-256color").await;
    channel
        .window_change(120, 40, 0, 0)
        .await
        .expect("window-change");
    channel.data(&b"\n"[..]).await.expect("data");
    read_until(&mut channel, &mut output, "40 120").await;
    let mut status = None;
    while let Some(message) = channel.wait().await {
        if let russh::ChannelMsg::ExitStatus { exit_status } = message {
            status = Some(exit_status);
        }
    }
    assert_eq!(status, Some(0));
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
}

struct PinnedHost(russh::keys::PublicKey);

impl russh::client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.0.key_data()),
        )
    }
}

async fn russh_client(runner: &Runner) -> russh::client::Handle<PinnedHost> {
    let host =
        russh::keys::PublicKey::from_openssh(&runner.server.host_public_key()).expect("host key");
    let stream = tokio::net::TcpStream::connect(runner.addr)
        .await
        .expect("connect");
    let config = Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect_stream(config, stream, PinnedHost(host))
        .await
        .expect("ssh handshake");
    let key = russh::keys::load_secret_key(&runner.key, None).expect("client key");
    let auth = session
        .authenticate_publickey(
            "root",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .expect("auth");
    assert!(auth.success(), "publickey auth refused");
    session
}

async fn read_until(
    channel: &mut russh::Channel<russh::client::Msg>,
    output: &mut String,
    needle: &str,
) {
    let found = tokio::time::timeout(COMMAND_TIMEOUT, async {
        while !output.contains(needle) {
            match channel.wait().await {
                Some(russh::ChannelMsg::Data { data }) => output.push_str(&text(&data)),
                Some(_) => {}
                None => return false,
            }
        }
        true
    })
    .await;
    assert!(found == Ok(true), "{needle:?} never came; got {output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sftp_batch_put_get_mkdir_rename_rm_round_trip() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let ws = runner.workspace();
    let data = random_bytes(1024 * 1024 + 5);
    let local = runner.client("local.bin");
    let other = runner.client("other.bin");
    let back = runner.client("back.bin");
    std::fs::write(&local, &data).expect("local file");
    std::fs::write(&other, b"to be replaced").expect("other file");
    // `put -p` keeps this modification time.
    let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(&local)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");

    let out = runner
        .sftp(&format!(
            "pwd\n\
             mkdir code/sub\n\
             cd code/sub\n\
             put -p {local} a.bin\n\
             put {other} b.bin\n\
             rename a.bin b.bin\n\
             chmod 640 b.bin\n\
             ln -s b.bin link\n\
             ln b.bin hard\n\
             get link {back}\n\
             ls -l\n\
             df /\n",
            local = local.display(),
            other = other.display(),
            back = back.display(),
        ))
        .await;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Remote working directory: /\n"), "{stdout}");
    let sub = ws.join("code/sub");
    assert!(!sub.join("a.bin").exists());
    assert!(std::fs::read(sub.join("b.bin")).expect("renamed file") == data);
    let mode = std::fs::metadata(sub.join("b.bin"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    let meta = std::fs::metadata(sub.join("b.bin")).expect("stat");
    assert_eq!(meta.modified().expect("mtime"), mtime);
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&meta), 2, "hard link");
    assert_eq!(
        std::fs::read_link(sub.join("link")).expect("symlink"),
        Path::new("b.bin")
    );
    assert!(std::fs::read(&back).expect("fetched file") == data);

    let out = runner
        .sftp("rm code/sub/link\nrm code/sub/b.bin\nrm code/sub/hard\nrmdir code/sub\n")
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!sub.exists());
    // The workspace's own root can't be removed.
    let out = runner.sftp("rmdir /\n").await;
    assert!(!out.status.success());
    assert!(ws.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn scp_copies_a_5_mib_file_both_ways() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let data = random_bytes(5 * 1024 * 1024);
    let local = runner.client("big.bin");
    std::fs::write(&local, &data).expect("local file");
    // The default (SFTP) protocol and the legacy one (`scp -t/-f` by exec).
    for (mode, flags) in [("sftp", &[][..]), ("legacy", &["-O"][..])] {
        let remote = format!("root@127.0.0.1:outputs/{mode}.bin");
        let mut args: Vec<&str> = flags.to_vec();
        args.extend([local.to_str().expect("utf-8 path"), remote.as_str()]);
        let out = runner.scp(&args).await;
        assert!(out.status.success(), "scp {mode} up: {}", text(&out.stderr));
        let uploaded = std::fs::read(runner.workspace().join(format!("outputs/{mode}.bin")))
            .expect("uploaded");
        assert!(uploaded == data, "scp {mode} up changed the bytes");

        let back = runner.client(&format!("{mode}-back.bin"));
        let mut args: Vec<&str> = flags.to_vec();
        args.extend([remote.as_str(), back.to_str().expect("utf-8 path")]);
        let out = runner.scp(&args).await;
        assert!(
            out.status.success(),
            "scp {mode} down: {}",
            text(&out.stderr)
        );
        assert!(
            std::fs::read(&back).expect("downloaded") == data,
            "scp {mode} down changed the bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sftp_paths_cannot_escape_the_workspace() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let ws = runner.workspace();
    // Outside the workspace, next to it: what an escape would reach.
    let outside = runner.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside dir");
    std::fs::write(outside.join("secret.txt"), "secret").expect("secret");
    std::os::unix::fs::symlink("/etc", ws.join("code/etc")).expect("symlink to /etc");
    std::os::unix::fs::symlink("../..", ws.join("code/up")).expect("symlink to ../..");
    std::os::unix::fs::symlink(&outside, ws.join("code/out")).expect("symlink outside");
    std::fs::write(ws.join("code/mine.txt"), "mine").expect("file");
    let local = runner.client("fetched");
    let upload = runner.client("upload.txt");
    std::fs::write(&upload, "upload").expect("upload file");

    for (command, why) in [
        (
            format!("get ../../etc/passwd {}", local.display()),
            "dot-dot above the root",
        ),
        (
            format!("get /../etc/passwd {}", local.display()),
            "dot-dot from the root",
        ),
        (
            format!("get code/etc/passwd {}", local.display()),
            "absolute symlink to /etc",
        ),
        (
            format!("get code/up/outside/secret.txt {}", local.display()),
            "relative symlink ../..",
        ),
        ("cd code/up".to_string(), "cd through ../.."),
        (
            format!("get code/out/secret.txt {}", local.display()),
            "symlink to a directory outside",
        ),
        (
            format!("put {} code/out/created.txt", upload.display()),
            "creating through a symlink",
        ),
        (
            format!("put {} code/up/outside/created.txt", upload.display()),
            "creating through ../..",
        ),
        (
            "rename code/mine.txt code/out/moved.txt".to_string(),
            "a rename target outside",
        ),
        (
            "rename code/mine.txt code/up/outside/moved.txt".to_string(),
            "a rename target through ../..",
        ),
        (
            "ln -s /etc/passwd code/up/outside/link".to_string(),
            "a symlink created outside",
        ),
        (
            "mkdir code/out/newdir".to_string(),
            "mkdir through a symlink",
        ),
        (
            "rm code/out/secret.txt".to_string(),
            "removing through a symlink",
        ),
        (
            "chmod 777 code/out/secret.txt".to_string(),
            "chmod through a symlink",
        ),
    ] {
        let out = runner.sftp(&format!("{command}\n")).await;
        assert!(
            !out.status.success(),
            "{why} was allowed: {command}\n{}",
            text(&out.stdout)
        );
    }
    // Listing a symlink that leads out shows the link, never what is behind.
    for (command, behind) in [("ls -l code/etc/", "passwd"), ("ls -l code/up/", "outside")] {
        let out = runner.sftp(&format!("{command}\n")).await;
        let listing = text(&out.stdout);
        assert!(
            !listing.contains(behind),
            "{command} listed {behind}: {listing}"
        );
    }
    assert!(!local.exists(), "something outside was read");
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .expect("outside dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["secret.txt"], "something was created outside");
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).expect("secret"),
        "secret"
    );
    let mode = std::fs::metadata(outside.join("secret.txt"))
        .expect("stat")
        .permissions()
        .mode();
    assert_ne!(mode & 0o777, 0o777, "chmod reached outside");
    assert!(ws.join("code/mine.txt").exists(), "the file was moved");

    // Creating symlinks is fine, and an absolute target means the client's
    // view: "/code/mine.txt" is the workspace's file. Following one out is not.
    let out = runner
        .sftp(&format!(
            "ln -s /code/mine.txt code/abs-link\n\
             get code/abs-link {}\n\
             ln -s ../../.. code/rel-link\n",
            local.display()
        ))
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&local).expect("fetched"), "mine");
    assert_eq!(
        std::fs::read_link(ws.join("code/abs-link")).expect("link"),
        ws.join("code/mine.txt")
    );
    let out = runner.sftp("ls -l code/rel-link/\n").await;
    assert!(
        !text(&out.stdout).contains("outside"),
        "listing through ../../.. was allowed: {}",
        text(&out.stdout)
    );
    // Paths are shown as the client sees them.
    let out = runner.sftp("cd code\npwd\n").await;
    assert!(
        text(&out.stdout).contains("Remote working directory: /code\n"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthorized_key_is_refused_and_a_removed_key_stops_working() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let other = keygen(&runner.client("other_ed25519")).await;
    let login = |key: PathBuf| {
        let mut command = runner.ssh_with(&key);
        command.args(["root@127.0.0.1", "echo in"]);
        run(command, b"")
    };

    let out = login(other.clone()).await;
    assert_eq!(out.status.code(), Some(255), "an unknown key got in");
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    assert!(login(runner.key.clone()).await.status.success());

    runner.server.set_authorized_keys(&[public_key(&other)]);
    assert_eq!(
        login(runner.key.clone()).await.status.code(),
        Some(255),
        "a removed key still works"
    );
    assert!(login(other.clone()).await.status.success());

    runner.server.set_authorized_keys(&[]);
    assert_eq!(
        login(other).await.status.code(),
        Some(255),
        "an empty set lets a key in"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_host_key_is_refused_by_the_client() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let other = Server::new(Config {
        workspace: runner.workspace(),
        state_dir: runner.dir.path().join("other-state"),
        confine: true,
    })
    .expect("another server");
    let pinned = format!(
        "[127.0.0.1]:{} {}\n",
        runner.addr.port(),
        other.host_public_key()
    );
    std::fs::write(runner.known_hosts(), pinned).expect("known_hosts");
    let out = runner.ssh(&["root@127.0.0.1", "true"], b"").await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_key_persists_across_restarts() {
    if !openssh_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        workspace: dir.path().to_owned(),
        state_dir: dir.path().join("state"),
        confine: true,
    };
    let first = Server::new(config.clone())
        .expect("first start")
        .host_public_key();
    let second = Server::new(config).expect("second start").host_public_key();
    assert_eq!(first, second);
    assert!(first.starts_with("ssh-ed25519 "), "{first}");
    assert_eq!(first.split(' ').count(), 2, "no comment expected: {first}");

    let key = dir.path().join("state").join(HOST_KEY_FILE);
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // OpenSSH reads it, and derives the same public key.
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .await
        .expect("ssh-keygen");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), first);
    let out = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&key)
        .output()
        .await
        .expect("ssh-keygen");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(ED25519)"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_w_reaches_a_port_inside_the_runner() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    // An echo server on the runner's side, reached through a direct-tcpip
    // channel as `ssh -L`/`-W` (and VS Code) use.
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let port = echo.local_addr().expect("addr").port();
    let echoing = tokio::spawn(async move {
        let (mut stream, _) = echo.accept().await.expect("accept");
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.expect("read");
        stream.write_all(&received).await.expect("write");
    });
    let out = runner
        .ssh(
            &["-W", &format!("127.0.0.1:{port}"), "root@127.0.0.1"],
            b"hello through the tunnel\n",
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello through the tunnel\n");
    echoing.await.expect("echo server");
}

/// Not a test of behaviour but of plumbing: the same server serves a
/// non-TCP stream (the agent hands it gRPC tunnels).
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_over_any_byte_stream_is_served() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    let (client_side, server_side) = tokio::io::duplex(64 * 1024);
    let server = Arc::clone(&runner.server);
    let serving = tokio::spawn(async move { server.serve(server_side).await });
    let host =
        russh::keys::PublicKey::from_openssh(&runner.server.host_public_key()).expect("host key");
    let config = Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect_stream(config, client_side, PinnedHost(host))
        .await
        .expect("ssh handshake");
    let key = russh::keys::load_secret_key(&runner.key, None).expect("client key");
    let auth = session
        .authenticate_publickey(
            "anyone",
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .expect("auth");
    assert!(auth.success());
    let mut channel = session.channel_open_session().await.expect("channel");
    channel
        .exec(true, "echo over a duplex")
        .await
        .expect("exec");
    let mut output = String::new();
    read_until(&mut channel, &mut output, "over a duplex").await;
    drop(channel);
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    drop(session);
    let ended = tokio::time::timeout(COMMAND_TIMEOUT, serving).await;
    assert!(ended.is_ok(), "serve did not end after the client left");
}

#[tokio::test(flavor = "multi_thread")]
async fn sftp_lists_a_large_directory_completely() {
    let Some(runner) = Runner::start().await else {
        return;
    };
    // More entries than one READDIR reply carries.
    let many = runner.workspace().join("data/many");
    std::fs::create_dir(&many).expect("dir");
    for i in 0..700 {
        std::fs::write(many.join(format!("file-{i:04}")), i.to_string()).expect("file");
    }
    let out = runner.sftp("ls -1 data/many\n").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout)
        .lines()
        .filter(|l| l.contains("file-"))
        .count();
    assert_eq!(listed, 700);
}

#[tokio::test(flavor = "multi_thread")]
async fn unconfined_sftp_starts_in_the_workspace_and_sees_the_whole_filesystem() {
    let Some(runner) = Runner::start_with(false).await else {
        return;
    };
    let ws = runner.workspace();
    std::fs::write(ws.join("code/here.txt"), "here").expect("file");
    let outside = runner.dir.path().join("outside.txt");
    std::fs::write(&outside, "outside").expect("file");
    let local = runner.client("fetched");
    let out = runner
        .sftp(&format!(
            "pwd\nget code/here.txt {local}\nget {outside} {local}.2\n",
            local = local.display(),
            outside = outside.display()
        ))
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("Remote working directory: {}\n", ws.display())),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(std::fs::read_to_string(&local).expect("fetched"), "here");
    assert_eq!(
        std::fs::read_to_string(local.with_extension("2")).expect("fetched"),
        "outside"
    );
}

/// Sends grad's `open-read@grad.dev` for `path` asking for `len` bytes;
/// returns the reply's handle, size and data, or the status code.
async fn open_read(
    sftp: &russh_sftp::client::RawSftpSession,
    path: &str,
    len: u32,
) -> Result<(String, Option<u64>, Vec<u8>), russh_sftp::protocol::StatusCode> {
    use russh_sftp::protocol::{FileAttributes, Packet};
    let mut request = (path.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(path.as_bytes());
    request.extend_from_slice(&len.to_be_bytes());
    match sftp
        .extended("open-read@grad.dev", request)
        .await
        .expect("request")
    {
        Packet::ExtendedReply(reply) => {
            let mut reply = bytes::Bytes::from(reply.data);
            let (handle, attrs): (String, FileAttributes) =
                russh_sftp::de::from_bytes(&mut reply).expect("handle and attributes");
            let n = u32::from_be_bytes(reply[..4].try_into().expect("length")) as usize;
            assert_eq!(reply.len(), 4 + n, "trailing bytes after the data");
            Ok((handle, attrs.size, reply[4..].to_vec()))
        }
        Packet::Status(status) => Err(status.status_code),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn open_read_opens_stats_and_reads_the_start_in_one_request() {
    use russh_sftp::protocol::StatusCode;
    let Some(runner) = Runner::start().await else {
        return;
    };
    let ws = runner.workspace();
    let big = random_bytes(100_000);
    std::fs::write(ws.join("code/big.bin"), &big).expect("big");
    std::fs::write(ws.join("data/small.txt"), "small\n").expect("small");
    std::os::unix::fs::symlink("/etc", ws.join("code/etc")).expect("symlink");

    let session = russh_client(&runner).await;
    let channel = session.channel_open_session().await.expect("channel");
    channel.request_subsystem(true, "sftp").await.expect("sftp");
    let sftp = russh_sftp::client::RawSftpSession::new(channel.into_stream());
    let version = sftp.init().await.expect("init");
    assert_eq!(
        version
            .extensions
            .get("open-read@grad.dev")
            .map(String::as_str),
        Some("1")
    );

    // A file longer than asked for: its start, its full size, and a handle
    // that reads on from there.
    let (handle, size, data) = open_read(&sftp, "/code/big.bin", 65_536)
        .await
        .expect("open-read big.bin");
    assert_eq!(size, Some(100_000));
    assert_eq!(data, big[..65_536]);
    let rest = sftp
        .read(handle.as_str(), 65_536, 65_536)
        .await
        .expect("read on");
    assert_eq!(rest.data, big[65_536..]);
    sftp.close(handle).await.expect("close");
    // A short file, under data/ (answered off the loop's thread): all of it.
    let (handle, size, data) = open_read(&sftp, "data/small.txt", 65_536)
        .await
        .expect("open-read small.txt");
    assert_eq!((size, data.as_slice()), (Some(6), &b"small\n"[..]));
    sftp.close(handle).await.expect("close");
    // Missing files and escapes are refused as OPEN refuses them.
    assert_eq!(
        open_read(&sftp, "/code/missing", 10).await.err(),
        Some(StatusCode::NoSuchFile)
    );
    assert_eq!(
        open_read(&sftp, "/code/etc/passwd", 10).await.err(),
        Some(StatusCode::PermissionDenied)
    );
    assert_eq!(
        open_read(&sftp, "/../../etc/passwd", 10).await.err(),
        Some(StatusCode::NoSuchFile),
        "dot-dot stops at the workspace, which has no etc/passwd"
    );
}
