//! The `gractl` binary without a server: help, usage errors, workspace files,
//! and what happens when grad cannot be reached.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
};

use gractl::config::Credentials;

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
        .expect("gractl runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

#[test]
fn help_documents_every_exit_code_and_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["--help"]);
    assert!(output.status.success());
    let help = stdout(&output);
    for line in [
        "Exit codes:",
        "    0  success",
        "    2  usage",
        "    3  auth",
        "    4  not found",
        "    5  precondition",
        "    6  unavailable",
        "    7  timeout",
        "    8  the executed code raised",
        "  130  interrupted",
        "GRAD_TOKEN",
    ] {
        assert!(help.contains(line), "{line:?} missing from:\n{help}");
    }
    for command in [
        "login",
        "runner",
        "execute-code",
        "execution",
        "whoami",
        "workspace",
        "completion",
        "ssh",
        "cp",
        "ssh-config",
        "ssh-key",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn an_unreachable_server_is_named_and_exits_6() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = closed_port();
    let server = format!("http://127.0.0.1:{port}");
    let output = Command::new(env!("CARGO_BIN_EXE_gractl"))
        .args(["--server", &server, "runner", "list"])
        .current_dir(dir.path())
        .env("GRAD_TOKEN", "t")
        .env("XDG_CONFIG_HOME", dir.path())
        .env_remove("GRAD_WORKSPACE")
        .output()
        .expect("gractl runs");
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        format!("error: cannot reach grad at {server}: connection refused\n")
    );
}

#[test]
fn errors_are_json_on_stderr_under_output_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = closed_port();
    let output = Command::new(env!("CARGO_BIN_EXE_gractl"))
        .args(["-o", "json", "whoami"])
        .current_dir(dir.path())
        .env("GRAD_SERVER", format!("127.0.0.1:{port}"))
        .env("GRAD_TOKEN", "t")
        .env("XDG_CONFIG_HOME", dir.path())
        .env_remove("GRAD_WORKSPACE")
        .output()
        .expect("gractl runs");
    assert_eq!(output.status.code(), Some(6));
    assert!(output.stdout.is_empty());
    let error: serde_json::Value =
        serde_json::from_slice(&output.stderr).expect("one JSON document");
    assert_eq!(error["error"]["code"], "unavailable");
    assert_eq!(
        error["error"]["message"],
        format!("cannot reach grad at http://127.0.0.1:{port}: connection refused")
    );
}

#[test]
fn without_credentials_commands_say_how_to_log_in_and_exit_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["runner", "list"]);
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(
        stderr(&output),
        "error: not logged in; run `gractl login --server URL --token-file FILE`\n"
    );
}

#[test]
fn a_bad_memory_flag_is_a_usage_error_naming_the_flag_and_valid_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["runner", "create", "a", "--memory", "4GB"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("invalid value '4GB' for '--memory <SIZE>'"),
        "{message}"
    );
    assert!(
        message.contains("expected a size like 512Mi, 4Gi or 1G"),
        "{message}"
    );
}

#[test]
fn a_bad_cpu_flag_is_a_usage_error_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["runner", "create", "a", "--cpu", "two"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("'--cpu <CORES>'"), "{message}");
    assert!(
        message.contains("expected a CPU amount like 2, 0.5 or 500m"),
        "{message}"
    );
}

#[test]
fn a_param_without_equals_is_a_usage_error_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(
        dir.path(),
        &["execute-code", "-r", "a", "--code", "1", "--param", "n"],
    );
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("invalid value 'n' for '--param <KEY=VALUE>'"),
        "{message}"
    );
    assert!(message.contains("expected KEY=VALUE"), "{message}");
}

#[test]
fn the_login_token_cannot_be_given_as_a_flag_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(
        dir.path(),
        &["login", "--server", "http://x:1", "--token", "secret"],
    );
    assert_eq!(output.status.code(), Some(2));
    let output = gractl(dir.path(), &["login", "--server", "http://x:1"]);
    assert_eq!(output.status.code(), Some(2), "a token source is required");
}

#[test]
fn execute_code_without_a_runner_says_how_to_pick_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["execute-code", "--code", "1"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("pass -r/--runner NAME or set defaults.runner"));
}

#[test]
fn workspace_init_creates_the_layout_and_a_config_that_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["workspace", "init", "ws"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let root = dir.path().join("ws");
    assert!(root.join("datasets").is_dir());
    assert!(root.join("runners").is_dir());
    let text = fs::read_to_string(root.join("config.yaml")).expect("config.yaml");
    assert!(text.contains("server: \"http://127.0.0.1:7070\""), "{text}");
    assert!(text.starts_with("# "), "the template is commented");

    let workspace = gractl::config::Workspace::load(&root).expect("the template loads");
    assert_eq!(
        workspace.defaults().memory,
        Some(gractl::quantity::Size(2 << 30))
    );
    assert_eq!(
        gractl::config::Workspace::find(&root.join("runners")),
        Some(root.clone()),
        "found from below"
    );
}

