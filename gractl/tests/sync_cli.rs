//! `gractl workspace sync`, `sync --status` and `unsync` from the outside,
//! without grad: the messages that say what to do, the status of a sync
//! whose process died, and clean-up of what such a process left mounted.
//! (Syncing real runners through grad is tested end to end in `tests/`.)

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::{
    fs,
    path::Path,
    process::{Command, Output, Stdio},
};

use gractl::sync::{
    self, Options, connect_with,
    state::{self, Mounted, State},
};

const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// `gractl ARGS` in `cwd`, isolated from the caller's environment and files.
fn gractl(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gractl"))
        .args(args)
        .current_dir(cwd)
        .env_remove("GRAD_SERVER")
        .env_remove("GRAD_TOKEN")
        .env_remove("GRAD_WORKSPACE")
        .env_remove("GRACTL_CONFIG")
        .env("XDG_CONFIG_HOME", cwd.join(".xdg"))
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let output = gractl(dir.path(), &["workspace", "init"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    dir
}

#[test]
fn sync_outside_a_workspace_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["workspace", "sync"][..],
        &["workspace", "sync", "--status"],
        &["workspace", "unsync"],
    ] {
        let output = gractl(dir.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.starts_with("error: no workspace here: "), "{stderr}");
        assert!(stderr.contains("`gractl workspace init DIR`"), "{stderr}");
    }
}

#[test]
fn status_without_a_sync_says_how_to_start_one() {
    let dir = workspace();
    let output = gractl(dir.path(), &["workspace", "sync", "--status"]);
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout),
        "not syncing; start with `gractl workspace sync`\n"
    );
    let output = gractl(dir.path(), &["-o", "json", "workspace", "sync", "--status"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["running"], false);
    assert_eq!(json["mounts"], serde_json::json!([]));
    let output = gractl(dir.path(), &["workspace", "unsync"]);
    assert_eq!(text(&output.stdout), "nothing was mounted\n");
}

#[test]
fn status_of_a_sync_whose_process_died_says_it_is_not_running() {
    let dir = workspace();
    let state = State {
        // No process has this pid (the kernel's limit is lower).
        pid: 999_999_999,
        started: "2025-01-01T00:00:00Z".into(),
        scans: 1,
        mounts: vec![Mounted {
            runner: "r1".into(),
            path: "runners/r1".into(),
            mounted: "2025-01-01T00:00:00Z".into(),
            connected: true,
        }],
        failed: vec![],
    };
    state.save(dir.path()).unwrap();
    let output = gractl(dir.path(), &["workspace", "sync", "--status"]);
    let stdout = text(&output.stdout);
    assert!(
        stdout.starts_with("the sync process (999999999) is not running;"),
        "{stdout}"
    );
    let row = stdout.lines().find(|line| line.starts_with("r1 ")).unwrap();
    let cells: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells, ["r1", "runners/r1", "not mounted"], "{stdout}");
    let output = gractl(dir.path(), &["-o", "json", "workspace", "sync", "--status"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["running"], false);
    assert_eq!(json["mounts"][0]["runner"], "r1");
    assert_eq!(json["mounts"][0]["healthy"], false);

    let output = gractl(dir.path(), &["workspace", "unsync"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "unmounted r1 (runners/r1)\n");
    assert_eq!(State::load(dir.path()).unwrap(), None);
}

#[test]
fn unsync_detaches_a_mount_left_under_runners() {
    let missing = if !Path::new(SFTP_SERVER).exists() {
        Some(format!("{SFTP_SERVER} is missing"))
    } else {
        sync::check_prerequisites().err().map(|e| e.to_string())
    };
    if let Some(why) = missing {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true, but {why}"
        );
        eprintln!("skipping: {why}");
        return;
    }
    let dir = workspace();
    let remote = tempfile::tempdir().unwrap();
    let point = dir.path().join("runners/r1");
    fs::create_dir_all(&point).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let root = remote.path().to_owned();
    let connect = connect_with(move || {
        let root = root.clone();
        async move {
            let mut child = tokio::process::Command::new(SFTP_SERVER)
                .current_dir(&root)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
            Ok::<_, std::io::Error>(tokio::io::join(stdout, stdin))
        }
    });
    let options = Options {
        root: ".".into(),
        ..Options::default()
    };
    let mount = runtime
        .block_on(sync::mount(&point, connect, options))
        .unwrap();
    assert!(state::is_mounted(&point));

    let output = gractl(dir.path(), &["-o", "json", "workspace", "unsync"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"unmounted": [{"runner": null, "path": "runners/r1"}]})
    );
    assert!(!state::is_mounted(&point));
    runtime.block_on(mount.unmount()).unwrap();
}
