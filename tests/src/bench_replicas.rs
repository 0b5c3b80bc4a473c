//! `make bench`, scale-out: the real grad (release build) on loopback in
//! three set-ups run side by side — one grad on SQLite (the embedded
//! default), one grad on PostgreSQL, three replicas sharing that
//! PostgreSQL — and for BENCHMARKS.md:
//! 1. job submissions per second: many SubmitJob calls at once from
//!    several connections (spread over the replicas where there are
//!    several);
//! 2. claim throughput: six workers (two per replica) claiming and
//!    finishing those jobs as fast as they can, each job once;
//! 3. execute-code latency on a runner through the replica holding its
//!    agent (direct) and through the other one (forwarded), interleaved.
//!
//! PostgreSQL is a private server in a temp dir (initdb + pg_ctl), or
//! `GRAD_TEST_POSTGRES_URL`'s.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use grad_proto::{
    ClaimJobRequest, ExecuteCodeRequest, FinishJobRequest, JobOutcome, JobSpec, Resources,
    RunnerState, WorkerCapabilities, exec_event::Event, worker_agent_client::WorkerAgentClient,
};
use grad_tests::{
    Grad, Postgres,
    bench::{env_usize, submit_burst, upload},
    stats::{Stats, of as stats},
};

fn row(name: &str, s: &Stats, note: &str) {
    println!(
        "| {name} | {} | {:.2} | {:.2} | {note} |",
        s.n, s.p50, s.p99
    );
}

struct Throughput {
    submit: Stats,
    submit_rate: f64,
    claim: Stats,
    claim_rate: f64,
}

/// Submits `jobs` jobs over `connections` connections spread over
/// `grads`, then has six workers (spread the same way) claim and finish
/// them all.
async fn throughput(grads: &[Grad], jobs: usize, connections: usize) -> anyhow::Result<Throughput> {
    let admin = grads[0].admin().await;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("job.yaml"), "name: b\ncommand: true\n")?;
    let bundle = upload(&admin, dir.path()).await?;
    let spec = JobSpec {
        name: "bench".into(),
        command: "true".into(),
        ..Default::default()
    };
    let per = jobs / connections;
    let mut clients = Vec::new();
    for c in 0..connections {
        clients.push(grads[c % grads.len()].admin().await);
    }
    let (submit, took) = submit_burst(clients, &spec, &bundle, per).await?;
    let submit_rate = submit.len() as f64 / took.as_secs_f64();

    let mut claimers = tokio::task::JoinSet::new();
    let mut tokens = Vec::new();
    for w in 0..6 {
        let worker = admin
            .create_worker(&format!("bench-{w}"), HashMap::new(), false)
            .await?;
        tokens.push((grads[w % grads.len()].url.clone(), worker.token));
    }
    let started = Instant::now();
    for (url, token) in tokens {
        claimers.spawn(claim_all(url, token));
    }
    let mut claim = Vec::new();
    while let Some(done) = claimers.join_next().await {
        claim.extend(done??);
    }
    let claim_rate = claim.len() as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        claim.len() == per * connections,
        "claimed {} of {} jobs",
        claim.len(),
        per * connections
    );
    Ok(Throughput {
        submit: stats(&submit),
        submit_rate,
        claim: stats(&claim),
        claim_rate,
    })
}

/// One worker claiming and finishing until the queue stays empty; answers
/// how long each claim + finish took.
async fn claim_all(url: String, token: String) -> anyhow::Result<Vec<Duration>> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = WorkerAgentClient::new(channel);
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let authed = |message| {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", auth.clone());
        request
    };
    let mut took = Vec::new();
    let mut empty = 0;
    while empty < 2 {
        let t = Instant::now();
        let claimed = client
            .claim_job(authed(ClaimJobRequest {
                capabilities: Some(WorkerCapabilities::default()),
                wait_ms: 100,
                ..Default::default()
            }))
            .await?
            .into_inner();
        let Some(job) = claimed.job else {
            empty += 1;
            continue;
        };
        empty = 0;
        let mut finish = tonic::Request::new(FinishJobRequest {
            id: job.id,
            attempt: job.attempt,
            outcome: JobOutcome::Exited as i32,
            ..Default::default()
        });
        finish.metadata_mut().insert("authorization", auth.clone());
        client.finish_job(finish).await?;
        took.push(t.elapsed());
    }
    Ok(took)
}

