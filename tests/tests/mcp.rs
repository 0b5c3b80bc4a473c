//! `gractl mcp` driven by a real MCP client — the official MCP Python SDK
//! (`tests/mcp_client.py`) — against the real grad and runners: initialize,
//! the tool list with its schemas, a matplotlib figure coming back as an
//! image, an exception as `isError` with its traceback, bad arguments
//! refused with the reason, files in the workspace, an agent's whole
//! session in MCP calls only; and the same tools as commands
//! (`gractl tools discover|call`).
#![allow(clippy::unwrap_used)]

use std::{path::Path, process::Command};

use base64::Engine;
use grad_tests::{Grad, OutputExt, bin, python, python_has, require};
use serde_json::Value;

fn prerequisites() -> bool {
    require("the MCP Python SDK (pip install mcp)", python_has("mcp"))
        && require(
            "matplotlib and DuckDB for the runner's Python",
            python_has("matplotlib, duckdb"),
        )
}

/// Runs the client script's `scenario` against gractl with `env`.
fn drive(grad: &Grad, scenario: &str, env: &[(&str, String)]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp_client.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg(bin("gractl"))
        .arg(scenario)
        .env("GRAD_SERVER", &grad.url)
        .env("GRAD_TOKEN", &grad.admin_token)
        .env("GRACTL_CONFIG", grad.data_dir.join("mcp-gractl.yaml"));
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the MCP client failed: {}\n{}",
        out.stdout_str(),
        out.stderr_str()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout_str()))
}

fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"] == "text")
        .map(|c| c["text"].as_str().unwrap())
        .collect()
}

fn png(result: &Value) -> Vec<u8> {
    let image = result["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "image")
        .unwrap_or_else(|| panic!("no image in {result}"));
    assert_eq!(image["mimeType"], "image/png");
    base64::engine::general_purpose::STANDARD
        .decode(image["data"].as_str().unwrap())
        .unwrap()
}

#[test]
fn a_real_mcp_client_runs_code_gets_figures_errors_and_files() {
    if !prerequisites() {
        return;
    }
    let grad = Grad::start();
    let out = drive(&grad, "basics", &[]);
    assert_eq!(out["server"], "grad");
    assert!(
        out["instructions"]
            .as_str()
            .unwrap()
            .contains("execute_code"),
        "{}",
        out["instructions"]
    );
    let tools = out["tools"].as_object().unwrap();
    for name in [
        "list_runners",
        "create_runner",
        "pause_runner",
        "resume_runner",
        "delete_runner",
        "execute_code",
        "read_file",
        "write_file",
        "list_files",
        "list_datasets",
        "submit_job",
        "job_status",
        "job_logs",
    ] {
        assert!(tools.contains_key(name), "no tool {name}: {tools:?}");
    }
    assert_eq!(
        tools["execute_code"]["required"],
        serde_json::json!(["runner", "code"])
    );
    assert_eq!(tools["execute_code"]["additionalProperties"], false);

    assert_eq!(out["create"]["isError"], false, "{}", out["create"]);
    assert_eq!(out["create"]["structured"]["state"], "ready");
    let plot = &out["plot"];
    assert_eq!(plot["isError"], false, "{plot}");
    assert!(text(plot).starts_with("plotted"), "{plot}");
    assert!(png(plot).starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    let raised = &out["raises"];
    assert_eq!(raised["isError"], true, "{raised}");
    assert_eq!(raised["structured"]["error"]["ename"], "ZeroDivisionError");
    assert!(text(raised).contains("Traceback"), "{raised}");

    let bad = &out["bad_argument"]["protocolError"];
    assert_eq!(bad["code"], -32602, "{}", out["bad_argument"]);
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("missing field `code`")
    );
    let unknown = &out["unknown_field"]["protocolError"];
    assert!(
        unknown["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `kode`"),
        "{unknown}"
    );
    assert_eq!(
        out["no_runner"]["protocolError"]["code"], -32602,
        "{}",
        out["no_runner"]
    );

    assert_eq!(text(&out["state_kept"]), "42", "state or params lost");
    assert_eq!(text(&out["read"]), "hello from an agent\n");
    assert_eq!(
        out["list"]["structured"]["entries"][0]["name"], "hello.txt",
        "{}",
        out["list"]
    );
    assert_eq!(
        out["escape"]["protocolError"]["code"], -32602,
        "{}",
        out["escape"]
    );
    assert_eq!(out["delete"]["structured"]["state"], "deleted");
}

#[test]
fn an_agent_does_a_whole_analysis_in_mcp_calls_only() {
    if !prerequisites() {
        return;
    }
    let grad = Grad::start();
    let out = drive(&grad, "agent", &[]);
    let steps = out["steps"].as_array().unwrap();
    for (i, step) in steps.iter().enumerate() {
        assert!(step.get("protocolError").is_none(), "step {i}: {step}");
        assert_eq!(step["isError"], false, "step {i}: {step}");
    }
    assert_eq!(steps[0]["structured"]["state"], "ready");
    assert_eq!(text(&steps[1]), "written\n");
    // Sums of 0..300 by i % 3.
    let totals = &steps[2]["structured"]["outputs"][0]["data"]["text/plain"];
    assert_eq!(
        totals.as_str().unwrap(),
        "{'k': [0, 1, 2], 'total': [14850.0, 14950.0, 15050.0]}",
        "{}",
        steps[2]
    );
    let listed: Vec<&str> = steps[4]["structured"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&"totals.png") && listed.contains(&"t.parquet"),
        "{listed:?}"
    );
    let image = png(&steps[5]);
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(
        image.len() > 1000,
        "a real figure is more than {} bytes",
        image.len()
    );
    assert_eq!(steps[6]["structured"]["state"], "deleted");
    assert_eq!(steps[7]["structured"]["runners"], serde_json::json!([]));
}

