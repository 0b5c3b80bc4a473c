//! The machine-readable contract of gractl, on every command: the test walks
//! gractl's whole command tree (from clap's own definition, so a new
//! command cannot be forgotten), runs each one with `-o json` against the
//! real grad, runners and a worker, and checks that a success prints
//! exactly one JSON document on stdout and a failure exits with its
//! documented code and prints `{"error":{"code":…,"message":…}}` on stderr.
//! The few commands that cannot speak JSON say why in `EXEMPT`.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, path::Path};

use clap::CommandFactory;
use grad_tests::{Grad, OutputExt};
use serde_json::Value;

/// Commands that do not print JSON, and why.
const EXEMPT: &[(&str, &str)] = &[
    (
        "ssh",
        "passes the remote command's bytes (or a terminal) through",
    ),
    ("mcp", "speaks MCP on stdio"),
    ("completion", "prints a shell script"),
];

/// Every leaf command, as its words (`runner create`).
fn leaves(command: &clap::Command, prefix: &str, out: &mut BTreeSet<String>) {
    let subcommands: Vec<&clap::Command> = command
        .get_subcommands()
        .filter(|c| c.get_name() != "help")
        .collect();
    if subcommands.is_empty() {
        out.insert(prefix.trim().to_owned());
    }
    for sub in subcommands {
        leaves(sub, &format!("{prefix} {}", sub.get_name()), out);
    }
}

/// The exit code's stable name, as `{"error":{"code":…}}` carries it.
fn code_name(code: i32) -> &'static str {
    match code {
        1 => "internal",
        2 => "usage",
        3 => "auth",
        4 => "not_found",
        5 => "precondition",
        6 => "unavailable",
        7 => "timeout",
        8 => "code_raised",
        9 => "job_failed",
        130 => "interrupted",
        _ => "?",
    }
}

struct Case {
    words: &'static str,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    exit: i32,
}

