//! `make bench`, batch jobs: the real grad (SQLite) and a warm
//! `grad-runner agent` on loopback, release build. Measures, for
//! BENCHMARKS.md:
//! 1. submit → running: from the client's SubmitJob call to the moment the
//!    job's command starts (the command records the time itself, on the same
//!    clock), one job at a time; beside it, the same command started
//!    directly with `sh -c` (the floor: what starting a process costs).
//! 2. sustained submissions per second: many SubmitJob calls at once from
//!    several connections (the jobs ask for a label no worker has, so they
//!    stay queued and the worker does not compete for the CPU).
//! 3. log latency: a job prints its clock every 20 ms; the follower (the
//!    client library, and the whole `gractl job logs -f` process) notes the
//!    delay to each line.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use grad_proto::{JobSpec, JobState};
use grad_tests::{
    Grad,
    bench::{env_usize, submit_burst, upload},
    stats::{Stats, of as stats},
};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn since_ns(then: u128) -> Duration {
    Duration::from_nanos(now_ns().saturating_sub(then) as u64)
}

fn spec(name: &str, command: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        command: command.into(),
        ..Default::default()
    }
}

fn row(name: &str, s: &Stats, unit: &str) {
    println!(
        "| {name} | {} | {:.1} | {:.1} | {unit} |",
        s.n, s.p50, s.p99
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let latency_rounds = env_usize("BENCH_JOB_ROUNDS", 100);
    let submissions = env_usize("BENCH_SUBMISSIONS", 2000);
    let connections = env_usize("BENCH_CONNECTIONS", 8);

    let grad = Grad::start();
    let client = grad.admin().await;
    let _worker = grad.start_agent(&grad.admin_token, "bench", &[], &[]);
    let project = tempfile::tempdir()?;
    std::fs::write(
        project.path().join("job.yaml"),
        "name: bench\ncommand: true\n",
    )?;
    let bundle = upload(&client, project.path()).await?;
    let marks = tempfile::tempdir()?;

    // 1. submit → running, against starting the command directly.
    let mut to_running = Vec::new();
    let mut direct = Vec::new();
    for i in 0..latency_rounds + 5 {
        let mark = marks.path().join(format!("m{i}"));
        let command = format!("date +%s%N > {}", mark.display());
        let t0 = now_ns();
        let job = client
            .submit_job(spec("latency", &command), &bundle)
            .await?;
        let done = client.wait_job(&job.id, Duration::from_secs(30)).await?;
        anyhow::ensure!(done.state() == JobState::Succeeded, "job: {}", done.reason);
        let started: u128 = std::fs::read_to_string(&mark)?.trim().parse()?;
        let t1 = now_ns();
        let status = Command::new("sh").arg("-c").arg(&command).status()?;
        anyhow::ensure!(status.success());
        let direct_start: u128 = std::fs::read_to_string(&mark)?.trim().parse()?;
        if i >= 5 {
            to_running.push(Duration::from_nanos(started.saturating_sub(t0) as u64));
            direct.push(Duration::from_nanos(direct_start.saturating_sub(t1) as u64));
        }
    }

    // 2. sustained submissions.
    let mut labels = std::collections::HashMap::new();
    labels.insert("pool".to_owned(), "nobody".to_owned());
    let queued = JobSpec {
        labels,
        ..spec("throughput", "true")
    };
    let per = submissions / connections.max(1);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(grad.admin().await);
    }
    let (submit_latency, elapsed) = submit_burst(clients, &queued, &bundle, per).await?;
    let rate = submit_latency.len() as f64 / elapsed.as_secs_f64();

    // 3. log line → follower.
    let lines = 100;
    let command = format!("for i in $(seq {lines}); do date +%s%N; sleep 0.02; done");
    let job = client.submit_job(spec("logs", &command), &bundle).await?;
    let mut stream = client.stream_logs(&job.id, 0, true).await?;
    let mut library = Vec::new();
    while let Some(chunk) = stream.message().await? {
        for line in chunk.lines {
            if let Ok(printed) = line.text.trim().parse::<u128>() {
                library.push(since_ns(printed));
            }
        }
    }
    let job = client.submit_job(spec("logs", &command), &bundle).await?;
    let mut follow = Command::new(grad_tests::bin("gractl"))
        .env("GRAD_SERVER", &grad.url)
        .env("GRAD_TOKEN", &grad.admin_token)
        .env("GRACTL_CONFIG", grad.data_dir.join("bench-gractl.yaml"))
        .args(["job", "logs", "-f", &job.id])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follow
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let process: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
    let reader = {
        let process = process.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(printed) = line.trim().parse::<u128>() {
                    process
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(since_ns(printed));
                }
            }
        })
    };
    follow.wait()?;
    let _ = reader.join();
    let process = process.lock().unwrap_or_else(|p| p.into_inner()).clone();

    let to_running = stats(&to_running);
    let direct = stats(&direct);
    println!("| jobs | n | p50 ms | p99 ms | note |");
    println!("|---|---|---|---|---|");
    row(
        "submit → command running (warm worker)",
        &to_running,
        &format!("{:.1}x the direct start", to_running.p50 / direct.p50),
    );
    row(
        "the same command started directly (`sh -c`)",
        &direct,
        "floor",
    );
    let submit = stats(&submit_latency);
    row(
        &format!("SubmitJob, {connections} connections at once"),
        &submit,
        &format!("{rate:.0} submissions/s sustained over {elapsed:.1?}"),
    );
    row(
        "log line printed → client library follower",
        &stats(&library),
        "",
    );
    row(
        "log line printed → `gractl job logs -f` stdout",
        &stats(&process),
        "",
    );
    Ok(())
}