#[test]
fn jobs_are_submitted_followed_and_read_through_mcp() {
    if !prerequisites() {
        return;
    }
    let grad = Grad::start();
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("job.yaml"),
        "name: from-mcp\ncommand: echo computed $((6 * 7))\n",
    )
    .unwrap();
    let out = drive(
        &grad,
        "jobs",
        &[("PROJECT_DIR", project.path().display().to_string())],
    );
    assert_eq!(out["submit"]["isError"], false, "{}", out["submit"]);
    assert_eq!(
        out["status"]["structured"]["state"], "succeeded",
        "{}",
        out["status"]
    );
    // The runner the agent created ran it (runners are workers too).
    assert_eq!(out["status"]["structured"]["worker"], "runner/jobs1");
    assert_eq!(text(&out["logs"]), "computed 42");
    assert_eq!(out["logs"]["structured"]["lines"][0]["stream"], "stdout");
    assert_eq!(
        out["no_dir"]["protocolError"]["code"], -32602,
        "{}",
        out["no_dir"]
    );
}

#[test]
fn not_being_logged_in_is_a_tool_error_that_says_so() {
    if !prerequisites() {
        return;
    }
    let grad = Grad::start();
    let nowhere = grad.data_dir.join("no-such-config.yaml");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(bin("gractl"))
        .arg("logged_out")
        .env_remove("GRAD_SERVER")
        .env_remove("GRAD_TOKEN")
        .env("GRACTL_CONFIG", &nowhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["list"]["isError"], true, "{}", out["list"]);
    assert!(
        text(&out["list"]).contains("not logged in"),
        "{}",
        out["list"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tools_discover_and_call_speak_json_on_stdout_only() {
    let grad = Grad::with_runners(&["r1"]).await;
    let discovered = grad.run(&["tools", "discover"]);
    assert!(discovered.status.success(), "{}", discovered.stderr_str());
    let tools: Value = serde_json::from_slice(&discovered.stdout).unwrap();
    let execute = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "execute_code")
        .unwrap();
    assert_eq!(execute["inputSchema"]["type"], "object");

    let called = grad.run_with_input(
        &grad.admin_token,
        &["tools", "call", "execute_code"],
        br#"{"runner": "r1", "code": "6 * 7"}"#,
    );
    assert!(called.status.success(), "{}", called.stderr_str());
    assert_eq!(called.stderr_str(), "", "stderr must stay empty on success");
    let result: Value = serde_json::from_slice(&called.stdout).unwrap();
    assert_eq!(
        result["structuredContent"]["outputs"][0]["data"]["text/plain"],
        "42"
    );
    assert_eq!(result["isError"], false);

    let raised = grad.run_with_input(
        &grad.admin_token,
        &["tools", "call", "execute_code"],
        br#"{"runner": "r1", "code": "raise ValueError('bad')"}"#,
    );
    assert_eq!(raised.code(), 8, "{}", raised.stderr_str());
    let result: Value = serde_json::from_slice(&raised.stdout).unwrap();
    assert_eq!(result["isError"], true);
    let bad = grad.run_with_input(
        &grad.admin_token,
        &["tools", "call", "execute_code"],
        b"{nope",
    );
    assert_eq!(bad.code(), 2, "{}", bad.stderr_str());
    let unknown = grad.run_with_input(&grad.admin_token, &["tools", "call", "dance"], b"{}");
    assert_eq!(unknown.code(), 2);
    assert!(
        unknown.stderr_str().contains("no tool 'dance'"),
        "{}",
        unknown.stderr_str()
    );

    let config = grad.run(&["mcp", "--print-config", "gemini"]);
    let config: Value = serde_json::from_slice(&config.stdout).unwrap();
    assert_eq!(config["mcpServers"]["grad"]["command"], "gractl");
    assert_eq!(
        config["mcpServers"]["grad"]["args"],
        serde_json::json!(["mcp"])
    );
}
