//! gractl as people and programs use it, against the real grad and runners:
//! output formats, `--wait`, workspace defaults, and the exit-code table.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    process::{Output, Stdio},
};

use grad_tests::{Grad, OutputExt};
use serde_json::Value;

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}\nstderr: {}",
            out.stdout_str(),
            out.stderr_str()
        )
    })
}

#[test]
fn login_reads_the_token_from_stdin_and_a_rejected_token_stores_nothing() {
    let grad = Grad::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let login = |token: &str| {
        let mut child = grad
            .gractl("")
            .env_remove("GRAD_TOKEN")
            .env_remove("GRAD_SERVER")
            .env("GRACTL_CONFIG", &config)
            .args(["login", "--server", &grad.url, "--token-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(token.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = login("not-a-token");
    assert_eq!(out.code(), 3, "{}", out.stderr_str());
    assert!(!config.exists(), "a rejected token was stored");

    let out = login(&grad.admin_token);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(
        out.stdout_str(),
        format!("Logged in to {} as admin (admin, pro)\n", grad.url)
    );
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn runners_print_as_tables_json_and_ndjson() {
    let grad = Grad::start();
    let out = grad.run(&[
        "runner", "create", "a", "--cpu", "500m", "--memory", "1Gi", "--wait",
    ]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(out.stdout_str(), "runner/a ready\n");

    let out = grad.run(&["runner", "list"]);
    let lines: Vec<&str> = out.stdout_str().leak().lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATE"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("a ") && lines[1].contains("READY") && lines[1].contains("500m"),
        "{lines:?}"
    );

    let out = grad.run(&["runner", "list", "--all"]);
    assert!(out.stdout_str().contains("OWNER"), "{}", out.stdout_str());

    let runner = json(&grad.run(&["runner", "get", "a", "-o", "json"]));
    assert_eq!(runner["state"], "ready");
    assert_eq!(runner["cpu"], "500m");
    assert_eq!(runner["memory"], "1Gi");
    assert_eq!(runner["storage"], "10Gi");
    assert_eq!(runner["connected"], true);

    let out = grad.run(&["runner", "list", "-o", "ndjson"]);
    assert_eq!(out.stdout_str().lines().count(), 1);
    let one: Value = serde_json::from_str(out.stdout_str().trim()).unwrap();
    assert_eq!(one["name"], "a");

    let out = grad.run(&["runner", "create", "a"]);
    assert_eq!(out.code(), 5, "{}", out.stderr_str());
    let out = grad.run(&["runner", "get", "nope", "-o", "json"]);
    assert_eq!(out.code(), 4);
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["code"], "not_found");
    assert_eq!(err["error"]["message"], "runner 'nope' not found");
}

#[test]
fn pause_resume_and_delete_wait_for_their_states() {
    let grad = Grad::start();
    assert!(grad.run(&["runner", "create", "a"]).status.success());
    let out = grad.run(&["runner", "pause", "a", "--wait"]);
    assert_eq!(
        out.stdout_str(),
        "runner/a paused\n",
        "{}",
        out.stderr_str()
    );
    let out = grad.run(&["runner", "resume", "a", "--wait"]);
    assert_eq!(out.stdout_str(), "runner/a ready\n", "{}", out.stderr_str());
    let out = grad.run(&["runner", "delete", "a", "--wait", "-o", "json"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(json(&out)["state"], "deleted");
    assert!(grad.runner_pids().is_empty());
}

#[test]
fn a_wait_that_times_out_exits_7() {
    // A "runner" that never registers.
    let dir = tempfile::tempdir().unwrap();
    let fake_runner = dir.path().join("never-ready");
    std::fs::write(&fake_runner, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&fake_runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    let grad = Grad::start_with(&["--runner-bin", fake_runner.to_str().unwrap()]);
    let out = grad.run(&["runner", "create", "slow", "--wait", "--timeout", "1s"]);
    assert_eq!(out.code(), 7, "{}", out.stderr_str());
    assert!(out.stderr_str().contains("slow"), "{}", out.stderr_str());
}

#[test]
fn the_workspace_supplies_the_default_runner_and_resources() {
    let grad = Grad::start();
    let ws = tempfile::tempdir().unwrap();
    let out = grad.run(&["workspace", "init", ws.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr_str());
    for entry in ["config.yaml", "datasets", "runners"] {
        assert!(ws.path().join(entry).exists(), "{entry} missing");
    }
    std::fs::write(
        ws.path().join("config.yaml"),
        "defaults:\n  runner: ws\n  cpu: 2\n  memory: 3Gi\n",
    )
    .unwrap();
    let in_ws = |args: &[&str]| {
        grad.gractl(&grad.admin_token)
            .current_dir(ws.path().join("runners"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = in_ws(&["runner", "create", "ws", "--wait"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    let runner = json(&in_ws(&["runner", "get", "ws", "-o", "json"]));
    assert_eq!(
        (runner["cpu"].as_str(), runner["memory"].as_str()),
        (Some("2"), Some("3Gi"))
    );
    let out = in_ws(&["execute-code", "--code", "print('used the default runner')"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert_eq!(out.stdout_str(), "used the default runner\n");

    std::fs::write(ws.path().join("config.yaml"), "defaults:\n  cpu: two\n").unwrap();
    let out = in_ws(&["runner", "list"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_str());
    let err = out.stderr_str();
    assert!(
        err.contains("config.yaml") && err.contains("line 2") && err.contains("defaults.cpu"),
        "{err}"
    );
}

#[test]
fn figures_print_as_their_file_and_a_dying_interpreter_exits_6() {
    if !grad_tests::require(
        "matplotlib in the runner's Python",
        grad_tests::python_has("matplotlib"),
    ) {
        return;
    }
    let grad = Grad::start();
    assert!(
        grad.run(&["runner", "create", "a", "--wait"])
            .status
            .success()
    );
    let out = grad.run(&[
        "execute-code",
        "-r",
        "a",
        "--code",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])\n42",
    ]);
    assert!(out.status.success(), "{}", out.stderr_str());
    // The figure is flushed when the cell ends, after its value (as in Jupyter).
    assert_eq!(
        out.stdout_str(),
        "42\n[image/png: outputs/figure-1-1.png]\n"
    );

    let out = grad.run(&[
        "execute-code",
        "-r",
        "a",
        "--code",
        "import os\nos._exit(3)",
    ]);
    assert_eq!(out.code(), 6, "{}", out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("the runner could not run the code"),
        "{}",
        out.stderr_str()
    );
    // The session starts afresh.
    let out = grad.run(&["execute-code", "-r", "a", "--code", "print('back')"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(out.stdout_str().contains("back"));
}

#[test]
fn a_missing_code_file_is_a_usage_error_naming_the_flag() {
    let grad = Grad::start();
    let out = grad.run(&["execute-code", "-r", "a", "--file", "/nonexistent/job.py"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("--file /nonexistent/job.py"),
        "{}",
        out.stderr_str()
    );
}
