//! SSH through grad, end to end: gractl's own client, OpenSSH's `ssh`, `sftp`
//! and `scp` with `gractl ssh --stdio` as ProxyCommand, `gractl cp`, and the
//! checks that keep users and runners apart.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, OutputExt, require};

fn have_openssh() -> bool {
    require(
        "OpenSSH clients (apt-get install openssh-client)",
        ["ssh", "sftp", "scp"].iter().all(|c| {
            Command::new(c)
                .arg("-V")
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok()
        }),
    )
}

/// Writes `gractl ssh-config`'s output to a file for `ssh -F`.
fn ssh_config(grad: &Grad) -> PathBuf {
    let out = grad.run(&["ssh-config"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let path = grad.data_dir.join("ssh_config");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// An OpenSSH client command using that config, with the test's token in
/// the environment ProxyCommand inherits.
fn openssh(grad: &Grad, program: &str, config: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("-F")
        .arg(config)
        .arg("-o")
        .arg("BatchMode=yes")
        .env("GRAD_SERVER", &grad.url)
        .env("GRAD_TOKEN", &grad.admin_token)
        .env(
            "GRACTL_CONFIG",
            grad.data_dir.join("gractl-test-config.yaml"),
        )
        .stdin(Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gractl_ssh_runs_a_command_in_the_workspace_with_its_exit_status() {
    let grad = Grad::with_runners(&["r1"]).await;
    let out = grad.run(&["ssh", "r1", "--", "pwd; echo oops >&2; exit 3"]);
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
    let ws = grad.workspace("admin", "r1");
    assert_eq!(out.stdout_str().trim(), ws.display().to_string());
    assert!(out.stderr_str().contains("oops"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_ssh_sftp_and_scp_work_through_gractl_as_proxy_command() {
    if !have_openssh() {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let config = ssh_config(&grad);
    let ws = grad.workspace("admin", "r1");

    let out = openssh(&grad, "ssh", &config)
        .args(["r1", "echo via openssh; python3 -V"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(
        out.stdout_str().starts_with("via openssh\nPython 3"),
        "{}",
        out.stdout_str()
    );

    let local = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(local.path().join("data.bin"), &data).unwrap();
    let out = openssh(&grad, "scp", &config)
        .arg(local.path().join("data.bin"))
        .arg("r1:code/data.bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "scp: {}", out.stderr_str());
    assert_eq!(std::fs::read(ws.join("code/data.bin")).unwrap(), data);

    let batch = local.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir outputs/run1\nrename code/data.bin outputs/run1/data.bin\nget outputs/run1/data.bin {}\n",
            local.path().join("back.bin").display()
        ),
    )
    .unwrap();
    let out = openssh(&grad, "sftp", &config)
        .arg("-b")
        .arg(&batch)
        .arg("r1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sftp: {}{}",
        out.stdout_str(),
        out.stderr_str()
    );
    assert_eq!(std::fs::read(local.path().join("back.bin")).unwrap(), data);
    assert!(ws.join("outputs/run1/data.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_through_grad_cannot_escape_the_workspace() {
    if !have_openssh() {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let config = ssh_config(&grad);
    let local = tempfile::tempdir().unwrap();
    for path in ["../../../../etc/passwd", "/../etc/passwd", "../../grad.db"] {
        let batch = local.path().join("batch");
        std::fs::write(
            &batch,
            format!("get {path} {}\n", local.path().join("stolen").display()),
        )
        .unwrap();
        let out = openssh(&grad, "sftp", &config)
            .arg("-b")
            .arg(&batch)
            .arg("r1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "sftp fetched {path}");
        assert!(
            !local.path().join("stolen").exists(),
            "{path} escaped the workspace"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gractl_cp_copies_files_and_directories_both_ways() {
    let grad = Grad::with_runners(&["r1"]).await;
    let ws = grad.workspace("admin", "r1");
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha").unwrap();
    std::fs::write(tree.join("sub/b.txt"), "beta").unwrap();

    let out = grad.run(&["cp", tree.to_str().unwrap(), "r1:code/"]);
    assert_eq!(
        out.code(),
        2,
        "a directory without -r: {}",
        out.stderr_str()
    );
    assert!(out.stderr_str().contains("-r"), "{}", out.stderr_str());

    let out = grad.run(&["cp", "-r", tree.to_str().unwrap(), "r1:code/"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(
        std::fs::read_to_string(ws.join("code/tree/sub/b.txt")).unwrap(),
        "beta"
    );

    std::fs::write(ws.join("outputs/plot.png"), b"\x89PNG fake").unwrap();
    let out = grad.run(&["cp", "r1:outputs/plot.png", local.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(
        std::fs::read(local.path().join("plot.png")).unwrap(),
        b"\x89PNG fake"
    );

    let out = grad.run(&["cp", "r1:outputs/missing.csv", "."]);
    assert!(!out.status.success());
    assert!(
        out.stderr_str().contains("missing.csv"),
        "{}",
        out.stderr_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_token_cannot_reach_the_runner_over_ssh() {
    let grad = Grad::with_runners(&["r1"]).await;
    let bob = grad.add_user("bob", &[]);
    let out = grad
        .gractl(&bob)
        .args(["ssh", "r1", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    let out = grad
        .gractl(&bob)
        .args(["ssh", "--stdio", "r1"])
        .output()
        .unwrap();
    assert_ne!(out.code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_other_than_the_one_grad_recorded_is_refused() {
    let grad = Grad::start();
    let admin = grad.admin().await;
    for name in ["r1", "r2"] {
        admin
            .create_runner(name, Resources::default(), Vec::new())
            .await
            .unwrap();
        admin
            .wait_runner(name, &[RunnerState::Ready], Duration::from_secs(20))
            .await
            .unwrap();
    }
    let r2_key = admin.get_runner("r2").await.unwrap().host_key;
    assert!(r2_key.starts_with("ssh-ed25519 "), "{r2_key}");
    assert_ne!(admin.get_runner("r1").await.unwrap().host_key, r2_key);
    // Make grad's record of r1 claim r2's key: r1's real key no longer matches.
    grad.execute_sql(&format!(
        "UPDATE runners SET host_key = '{}' WHERE name = 'r1'",
        r2_key.replace('\'', "''")
    ));
    let out = grad.run(&["ssh", "r1", "--", "true"]);
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr_str().contains("host key"),
        "{}",
        out.stderr_str()
    );
}

/// Drives `gractl ssh r1` on a pseudo-terminal, as a person at a terminal does.
const PTY_DRIVER: &str = r#"
import os, pty, select, sys, time
gractl = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    os.execv(gractl, [gractl, "ssh", "r1"])
seen = b""
def expect(needle, timeout=15):
    global seen
    deadline = time.time() + timeout
    while needle not in seen:
        left = deadline - time.time()
        if left <= 0:
            sys.exit("timed out waiting for %r; saw %r" % (needle, seen[-500:]))
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    seen = seen[seen.index(needle) + len(needle):]
os.write(fd, b"echo answer=$((6*7))\n")
expect(b"answer=42")
os.write(fd, b"tty\n")
expect(b"/dev/pts/")
os.write(fd, b"sleep 30\n")
time.sleep(0.5)
os.write(fd, b"\x03")  # Ctrl-C goes to the remote sleep, not to gractl
os.write(fd, b"echo after=$((1+1))\n")
expect(b"after=2", timeout=10)
os.write(fd, b"exit 5\n")
_, status = os.waitpid(pid, 0)
print("exit", os.waitstatus_to_exitcode(status))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_shell_runs_on_a_pty_and_ctrl_c_reaches_the_runner() {
    let grad = Grad::with_runners(&["r1"]).await;
    let out = Command::new(grad_tests::python())
        .arg("-c")
        .arg(PTY_DRIVER)
        .arg(grad_tests::bin("gractl"))
        .env("GRAD_SERVER", &grad.url)
        .env("GRAD_TOKEN", &grad.admin_token)
        .env(
            "GRACTL_CONFIG",
            grad.data_dir.join("gractl-test-config.yaml"),
        )
        .env("TERM", "xterm")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        out.stdout_str(),
        out.stderr_str()
    );
    assert_eq!(out.stdout_str().trim(), "exit 5", "{}", out.stderr_str());
}