async fn run_code(client: &gractl::client::Client) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut events = client
        .execute_code(ExecuteCodeRequest {
            runner: "bench".into(),
            code: "pass".into(),
            ..Default::default()
        })
        .await?;
    while let Some(event) = events.message().await? {
        if let Some(Event::Finished(_)) = event.event {
            return Ok(t.elapsed());
        }
    }
    anyhow::bail!("stream ended without finished")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let jobs = env_usize("BENCH_REPLICA_JOBS", 2000);
    let connections = env_usize("BENCH_CONNECTIONS", 8);
    let rounds = env_usize("BENCH_EXEC_ROUNDS", 300);
    let postgres =
        Postgres::start().ok_or_else(|| anyhow::anyhow!("PostgreSQL is needed for this bench"))?;

    let mut results = Vec::new();
    {
        let sqlite = [Grad::start_on(None, &[], &[])];
        results.push((
            "SQLite, 1 grad",
            throughput(&sqlite, jobs, connections).await?,
        ));
    }
    {
        let one = [Grad::start_on(Some(postgres.database()), &[], &[])];
        results.push((
            "PostgreSQL, 1 grad",
            throughput(&one, jobs, connections).await?,
        ));
    }
    let first = Grad::start_on(Some(postgres.database()), &[], &[]);
    let replicas = vec![first.replica(), first.replica()];
    let three: Vec<Grad> = std::iter::once(first).chain(replicas).collect();
    results.push((
        "PostgreSQL, 3 replicas",
        throughput(&three, jobs, connections).await?,
    ));

    // execute-code, direct and forwarded: the runner is created through
    // the first replica and connects to it.
    let direct = three[0].admin().await;
    direct
        .create_runner("bench", Resources::default(), Vec::new())
        .await?;
    let ready = direct
        .wait_runner("bench", &[RunnerState::Ready], Duration::from_secs(60))
        .await?;
    anyhow::ensure!(
        ready.state() == RunnerState::Ready,
        "runner: {}",
        ready.reason
    );
    let forwarded = three[1].admin().await;
    for _ in 0..20 {
        run_code(&direct).await?;
        run_code(&forwarded).await?;
    }
    let (mut through_holder, mut through_other) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        through_holder.push(run_code(&direct).await?);
        through_other.push(run_code(&forwarded).await?);
    }

    let base = &results[0].1;
    println!("| scale-out | n | p50 ms | p99 ms | note |");
    println!("|---|---|---|---|---|");
    for (name, r) in &results {
        row(
            &format!("SubmitJob, {connections} connections — {name}"),
            &r.submit,
            &format!(
                "{:.0} submissions/s ({:.2}x SQLite)",
                r.submit_rate,
                r.submit_rate / base.submit_rate
            ),
        );
    }
    for (name, r) in &results {
        row(
            &format!("claim + finish, 6 workers — {name}"),
            &r.claim,
            &format!(
                "{:.0} jobs claimed/s ({:.2}x SQLite)",
                r.claim_rate,
                r.claim_rate / base.claim_rate
            ),
        );
    }
    let holder = stats(&through_holder);
    let other = stats(&through_other);
    row(
        "execute-code `pass`, through the replica holding the runner",
        &holder,
        "direct",
    );
    row(
        "execute-code `pass`, through another replica (forwarded)",
        &other,
        &format!("{:.2}x direct", other.p50 / holder.p50),
    );
    Ok(())
}