#[test]
fn workspace_init_uses_the_current_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(
        dir.path(),
        &["--server", "http://10.0.0.5:7070", "workspace", "init"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = fs::read_to_string(dir.path().join("config.yaml")).expect("config.yaml");
    assert!(text.contains("server: \"http://10.0.0.5:7070\""), "{text}");
}

#[test]
fn workspace_init_refuses_to_overwrite_a_config_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    fs::write(&config, "server: http://mine:1\n").expect("write");

    let output = gractl(dir.path(), &["workspace", "init"]);
    assert_eq!(output.status.code(), Some(5));
    assert!(
        stderr(&output).contains(&format!(
            "{} already exists; pass --force",
            Path::new(".").join("config.yaml").display()
        )),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        fs::read_to_string(&config).expect("read"),
        "server: http://mine:1\n"
    );

    let output = gractl(dir.path(), &["workspace", "init", "--force"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        fs::read_to_string(&config)
            .expect("read")
            .contains("defaults:")
    );
    // Directories already there are fine.
    let output = gractl(dir.path(), &["workspace", "init", "--force", "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let init: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(init["created"], serde_json::json!([]));
}

#[test]
fn a_malformed_workspace_config_names_the_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("runners")).expect("mkdir");
    let config = dir.path().join("config.yaml");
    fs::write(
        &config,
        "server: http://127.0.0.1:1\ndefaults:\n  cpu: two\n",
    )
    .expect("write");
    let nested = dir.path().join("runners");

    let output = gractl(&nested, &["runner", "list"]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!(
            "error: {}: line 3: defaults.cpu: invalid value \"two\": expected a CPU amount like 2, 0.5 or 500m\n",
            config.display()
        )
    );
}

#[test]
fn an_unknown_workspace_key_lists_the_valid_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("runners")).expect("mkdir");
    fs::write(dir.path().join("config.yaml"), "servr: http://x:1\n").expect("write");
    let output = gractl(dir.path(), &["-o", "json", "whoami"]);
    assert_eq!(output.status.code(), Some(2));
    let error: serde_json::Value = serde_json::from_slice(&output.stderr).expect("json");
    assert_eq!(error["error"]["code"], "usage");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("line 1: unknown field `servr`, expected `server` or `defaults`"),
        "{message}"
    );
}

#[test]
fn a_named_workspace_without_config_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["--workspace", "nowhere", "whoami"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("gractl workspace init nowhere"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn credentials_are_written_readable_by_the_owner_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deep/er/gractl/config.yaml");
    let credentials = Credentials {
        server: "http://127.0.0.1:7070".into(),
        token: "secret".into(),
    };
    credentials.save(&path).expect("save");
    let mode = fs::metadata(&path).expect("metadata").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        Credentials::load(&path).expect("load"),
        Some(credentials.clone())
    );

    // A looser file left by someone else is replaced, not reused.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    credentials.save(&path).expect("save again");
    let mode = fs::metadata(&path).expect("metadata").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let leftovers: Vec<_> = fs::read_dir(path.parent().expect("parent"))
        .expect("read_dir")
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left behind");
}

#[test]
fn completion_scripts_are_generated_for_each_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let output = gractl(dir.path(), &["completion", shell]);
        assert!(output.status.success(), "{shell}");
        assert!(stdout(&output).contains("execute-code"), "{shell}");
    }
}

#[test]
fn cp_needs_one_side_on_a_runner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["cp", "a.txt", "b.txt"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("RUNNER:PATH"),
        "{}",
        stderr(&output)
    );
    let output = gractl(dir.path(), &["cp", "r1:a", "r2:b"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
fn cp_names_a_missing_or_directory_source_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens there: these errors come first.
    let server = format!("--server=127.0.0.1:{}", closed_port());
    let output = gractl(dir.path(), &[&server, "cp", "./missing.csv", "r1:code/"]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        "error: ./missing.csv: no such file or directory\n"
    );
    fs::create_dir(dir.path().join("data")).expect("mkdir");
    let output = gractl(dir.path(), &[&server, "cp", "data", "r1:"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        "error: data is a directory; pass -r/--recursive to copy it\n"
    );
}

#[test]
fn ssh_stdio_takes_no_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = gractl(dir.path(), &["ssh", "--stdio", "r1", "ls"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}
