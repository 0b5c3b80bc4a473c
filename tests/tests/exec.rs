//! execute-code end to end: gractl → grad → grad-runner → Python, and back.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use grad_proto::{Resources, RunnerState};
use grad_tests::{Grad, OutputExt, python_has, require, signal};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn exec_json(grad: &Grad, args: &[&str]) -> (i32, Value) {
    let out = grad
        .gractl(&grad.admin_token)
        .args(["execute-code", "-r", "r1", "-o", "json"])
        .args(args)
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}\nstderr: {}",
            out.stdout_str(),
            out.stderr_str()
        )
    });
    (out.code(), doc)
}

fn result_text(doc: &Value) -> String {
    doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["is_result"] == true)
        .map(|o| o["data"]["text/plain"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_survive_between_calls_and_params_arrive_as_a_dict() {
    if !require("pandas in the runner's Python", python_has("pandas")) {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let out = grad
        .gractl(&grad.admin_token)
        .args([
            "execute-code",
            "-r",
            "r1",
            "--code",
            r#"import pandas as pd; df = pd.DataFrame({"x":[1,2,3]}); df"#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(out.stdout_str().contains('x'), "{}", out.stdout_str());

    let (code, doc) = exec_json(
        &grad,
        &["--code", r#"df.x.sum() * params["k"]"#, "--param", "k=10"],
    );
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["status"], "ok");
    // numpy 2 shows its scalars as np.int64(60), as Jupyter does.
    let sum = result_text(&doc);
    assert!(sum == "60" || sum == "np.int64(60)", "{sum}");
    assert_eq!(doc["execution_count"], 2);

    let (_, doc) = exec_json(
        &grad,
        &[
            "--code",
            "[type(params[k]).__name__ for k in sorted(params)]",
            "--param",
            "a=abc",
            "--param",
            "b=[1,2]",
            "--param",
            "c=1.5",
        ],
    );
    assert_eq!(result_text(&doc), "['str', 'list', 'float']");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataframe_shows_as_a_table_and_a_figure_as_a_png_in_outputs() {
    if !require(
        "pandas and matplotlib in the runner's Python",
        python_has("pandas, matplotlib"),
    ) {
        return;
    }
    let grad = Grad::with_runners(&["r1"]).await;
    let (code, doc) = exec_json(
        &grad,
        &["--code", "import pandas as pd\npd.DataFrame({'a': [1, 2]})"],
    );
    assert_eq!(code, 0, "{doc}");
    let result = &doc["outputs"][0];
    assert!(
        result["data"]["text/html"]
            .as_str()
            .unwrap()
            .contains("<table"),
        "{doc}"
    );

    let (code, doc) = exec_json(
        &grad,
        &[
            "--code",
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nNone",
        ],
    );
    assert_eq!(code, 0, "{doc}");
    let figure = doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["data"]["image/png"].is_string())
        .unwrap_or_else(|| panic!("no image/png output: {doc}"));
    let file = figure["files"][0].as_str().unwrap();
    assert!(
        file.starts_with("outputs/") && file.ends_with(".png"),
        "{file}"
    );
    let png = std::fs::read(grad.workspace("admin", "r1").join(file)).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_in_order_as_it_happens() {
    let grad = Grad::with_runners(&["r1"]).await;
    let mut child = grad
        .gractl(&grad.admin_token)
        .args([
            "execute-code",
            "-r",
            "r1",
            "-o",
            "ndjson",
            "--code",
            "import sys, time\nprint('first')\nsys.stdout.flush()\ntime.sleep(0.5)\nprint('second', file=sys.stderr)\n1 + 1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut events = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        events.push((start.elapsed(), event));
    }
    assert!(child.wait().unwrap().success());
    // Chunking is not part of the contract: join adjacent chunks of one stream.
    let mut kinds: Vec<String> = Vec::new();
    let mut at: Vec<usize> = Vec::new();
    for (i, (_, e)) in events.iter().enumerate() {
        let kind = e["event"].as_str().unwrap();
        if kind == "stream" {
            let name = e["name"].as_str().unwrap();
            let text = e["text"].as_str().unwrap();
            let prefix = format!("stream:{name}:");
            if let Some(last) = kinds.last_mut().filter(|k| k.starts_with(&prefix)) {
                last.push_str(text);
                continue;
            }
            kinds.push(format!("{prefix}{text}"));
        } else {
            kinds.push(kind.to_string());
        }
        at.push(i);
    }
    let kinds: Vec<String> = kinds.iter().map(|k| k.trim_end().to_string()).collect();
    assert_eq!(
        kinds,
        [
            "started",
            "stream:stdout:first",
            "stream:stderr:second",
            "display",
            "finished"
        ],
        "{events:?}"
    );
    let first_at = events[at[1]].0;
    let finished_at = events[at[4]].0;
    assert!(
        finished_at - first_at >= Duration::from_millis(400),
        "the first line was not streamed before the code finished: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_code_raising_is_a_result_with_name_value_and_traceback() {
    let grad = Grad::with_runners(&["r1"]).await;
    let (code, doc) = exec_json(&grad, &["--code", "def f(x):\n    return 1 / x\nf(0)"]);
    assert_eq!(code, 8, "{doc}");
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["ename"], "ZeroDivisionError");
    assert_eq!(doc["error"]["evalue"], "division by zero");
    let tb = doc["error"]["traceback"].as_array().unwrap();
    let tb: String = tb
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(tb.contains("return 1 / x"), "{tb}");
    assert!(!tb.contains("driver"), "the driver's own frames leak: {tb}");

    // Human output: the traceback goes to stderr, exit code 8.
    let out = grad.run(&[
        "execute-code",
        "-r",
        "r1",
        "--code",
        "raise ValueError('bad input')",
    ]);
    assert_eq!(out.code(), 8);
    assert!(
        out.stderr_str().contains("ValueError: bad input"),
        "{}",
        out.stderr_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_interrupts_the_code_and_the_next_call_works() {
    let grad = Grad::with_runners(&["r1"]).await;
    let (code, _) = exec_json(&grad, &["--code", "kept = 7"]);
    assert_eq!(code, 0);
    let started = Instant::now();
    let (code, doc) = exec_json(
        &grad,
        &[
            "--code",
            "import time\ntime.sleep(30)",
            "--timeout",
            "500ms",
        ],
    );
    assert_eq!(code, 7, "{doc}");
    assert_eq!(doc["status"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let (code, doc) = exec_json(&grad, &["--code", "kept * 6"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(result_text(&doc), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_code_and_leaves_the_interpreter_usable() {
    let grad = Grad::with_runners(&["r1"]).await;
    let mut child = grad
        .gractl(&grad.admin_token)
        .args([
            "execute-code",
            "-r",
            "r1",
            "-o",
            "ndjson",
            "--code",
            "import time\nkept = 1\nprint('sleeping', flush=True)\ntime.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .expect("output before the code finished")
            .unwrap();
        if line.contains("sleeping") {
            break;
        }
    }
    signal(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", out.stderr_str());
    let started = Instant::now();
    let (code, doc) = exec_json(&grad, &["--code", "kept + 1"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(result_text(&doc), "2");
    assert!(started.elapsed() < Duration::from_secs(10));
    let executions = grad.admin().await.list_executions("r1", 10).await.unwrap();
    assert!(
        executions
            .iter()
            .any(|e| e.status() == grad_proto::ExecStatus::Cancelled),
        "{executions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_comes_from_a_file_or_stdin_and_runs_in_the_code_directory() {
    let grad = Grad::with_runners(&["r1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("analysis.py");
    std::fs::write(&file, "import os\nos.getcwd()").unwrap();
    let (code, doc) = exec_json(&grad, &["--file", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{doc}");
    let code_dir = grad.workspace("admin", "r1").join("code");
    assert_eq!(
        result_text(&doc),
        format!("{:?}", code_dir.display().to_string()).replace('"', "'")
    );

    let out = grad.run_with_input(
        &grad.admin_token,
        &["execute-code", "-r", "r1"],
        b"print('from stdin')",
    );
    assert!(out.status.success());
    assert_eq!(out.stdout_str().trim(), "from stdin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_are_recorded_and_listed_per_runner() {
    let grad = Grad::with_runners(&["r1"]).await;
    exec_json(&grad, &["--code", "a = 1"]);
    exec_json(&grad, &["--code", "1 / 0"]);
    let executions = grad.admin().await.list_executions("r1", 10).await.unwrap();
    assert_eq!(executions.len(), 2, "{executions:?}");
    assert_eq!(executions[0].code, "1 / 0");
    assert_eq!(executions[0].status(), grad_proto::ExecStatus::Error);
    assert_eq!(executions[1].code, "a = 1");
    assert_eq!(executions[1].status(), grad_proto::ExecStatus::Ok);
    let out = grad.run(&["execution", "list", "-r", "r1"]);
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(out.stdout_str().contains("1 / 0"), "{}", out.stdout_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_separate_interpreters() {
    let grad = Grad::with_runners(&["r1"]).await;
    exec_json(&grad, &["--code", "v = 'default'"]);
    exec_json(&grad, &["--code", "v = 'other'", "--session", "s2"]);
    let (_, doc) = exec_json(&grad, &["--code", "v"]);
    assert_eq!(result_text(&doc), "'default'");
    let (_, doc) = exec_json(&grad, &["--code", "v", "--session", "s2"]);
    assert_eq!(result_text(&doc), "'other'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_interpreter_is_reported_by_name() {
    let grad = Grad::start_with(&["--python", "python3.99-missing"]);
    let admin = grad.admin().await;
    admin
        .create_runner("r1", Resources::default(), Vec::new())
        .await
        .unwrap();
    admin
        .wait_runner("r1", &[RunnerState::Ready], WAIT)
        .await
        .unwrap();
    let (code, doc) = exec_json(&grad, &["--code", "1"]);
    assert_ne!(code, 0);
    assert_eq!(doc["status"], "failed", "{doc}");
    let message = doc.to_string();
    assert!(message.contains("python3.99-missing"), "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_code_on_an_unknown_runner_says_not_found() {
    let grad = Grad::start();
    let out = grad.run(&["execute-code", "-r", "ghost", "--code", "1"]);
    assert_eq!(out.code(), 4, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("runner 'ghost' not found"),
        "{}",
        out.stderr_str()
    );
}