fn case(words: &'static str, args: &[&str], exit: i32) -> Case {
    Case {
        words,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        stdin: None,
        exit,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_speaks_json_and_exits_with_its_documented_code() {
    let mut all = BTreeSet::new();
    leaves(&gractl::cli::Cli::command(), "", &mut all);

    let grad = Grad::with_runners(&["r1"]).await;
    let _worker = grad.start_agent(&grad.admin_token, "w0", &[], &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).display().to_string();
    let ws = dir("ws");
    assert!(grad.run(&["workspace", "init", &ws]).status.success());
    std::fs::create_dir_all(dir("project")).unwrap();
    std::fs::write(
        Path::new(&dir("project")).join("job.yaml"),
        "name: contract\ncommand: mkdir -p outputs; echo done > outputs/x.txt; echo hi\n",
    )
    .unwrap();
    std::fs::write(dir("upload.txt"), "upload\n").unwrap();
    let key = dir("key");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f", &key])
        .status()
        .unwrap();
    assert!(keygen.success());
    let submitted = grad.run(&["job", "submit", &dir("project"), "-o", "json"]);
    let job: Value = serde_json::from_slice(&submitted.stdout).unwrap();
    let job = job["job"]["id"].as_str().unwrap().to_owned();
    let finished = grad.run(&["job", "wait", &job]);
    assert!(finished.status.success(), "{}", finished.stderr_str());
    let fingerprint = {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(format!("{key}.pub"))
            .output()
            .unwrap();
        out.stdout_str()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    let ws_args = |rest: &[&str]| -> Vec<String> {
        let mut args = vec!["--workspace".to_owned(), ws.clone()];
        args.extend(rest.iter().map(|a| (*a).to_owned()));
        args
    };

    let cases = vec![
        Case {
            stdin: Some(grad.admin_token.clone().into_bytes()),
            ..case(
                "login",
                &[
                    "--server",
                    &grad.url,
                    "--token-stdin",
                    "--config",
                    &dir("login.yaml"),
                ],
                0,
            )
        },
        case("whoami", &[], 0),
        case("runner create", &["r2", "--wait"], 0),
        case("runner list", &[], 0),
        case("runner get", &["r2"], 0),
        case("runner pause", &["r2", "--wait"], 0),
        case("runner resume", &["r2", "--wait"], 0),
        case("runner delete", &["r2", "--wait"], 0),
        case("execute-code", &["-r", "r1", "--code", "1 / 0"], 8),
        case("execution list", &["-r", "r1"], 0),
        case("cp", &[&dir("upload.txt"), "r1:code/"], 0),
        case("ssh-config", &[], 0),
        case("ssh-key add", &[&format!("{key}.pub")], 0),
        case("ssh-key list", &[], 0),
        case("ssh-key delete", &[&fingerprint], 0),
        case("workspace init", &[&dir("ws2")], 0),
        Case {
            args: ws_args(&[]),
            ..case("workspace sync", &[], 0)
        },
        Case {
            args: ws_args(&[]),
            ..case("workspace unsync", &[], 0)
        },
        Case {
            args: ws_args(&[
                "taxi",
                "--bucket",
                "nyc-taxi",
                "--endpoint",
                "http://127.0.0.1:9",
            ]),
            ..case("dataset add", &[], 0)
        },
        Case {
            args: ws_args(&[]),
            ..case("dataset list", &[], 0)
        },
        Case {
            args: ws_args(&["taxi"]),
            ..case("dataset show", &[], 0)
        },
        // Nothing listens on port 9.
        Case {
            args: ws_args(&["taxi"]),
            ..case("dataset test", &[], 6)
        },
        Case {
            args: ws_args(&["taxi"]),
            ..case("dataset remove", &[], 0)
        },
        case("outputs collect", &["r1"], 0),
        case("outputs list", &[], 0),
        case("outputs pull", &["r1", &dir("pulled")], 0),
        // r1 is alive: only a deleted runner's outputs can be removed.
        case("outputs remove", &["r1"], 5),
        Case {
            stdin: Some(b"value".to_vec()),
            ..case("secret set", &["CONTRACT"], 0)
        },
        case("secret list", &[], 0),
        case("secret remove", &["CONTRACT"], 0),
        case("job submit", &[&dir("project")], 0),
        case("job list", &[], 0),
        case("job get", &[&job], 0),
        case("job cancel", &[&job], 0),
        case("job wait", &[&job], 0),
        case("job outputs", &[&job, &dir("job-out")], 0),
        case("job logs", &[&job], 0),
        case(
            "worker create",
            &["w9", "--token-file", &dir("w9.token")],
            0,
        ),
        case("worker list", &[], 0),
        case("worker remove", &["w9"], 0),
        case("tools discover", &[], 0),
        Case {
            stdin: Some(br#"{"runner": "r1", "code": "1"}"#.to_vec()),
            ..case("tools call", &["execute_code"], 0)
        },
        // Failures speak JSON too, with their codes.
        case("runner get", &["no-such"], 4),
        case("runner create", &["Bad_Name"], 2),
        case("job get", &["ffffffffffff"], 4),
    ];
    let covered: BTreeSet<String> = cases.iter().map(|c| c.words.to_owned()).collect();
    let exempt: BTreeSet<String> = EXEMPT.iter().map(|(w, _)| (*w).to_owned()).collect();
    let missing: Vec<&String> = all
        .iter()
        .filter(|c| !covered.contains(*c) && !exempt.contains(*c))
        .collect();
    assert!(
        missing.is_empty(),
        "commands the contract test does not run: {missing:?}"
    );

    for case in &cases {
        let mut args: Vec<String> = case.words.split(' ').map(str::to_owned).collect();
        args.extend(case.args.iter().cloned());
        args.extend(["-o".to_owned(), "json".to_owned()]);
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = match &case.stdin {
            Some(input) => grad.run_with_input(&grad.admin_token, &arg_refs, input),
            None => grad.run(&arg_refs),
        };
        let shown = format!("gractl {}", args.join(" "));
        assert_eq!(
            out.code(),
            case.exit,
            "{shown}: exit {}, stdout {}, stderr {}",
            out.code(),
            out.stdout_str(),
            out.stderr_str()
        );
        if case.exit == 0 {
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| {
                panic!("{shown}: not one JSON document ({e}): {}", out.stdout_str())
            });
        } else if case.exit != 8 && case.exit != 9 {
            // Code that raised and failed jobs print their result document
            // instead; every other failure is the error document.
            let error: Value = serde_json::from_str(out.stderr_str().trim()).unwrap_or_else(|e| {
                panic!("{shown}: the error is not JSON ({e}): {}", out.stderr_str())
            });
            assert_eq!(
                error["error"]["code"],
                code_name(case.exit),
                "{shown}: {error}"
            );
            assert!(
                error["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        } else {
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| {
                panic!("{shown}: not one JSON document ({e}): {}", out.stdout_str())
            });
        }
    }

    // Lists speak NDJSON: one document per line.
    for words in [
        "runner list",
        "job list",
        "secret list",
        "worker list",
        "outputs list",
    ] {
        let mut args: Vec<&str> = words.split(' ').collect();
        args.extend(["-o", "ndjson"]);
        let out = grad.run(&args);
        assert!(out.status.success(), "{words}: {}", out.stderr_str());
        for line in out.stdout_str().lines() {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("{words} -o ndjson: {e}: {line}"));
        }
    }
}
