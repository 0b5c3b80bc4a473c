//! `make bench`: execute-code round trips and runner start times, side by
//! side in one run with the tool a user would otherwise use (a Jupyter kernel
//! driven by jupyter_client). Prints a Markdown table for BENCHMARKS.md.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use gractl::client::Client;
use grad_proto::{ExecuteCodeRequest, Resources, RunnerState, exec_event::Event};
use grad_tests::{
    Grad,
    stats::{Stats, of as stats},
};

async fn execute(client: &Client, code: &str) -> anyhow::Result<()> {
    let mut events = client
        .execute_code(ExecuteCodeRequest {
            runner: "bench".into(),
            code: code.into(),
            ..Default::default()
        })
        .await?;
    while let Some(event) = events.message().await? {
        if let Some(Event::Finished(_)) = event.event {
            return Ok(());
        }
    }
    anyhow::bail!("stream ended without finished")
}

use grad_tests::bench::env_usize;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let rounds = env_usize("BENCH_ROUNDS", 1000);
    let process_rounds = env_usize("BENCH_PROCESS_ROUNDS", 300);
    let starts = env_usize("BENCH_STARTS", 20);
    let python = grad_tests::python();

    let grad = Grad::start();
    let client = grad.admin().await;

    // Runner create → ready.
    let mut create = Vec::new();
    for _ in 0..starts {
        let t = Instant::now();
        client
            .create_runner("bench", Resources::default(), Vec::new())
            .await?;
        let r = client
            .wait_runner("bench", &[RunnerState::Ready], Duration::from_secs(30))
            .await?;
        create.push(t.elapsed());
        anyhow::ensure!(
            r.state() == RunnerState::Ready,
            "runner failed: {}",
            r.reason
        );
        client.delete_runner("bench", false).await?;
        client
            .wait_runner("bench", &[RunnerState::Deleted], Duration::from_secs(30))
            .await?;
    }
    client
        .create_runner("bench", Resources::default(), Vec::new())
        .await?;
    client
        .wait_runner("bench", &[RunnerState::Ready], Duration::from_secs(30))
        .await?;

    // Through the client library (one connection, like an SDK user).
    for _ in 0..50 {
        execute(&client, "1+1").await?;
    }
    let mut library = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        execute(&client, "1+1").await?;
        library.push(t.elapsed());
    }

    // The whole gractl process, as a shell user or an AI agent runs it.
    let gractl = grad_tests::bin("gractl");
    let mut process = Vec::with_capacity(process_rounds);
    for i in 0..process_rounds + 10 {
        let t = Instant::now();
        let out = Command::new(&gractl)
            .env("GRAD_SERVER", &grad.url)
            .env("GRAD_TOKEN", &grad.admin_token)
            .args(["execute-code", "-r", "bench", "--code", "1+1"])
            .output()?;
        let took = t.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "gractl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i >= 10 {
            process.push(took);
        }
    }

    // The baseline, in the same run on the same machine.
    let out = Command::new(&python)
        .arg("scripts/bench_jupyter.py")
        .arg(rounds.to_string())
        .arg(starts.min(10).to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "the Jupyter baseline failed (pip install ipykernel jupyter_client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jupyter: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let secs = |key: &str| -> Vec<Duration> {
        jupyter[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_f64())
                    .map(Duration::from_secs_f64)
                    .collect()
            })
            .unwrap_or_default()
    };
    let jupyter_exec = stats(&secs("execute"));
    let jupyter_start = stats(&secs("start"));

    let library = stats(&library);
    let process = stats(&process);
    let create = stats(&create);
    println!("| measurement | n | p50 ms | p99 ms | p50 vs Jupyter execute |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, s: &Stats, base: &Stats| {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2}x |",
            s.n,
            s.p50,
            s.p99,
            s.p50 / base.p50
        );
    };
    row(
        "execute-code `1+1`, gractl client library",
        &library,
        &jupyter_exec,
    );
    row(
        "execute-code `1+1`, whole `gractl` process",
        &process,
        &jupyter_exec,
    );
    row(
        "Jupyter kernel execute `1+1` (jupyter_client, in-library)",
        &jupyter_exec,
        &jupyter_exec,
    );
    println!();
    println!("| start | n | p50 ms | p99 ms | p50 vs Jupyter kernel start |");
    println!("|---|---|---|---|---|");
    println!(
        "| grad runner create → ready | {} | {:.1} | {:.1} | {:.3}x |",
        create.n,
        create.p50,
        create.p99,
        create.p50 / jupyter_start.p50
    );
    println!(
        "| Jupyter kernel start (start_new_kernel) | {} | {:.1} | {:.1} | 1.000x |",
        jupyter_start.n, jupyter_start.p50, jupyter_start.p99
    );
    Ok(())
}
